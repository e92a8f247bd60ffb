"""Shared machinery of the gradient transforms (run between ``backward()`` and ``optimizer.step()``).

A transform owns a list of :class:`~dist_stab.spec.ShardedParam`, keeps its per-tensor state
as fp32 vectors (one entry per parameter, identical on every rank because it is computed only
from reduced statistics), and each ``step()``:

1. collects the local gradient pieces (params without a grad are skipped),
2. computes local partial statistics and completes them with one collective per group,
3. runs its vectorised math on the complete per-tensor statistics (device side, no host read),
4. scales the local gradient pieces in place with one fused ``_foreach_mul_``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import comm
from ..backends import describe
from ..reducer import SlotLayout
from ..spec import GroupRef, ShardedParam
from ..kernels import scale_tensors_
from ..stats import local_maxabs, local_sumsq


def check_open_unit(name: str, value: float) -> None:
    if not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")


@dataclass
class _Plan:
    """Everything that depends only on which parameters have a gradient this step."""

    active: List[int]  # indices into self.shards
    index: Optional[torch.Tensor]  # LongTensor of ``active`` (None: all are active)
    sum_layout: SlotLayout
    max_layout: Optional[SlotLayout]
    counted: torch.Tensor  # fp32 0/1 per active tensor, for cross-tensor (global) sums


class GradTransform:
    """Base class. Subclasses set ``state_init`` and implement ``_compute``.

    Args:
        params: a module, ``named_parameters()`` pairs, tensors, or ``ShardedParam`` lists.
        mode: ``"exact"`` (full-tensor statistics, one collective per group) or
            ``"shard_local"`` (each local piece is its own tensor: zero collectives; state then
            differs per rank and can only be restored on the same mesh).
        global_group: optional process group spanning pipeline stages, for transforms that
            need a global (all-tensor) norm; one extra scalar SUM over it when used.
        validate: check once per layout that all ranks of a group pack the same statistics.
    """

    state_init: Dict[str, float] = {}
    needs_max: bool = False
    apply_factors: bool = True  # False: measure only (GradNorm)
    tag = "transform"

    def __init__(self, params, *, mode: str = "exact", global_group=None, validate: bool = True):
        if mode not in ("exact", "shard_local"):
            raise ValueError(f"mode must be 'exact' or 'shard_local', got {mode!r}")
        self.mode = mode
        self.shards: List[ShardedParam] = describe(params)
        self.fqns = [s.fqn for s in self.shards]
        self.validate = validate
        self.global_group = None
        if global_group is not None:
            self.global_group = global_group if isinstance(global_group, GroupRef) else GroupRef.of("global", global_group)
        self.num_steps = 0  # calls to step(); host-side, not data dependent
        self.state: Dict[str, torch.Tensor] = {
            k: torch.full((len(self.shards),), v, dtype=torch.float32) for k, v in self.state_init.items()}
        self._plans: Dict[tuple, _Plan] = {}
        self._all: Optional[List[int]] = None
        self._device: Optional[torch.device] = None

    # ----------------------------------------------------------------- gradients
    def _collect(self):
        """Local gradient pieces of the params that have one, and their indices."""
        kinds = {s.kind for s in self.shards}
        if kinds == {"plain"} or kinds == {"dtensor"}:
            params = [s.param for s in self.shards]
            raw = [p.grad for p in params]
            if all(g is not None for g in raw):
                active = list(range(len(raw))) if self._all is None else self._all
                self._all = active
                if kinds == {"dtensor"}:
                    if tuple(active) not in self._plans:  # placements checked once per plan
                        raw = [s.local_grad() for s in self.shards]
                    else:
                        raw = [g._local_tensor for g in raw]
                return raw, active
        grads, active = [], []
        for i, s in enumerate(self.shards):
            g = s.local_grad()
            if g is not None:
                grads.append(g)
                active.append(i)
        return grads, active

    # ----------------------------------------------------------------- planning
    def _plan(self, active: List[int], device) -> _Plan:
        key = tuple(active)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        specs = [self.shards[i].spec for i in active]
        keys = [s.fqn for s in specs]
        groups = [() if self.mode == "shard_local" else s.groups() for s in specs]
        sum_layout = SlotLayout([k + ":sumsq" for k in keys], [1] * len(keys), groups, self.validate, device)
        max_layout = (SlotLayout([k + ":maxabs" for k in keys], [1] * len(keys), groups, self.validate, device)
                      if self.needs_max else None)
        index = None if len(active) == len(self.shards) else torch.tensor(active, device=device)
        counted = torch.tensor([1.0 if s.counted else 0.0 for s in specs], device=device)
        plan = _Plan(active, index, sum_layout, max_layout, counted)
        self._plans[key] = plan
        return plan

    def _to_device(self, device) -> None:
        if self._device != device:
            self.state = {k: v.to(device) for k, v in self.state.items()}
            self._device = device

    # ----------------------------------------------------------------- state views
    def _get(self, plan: _Plan, name: str) -> torch.Tensor:
        v = self.state[name]
        return v if plan.index is None else v.index_select(0, plan.index)

    def _set(self, plan: _Plan, name: str, value: torch.Tensor) -> None:
        if plan.index is None:
            self.state[name].copy_(value)
        else:
            self.state[name].index_copy_(0, plan.index, value)

    def global_sumsq(self, plan: _Plan, sumsq: torch.Tensor) -> torch.Tensor:
        """Sum of counted per-tensor sums of squares; across pipeline stages if configured."""
        total = (sumsq * plan.counted).sum()
        if self.global_group is not None:
            total = total.reshape(1)
            comm.all_reduce(total, "sum", self.global_group, self.tag + ":global")
            total = total.reshape(())
        return total

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> Dict[str, torch.Tensor]:
        """Transform the gradients in place; return statistics as device tensors (no host sync).

        Returned keys: ``global_norm`` (pre-transform L2 norm over all counted tensors; of this
        pipeline stage only, unless the transform needs it globally and ``global_group`` is set),
        ``norms`` (per-tensor pre-transform norms, indexed like ``self.fqns``; 0 for params
        without a grad), ``factors`` (per-tensor multipliers applied), ``num_clipped``,
        ``num_nonfinite``.
        """
        self.num_steps += 1
        grads, active = self._collect()
        device = grads[0].device if grads else (self._device or torch.device("cpu"))
        self._to_device(device)
        P = len(self.shards)
        if not grads:
            z = torch.zeros((), device=device)
            return {"global_norm": z, "norms": torch.zeros(P, device=device), "factors": torch.ones(P, device=device),
                    "num_clipped": z.long(), "num_nonfinite": z.long()}
        plan = self._plan(active, device)
        sumsq = plan.sum_layout.complete(local_sumsq(grads), "sum", self.tag)
        maxabs = plan.max_layout.complete(local_maxabs(grads), "max", self.tag) if plan.max_layout else None
        factors, extra = self._compute(plan, sumsq, maxabs)
        if self.apply_factors:
            scale_tensors_(grads, factors)
        norms = sumsq.sqrt()
        finite = torch.isfinite(norms)
        global_norm = extra.pop("global_norm", None)
        out = {
            "global_norm": (sumsq * plan.counted).sum().sqrt() if global_norm is None else global_norm,
            "norms": self._scatter_full(plan, norms, 0.0),
            "factors": self._scatter_full(plan, factors, 1.0),
            "num_clipped": (factors < 1.0).sum(),
            "num_nonfinite": (~finite).sum(),
        }
        out.update(extra)
        return out

    def _scatter_full(self, plan: _Plan, v: torch.Tensor, fill: float) -> torch.Tensor:
        if plan.index is None:
            return v
        full = torch.full((len(self.shards),), fill, device=v.device, dtype=v.dtype)
        return full.index_copy_(0, plan.index, v)

    def _compute(self, plan: _Plan, sumsq: torch.Tensor, maxabs: Optional[torch.Tensor]):
        """Return (per-active-tensor factors, extra stats). Must not sync with the host."""
        raise NotImplementedError

    # ----------------------------------------------------------------- skip support
    def _tensor_state(self) -> Dict[str, torch.Tensor]:
        return self.state

    def snapshot(self) -> Dict[str, torch.Tensor]:
        """Copies of every state tensor, to undo a step with :meth:`restore_where`."""
        return {k: v.clone() for k, v in self._tensor_state().items()}

    def restore_where(self, snap: Dict[str, torch.Tensor], cond: torch.Tensor) -> None:
        """Device side: where ``cond`` is true, put the snapshot back (a skipped step)."""
        for k, v in self._tensor_state().items():
            if k in snap and snap[k].device == v.device:
                v.copy_(torch.where(cond, snap[k], v))

    # ----------------------------------------------------------------- state dict
    def _scalar_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def _load_scalar_state(self, sd: dict) -> None:
        self.num_steps = int(sd["num_steps"])

    def state_dict(self) -> dict:
        """Per-tensor state keyed by parameter FQN, plus scalars; loads on any mesh (exact mode)."""
        per_tensor = {fqn: {k: v[i].detach().clone() for k, v in self.state.items()}
                      for i, fqn in enumerate(self.fqns)}
        sd = {"type": type(self).__name__, "mode": self.mode, "per_tensor": per_tensor}
        sd.update(self._scalar_state())
        if self.mode == "shard_local" and dist.is_available() and dist.is_initialized():
            sd["shard_local_rank"] = dist.get_rank()
            sd["shard_local_world"] = dist.get_world_size()
        return sd

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state of a {sd.get('type')} cannot load into {type(self).__name__}")
        if sd.get("mode") != self.mode:
            raise ValueError(f"state saved in mode {sd.get('mode')!r}, this transform runs {self.mode!r}")
        if self.mode == "shard_local" and "shard_local_world" in sd and dist.is_initialized():
            if sd["shard_local_world"] != dist.get_world_size() or sd["shard_local_rank"] != dist.get_rank():
                raise ValueError("shard_local state is per rank and cannot move to another rank or world size")
        per_tensor = sd["per_tensor"]
        missing = [f for f in self.fqns if f not in per_tensor]
        if strict and missing:
            raise KeyError(f"saved state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for i, fqn in enumerate(self.fqns):
            if fqn in per_tensor:
                for k, v in per_tensor[fqn].items():
                    self.state[k][i] = torch.as_tensor(v, dtype=torch.float32)
        self._load_scalar_state(sd)
