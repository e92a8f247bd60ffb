"""Apply parallelism to the model, chosen by ``cfg.parallel.mode`` (the model only declares layers).

=========  ===============================================================  ====================
mode       what is applied                                                  mesh dims
=========  ===============================================================  ====================
none       nothing (one process)                                            -
ddp        ``DistributedDataParallel``                                      -
fsdp       FSDP2 ``fully_shard`` per block, then the root                   (dp_shard,)
hsdp       FSDP2 on a 2-D mesh: replicate x shard                           (dp_replicate, dp_shard)
tp         TP: wq/wk/wv, w1/w3 ``ColwiseParallel``; wo, w2 ``RowwiseParallel``  (tp,)
fsdp_tp    TP as above on ``tp``, then FSDP2 on ``dp_shard``                  (dp_shard, tp)
deepspeed  nothing here: the trainer wraps the model in a DeepSpeed ZeRO       -
           engine (``dist_stab.deepspeed.initialize``) with its optimizer
=========  ===============================================================  ====================

Under TP the embeddings, norms and lm_head stay plain replicated tensors: a model that mixes
DTensors and plain tensors, which dist_stab's transforms handle (torch's ``clip_grad_norm_``
does not, ``cpu-stack.md`` §1b).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

MODES = ("none", "ddp", "fsdp", "hsdp", "tp", "fsdp_tp", "deepspeed")


@dataclass
class Parallel:
    mode: str
    world_size: int
    rank: int
    dp_size: int  # data-parallel ranks (different data)
    dp_rank: int
    mesh: Optional[object] = None  # DeviceMesh, where the mode has one
    wrapper: Optional[nn.Module] = None  # DDP: the wrapper to call (parameters stay the model's)

    def no_sync(self, model: nn.Module, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro step (DDP)."""
        if self.mode == "ddp" and not last_micro:
            return model.no_sync()
        return nullcontext()


def _fsdp_api():
    try:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy  # torch >= 2.6
    except ImportError:  # pragma: no cover
        from torch.distributed._composable.fsdp import fully_shard, MixedPrecisionPolicy
    return fully_shard, MixedPrecisionPolicy


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool = True) -> None:
    fully_shard, _ = _fsdp_api()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's params are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n_heads = model.args.n_heads
    if n_heads % tp_mesh.size() or model.args.ffn_dim % tp_mesh.size():
        raise ValueError(f"tp={tp_mesh.size()} must divide n_heads={n_heads} and ffn_dim={model.args.ffn_dim}")
    plan = {
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)


def parallelize(model: nn.Module, cfg, device: torch.device) -> Parallel:
    """Apply ``cfg`` (a ParallelConfig) to ``model`` in place; return who holds which data."""
    mode = cfg.mode
    if mode not in MODES:
        raise ValueError(f"parallel.mode must be one of {MODES}, got {mode!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if mode not in ("none",):
            raise RuntimeError(f"parallel.mode={mode!r} needs torch.distributed (run under torchrun)")
        return Parallel("none", 1, 0, 1, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    dev = device.type
    if mode == "none":
        if world > 1:
            raise ValueError("parallel.mode=none with more than one process; use ddp or fsdp")
        return Parallel("none", 1, 0, 1, 0)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if dev == "cuda" else None
        return Parallel("ddp", world, rank, world, rank, wrapper=DDP(model, device_ids=ids))
    if mode == "deepspeed":  # ZeRO data parallel over the world; the engine is built with the optimizer
        return Parallel("deepspeed", world, rank, world, rank)
    if mode == "fsdp":
        mesh = init_device_mesh(dev, (world,), mesh_dim_names=("dp_shard",))
        apply_fsdp(model, mesh, cfg.reshard_after_forward)
        return Parallel("fsdp", world, rank, world, rank, mesh)
    if mode == "hsdp":
        r = cfg.dp_replicate
        if r < 1 or world % r:
            raise ValueError(f"parallel.dp_replicate={r} must divide the world size {world}")
        mesh = init_device_mesh(dev, (r, world // r), mesh_dim_names=("dp_replicate", "dp_shard"))
        apply_fsdp(model, mesh, cfg.reshard_after_forward)
        return Parallel("hsdp", world, rank, world, rank, mesh)
    tp = cfg.tp
    if tp < 1 or world % tp:
        raise ValueError(f"parallel.tp={tp} must divide the world size {world}")
    if mode == "tp":
        if tp != world:
            raise ValueError(f"parallel.mode=tp needs parallel.tp == world size ({world}); use fsdp_tp to add DP")
        mesh = init_device_mesh(dev, (tp,), mesh_dim_names=("tp",))
        apply_tp(model, mesh)
        return Parallel("tp", world, rank, 1, 0, mesh)
    # fsdp_tp
    dp = world // tp
    mesh = init_device_mesh(dev, (dp, tp), mesh_dim_names=("dp_shard", "tp"))
    apply_tp(model, mesh["tp"])
    apply_fsdp(model, mesh["dp_shard"], cfg.reshard_after_forward)
    return Parallel("fsdp_tp", world, rank, dp, mesh["dp_shard"].get_local_rank(), mesh)


def deepspeed_config(cfg, dp_size: int, bf16: bool) -> dict:
    """The DeepSpeed config of ``parallel.mode: deepspeed`` for ``cfg`` (a trainer Config) on ``dp_size`` ranks.

    ``parallel.deepspeed_config`` null: built from the trainer config (ZeRO stage ``parallel.zero_stage``,
    micro batch and accumulation from ``train.*``, DeepSpeed clipping off: dist_stab's transforms clip,
    ``bf16`` as given: the trainer passes "on CUDA"). A JSON path (relative paths also from the repo root):
    its batch keys must agree with ``train.*``, else ``ValueError``.
    """
    tb, p = cfg.train, cfg.parallel
    if tb.global_batch_size % (tb.micro_batch_size * dp_size):
        raise ValueError(f"train.global_batch_size={tb.global_batch_size} is not a multiple of "
                         f"micro_batch_size x dp ranks = {tb.micro_batch_size} x {dp_size}")
    accum = tb.global_batch_size // (tb.micro_batch_size * dp_size)
    if p.deepspeed_config is None:
        if p.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 1, 2 or 3, got {p.zero_stage}")
        return {"train_micro_batch_size_per_gpu": tb.micro_batch_size, "gradient_accumulation_steps": accum,
                "zero_optimization": {"stage": p.zero_stage}, "gradient_clipping": 0.0, "bf16": {"enabled": bf16},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    path = Path(p.deepspeed_config)
    repo_path = Path(__file__).resolve().parents[2] / path
    if not path.exists() and not path.is_absolute() and repo_path.exists():
        path = repo_path
    ds = json.loads(path.read_text())
    want = {"train_micro_batch_size_per_gpu": tb.micro_batch_size, "gradient_accumulation_steps": accum,
            "train_batch_size": tb.global_batch_size}
    bad = [f"{k}={ds[k]} (trainer: {v})" for k, v in want.items()
           if ds.get(k) not in (None, "auto") and int(ds[k]) != v]
    if bad:
        raise ValueError(f"{p.deepspeed_config} disagrees with the trainer config on {dp_size} data-parallel ranks: "
                         f"{', '.join(bad)}. Make train.micro_batch_size and train.global_batch_size (= micro x "
                         f"accumulation x ranks) match the JSON, or set parallel.deepspeed_config=null.")
    return ds
