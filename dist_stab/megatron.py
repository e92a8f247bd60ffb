"""Plug dist_stab into a Megatron-style training loop (megatron-core 0.16.1; 0.17+ guarded).

Two entry points, both returning a ``MegatronOptimizer`` (``step() -> (success, grad_norm,
num_zeros)``, ``zero_grad``, ``state_dict`` ..., so ``megatron.training``'s ``train_step`` and
hand-written loops call it unchanged):

* :func:`get_stabilized_optimizer` / :class:`StabilizedMegatronOptimizer`: Megatron's own
  optimizer (``get_megatron_optimizer``: Adam/SGD, fp32 or bf16/fp16 main params, dense +
  expert ``ChainedOptimizer``) whose **global clip is replaced** by AdaGC, GradientStabilizer,
  ZClip or GlobalClip. ``step()`` runs ``prepare_grads()`` (main grads, unscale, found-inf),
  then the transform(s) on the main grads, then ``step_with_ready_grads()``; Megatron's
  ``config.clip_grad`` is not applied (it is the default ``max_norm`` of GlobalClip / the AdaGC
  warm-up).
* :func:`get_dist_stab_optimizer`: a dist_stab optimizer (``SCALE``, ``StableSPAM``, ``SPAM``)
  over the TP-local params, wrapped in Megatron's ``FP32Optimizer`` (fp32 params).

Usage (a Megatron-style loop)::

    import dist_stab.megatron as dsm
    opt = dsm.get_stabilized_optimizer(OptimizerConfig(optimizer="adam", lr=3e-4, clip_grad=1.0),
                                       [model], method="adagc")
    for batch in data:
        opt.zero_grad(); model.zero_grad_buffer()          # (Megatron DDP)
        loss = forward_backward(...)                       # grads in main_grad / .grad
        finalize_model_grads([model])                      # (DDP / PP / SP grad all-reduces)
        ok, grad_norm, _ = opt.step()

Parallelism: parameters are described by :mod:`dist_stab.backends.megatron` (TP attributes,
``shared`` tied copies not counted). Per-tensor methods complete their norms with one SUM per
TP group and nothing across pipeline stages or DP replicas; global-norm methods (GlobalClip,
AdaGC warm-up) add one scalar SUM over the pipeline group (``global_group="auto"``).
Megatron's ``DistributedOptimizer`` (``use_distributed_optimizer=True``) steps 1-D fragments
of the TP-local params (each DP rank owns a contiguous slice of every grad bucket, cutting
across params). Each model param is then described as a flat piece of its TP-local tensor
(``global_shape`` = the TP-local shape, ``flat_start`` = this rank's range; ranks owning none
of it contribute an empty piece) with a flat axis over the distributed optimizer's DP group
and, for TP-split params, a flat axis over the TP group: whole-tensor statistics (AdaGC,
GradientStabilizer, ZClip, GlobalClip) are exact, with one SUM over DP and one over TP per
step. Per-row statistics (SCALE) on these fragments are not supported (a TP-split tensor's
rows would be summed across TP ranks): :func:`get_dist_stab_optimizer` refuses it.
Not supported: expert parallelism > 1 for *global* norms (expert tensors would need a sum over
EP too); the precision-aware optimizer (``decoupled_grad``) with the distributed optimizer.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import comm
from .backends import megatron as _mb
from .backends.megatron import MegatronDescriber, group_ref, pipeline_group_ref
from .spec import GroupRef, ShardAxis, ShardedParam, ShardSpec
from .transforms import AdaGC, GlobalClip, GradientStabilizer, ZClip

try:  # megatron-core is optional: the module imports without it, the classes need it
    from megatron.core.optimizer.optimizer import MegatronOptimizer as _MegatronOptimizer
    HAVE_MEGATRON = True
except ImportError:  # pragma: no cover - exercised only without megatron-core
    _MegatronOptimizer = object
    HAVE_MEGATRON = False

METHODS = {"adagc": AdaGC, "gradient_stabilizer": GradientStabilizer, "global_clip": GlobalClip, "zclip": ZClip}
_GLOBAL_METHODS = (AdaGC, GlobalClip, ZClip)


def _require_megatron():
    if not HAVE_MEGATRON:
        raise ImportError("dist_stab.megatron needs megatron-core (pip install megatron-core)")


def _strip(name: str) -> str:
    while name.startswith("module."):  # Megatron DDP / Float16Module wrappers
        name = name[len("module."):]
    return name


def param_names(model_chunks) -> Dict[int, str]:
    """{id(param): fqn}; with several model chunks (virtual PP) names get a ``chunk{i}.`` prefix."""
    chunks = list(model_chunks or [])
    names: Dict[int, str] = {}
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for n, p in chunk.named_parameters():
            names.setdefault(id(p), prefix + _strip(n))
    return names


def _children(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def named_main_params(optimizer, model_chunks=None) -> List[Tuple[str, torch.Tensor]]:
    """``(fqn, main param)`` for every parameter a (Chained) MegatronOptimizer steps.

    Float16 wrappers step fp32 copies (``main_param``) that carry the TP attributes
    (``copy_tensor_model_parallel_attributes``) and ``shared``; they are named after their
    model parameter, so saved state is keyed by model FQN on every precision.
    """
    if model_chunks is None:
        model_chunks = getattr(optimizer, "model_chunks", None)
        if not model_chunks:
            model_chunks = [c for ch in _children(optimizer) for c in (getattr(ch, "model_chunks", None) or [])]
    names = param_names(model_chunks)
    out: List[Tuple[str, torch.Tensor]] = []
    seen = set()

    def add(main, model):
        if id(main) in seen:
            return
        seen.add(id(main))
        out.append((names.get(id(model), f"param@{len(out)}"), main))

    for child in _children(optimizer):
        if getattr(child, "is_stub_optimizer", False):
            continue
        if _is_dist_opt(child):
            raise NotImplementedError("DistributedOptimizer fragments are described by megatron_shards()")
        if hasattr(child, "fp32_from_float16_groups"):
            for model_g, main_g in zip(child.float16_groups, child.fp32_from_float16_groups):
                for model_p, main_p in zip(model_g, main_g):
                    add(main_p, model_p)
            for g in child.fp32_from_fp32_groups:
                for p in g:
                    add(p, p)
        else:
            for g in child.optimizer.param_groups:
                for p in g["params"]:
                    add(p, p)
    return out


def _is_dist_opt(child) -> bool:
    return hasattr(child, "gbuf_ranges") and hasattr(child, "model_param_gbuf_map")


def megatron_shards(optimizer, model_chunks=None, pg_collection=None, grad_attr: str = "grad") -> List[ShardedParam]:
    """Describe the main params of a MegatronOptimizer (TP axes, ``shared`` not counted);
    for a ``DistributedOptimizer`` child, the 1-D fragments of every param (see module doc)."""
    d = MegatronDescriber(pg_collection=pg_collection, grad_attr=grad_attr, only_marked=False)
    children = [c for c in _children(optimizer) if not getattr(c, "is_stub_optimizer", False)]
    if not any(_is_dist_opt(c) for c in children):
        return [d(n, p) for n, p in named_main_params(optimizer, model_chunks)]
    if model_chunks is None:
        model_chunks = getattr(optimizer, "model_chunks", None) or [
            m for c in children for m in (getattr(c, "model_chunks", None) or [])]
    names = param_names(model_chunks)
    out: List[ShardedParam] = []
    for child in children:
        if _is_dist_opt(child):
            out.extend(_dist_opt_shards(child, names, d))
        else:
            sub = named_main_params(child, model_chunks)
            out.extend(d(n, p) for n, p in sub)
    return out


def _dist_opt_shards(child, names: Dict[int, str], describer: MegatronDescriber) -> List[ShardedParam]:
    """One flat ShardedParam per model param in this DistributedOptimizer's grad buffers (every DP
    rank lists all of them, in buffer order, so the DP group packs identical slots)."""
    if getattr(child.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False) or getattr(
            child.config, "use_precision_aware_optimizer", False):
        raise NotImplementedError("the precision-aware optimizer keeps grads in decoupled_grad: not supported")
    main_of: Dict[int, torch.Tensor] = {}
    for model_gs, main_gs in ((child.model_float16_groups, child.shard_fp32_from_float16_groups),
                              (child.model_fp32_groups, child.shard_fp32_groups)):
        for mg, sg in zip(model_gs, main_gs):
            for model_p, main_p in zip(mg, sg):
                main_of[id(model_p)] = main_p
    dp_ref = group_ref("dopt", child.data_parallel_group)
    out: List[ShardedParam] = []
    for buf in child.buffers:
        for p, (start, end, _bucket) in sorted(buf.param_index_map.items(), key=lambda kv: kv[1][0]):
            name = names.get(id(p), f"param@{len(out)}")
            tp_spec = describer(name, p).spec  # the TP axis (if any) of the model param
            axes = [ShardAxis(None, dp_ref)] if dp_ref is not None else []
            axes += [ShardAxis(None, a.group) for a in tp_spec.axes]
            main = main_of.get(id(p))
            if main is not None:
                rng = child._get_model_param_range_map(p)["param"]
                flat_start, n = int(rng.start), int(rng.size)
            else:
                flat_start, n = 0, 0
            spec = ShardSpec(fqn=name, global_shape=tuple(p.shape), local_shape=(n,), flat_start=flat_start,
                             axes=tuple(sorted(axes, key=lambda a: a.group.name)), counted=tp_spec.counted)
            out.append(_fragment(spec, p, main))
    return out


def _fragment(spec: ShardSpec, model_p: torch.Tensor, main: Optional[torch.Tensor]) -> ShardedParam:
    if main is not None:
        return ShardedParam(spec, main, local_grad=lambda: main.grad, local_param=lambda: main.detach())
    empty = torch.empty(0, dtype=torch.float32, device=model_p.device)
    # Owning none of it: an empty piece with a grad whenever the model param has one, so every
    # DP rank packs the same slots.
    return ShardedParam(spec, model_p,
                        local_grad=lambda: empty if (model_p.grad is not None or
                                                     getattr(model_p, "main_grad", None) is not None) else None,
                        local_param=lambda: empty)


def build_transform(method, shards, global_group=None, **kwargs):
    """A transform from a name in :data:`METHODS`, a transform class, or ``fn(shards, global_group)``."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        method = METHODS[method]
    if isinstance(method, type):
        if issubclass(method, _GLOBAL_METHODS):
            kwargs.setdefault("global_group", global_group)
        return method(shards, **kwargs)
    if callable(method):
        return method(shards, global_group)
    raise TypeError(f"method must be a name, a transform class or a callable, got {method!r}")


class StabilizedMegatronOptimizer(_MegatronOptimizer):
    """A ``MegatronOptimizer`` that runs dist_stab transforms instead of Megatron's global clip.

    Args:
        optimizer: the MegatronOptimizer to wrap (from ``get_megatron_optimizer``; FP32,
            Float16 or Chained of those).
        method: ``"adagc"``, ``"gradient_stabilizer"``, ``"zclip"``, ``"global_clip"``, a
            transform class, a callable ``fn(shards, global_group) -> transform``, or a list of
            these (run in order). Default AdaGC with ``max_norm=config.clip_grad``.
        method_kwargs: keyword arguments of the transform (one dict, or one per method).
        model_chunks: the model chunks (for parameter names); default the optimizer's.
        global_group: process group / ``GroupRef`` spanning pipeline stages for global norms;
            ``"auto"``: megatron's pipeline group (None when PP = 1).
        grad_norm: what ``step()`` returns as ``grad_norm``: ``"stage"`` (the first transform's
            pre-transform norm: global for GlobalClip/AdaGC warm-up, this stage's otherwise; no
            extra collective), ``"global"`` (one more scalar SUM over the pipeline group when it
            is not global already) or ``"none"``.
        sync: return ``grad_norm`` as a Python float (Megatron's convention; one host sync)
            rather than a device tensor.
    """

    def __init__(self, optimizer, method="adagc", method_kwargs=None, model_chunks=None, global_group="auto",
                 pg_collection=None, grad_norm: str = "stage", sync: bool = True):
        _require_megatron()
        if grad_norm not in ("stage", "global", "none"):
            raise ValueError(f"grad_norm must be 'stage', 'global' or 'none', got {grad_norm!r}")
        # Not calling MegatronOptimizer.__init__: everything is delegated to the wrapped optimizer.
        self.inner = optimizer
        self.config = optimizer.config
        self.is_stub_optimizer = getattr(optimizer, "is_stub_optimizer", False)
        self.model_chunks = model_chunks if model_chunks is not None else getattr(optimizer, "model_chunks", None)
        if global_group == "auto":
            global_group = pipeline_group_ref(pg_collection)
        elif global_group is not None and not isinstance(global_group, GroupRef):
            global_group = group_ref("pp", global_group) or GroupRef("pp[self]", global_group, 1)
        self.global_group = global_group
        self.shards = megatron_shards(optimizer, self.model_chunks, pg_collection=pg_collection)
        methods = method if isinstance(method, (list, tuple)) else [method]
        kws = method_kwargs if isinstance(method_kwargs, (list, tuple)) else [method_kwargs] * len(methods)
        self.transforms = []
        clip = float(getattr(self.config, "clip_grad", 0.0) or 0.0)
        for m, kw in zip(methods, kws):
            kw = dict(kw or {})
            cls = METHODS.get(m, m) if isinstance(m, str) else m
            if isinstance(cls, type) and issubclass(cls, (AdaGC, GlobalClip)) and clip > 0:
                kw.setdefault("max_norm", clip)
            self.transforms.append(build_transform(m, self.shards, self.global_group, **kw))
        self.grad_norm_mode, self.sync = grad_norm, sync
        self.last_stats: Dict[str, Dict[str, torch.Tensor]] = {}

    # -------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self):
        found_inf = self.inner.prepare_grads()
        if found_inf:
            return False, None, None
        norm = None
        for t in self.transforms:
            stats = t.step()
            self.last_stats[getattr(t, "tag", type(t).__name__)] = stats
            if norm is None:
                norm = stats["global_norm"]
                already_global = isinstance(t, GlobalClip) or (
                    isinstance(t, AdaGC) and t.num_steps <= t.warmup_steps)
        grad_norm = None
        if norm is not None and self.grad_norm_mode != "none":
            if self.grad_norm_mode == "global" and not already_global and self.global_group is not None:
                sq = norm.square().reshape(1)
                comm.all_reduce(sq, "sum", self.global_group, "megatron:grad_norm")
                norm = sq.reshape(()).sqrt()
            grad_norm = float(norm) if self.sync else norm  # host-sync-ok: Megatron returns a float
        num_zeros = self.inner.count_zeros() if getattr(self.config, "log_num_zeros_in_grad", False) else None
        success = self.inner.step_with_ready_grads()
        return success, grad_norm, num_zeros

    def prepare_grads(self) -> bool:
        return self.inner.prepare_grads()

    def step_with_ready_grads(self) -> bool:
        return self.inner.step_with_ready_grads()

    # -------------------------------------------------------------- delegation
    def zero_grad(self, set_to_none: bool = True):
        return self.inner.zero_grad(set_to_none)

    def get_loss_scale(self):
        return self.inner.get_loss_scale()

    def scale_loss(self, loss):
        return self.inner.scale_loss(loss)

    def reload_model_params(self, state_dict=None):
        return self.inner.reload_model_params(state_dict) if state_dict is not None else self.inner.reload_model_params()

    def get_parameters(self):
        return self.inner.get_parameters()

    def get_grad_norm(self):
        return self.inner.get_grad_norm()

    def clip_grad_norm(self, clip_grad: float) -> float:
        return self.inner.clip_grad_norm(clip_grad)

    def count_zeros(self) -> float:
        return self.inner.count_zeros()

    def get_grad_stats_parallel_group(self):
        return self.inner.get_grad_stats_parallel_group()

    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @property
    def optimizer(self):
        return self.inner.optimizer

    def __getattr__(self, name):  # anything else (timers, offload_to_cpu, ...) from the wrapped one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -------------------------------------------------------------- checkpoints
    def transforms_state_dict(self) -> list:
        return [t.state_dict() for t in self.transforms]

    def load_transforms_state_dict(self, sd: list) -> None:
        if len(sd) != len(self.transforms):
            raise ValueError(f"checkpoint has {len(sd)} transforms, this optimizer has {len(self.transforms)}")
        for t, s in zip(self.transforms, sd):
            t.load_state_dict(s)

    _KEY, _INNER = "dist_stab_transforms", "dist_stab_inner"

    def _merge(self, inner, extra):
        # A single optimizer's (sharded) state dict is a dict: add one key, so code that reads
        # Megatron's own keys (e.g. the distributed optimizer's) still finds them. A multi-child
        # ChainedOptimizer's is a list / dict keyed by child: wrap it.
        if isinstance(inner, dict) and len(_children(self.inner)) == 1:
            out = dict(inner)
            out[self._KEY] = extra
            return out
        return {self._INNER: inner, self._KEY: extra}

    def state_dict(self):
        return self._merge(self.inner.state_dict(), self.transforms_state_dict())

    def load_state_dict(self, state_dict):
        extra = None
        if isinstance(state_dict, dict) and self._KEY in state_dict:
            extra = state_dict[self._KEY]
            state_dict = state_dict[self._INNER] if self._INNER in state_dict else {
                k: v for k, v in state_dict.items() if k != self._KEY}
        self.inner.load_state_dict(state_dict)
        if extra is not None:
            self.load_transforms_state_dict(extra)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        """Megatron dist-ckpt: the wrapped optimizer's sharded state plus the transforms' state
        as one ``ShardedObject`` per pipeline stage (identical across TP/DP ranks in exact mode,
        so only replica 0 writes it). Not exercised by the tests (torch-format round trip is)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        inner = self.inner.sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        replica = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
        obj = ShardedObject("optimizer.dist_stab.transforms", self.transforms_state_dict(), (pp_size,), (pp_rank,),
                            replica_id=replica)
        return self._merge(inner, obj)


def get_stabilized_optimizer(config, model_chunks, method="adagc", method_kwargs=None, *, grad_norm: str = "stage",
                             sync: bool = True, pg_collection=None, **megatron_kwargs) -> StabilizedMegatronOptimizer:
    """``get_megatron_optimizer(config, model_chunks, **megatron_kwargs)`` with its global clip
    swapped for ``method`` (see :class:`StabilizedMegatronOptimizer`)."""
    _require_megatron()
    from megatron.core.optimizer import get_megatron_optimizer

    if pg_collection is not None:
        megatron_kwargs["pg_collection"] = pg_collection
    inner = get_megatron_optimizer(config, list(model_chunks), **megatron_kwargs)
    return StabilizedMegatronOptimizer(inner, method=method, method_kwargs=method_kwargs, model_chunks=model_chunks,
                                       pg_collection=pg_collection, grad_norm=grad_norm, sync=sync)


def get_dist_stab_optimizer(config, model_chunks, optimizer: Union[str, Callable] = "scale", transforms=None,
                            transform_kwargs=None, pg_collection=None, **optimizer_kwargs):
    """A dist_stab optimizer over the TP-local params, in Megatron's ``FP32Optimizer``.

    ``optimizer``: ``"scale"``, ``"stable_spam"``, ``"spam"`` or ``fn(named_params) ->
    torch.optim.Optimizer``. For SCALE, ``last_layer`` defaults to ``output_layer.weight`` and
    ``embeddings`` to ``embedding.word_embeddings.weight`` (Megatron GPT names); a tied output
    layer (``share_embeddings_and_output_weights``) needs ``tied_embeddings=``.
    ``transforms``: optional gradient transforms run before it (as in
    :class:`StabilizedMegatronOptimizer`). fp32 parameters only (``config.bf16/fp16`` False).
    """
    _require_megatron()
    from megatron.core.optimizer.optimizer import FP32Optimizer

    if getattr(config, "bf16", False) or getattr(config, "fp16", False):
        raise NotImplementedError("get_dist_stab_optimizer supports fp32 parameters only")
    if getattr(config, "use_distributed_optimizer", False):
        raise NotImplementedError("dist_stab optimizers need whole TP-local params: use_distributed_optimizer=False")
    named = [(n, p) for n, p in _named_trainable(model_chunks)]
    if isinstance(optimizer, str):
        from . import optim as _optim

        key = optimizer.lower()
        if key == "scale":
            have = {n for n, _ in named}
            optimizer_kwargs.setdefault("lr", config.lr)
            optimizer_kwargs.setdefault("weight_decay", config.weight_decay)
            if "last_layer" not in optimizer_kwargs and "output_layer.weight" in have:
                optimizer_kwargs["last_layer"] = "output_layer.weight"
            if "embeddings" not in optimizer_kwargs:
                optimizer_kwargs["embeddings"] = [n for n in ("embedding.word_embeddings.weight",) if n in have]
            torch_opt = _optim.SCALE(named, **optimizer_kwargs)
        elif key in ("stable_spam", "stablespam"):
            optimizer_kwargs.setdefault("lr", config.lr)
            torch_opt = _optim.StableSPAM(named, **optimizer_kwargs)
        elif key == "spam":
            optimizer_kwargs.setdefault("lr", config.lr)
            torch_opt = _optim.SPAM(named, **optimizer_kwargs)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    else:
        torch_opt = optimizer(named)
    inner = FP32Optimizer(torch_opt, config, lambda *a, **k: None)
    inner.model_chunks = list(model_chunks)
    if transforms is None:
        return _NoClip(inner)
    return StabilizedMegatronOptimizer(inner, method=transforms, method_kwargs=transform_kwargs,
                                       model_chunks=model_chunks, pg_collection=pg_collection)


def _named_trainable(model_chunks):
    chunks = list(model_chunks)
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for n, p in chunk.named_parameters():
            if p.requires_grad:
                yield prefix + _strip(n), p


class _NoClip(StabilizedMegatronOptimizer):
    """FP32Optimizer step without Megatron's clip (dist_stab optimizers normalise their updates)."""

    def __init__(self, optimizer):
        self.inner = optimizer
        self.config = optimizer.config
        self.is_stub_optimizer = False
        self.model_chunks = getattr(optimizer, "model_chunks", None)
        self.transforms, self.shards, self.global_group = [], [], None
        self.grad_norm_mode, self.sync = "none", True
        self.last_stats = {}
