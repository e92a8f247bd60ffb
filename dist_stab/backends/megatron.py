"""Megatron-Core tensor parallelism: describe parameters from their TP attributes.

megatron-core marks every parameter of its parallel layers with attributes (set by
``set_tensor_model_parallel_attributes`` and copied onto the optimizer's fp32 main params by
``copy_tensor_model_parallel_attributes``):

=====================================  =======================================================
attribute                              description produced here
=====================================  =======================================================
``tensor_model_parallel=True``         one :class:`ShardAxis` on ``partition_dim`` over the TP
                                       group (``ColumnParallelLinear``/``VocabParallelEmbedding``
                                       /output layer: dim 0; ``RowParallelLinear``: dim 1)
``allreduce=False`` (expert params)    the axis is over the **expert**-TP group instead
no ``tensor_model_parallel``           replicated across TP (LayerNorm, RowParallel bias,
                                       position embedding): no axis. Every TP rank holds the whole
                                       tensor and computes the same complete statistic; nothing is
                                       ever summed over TP for it, so it is counted once (the
                                       1.36-1.52x inflation of ROCm/TransformerEngine#715 cannot
                                       happen).
``shared=True``                        ``counted=False``: the tied output-layer copy of the word
                                       embedding on the last pipeline stage; per-tensor methods
                                       still treat it (its grad equals the first stage's after
                                       Megatron's embedding all-reduce), global sums skip it.
=====================================  =======================================================

Pipeline stages hold different tensors; no axis ever spans them, so per-tensor methods issue
nothing across PP. Global-norm methods add one scalar SUM over ``global_group`` (pass
:func:`pipeline_group_ref`). DP replicas under Megatron DDP (non-distributed optimizer) hold
identical all-reduced grads: no DP axis.

**Fused QKV** (``linear_qkv``: one ``ColumnParallelLinear`` whose output rows are laid out per
query group ``[q_1..q_r, k, v]``; ``partition_stride`` / ``is_qkv`` in newer releases): it is
split on dim 0, so every output row (one q, k or v channel) is local to one TP rank. Per-row
statistics (SCALE's row RMS) need no communication and are the same whatever the fusion;
whole-tensor statistics (AdaGC, GradientStabilizer) treat the fused weight as **one** tensor,
exactly as Megatron's optimizer and the official AdaGC Megatron patch do. With
``partition_stride > 1`` a rank's piece is ``stride`` interleaved blocks: ``offsets`` then name
the first block only (a nominal position); sums over the split dim and per-row statistics of
the kept dim are unaffected by the interleaving, which is all the algorithms use.

Gradients: ``local_grad()`` returns ``param.grad`` if set, else ``param.main_grad`` (Megatron
DDP's fp32 grad buffer), so transforms work both inside the optimizer (after
``prepare_grads()`` moved grads to the main params) and between ``finalize_model_grads`` and
the optimizer step.

Import: megatron-core is imported lazily (``parallel_state`` only when a group is needed), so
``dist_stab`` imports without it. Tested with megatron-core 0.16.1; 0.17+ use the same
attributes and ``parallel_state`` accessors (guarded below).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..spec import GroupRef, ShardAxis, ShardedParam, ShardSpec

#: attributes that mark a parameter as Megatron's (any of them selects this describer)
MEGATRON_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride", "shared", "allreduce",
                  "expert_tp", "is_qkv", "sequence_parallel", "shared_embedding")


def _parallel_state():
    try:
        from megatron.core import parallel_state
    except ImportError as exc:  # pragma: no cover - only without megatron-core
        raise ImportError("megatron-core is needed for TP-sharded Megatron parameters "
                          "(pip install megatron-core)") from exc
    return parallel_state


def group_ref(role: str, group) -> Optional[GroupRef]:
    """``GroupRef`` named ``f"{role}{ranks}"`` (equal on every member); None for a 1-rank group."""
    if group is None:
        return None
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) <= 1:
        return None
    return GroupRef(f"{role}{ranks}", group, len(ranks))


def pipeline_group_ref(pg_collection=None) -> Optional[GroupRef]:
    """The pipeline-stage group as the ``global_group`` of global-norm transforms (None if PP=1)."""
    if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
        return group_ref("pp", pg_collection.pp)
    ps = _parallel_state()
    if not ps.model_parallel_is_initialized():
        return None
    return group_ref("pp", ps.get_pipeline_model_parallel_group())


def is_megatron_param(p: torch.Tensor) -> bool:
    return any(hasattr(p, a) for a in MEGATRON_ATTRS)


def is_expert_param(p: torch.Tensor) -> bool:
    """Megatron marks expert params ``allreduce=False`` (newer releases also ``expert_tp``)."""
    return getattr(p, "allreduce", True) is False or bool(getattr(p, "expert_tp", False))


def _grad_of(p: torch.Tensor, grad_attr: str):
    if grad_attr == "auto":
        g = p.grad
        return g if g is not None else getattr(p, "main_grad", None)
    return getattr(p, grad_attr, None)


class MegatronDescriber:
    """``fn(fqn, param) -> ShardedParam | None`` for Megatron parameters.

    Args:
        tp_group / expt_tp_group: process groups; default: ``pg_collection.tp`` /
            ``pg_collection.expt_tp`` if a ``pg_collection`` is given, else megatron-core's
            ``parallel_state`` (looked up when the first TP-sharded param is described).
        grad_attr: ``"auto"`` (``.grad``, else ``.main_grad``), ``"grad"``, ``"main_grad"`` or
            ``"decoupled_grad"`` (precision-aware optimizer).
        only_marked: describe only params carrying a Megatron attribute (others fall through
            to the next describer; a plain param gets the same description there).
    """

    def __init__(self, tp_group=None, expt_tp_group=None, pg_collection=None, grad_attr: str = "auto",
                 only_marked: bool = True):
        if grad_attr not in ("auto", "grad", "main_grad", "decoupled_grad"):
            raise ValueError(f"grad_attr must be auto/grad/main_grad/decoupled_grad, got {grad_attr!r}")
        self._tp, self._etp, self.pg_collection = tp_group, expt_tp_group, pg_collection
        self.grad_attr = grad_attr
        self.only_marked = only_marked

    # groups ------------------------------------------------------------------
    def _group(self, expert: bool):
        g = self._etp if expert else self._tp
        if g is not None:
            return g
        pgc = self.pg_collection
        if pgc is not None:
            g = getattr(pgc, "expt_tp" if expert else "tp", None)
            if g is not None:
                return g
        ps = _parallel_state()
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("a parameter is marked tensor_model_parallel but megatron-core's "
                               "parallel_state is not initialised; pass tp_group= or pg_collection=")
        if expert:
            getter = getattr(ps, "get_expert_tensor_parallel_group", None)
            return getter() if getter is not None else ps.get_tensor_model_parallel_group()
        return ps.get_tensor_model_parallel_group()

    # describer ---------------------------------------------------------------
    def __call__(self, fqn: str, p: torch.Tensor) -> Optional[ShardedParam]:
        if self.only_marked and not is_megatron_param(p):
            return None
        if type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor"):
            return None  # Megatron-FSDP / DTensor params: the DTensor describer handles them
        local_shape = tuple(p.shape)
        ndim = len(local_shape)
        global_shape, offsets = list(local_shape), [0] * ndim
        axes = ()
        if getattr(p, "tensor_model_parallel", False):
            dim = int(getattr(p, "partition_dim", 0))
            if ndim == 0 or not (-ndim <= dim < ndim):
                raise ValueError(f"{fqn}: partition_dim={dim} is invalid for shape {local_shape}")
            dim %= ndim
            expert = is_expert_param(p)
            ref = group_ref("etp" if expert else "tp", self._group(expert))
            if ref is not None:
                rank = dist.get_rank(ref.group)
                global_shape[dim] = local_shape[dim] * ref.size
                stride = int(getattr(p, "partition_stride", 1) or 1)
                # stride > 1: the piece is `stride` interleaved blocks; this is the first block's offset
                offsets[dim] = rank * (local_shape[dim] // stride)
                axes = (ShardAxis(dim, ref),)
        counted = not bool(getattr(p, "shared", False))
        spec = ShardSpec(fqn=fqn, global_shape=tuple(global_shape), local_shape=local_shape,
                         offsets=tuple(offsets), axes=axes, counted=counted)
        grad_attr = self.grad_attr
        return ShardedParam(spec, p, local_grad=lambda: _grad_of(p, grad_attr), local_param=lambda: p.detach())


#: the default describer, registered with :func:`dist_stab.register_describer` by :func:`register`
default_describer = MegatronDescriber()


def describe(fqn: str, p: torch.Tensor) -> Optional[ShardedParam]:
    return default_describer(fqn, p)


def register() -> None:
    """Make :func:`dist_stab.describe` understand Megatron params (already the default: the
    package registers :func:`describe` first in its describer chain)."""
    from . import register_describer

    register_describer(describe)


def describe_megatron(named_params, **kw):
    """Describe ``(name, param)`` pairs with a describer built from ``kw`` (groups, grad_attr)."""
    from . import describe as _describe, _local

    d = MegatronDescriber(**kw)
    return _describe(named_params, describers=[d, _local.describe])
