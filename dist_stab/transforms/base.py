"""Shared machinery of the gradient transforms (run between ``backward()`` and ``optimizer.step()``).

A transform owns a list of :class:`~dist_stab.spec.ShardedParam`, keeps its per-tensor state
as fp32 vectors (one entry per parameter, identical on every rank because it is computed only
from reduced statistics), and each ``step()``:

1. collects the local gradient pieces (params without a grad are skipped),
2. computes local partial statistics and completes them with one collective per group,
3. runs its vectorised math on the complete per-tensor statistics (device side, no host read),
4. scales the local gradient pieces in place (multi-tensor kernels, see :mod:`dist_stab.kernels`).

Host cost per step (what matters with thousands of tensors): ``param.grad`` of every plain or
DTensor param is read in one C-level pass (other shards: a ``local_grad()`` call each). If every
shard holds the same gradient object as in the previous step (grads kept across steps:
``zero_grad(set_to_none=False)``, accumulation) at the same data pointers, the step reuses all that
step prepared (plan, dtype split, the kernels' pointer and chunk tables): two more C-level passes
(identity, data pointers; see ``check_pointers``) and no Python code per tensor. New gradient
objects (``set_to_none=True``) rebuild the split and the tables: a few more C-level passes, one per
tensor property. Gradients are referenced weakly between steps, never kept alive.

``persistent_grads=True`` (opt-in, for many thousands of tensors with gradient buffers that live for the
whole run: ``zero_grad(set_to_none=False)``, DDP's ``gradient_as_bucket_view``, Megatron-style grad
buffers): the transform holds the gradients strongly and, each step, checks only the first and the last
shard's gradient object and address (what ``zero_grad(set_to_none=True)``, a new backward into fresh
tensors or a ``module.to()`` change); no per-tensor work at all. Replacing or moving one gradient in the
middle of the list is then not seen (tested, documented): use the default where that can happen. A
switch to new gradient objects is seen, but the previous ones stay alive until that step.
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass
from itertools import compress, repeat
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import comm
from ..backends import describe
from ..reducer import SlotLayout
from ..spec import GroupRef, ShardedParam
from ..kernels import TensorBatch
from ..stats import local_maxabs, local_sumsq

_GRAD = operator.attrgetter("grad")
_LOCAL = operator.attrgetter("_local_tensor")
_deref = getattr(operator, "call", weakref.ref.__call__)  # operator.call: Python >= 3.11, faster


def _address(g: Optional[torch.Tensor]) -> Optional[int]:
    """Data pointer of a gradient (of its local tensor for a DTensor); None for no gradient."""
    return None if g is None else getattr(g, "_local_tensor", g).data_ptr()


def _no_grad() -> None:
    """Stands in the weak references for a shard without a grad: "dereferences" to None."""


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


@dataclass
class _Prepared:
    """A step's host-side work, reused by the next step while the shards hold the same gradient objects."""

    refs: list  # each shard's gradient object, weakly: a strong reference would keep grads alive that
    # zero_grad(set_to_none=True) dropped
    plan: _Plan
    batch: TensorBatch  # dtype split, pointer and chunk tables; it checks the data pointers


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
    apply_factors: bool = True  # False: measure only (GradNorm), or the factors go elsewhere: wrap() sets it on the
    # last transform when it folds the factors into the optimizer (dist_stab.optim.AdamW reads them)
    #: Compare every gradient's data pointer with the kernels' tables each step (Triton path; a C-level
    #: pass, roughly a third of the host time of a step that reuses them). False: only the objects'
    #: identity is checked, and a gradient kept across steps must not be moved in place (``.set_()``,
    #: ``.data =``, ``module.to()`` while grads exist): the kernels would use its old address.
    check_pointers: bool = True
    tag = "transform"

    def __init__(self, params, *, mode: str = "exact", global_group=None, validate: bool = True,
                 persistent_grads: bool = False):
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
        self._plans: Dict[Optional[tuple], _Plan] = {}
        self._all = list(range(len(self.shards)))
        kinds = {s.kind for s in self.shards}
        self._params = [s.param for s in self.shards] if kinds in ({"plain"}, {"dtensor"}) else None
        self._dtensor = kinds == {"dtensor"}
        self._prepared: Optional[_Prepared] = None
        self._device: Optional[torch.device] = None
        self.persistent_grads = bool(persistent_grads)
        self._held: Optional[tuple] = None  # persistent_grads: (grads, first/last raw grad, their data_ptrs)

    # ----------------------------------------------------------------- gradients
    def _read(self) -> list:
        """Each shard's gradient (None: it has none): ``param.grad`` in one C-level pass, else ``local_grad()``."""
        if self._params is not None:
            return list(map(_GRAD, self._params))
        return [s.local_grad() for s in self.shards]

    def _pieces(self, raw: list, active: List[int]) -> List[torch.Tensor]:
        """The local gradient pieces of the ``active`` shards (DTensor: the local tensors; their
        placements are checked when the plan for ``active`` is built)."""
        if active is not self._all:
            raw = list(compress(raw, map(operator.is_not, raw, repeat(None))))
        if not self._dtensor:
            return raw
        if self._plan_key(active) in self._plans:
            return list(map(_LOCAL, raw))
        return [self.shards[i].local_grad() for i in active]

    def _shard_grad(self, i: int):
        return self._params[i].grad if self._params is not None else self.shards[i].local_grad()

    def _held_grads(self) -> Optional[Tuple[List[torch.Tensor], _Prepared]]:
        """persistent_grads: last step's pieces and preparation if the first and last shard still hold the
        same gradient objects at the same addresses (else None: the full path runs)."""
        held = self._held
        if held is None or self._prepared is None:
            return None
        grads, ends, ptrs = held
        now = (self._shard_grad(0), self._shard_grad(len(self.shards) - 1))
        if now[0] is not ends[0] or now[1] is not ends[1]:
            return None
        if list(map(_address, now)) != ptrs:
            return None
        return grads, self._prepared

    def _prepare(self, raw: list) -> Tuple[List[torch.Tensor], Optional[_Prepared]]:
        """This step's pieces and preparation (None: no grad at all). The previous step's preparation
        if every shard holds the same gradient object, with the same data pointers; else a new one."""
        p = self._prepared
        if p is not None and all(map(operator.is_, raw, map(_deref, p.refs))):
            grads = self._pieces(raw, p.plan.active)
            if not self.check_pointers or p.batch.same_storage(grads):
                return grads, p
        has = list(map(operator.is_not, raw, repeat(None)))
        active = self._all if all(has) else list(compress(self._all, has))
        if not active:
            return [], None
        grads = self._pieces(raw, active)
        refs = (list(map(weakref.ref, raw)) if active is self._all
                else [weakref.ref(g) if g is not None else _no_grad for g in raw])
        p = _Prepared(refs, self._plan(active, grads[0].device), TensorBatch(grads))
        self._prepared = p
        return grads, p

    # ----------------------------------------------------------------- planning
    def _plan_key(self, active: List[int]) -> Optional[tuple]:
        return None if active is self._all else tuple(active)

    def _plan(self, active: List[int], device) -> _Plan:
        key = self._plan_key(active)
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
        held = self._held_grads() if self.persistent_grads else None
        if held is not None:
            grads, prep = held
        else:
            grads, prep = self._prepare(self._read())
            if self.persistent_grads:
                ends = (self._shard_grad(0), self._shard_grad(len(self.shards) - 1))
                self._held = None if prep is None else (grads, ends, list(map(_address, ends)))
        if prep is None:
            device = self._device or torch.device("cpu")
            P = len(self.shards)
            z = torch.zeros((), device=device)
            return {"global_norm": z, "norms": torch.zeros(P, device=device), "factors": torch.ones(P, device=device),
                    "num_clipped": z.long(), "num_nonfinite": z.long()}
        self._to_device(prep.batch.device)
        plan = prep.plan
        sumsq = plan.sum_layout.complete(local_sumsq(grads, prep.batch), "sum", self.tag)
        maxabs = plan.max_layout.complete(local_maxabs(grads), "max", self.tag) if plan.max_layout else None
        factors, extra = self._compute(plan, sumsq, maxabs)
        if self.apply_factors:
            prep.batch.scale_(grads, factors)
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
