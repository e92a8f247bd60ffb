"""Shared machinery of the gradient transforms (run between ``backward()`` and ``optimizer.step()``).

Binding. A transform is *bound* to a list of :class:`~dist_stab.spec.ShardedParam` (``shards``) and
keeps its per-tensor state as fp32 vectors (one entry per bound parameter, identical on every rank
because it is computed only from reduced statistics). Inside :func:`dist_stab.wrap` the wrapper
rebinds every transform to the inner optimizer's *current* parameters, matched by name, whenever
they change (``fully_shard`` + Accelerate's swap, ``add_param_group``, ...); state moves with the
names. Standalone, :meth:`GradTransform.bind` rebinds; a step that finds no gradient on any bound
parameter while the model it was built from has gradients raises (stale binding), it never reports
a norm of 0.

Presence is data, not layout. The reduction layout is fixed at bind time: for every bound tensor,
two fp32 slots ``(sum of squares of the local piece, 1 if this rank holds a gradient for it else 0)``
in one buffer, completed with one SUM per process group. The reduced presence count decides, on
every rank alike:

* count = number of ranks that complete the tensor (all of them): the tensor is *active*;
* count = 0 (no rank has a gradient): *inactive*: factor 1, its state does not advance;
* anything else (some ranks of a sharded group have a gradient, others not): an error naming the
  parameter, raised on every rank after the collective (nothing hangs). On CPU it is raised at once,
  before any gradient is touched; on CUDA, where reading it would sync the host, the flag is copied
  to pinned memory and the error is raised at the start of the next ``step()`` (or by
  :meth:`check`); the tensor is treated as inactive in the step where it happened.

Replicated tensors (no group completes them) need no collective; their presence is this rank's.

Zero-safe state: a tensor whose completed norm is zero or non-finite, or that is inactive, neither
seeds nor advances any state (each transform's docstring says what that means for it).

Host cost per step (what matters with thousands of tensors): ``param.grad`` of every plain or
DTensor param is read in one C-level pass (other shards: a ``local_grad()`` call each). If every
shard holds the same gradient object as in the previous step (``zero_grad(set_to_none=False)``,
accumulation) at the same data pointers, the step reuses what the previous step prepared (the
pieces, the kernels' pointer tables, the presence vector): two more C-level passes and no Python
code per tensor. New gradient objects rebuild them. Gradients are referenced weakly between steps.

``persistent_grads=True`` (opt-in, for many thousands of tensors with gradient buffers that live for
the whole run): the transform holds the gradients strongly and, each step, checks only the first and
the last shard's gradient object and address; no per-tensor work at all. Replacing, dropping or
moving one gradient in the middle of the list is then not seen (tested, documented): use the
default where that can happen.
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
from ..kernels import TensorBatch, _int64_on
from ..reducer import SlotLayout
from ..spec import GroupRef, ShardedParam
from ..stats import local_maxabs

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


_WRAPPER_PARTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def canonical_fqn(fqn: str) -> str:
    """A parameter name without the segments wrappers add (DDP's ``module.``, torch.compile's ``_orig_mod.``,
    FSDP1's and activation checkpointing's), so state saved under one wrapping loads under another."""
    parts = [p for p in fqn.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts) if parts else fqn


class PresenceError(RuntimeError):
    """A parameter has a gradient on some ranks of the group that completes it and not on others."""


class StaleBindingError(RuntimeError):
    """A standalone transform's parameters have no gradient while the model's parameters have some."""


@dataclass
class _Prepared:
    """A step's host-side work, reused by the next step while the shards hold the same gradient objects."""

    refs: list  # each shard's gradient object, weakly (a strong reference would keep dropped grads alive)
    pos: Optional[torch.Tensor]  # their positions among the shards (None: all have one)
    presence: torch.Tensor  # fp32 [P]: 1 where this rank has a gradient
    missing: int  # how many shards had no gradient
    batch: TensorBatch  # dtype split, pointer and chunk tables; it checks the data pointers
    device: torch.device


class GradTransform:
    """Base class. Subclasses set ``state_init`` and implement ``_compute``.

    Args:
        params: a module, ``named_parameters()`` pairs, tensors, or ``ShardedParam`` lists; ``None`` (or an
            empty iterable, e.g. a generator the optimizer already consumed): inside :func:`dist_stab.wrap`,
            every parameter the optimizer updates. Frozen parameters are bound too (they have no gradient,
            so they stay inactive until unfrozen).
        mode: ``"exact"`` (full-tensor statistics, one collective per group) or
            ``"shard_local"`` (each local piece is its own tensor: zero collectives; state then
            differs per rank and can only be restored on the same mesh).
        global_group: optional process group spanning pipeline stages, for transforms that
            need a global (all-tensor) norm; one extra scalar SUM over it when used.
        validate: check once per binding that all ranks of a group pack the same statistics.
    """

    state_init: Dict[str, float] = {}
    needs_max: bool = False
    apply_factors: bool = True  # False: measure only (GradNorm). wrap() folds factors by calling step(apply=False)
    #: Compare every gradient's data pointer with the kernels' tables each step (Triton path; a C-level
    #: pass). False: only the objects' identity is checked, and a gradient kept across steps must not be
    #: moved in place (``.set_()``, ``.data =``, ``module.to()`` while grads exist).
    check_pointers: bool = True
    tag = "transform"

    def __init__(self, params=None, *, mode: str = "exact", global_group=None, validate: bool = True,
                 persistent_grads: bool = False):
        if mode not in ("exact", "shard_local"):
            raise ValueError(f"mode must be 'exact' or 'shard_local', got {mode!r}")
        self.mode = mode
        self.validate = validate
        self.global_group = None
        if global_group is not None:
            self.global_group = global_group if isinstance(global_group, GroupRef) else GroupRef.of("global", global_group)
        self.num_steps = 0  # calls to step(); host-side, not data dependent
        self.persistent_grads = bool(persistent_grads)
        self.state: Dict[str, torch.Tensor] = {}
        self.shards: List[ShardedParam] = []
        self.fqns: List[str] = []
        self._unbound: Dict[str, Dict[str, torch.Tensor]] = {}  # per-tensor state of names not bound now
        self._device: Optional[torch.device] = None
        self._pending: Optional[tuple] = None  # CUDA: (pinned flags, event, step) of a presence check in flight
        self.wrapped = False  # set by wrap(): the wrapper binds; standalone checks are off
        self._module = params if isinstance(params, torch.nn.Module) else None
        if params is not None and not isinstance(params, (torch.nn.Module, torch.Tensor)):
            params = list(params)  # a generator is read once
        # Late-bindable: built from tensors (the wrapper rebinds it by name). Fixed: built from ShardedParam
        # lists that an engine made (DeepSpeed partitions, Megatron's main params).
        self.late_bindable = not (isinstance(params, list) and any(isinstance(x, ShardedParam) for x in params))
        shards = describe(params, include_frozen=True) if params is not None else []
        self.scope: Optional[frozenset] = frozenset(s.fqn for s in shards) if shards else None
        self.scope_trainable = frozenset(s.fqn for s in shards if getattr(s.param, "requires_grad", True))
        self.names_by_id: Dict[int, str] = {id(s.param): s.fqn for s in shards}
        self._bind(shards)

    # ----------------------------------------------------------------- binding
    def bind(self, params) -> None:
        """Rebind to ``params`` (a module, named pairs, tensors, ShardedParams), e.g. after ``fully_shard``.

        Per-tensor state moves by name; names not seen before start from the initial state. Collective
        when ``validate`` is set (all ranks of a group must bind alike)."""
        if isinstance(params, torch.nn.Module):
            self._module = params
        shards = describe(params, include_frozen=True)
        self.names_by_id = {id(s.param): s.fqn for s in shards}
        self._bind(shards)

    def _bind(self, shards: List[ShardedParam]) -> None:
        old = {f: {k: v[i] for k, v in self.state.items()} for i, f in enumerate(self.fqns)}
        self._unbound.update(old)
        self.shards = list(shards)
        self.fqns = [s.fqn for s in self.shards]
        P = len(self.shards)
        dev = self._device or torch.device("cpu")
        self.state = {k: torch.full((P,), v, dtype=torch.float32, device=dev) for k, v in self.state_init.items()}
        for i, f in enumerate(self.fqns):
            saved = self._unbound.pop(f, None) or self._unbound.pop(canonical_fqn(f), None)
            if saved is not None:
                for k, v in saved.items():
                    if k in self.state:
                        self.state[k][i] = v
        kinds = {s.kind for s in self.shards}
        self._params = [s.param for s in self.shards] if kinds in ({"plain"}, {"dtensor"}) else None
        self._dtensor = kinds == {"dtensor"}
        groups = [() if self.mode == "shard_local" else s.spec.groups() for s in self.shards]
        self._groups = groups
        # ranks that complete each tensor: a full presence count
        self._expected_host = [float(math.prod(g.size for g in gs)) for gs in groups]
        self._any_sharded = any(e > 1 for e in self._expected_host)
        self._layout: Optional[SlotLayout] = None
        self._max_layout: Optional[SlotLayout] = None
        self._consts: Dict[str, torch.Tensor] = {}
        self._prepared: Optional[_Prepared] = None
        self._held: Optional[tuple] = None

    def _build_layouts(self, device) -> None:
        """The fixed layout of this binding: per tensor (sum of squares, presence), SUM; MAX if needed."""
        keys = self.fqns
        self._layout = SlotLayout([k + ":sumsq,present" for k in keys], [2] * len(keys), self._groups,
                                  self.validate, device)
        if self.needs_max:
            self._max_layout = SlotLayout([k + ":maxabs" for k in keys], [1] * len(keys), self._groups,
                                          self.validate, device)
        self._consts = {
            "expected": torch.tensor(self._expected_host, dtype=torch.float32).to(device),
            "counted": torch.tensor([1.0 if s.spec.counted else 0.0 for s in self.shards]).to(device),
            "ones": torch.ones(len(self.shards), dtype=torch.float32, device=device),
        }

    def _param_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if self.shards:
            try:
                return self.shards[0].local_param().device
            except Exception:  # noqa: BLE001 - an engine's shard may not expose its parameter yet
                pass
        return torch.device("cpu")

    # ----------------------------------------------------------------- gradients
    def _read(self) -> list:
        """Each shard's gradient (None: it has none): ``param.grad`` in one C-level pass, else ``local_grad()``."""
        if self._params is not None:
            return list(map(_GRAD, self._params))
        return [s.local_grad() for s in self.shards]

    def _shard_grad(self, i: int):
        return self._params[i].grad if self._params is not None else self.shards[i].local_grad()

    def _held_prep(self) -> Optional[Tuple[List[torch.Tensor], _Prepared]]:
        """persistent_grads: last step's pieces and preparation if the first and last shard still hold the
        same gradient objects at the same addresses (else None: the full path runs)."""
        held = self._held
        if held is None or self._prepared is None:
            return None
        grads, ends, ptrs = held
        now = (self._shard_grad(0), self._shard_grad(len(self.shards) - 1))
        if now[0] is not ends[0] or now[1] is not ends[1] or list(map(_address, now)) != ptrs:
            return None
        return grads, self._prepared

    def _prepare(self, raw: list) -> Tuple[List[torch.Tensor], _Prepared]:
        """This step's preparation: the previous one if every shard holds the same gradient object, with
        the same data pointers; else a new one (positions and presence uploaded without a host sync)."""
        p = self._prepared
        if p is not None and all(map(operator.is_, raw, map(_deref, p.refs))):
            # the same objects -- unless a dead weak reference (-> None) matched a gradient that is None now: the
            # kernels' pointer check fails on a None (a dropped piece shortens the list); without it, count them
            try:
                grads = self._pieces(raw, p.pos is None)
                if p.batch.ptrs is not None and self.check_pointers:
                    same = p.batch.same_storage(grads)
                else:
                    same = sum(map(operator.is_, raw, repeat(None))) == p.missing
            except (TypeError, AttributeError):
                same = False
            if same:
                return grads, p
        has = list(map(operator.is_not, raw, repeat(None)))
        full = all(has)
        grads = self._pieces(raw, full)
        device = grads[0].device if grads else self._param_device()
        if self._layout is None or self._device != device:
            self._to_device(device)
        refs = (list(map(weakref.ref, raw)) if full
                else [weakref.ref(g) if g is not None else _no_grad for g in raw])
        if full:
            pos, presence = None, self._consts["ones"]
        else:
            idx = list(compress(range(len(raw)), has))
            pos = _int64_on(idx, device)
            presence = torch.zeros(len(raw), dtype=torch.float32, device=device)
            if idx:
                presence.index_fill_(0, pos, 1.0)
        p = _Prepared(refs, pos, presence, len(raw) - len(grads), TensorBatch(grads), device)
        self._prepared = p
        return grads, p

    def _pieces(self, raw: list, full: bool) -> List[torch.Tensor]:
        """The local gradient pieces of the shards that have one (DTensor: the local tensors)."""
        if self._params is None:
            return raw if full else [g for g in raw if g is not None]
        if not full:
            if self._dtensor:
                return [self.shards[i].local_grad() for i, g in enumerate(raw) if g is not None]
            return [g for g in raw if g is not None]
        if not self._dtensor:
            return raw
        if self._prepared is not None and self._prepared.pos is None:
            return list(map(_LOCAL, raw))  # placements were checked when the preparation was built
        return [s.local_grad() for s in self.shards]

    def _to_device(self, device) -> None:
        self.state = {k: v.to(device) for k, v in self.state.items()}
        self._device = device
        self._build_layouts(device)

    # ----------------------------------------------------------------- state views
    def _get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def _set(self, name: str, value: torch.Tensor) -> None:
        self.state[name].copy_(value)

    def global_sumsq(self, sumsq: torch.Tensor) -> torch.Tensor:
        """Sum of counted per-tensor sums of squares; across pipeline stages if configured."""
        total = (sumsq * self._consts["counted"]).sum()
        if self.global_group is not None and self._global_this_step():
            total = total.reshape(1)
            comm.all_reduce(total, "sum", self.global_group, self.tag + ":global")
            total = total.reshape(())
        return total

    def _global_this_step(self) -> bool:
        """Whether this step's global norm is reduced over ``global_group`` (host-side, same on all ranks)."""
        return True

    # ----------------------------------------------------------------- presence check
    def check(self) -> None:
        """Raise a pending :class:`PresenceError` (CUDA: found in an earlier step, checked without a sync
        once its copy has landed; this call waits for it)."""
        self._check_pending(wait=True)

    def _check_pending(self, wait: bool = False) -> None:
        pend = self._pending
        if pend is None:
            return
        flags, event, step, fqns, expected = pend
        if not wait and not event.query():
            return
        event.synchronize()
        self._pending = None
        self._raise_partial(flags, step, fqns, expected)

    def _raise_partial(self, flags: torch.Tensor, step: int, fqns, expected) -> None:
        bad, idx, count = (int(x) for x in flags.tolist())
        if bad:
            raise PresenceError(
                f"{self.tag}: step {step}: parameter {fqns[idx]!r} has a gradient on {count} of the "
                f"{int(expected[idx])} ranks that hold its pieces. A gradient must be present on all of them or on "
                f"none (then the parameter is inactive this step); {bad} parameter(s) affected. Typical causes: "
                "p.grad set to None on some ranks only, or a parameter used in the forward of some ranks only "
                "(run every parameter through the graph, e.g. add 0 * p.sum() to the loss).")

    def _presence_flags(self, partial: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        idx = torch.argmax(partial.to(torch.int32))
        return torch.stack([partial.sum().long(), idx.long(), count[idx].round().long()])

    def _check_presence(self, partial: torch.Tensor, count: torch.Tensor) -> None:
        if not self._any_sharded:
            return  # nothing is sharded: presence is local, nothing can disagree
        flags = self._presence_flags(partial, count)
        if flags.device.type == "cpu":
            self._raise_partial(flags, self.num_steps, self.fqns, self._expected_host)
            return
        host = torch.empty(3, dtype=torch.int64, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event, self.num_steps, list(self.fqns), list(self._expected_host))

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, apply: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """Transform the gradients in place; return statistics as device tensors (no host sync).

        ``apply=False``: compute everything but leave the gradients alone (wrap() passes the factors to
        the optimizer instead). Returned keys: ``global_norm`` (pre-transform L2 norm over all counted
        active tensors; of this pipeline stage only, unless the transform needs it globally and
        ``global_group`` is set), ``norms`` (per-tensor pre-transform norms, indexed like ``self.fqns``;
        0 for inactive tensors), ``factors`` (per-tensor multipliers; 1 for inactive tensors),
        ``active`` (bool per tensor), ``num_active``, ``num_clipped``, ``num_nonfinite``.
        """
        self._check_pending()
        self.num_steps += 1
        if not self.shards:
            if not self.wrapped:
                raise StaleBindingError(
                    f"{type(self).__name__} has no parameters: pass them (a module or a fresh "
                    "model.named_parameters(); a generator the optimizer consumed is empty), use it inside "
                    "dist_stab.wrap(), which binds it to the optimizer's parameters, or, for a copy (deepcopy, "
                    "pickle), call bind(params)")
            return self._empty_stats()
        apply = self.apply_factors if apply is None else apply
        held = self._held_prep() if self.persistent_grads else None
        if held is not None:
            grads, prep = held
        else:
            grads, prep = self._prepare(self._read())
            if self.persistent_grads:  # strong references: these gradients live for the whole run
                ends = (self._shard_grad(0), self._shard_grad(len(self.shards) - 1))
                self._held = (grads, ends, list(map(_address, ends)))
        if not grads and not self.wrapped:
            self._check_stale()
        P = len(self.shards)
        local = prep.batch.sumsq(grads) if grads else torch.zeros(0, device=prep.device)
        sumsq_local = local if prep.pos is None else torch.zeros(P, device=prep.device).index_copy_(0, prep.pos, local)
        buf = torch.stack([sumsq_local, prep.presence], dim=1).reshape(-1)
        buf = self._layout.complete(buf, "sum", self.tag).view(P, 2)
        sumsq, count = buf[:, 0], buf[:, 1]
        expected = self._consts["expected"]
        active = count > expected - 0.5
        partial = (count > 0.5) & ~active
        self._check_presence(partial, count)
        sumsq = torch.where(active, sumsq, torch.zeros_like(sumsq))
        maxabs = None
        if self._max_layout is not None:
            m = local_maxabs(grads) if grads else torch.zeros(0, device=prep.device)
            m = m if prep.pos is None else torch.zeros(P, device=prep.device).index_copy_(0, prep.pos, m)
            maxabs = torch.where(active, self._max_layout.complete(m, "max", self.tag), torch.zeros_like(m))
        factors, extra = self._compute(sumsq, maxabs, active)
        factors = torch.where(active, factors, torch.ones_like(factors))
        if apply and grads:
            prep.batch.scale_(grads, factors if prep.pos is None else factors.index_select(0, prep.pos))
        norms = sumsq.sqrt()
        global_norm = extra.pop("global_norm", None)
        out = {
            "global_norm": (sumsq * self._consts["counted"]).sum().sqrt() if global_norm is None else global_norm,
            "norms": norms,
            "factors": factors,
            "active": active,
            "num_active": active.sum(),
            "num_clipped": (factors < 1.0).sum(),
            "num_nonfinite": (~torch.isfinite(norms)).sum(),
        }
        out.update(extra)
        return out

    def _empty_stats(self) -> Dict[str, torch.Tensor]:
        device = self._param_device()
        z = torch.zeros((), device=device)
        e = torch.zeros(0, device=device)
        return {"global_norm": z, "norms": e, "factors": e, "active": e.bool(), "num_active": z.long(),
                "num_clipped": z.long(), "num_nonfinite": z.long()}

    def _check_stale(self) -> None:
        """Standalone, no bound parameter has a gradient on this rank: stale if the model has gradients."""
        if self._module is None:
            return
        bound = {id(s.param) for s in self.shards}
        stray = [n for n, p in self._module.named_parameters() if p.grad is not None and id(p) not in bound]
        if stray:
            raise StaleBindingError(
                f"{type(self).__name__}: none of its {len(self.shards)} parameters has a gradient, but the model's "
                f"parameters {stray[:3]}{'...' if len(stray) > 3 else ''} have: they were replaced after the "
                "transform was built (fully_shard, Accelerate's prepare, module.to_empty, ...). Call "
                "transform.bind(model), or use it inside dist_stab.wrap(), which follows the optimizer's parameters.")

    def _compute(self, sumsq: torch.Tensor, maxabs: Optional[torch.Tensor], active: torch.Tensor):
        """Return (per-tensor factors, extra stats) from complete per-tensor statistics. ``active``: the
        tensors present on every rank that completes them (inactive ones have sumsq 0 and must not
        change state). Must not sync with the host."""
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
            if k in snap and snap[k].device == v.device and snap[k].shape == v.shape:
                v.copy_(torch.where(cond.to(v.device), snap[k], v))

    # ----------------------------------------------------------------- state dict
    def _scalar_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def _load_scalar_state(self, sd: dict) -> None:
        self.num_steps = int(sd["num_steps"])

    def state_dict(self) -> dict:
        """Per-tensor state keyed by parameter FQN, plus scalars; loads on any mesh (exact mode)."""
        per_tensor = {fqn: {k: v[i].detach().clone() for k, v in self.state.items()}
                      for i, fqn in enumerate(self.fqns)}
        for fqn, st in self._unbound.items():  # state of parameters not bound now (kept, not lost)
            per_tensor.setdefault(fqn, {k: v.detach().clone() for k, v in st.items()})
        sd = {"type": type(self).__name__, "mode": self.mode, "per_tensor": per_tensor}
        sd.update(self._scalar_state())
        if self.mode == "shard_local" and dist.is_available() and dist.is_initialized():
            sd["shard_local_rank"] = dist.get_rank()
            sd["shard_local_world"] = dist.get_world_size()
        return sd

    def _match(self, per_tensor: dict) -> Tuple[Dict[int, dict], Dict[str, dict]]:
        """(bound index -> saved entry, saved entries of names not bound now). Names are compared as
        :func:`canonical_fqn`; when no name matches but the counts do (state saved by an optimizer built with
        ``named_parameters()`` loaded into one built without, or the reverse), entries are matched in order."""
        saved = [(canonical_fqn(f), st) for f, st in per_tensor.items()]
        cur = [canonical_fqn(f) for f in self.fqns]
        names = {f for f, _ in saved}
        if cur and len(saved) == len(cur) and not names.intersection(cur):
            return {i: st for i, (_, st) in enumerate(saved)}, {}
        where = {f: i for i, f in enumerate(cur)}
        hit, rest = {}, {}
        for f, st in saved:
            if f in where:
                hit[where[f]] = st
            else:
                rest[f] = st
        return hit, rest

    def missing_in(self, sd: dict) -> List[str]:
        """Trainable bound parameters of which ``sd`` holds no state."""
        hit, _ = self._match(sd.get("per_tensor", {}))
        return [f for i, (f, s) in enumerate(zip(self.fqns, self.shards))
                if i not in hit and getattr(s.param, "requires_grad", True)]

    def check_loadable(self, sd: dict, strict: bool = True) -> None:
        """Raise if :meth:`load_state_dict` would (nothing changes here)."""
        if sd.get("type") != type(self).__name__:
            raise ValueError(f"state of a {sd.get('type')} cannot load into {type(self).__name__}")
        if sd.get("mode") != self.mode:
            raise ValueError(f"state saved in mode {sd.get('mode')!r}, this transform runs {self.mode!r}")
        if "per_tensor" not in sd or "num_steps" not in sd:
            raise ValueError(f"{type(self).__name__} state lacks 'per_tensor' or 'num_steps'")
        if self.mode == "shard_local" and "shard_local_world" in sd and dist.is_initialized():
            if sd["shard_local_world"] != dist.get_world_size() or sd["shard_local_rank"] != dist.get_rank():
                raise ValueError("shard_local state is per rank and cannot move to another rank or world size")
        missing = self.missing_in(sd)
        if strict and missing:
            raise KeyError(f"saved state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Load :meth:`state_dict` output. ``strict=False``: a bound parameter the state lacks starts fresh."""
        self.check_loadable(sd, strict)
        hit, rest = self._match(sd["per_tensor"])
        for i, st in hit.items():
            for k, v in st.items():
                if k in self.state:
                    self.state[k][i] = torch.as_tensor(v, dtype=torch.float32).to(self.state[k].device)
        for fqn, st in rest.items():  # a parameter bound later (added, unfrozen) picks it up
            self._unbound[fqn] = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in st.items()}
        self._load_scalar_state(sd)

    # ----------------------------------------------------------------- copies (deepcopy, pickle, torch.save)
    _TRANSIENT = ("_prepared", "_held", "_pending", "_layout", "_max_layout", "_params")

    def __getstate__(self) -> dict:
        """Shard descriptions hold closures and caches hold weak references: a copy keeps the names and
        state and binds again (inside wrap(): at its next step; alone: from its module, or ``bind()``)."""
        d = dict(self.__dict__)
        for k in self._TRANSIENT:
            d[k] = None
        d["_consts"] = {}
        d["shards"] = []
        d["names_by_id"] = {}
        return d

    def __setstate__(self, d: dict) -> None:
        d.pop("_copied_shards", None)
        self.__dict__.update(d)
        self._dtensor = False
        if self._module is not None and self.late_bindable and not self.wrapped:
            self.bind(self._module)  # alone, built from a module: bind to the copy's own module
