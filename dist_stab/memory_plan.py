r"""Per-GPU memory plan of a training config: does it fit in 80 GB?

    python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml                 # the file's stated world size
    python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --world-size 32,64,128,256
    python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --deepspeed configs/ds_zero3_7b.json --world-size 64
    python -m dist_stab.memory_plan --config configs/7b_zero3.yaml     # parallel.mode deepspeed: its deepspeed_config
    python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --world-size 1 --set parallel.mode=none   # does not fit

The model is the trainer's (:mod:`dist_stab.train.model`), built on the **meta device** (no
memory, no ``torch.distributed``); every parameter's per-GPU piece is computed from the layout
exactly as :mod:`dist_stab.train.parallelize` places it. Exit status 0 if every plan fits, 1 if not.

A YAML config states the world size it was planned for in a comment line that holds default
arguments of this command (the trainer ignores comments)::

    # memory_plan: --world-size 64

Persistent, per GPU (``n_local`` = elements of a parameter's piece on this GPU)
-------------------------------------------------------------------------------
* **weights**: ``n_local * p`` with ``p`` = 4 (fp32 params: the trainer, bf16 autocast) or 2
  (bf16 params: DeepSpeed ``bf16.enabled``).
* **grads**: ``n_local * p`` (FSDP2 reduce-scatters into sharded grads of the param dtype).
* **optimizer state**: per element, by ``optim.name``:
  AdamW / Adam / SPAM / StableSPAM: ``exp_avg`` + ``exp_avg_sq`` = 2 x 4 B (fp32 state; the
  dist_stab optimizers make state ``zeros_like(param)``); SCALE: a 4 B momentum on the last layer
  (lm_head) only, AdamW (2 x 4 B) on 1-D params, nothing on matrices and the embedding (SCALE's own
  classification, ``SCALE.kind_of``); SGD: 4 B with momentum, else 0. Plus a 4 B fp32 **master**
  copy per element when params are bf16. StableSPAM's per-tensor scalars are ignored (3 per tensor).

``n_local`` by layout (FSDP2 pads dim 0 to a multiple of the shard size, so ``ceil``):

=========  ============================================================  ====================
mode       piece of a [d0, d1] weight                                     shard size S
=========  ============================================================  ====================
none/ddp   whole                                                          1
fsdp       ceil(d0 / S) x d1                                              world
hsdp       ceil(d0 / S) x d1 (replicated over ``dp_replicate`` groups)    world / dp_replicate
tp         TP weights: d0/t x d1 (colwise) or d0 x d1/t (rowwise); others  1
           (embeddings, norms, lm_head) whole
fsdp_tp    the TP piece, then ceil(rows / S)                              world / tp
zero1/2/3  DeepSpeed: optimizer state (+ master) / grads too / params      world
           too, each ceil(numel / world) of a flat partition
=========  ============================================================  ====================

Transient buffers
-----------------
* FSDP2 (fsdp/hsdp/fsdp_tp): the root unit (embeddings, final norm, lm_head: not resharded
  between forward and backward) gathered, plus 2 gathered blocks (current + prefetched) in
  the param dtype, plus the unsharded grads of the root and of one block (reduce-scatter
  input). With ``reshard_after_forward: false`` every block stays gathered.
* DDP: a second copy of the grads (the buckets; ``gradient_as_bucket_view=False``).
* DeepSpeed ZeRO-3: ``min(stage3_max_live_parameters + stage3_prefetch_bucket_size, params) x p``
  gathered params, ``reduce_bucket_size x p x 4.5`` with ``overlap_comm`` (DeepSpeed's docs: "uses
  4.5x the allgather_bucket_size and reduce_bucket_size"), and a fp32 grad buffer of one sub-group
  ``4 x min(sub_group_size, n_local)``. ZeRO-1/2: ``(allgather_bucket_size + reduce_bucket_size) x p``
  (x 4.5 with ``overlap_comm``).
* **Skip-step snapshot**: with ``spikes.skip_mode: restore`` (and a skip test on) the trainer's
  ``dist_stab.SkipStep`` keeps a copy of the local params + optimizer state (weights + optimizer
  state above) unless the optimizer takes ``step(step_factor=...)``.
* **Autocast weight copies**: under bf16 autocast with fp32 params, every ``nn.Linear`` weight is
  cast to bf16 and autograd keeps that copy for the backward matmul: ``2 B x`` (all Linear weights,
  TP piece, *not* FSDP-sharded) for the whole forward/backward. (An FSDP2
  ``MixedPrecisionPolicy(param_dtype=bf16)`` would remove this term.)

Activations (the stated budget)
-------------------------------
``N = micro_batch x seq_len`` tokens per GPU, ``h`` = dim, ``f`` = ffn_dim, ``t`` = TP degree,
``L`` = layers, ``V`` = vocab. Bytes saved for backward per layer, counted tensor by tensor for
this model (RMSNorm in fp32, RoPE, SwiGLU, SDPA flash/memory-efficient: no ``T^2`` term; no
dropout; TP without sequence parallelism, so norms and the Linear inputs are replicated)::

    amp  (fp32 params, bf16 autocast; the trainer on GPU):  A = N (26 h + (8 h + 8 f) / t)
    bf16 (bf16 params; DeepSpeed bf16):                      A = N (16 h + (8 h + 8 f) / t)
    fp32 (no autocast):                                      A = N (24 h + (16 h + 16 f) / t)

(amp: each of the two RMSNorms keeps its fp32 input and normalised output, 2 x 8 h; five bf16
casts of their outputs feed wq/wk/wv/w1/w3, 10 h; SDPA keeps q, k, v and its output, 8 h (the wo
input is a view of it); SwiGLU keeps w1 out, silu out, w3 out and the w2 input, 8 f. RoPE keeps
nothing per token: it multiplies by the constant cos/sin tables.) This is the per-layer form
``s b h k`` of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv 2205.05198, Sec. 4.1: ``s b h (34 + 5 a s / h)`` for GPT with a 4h MLP, fp16
residuals and dropout), redone for this block: ``k = 26 + 8 + 8 f / h`` = 55.5 for LLaMA-7B.
Measured on an H100 (torch 2.11, flash SDPA) with 7B-wide blocks under bf16 autocast, saved
bytes per layer including the bf16 weight copies below: 0.858 GB at N = 2048 and 1.336 GB at
N = 4096, against 0.870 and 1.336 GB from the formula. With activation checkpointing (one
checkpoint per block) a layer keeps only its input, ``N h r`` (``r`` = residual bytes: 4
amp/fp32, 2 bf16), and one layer's ``A`` is live again during its recomputation::

    activations = L A                          (no activation checkpointing)
                = L N h r + A                  (activation checkpointing per block)
    + final norm and lm_head input  N h (2 r + c)     (c = compute bytes: 2, or 4 for fp32)
    + logits and loss               N V 14            (bound at the start of backward: bf16 logits,
                                                       fp32 log-softmax output, its grad and the grad
                                                       of the fp32 logits; 12 in fp32)

Plus a fixed **overhead** of 3 GB (CUDA context, cuBLAS workspace, NCCL buffers). The check
compares the sum with ``--gpu-gb`` (default 80) x 10^9 bytes, i.e. 74.5 GiB: an "80 GB" H100 or
A100 exposes about 79.6 GiB, and the 5 GiB between them is left for allocator fragmentation.

Checked against real training steps on one H100 (torch 2.11, fused AdamW, bf16 autocast, 2
micro-steps of accumulation, 2 steps): LLaMA-1B at micro-batch 4 x 2048 peaked at 50.27 GB
allocated against 50.09 GB planned (the items above without the overhead), a 4-layer 7B-wide
model at 2 x 2048 at 24.83 GB against 24.76 GB. The caching allocator reserved up to 4 GB more
than it allocated (without ``expandable_segments``), which is what the margin above is for.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

GB = 1e9
DEFAULT_GPU_GB = 80.0
OVERHEAD_BYTES = 3 * GB  # CUDA context + cuBLAS workspace + NCCL buffers
LOGIT_BYTES = {"amp": 14, "bf16": 14, "fp32": 12}  # bytes per token per vocab entry at the loss
# per-layer activation coefficients (bytes per token): (replicated x h, TP-split x h, TP-split x f)
ACT_COEF = {"amp": (26, 8, 8), "bf16": (16, 8, 8), "fp32": (24, 16, 16)}
# Mirrors dist_stab.train.parallelize.apply_tp: ColwiseParallel shards weight dim 0, RowwiseParallel dim 1.
TP_PLAN = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
           "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1}
FSDP_MODES = ("fsdp", "hsdp", "fsdp_tp")
ZERO_MODES = ("zero1", "zero2", "zero3")
MODES = ("none", "ddp", "fsdp", "hsdp", "tp", "fsdp_tp") + ZERO_MODES
ADAM_LIKE = ("adamw", "adam", "spam", "stable_spam")
HEADER_RE = re.compile(r"^#\s*memory_plan:\s*(.*)$")


@dataclass
class Layout:
    mode: str
    world_size: int
    dp_replicate: int = 1  # hsdp
    tp: int = 1  # tp / fsdp_tp
    reshard_after_forward: bool = True
    ds: Dict = field(default_factory=dict)  # DeepSpeed config (zero modes)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        w = self.world_size
        if w < 1:
            raise ValueError(f"world size must be >= 1, got {w}")
        if self.mode == "none" and w != 1:
            raise ValueError("mode none runs one process; use ddp/fsdp for more")
        if self.mode == "hsdp" and (self.dp_replicate < 1 or w % self.dp_replicate):
            raise ValueError(f"parallel.dp_replicate={self.dp_replicate} must divide the world size {w}")
        if self.mode in ("tp", "fsdp_tp") and (self.tp < 1 or w % self.tp):
            raise ValueError(f"parallel.tp={self.tp} must divide the world size {w}")
        if self.mode == "tp" and self.tp != w:
            raise ValueError(f"mode tp needs parallel.tp == world size ({w})")

    @property
    def tp_size(self) -> int:
        return self.tp if self.mode in ("tp", "fsdp_tp") else 1

    @property
    def shard_size(self) -> int:
        """Ranks one parameter (or its ZeRO partition) is split over."""
        return {"fsdp": self.world_size, "hsdp": self.world_size // max(1, self.dp_replicate),
                "fsdp_tp": self.world_size // self.tp_size}.get(self.mode, self.world_size if self.mode in ZERO_MODES
                                                                else 1)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size


@dataclass
class Plan:
    """Bytes per GPU, by item, for one config and layout."""

    name: str
    layout: Layout
    num_params: int
    precision: str  # amp | bf16 | fp32
    activation_checkpointing: bool
    micro_batch: int
    seq_len: int
    items: Dict[str, float]  # label -> bytes
    gpu_bytes: float
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    def table(self) -> str:
        L = self.layout
        lines = [f"{self.name}: {self.num_params / 1e9:.2f}B params | mode {L.mode} | world {L.world_size} "
                 f"(dp {L.dp_size}, tp {L.tp_size}, shard {L.shard_size}"
                 f"{', replicas ' + str(L.dp_replicate) if L.mode == 'hsdp' else ''}) | {self.precision} | "
                 f"micro-batch {self.micro_batch} x seq {self.seq_len} | activation checkpointing "
                 f"{'on' if self.activation_checkpointing else 'off'}",
                 f"  {'item':<56s} {'GB/GPU':>9s}"]
        for k, v in self.items.items():
            lines.append(f"  {k:<56s} {v / GB:9.2f}")
        lines.append(f"  {'total':<56s} {self.total / GB:9.2f}")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'GPU memory':<56s} {self.gpu_bytes / GB:9.2f}   -> {verdict} "
                     f"({100 * self.total / self.gpu_bytes:.0f}%)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- inputs
def header_args(path: str) -> List[str]:
    """Arguments from ``# memory_plan: ...`` comment lines of a YAML config (none for JSON)."""
    out: List[str] = []
    with open(path) as f:
        for line in f:
            m = HEADER_RE.match(line.strip())
            if m:
                out += shlex.split(m.group(1))
    return out


def load_ds_config(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def build_meta_model(cfg):
    """The trainer's model for ``cfg`` (a dist_stab.train.config.Config) on the meta device."""
    from dist_stab.train.model import build_model, model_args

    m = cfg.model
    args = model_args(m.size, cfg.data.vocab_size, cfg.data.seq_len, dim=m.dim, n_layers=m.n_layers,
                      n_heads=m.n_heads, ffn_dim=m.ffn_dim, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
                      init_std=m.init_std)
    return build_model(args, device="meta"), args


def optimizer_kinds(model, name: str, kwargs: Optional[Dict] = None) -> Dict[str, str]:
    """FQN -> state kind: ``adam`` (2 fp32 moments), ``momentum`` (1), ``none``."""
    named = list(model.named_parameters())
    if name in ADAM_LIKE:
        return {n: "adam" for n, _ in named}
    if name == "sgd":
        mom = float((kwargs or {}).get("momentum", 0.0))
        return {n: "momentum" if mom > 0 else "none" for n, _ in named}
    if name == "scale":
        try:  # SCALE's own classification (works on meta tensors)
            from dist_stab.optim import SCALE

            opt = SCALE(model, lr=1e-3, **{k: v for k, v in (kwargs or {}).items()
                                           if k in ("last_layer", "embeddings", "tied_embeddings")})
            kind = {id(p): opt.kind_of(p) for _, p in named}
        except Exception:  # noqa: BLE001 - fall back to the documented rule
            from dist_stab.optim import find_last_layer

            last = find_last_layer(model)
            last_id = id(last.weight) if last is not None else None
            kind = {id(p): ("last" if id(p) == last_id else "adam" if p.dim() <= 1 else "matrix") for _, p in named}
        return {n: {"last": "momentum", "adam": "adam"}.get(kind[id(p)], "none") for n, p in named}
    raise ValueError(f"unknown optimizer {name!r} for the memory plan; known: {ADAM_LIKE + ('sgd', 'scale')}")


def skip_snapshot(cfg) -> bool:
    """Does the trainer's skip-step policy keep a device copy of params + optimizer state?

    ``dist_stab.SkipStep`` in ``restore`` mode snapshots them before each step unless the optimizer
    takes ``step(step_factor=...)`` (``supports_step_factor``) or decides on the host because its step
    counters live there (``host_step_counters``: SCALE, StableSPAM, SPAM); no skip test enabled: no snapshot.
    """
    sp = getattr(cfg, "spikes", None)
    if sp is None or getattr(sp, "skip_mode", "host_sync") != "restore":
        return False
    if not (sp.skip_nonfinite or sp.skip_loss_z is not None or sp.skip_grad_z is not None):
        return False
    try:
        from dist_stab.train.registry import OPTIMIZERS

        cls = OPTIMIZERS[cfg.optim.name][0]()
    except Exception:  # noqa: BLE001 - unknown here: assume the copy is kept
        return True
    return not (getattr(cls, "supports_step_factor", False) or getattr(cls, "host_step_counters", False))


def _tp_dim(fqn: str) -> Optional[int]:
    parts = fqn.split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[-1] == "weight":
        return TP_PLAN.get(".".join(parts[2:-1]))
    return None


def _local_numel(shape: Sequence[int], tp_dim: Optional[int], tp: int, fsdp_shard: int) -> int:
    shape = list(shape)
    if tp_dim is not None and tp > 1:
        if shape[tp_dim] % tp:
            raise ValueError(f"TP degree {tp} does not divide dim {tp_dim} of shape {tuple(shape)}")
        shape[tp_dim] //= tp
    if fsdp_shard > 1:
        shape[0] = math.ceil(shape[0] / fsdp_shard)
    return math.prod(shape)


# ----------------------------------------------------------------------------- the plan
def activation_bytes(args, precision: str, micro_batch: int, seq_len: int, tp: int = 1,
                     activation_checkpointing: bool = False) -> Dict[str, float]:
    """The stated activation budget (module docstring) for one GPU: {label: bytes}."""
    a_rep, a_h, a_f = ACT_COEF[precision]
    N, h, f, L, V = micro_batch * seq_len, args.dim, args.ffn_dim, args.n_layers, args.vocab_size
    r = 2 if precision == "bf16" else 4
    c = 4 if precision == "fp32" else 2
    per_layer = N * (a_rep * h + (a_h * h + a_f * f) / tp)
    if activation_checkpointing:
        layers = L * N * h * r + per_layer
        label = f"activations: {L} x N h {r} + 1 layer (checkpointing)"
    else:
        layers = L * per_layer
        label = f"activations: {L} layers x {per_layer / GB:.2f} GB"
    return {label: layers, "final norm + logits + loss": N * h * (2 * r + c) + N * V * LOGIT_BYTES[precision]}


def plan(cfg, world_size: int, *, deepspeed: Optional[Dict] = None, activation_checkpointing: Optional[bool] = None,
         micro_batch: Optional[int] = None, gpu_gb: float = DEFAULT_GPU_GB, name: Optional[str] = None) -> Plan:
    """Per-GPU memory of ``cfg`` (trainer Config) on ``world_size`` GPUs.

    ``deepspeed``: a DeepSpeed config dict; then the layout is ZeRO-``stage`` over the world, params
    are bf16 if ``bf16.enabled`` and the micro-batch is ``train_micro_batch_size_per_gpu``.
    ``activation_checkpointing``: None reads ``cfg.train.activation_checkpointing`` if the trainer has
    that key, else False (the trainer does not checkpoint activations).
    """
    model, args = build_meta_model(cfg)
    notes: List[str] = []
    p = cfg.parallel
    if deepspeed is None and p.mode == "deepspeed":  # the trainer's DeepSpeed config (its JSON, or built: bf16)
        from dist_stab.train.parallelize import deepspeed_config

        deepspeed = deepspeed_config(cfg, world_size, bf16=cfg.train.autocast != "none")
    if deepspeed is not None:
        zero = deepspeed.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0))
        if stage not in (1, 2, 3):
            raise ValueError(f"memory plan supports ZeRO stages 1-3, got {stage}")
        layout = Layout(f"zero{stage}", world_size, ds=deepspeed)
        bf16 = bool((deepspeed.get("bf16") or {}).get("enabled", False))
        fp16 = bool((deepspeed.get("fp16") or {}).get("enabled", False))
        precision = "bf16" if (bf16 or fp16) else "fp32"
        mb = micro_batch or int(deepspeed.get("train_micro_batch_size_per_gpu") or cfg.train.micro_batch_size)
    else:
        layout = Layout(p.mode, world_size, p.dp_replicate, p.tp, p.reshard_after_forward)
        ac_mode = cfg.train.autocast
        precision = "fp32" if ac_mode == "none" else "amp"  # auto: bf16 autocast on CUDA
        mb = micro_batch or cfg.train.micro_batch_size
    if activation_checkpointing is None:
        activation_checkpointing = bool(getattr(cfg.train, "activation_checkpointing", False))
    pbytes = 2 if precision == "bf16" else 4
    master = 4 if pbytes == 2 else 0
    t, S, mode = layout.tp_size, layout.shard_size, layout.mode
    kinds = optimizer_kinds(model, cfg.optim.name, cfg.optim.kwargs)
    state_per_elem = {"adam": 8, "momentum": 4, "none": 0}

    w = g = o = 0.0
    root_full = block_full = 0  # unsharded elements (TP piece): root unit, largest block
    block_full_by: Dict[str, int] = {}
    linear_full = 0  # Linear weights, TP piece (autocast copies)
    for fqn, prm in model.named_parameters():
        td = _tp_dim(fqn)
        tp_piece = _local_numel(prm.shape, td, t, 1)
        if mode in FSDP_MODES:
            n_param = n_grad = n_opt = _local_numel(prm.shape, td, t, S)
        elif mode in ZERO_MODES:
            part = math.ceil(prm.numel() / S)
            n_opt = part
            n_grad = part if mode in ("zero2", "zero3") else prm.numel()
            n_param = part if mode == "zero3" else prm.numel()
        else:
            n_param = n_grad = n_opt = tp_piece
        w += n_param * pbytes
        g += n_grad * pbytes
        o += n_opt * (state_per_elem[kinds[fqn]] + master)
        parts = fqn.split(".")
        if parts[0] == "layers":
            block_full_by[parts[1]] = block_full_by.get(parts[1], 0) + tp_piece
        else:
            root_full += tp_piece
        if prm.dim() == 2 and fqn != "tok_embeddings.weight":
            linear_full += tp_piece
    block_full = max(block_full_by.values(), default=0)
    n_params = sum(prm.numel() for prm in model.parameters())

    items: Dict[str, float] = {
        f"weights ({'bf16' if pbytes == 2 else 'fp32'})": w,
        f"grads ({'bf16' if pbytes == 2 else 'fp32'})": g,
        f"optimizer state ({cfg.optim.name}{', + fp32 master' if master else ''})": o,
    }
    if mode in FSDP_MODES:
        gathered = (len(block_full_by) if not layout.reshard_after_forward else 2) * block_full
        items["FSDP2 gathered params + unsharded grads"] = ((root_full + gathered) * pbytes
                                                           + (root_full + block_full) * pbytes)
    elif mode == "ddp":
        items["DDP gradient buckets"] = g
    elif mode == "zero3":
        z = layout.ds.get("zero_optimization", {})
        live = min(float(z.get("stage3_max_live_parameters", 1e9)) + float(z.get("stage3_prefetch_bucket_size", 5e7)),
                   n_params)
        rb = float(z.get("reduce_bucket_size", 5e8)) * pbytes * (4.5 if z.get("overlap_comm", True) else 1.0)
        sub = 4 * min(float(z.get("sub_group_size", 1e9)), math.ceil(n_params / S))
        items["ZeRO-3 live params + reduce buckets + fp32 sub-group grads"] = live * pbytes + rb + sub
    elif mode in ("zero1", "zero2"):
        z = layout.ds.get("zero_optimization", {})
        k = 4.5 if z.get("overlap_comm", False) else 1.0
        items[f"ZeRO-{mode[-1]} buckets"] = k * pbytes * (float(z.get("allgather_bucket_size", 5e8))
                                                         + float(z.get("reduce_bucket_size", 5e8)))
    if skip_snapshot(cfg) and mode not in ZERO_MODES:
        items["skip-step snapshot (spikes.skip_mode: restore)"] = w + o
    if precision == "amp":
        items["bf16 autocast copies of Linear weights"] = 2 * linear_full
    items.update(activation_bytes(args, precision, mb, cfg.data.seq_len, t, activation_checkpointing))
    items["overhead (CUDA context, cuBLAS, NCCL)"] = OVERHEAD_BYTES
    if mode in ("none", "ddp"):
        notes.append("no parameter sharding: weights, grads and optimizer state are whole on every GPU")
    elif mode == "tp":
        notes.append("TP only: embeddings, norms and lm_head (and their state) are whole on every GPU")
    return Plan(name or (cfg.config_path or "config"), layout, n_params, precision, activation_checkpointing, mb,
                cfg.data.seq_len, items, gpu_gb * GB, notes)


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dist_stab.memory_plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="trainer YAML (configs/*.yaml)")
    ap.add_argument("--world-size", default=None,
                    help="GPUs, or a comma list (32,64,128,256); default: the config's '# memory_plan:' line")
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON: plan ZeRO (stage, bf16, micro-batch) from it")
    ap.add_argument("--activation-checkpointing", choices=("auto", "on", "off"), default="auto",
                    help="auto: the config's train.activation_checkpointing if the trainer has it, else off")
    ap.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch_size")
    ap.add_argument("--gpu-gb", type=float, default=DEFAULT_GPU_GB, help="GPU memory in 10^9 bytes (default 80)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                    help="config override as for the trainer, e.g. --set parallel.mode=none")
    return ap


def plans_from_args(argv: Optional[Sequence[str]] = None) -> List[Plan]:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = _parser().parse_known_args(argv)
    args = _parser().parse_args(header_args(pre.config) + argv)  # the command line wins over the header
    from dist_stab.train.config import load_config

    cfg = load_config(args.config, [o for grp in args.overrides for o in grp])
    if args.world_size is None:
        raise SystemExit(f"{args.config}: no '# memory_plan: --world-size N' line; pass --world-size")
    ds = load_ds_config(args.deepspeed) if args.deepspeed else None
    ac = {"auto": None, "on": True, "off": False}[args.activation_checkpointing]
    name = args.config + (f" + {args.deepspeed}" if args.deepspeed else "")
    return [plan(cfg, int(ws), deepspeed=ds, activation_checkpointing=ac, micro_batch=args.micro_batch,
                 gpu_gb=args.gpu_gb, name=name) for ws in str(args.world_size).split(",")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    plans = plans_from_args(argv)
    print("\n\n".join(pl.table() for pl in plans))
    return 0 if all(pl.fits for pl in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
