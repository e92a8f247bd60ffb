"""Shared machinery of the sharding-aware optimizers.

Each optimizer is a thin ``torch.optim.Optimizer`` around a *functional core* that works on
:class:`OptItem` lists: one item = one local piece of a parameter (rectangular or flat, see
:mod:`dist_stab.spec`) with its gradient piece, its element-wise state pieces and its group's
hyperparameters. A backend that keeps parameters outside ``param.grad`` (DeepSpeed ZeRO,
Megatron's distributed optimizer) builds the items itself and calls the core directly.

Per-step hyperparameters are packed into one small ``[items, K]`` tensor that is copied to the
device once per step (pinned, non-blocking on CUDA), so the element-wise kernels take them as
tensors: no host sync, and a ``torch.compile``'d kernel does not recompile when a scheduler
changes the learning rate.

Element-wise kernels are plain torch functions over the lists of a step's tensors. They run
eagerly (CPU, or ``fused=False``) or compiled with ``torch.compile`` (``fused=True``;
``fused=None`` picks it on CUDA when Triton is importable): dynamo unrolls the list, inductor
emits one fused kernel per tensor (horizontally combined with ``combo_kernels``), and a step
costs one compiled call per phase. Both run the same code, so both give the same results up
to floating-point contraction (1e-7 relative after 3 steps on an H100). The first compiled
step of a 1B model compiles for 40-110 s.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..backends import describe
from ..spec import ShardedParam, ShardSpec
from ..stats import Segment, local_dim_sumsq, seg_view, segments  # noqa: F401 - re-exported

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None


# ----------------------------------------------------------------------------- validation
def host_float(name: str, value) -> float:
    """``float(value)`` for a Python number or a one-element CPU tensor (read without a sync).

    A tensor on another device is refused: every step reads hyperparameters on the host, which
    would be one device sync per read."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            raise ValueError(f"{name} is a tensor on {value.device}: dist_stab optimizers read hyperparameters on "
                             "the host every step (a device sync each time); pass a float or a CPU tensor")
        if value.is_complex():
            raise ValueError(f"{name} must be real, got {value!r}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def check_lr(name: str, value) -> None:
    v = host_float(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")


def check_unit(name: str, value, closed_low: bool = True) -> None:
    v = host_float(name, value)
    ok = (0.0 <= v < 1.0) if closed_low else (0.0 < v < 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'[0, 1)' if closed_low else '(0, 1)'}, got {value!r}")


def check_nonneg(name: str, value, positive: bool = False) -> None:
    v = host_float(name, value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")


def check_int(name: str, value, minimum: int = 0) -> None:
    try:
        ok = (not isinstance(value, (bool, torch.Tensor)) and int(value) == value and value >= minimum)
    except (TypeError, ValueError, OverflowError):  # None, strings, nan, inf
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_betas(name: str, betas) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}") from None
    check_unit(_Item(name, 0), b1)
    check_unit(_Item(name, 1), b2)


def check_positive(name: str, value) -> None:
    check_nonneg(name, value, positive=True)


def check_optional_int1(name: str, value) -> None:
    if value is not None:
        check_int(name, value, 1)


def check_count(name: str, value) -> None:
    check_int(name, value, 0)


# ----------------------------------------------------------------------------- items
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local piece of a DTensor (an alias of its storage), or the tensor itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Compute dtype: fp64 for fp64 pieces, fp32 otherwise (bf16/fp16 are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(eq=False)
class OptItem:
    """One local piece handed to a functional core.

    ``param``/``grad``/``state`` values are plain tensors aliasing the real storage (local
    shape, or 1-D for a flat piece); the core updates ``param`` and ``state`` in place.
    ``hp`` is the parameter group (read only); ``kind`` and ``transposed`` are used by SCALE
    (``transposed``: a 2-D weight stored ``[in, out]``, e.g. transformers' ``Conv1D``, whose units are
    its columns; see :class:`dist_stab.optim.SCALE`).
    """

    spec: ShardSpec
    param: torch.Tensor
    grad: torch.Tensor
    state: Dict[str, torch.Tensor]
    hp: dict
    kind: str = ""
    transposed: bool = False


def pack_scalars(rows: Sequence[Sequence[float]], device, dtype, width: int) -> torch.Tensor:
    """``[len(rows), width]`` tensor of per-item scalars on ``device``, one async host-to-device copy.

    ``width`` is padded to a multiple of 4 so every row view stays 16-byte aligned.
    """
    width = max(4, -(-width // 4) * 4)
    host = torch.zeros((len(rows), width), dtype=dtype)
    if rows:
        host[:, :len(rows[0])] = torch.tensor([list(r) for r in rows], dtype=torch.float64).to(dtype)
    dev = torch.device(device)
    if dev.type == "cpu":
        return host
    if dev.type == "cuda":
        host = host.pin_memory()
    return host.to(dev, non_blocking=True)


# ----------------------------------------------------------------------------- kernels
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def resolve_fused(fused: Optional[bool], device: torch.device) -> bool:
    if fused is None:
        return torch.device(device).type == "cuda" and _triton_available()
    return bool(fused)


#: ``torch.compile(dynamic=...)`` of the fused kernels. False: one specialised graph per distinct
#: shape (LLaMA has about five), the fastest kernels; past dynamo's recompile limit a new shape
#: runs the same function eagerly. None: dynamo's automatic dynamic shapes.
COMPILE_DYNAMIC: Optional[bool] = False
#: Extra inductor options of the fused kernels. ``combo_kernels`` (horizontal fusion of the
#: per-tensor kernels into fewer launches) took a 1B StableSPAM step on an H100 from 26.7 to 19.2 ms.
COMPILE_OPTIONS: dict = {"combo_kernels": True}


_PARAMS = itemgetter("params")


class Kernel:
    """A function over lists of tensors, run eagerly or through ``torch.compile``.

    The kernels loop over the tensors of a step in Python; compiled, dynamo unrolls the loop
    into one graph, so a step costs one guard check and one wrapper call that launches one
    fused kernel per tensor (per-tensor compiled calls cost ~0.1 ms of host time each, which
    made a 1B-parameter step host-bound). A compile failure (no compiler, unsupported op,
    recompile limit) warns once and falls back to the same function run eagerly.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Optional[Callable] = None
        self._broken = False

    def __call__(self, fused: bool, *args):
        if fused and not self._broken:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=COMPILE_DYNAMIC, fullgraph=True,
                                               options=dict(COMPILE_OPTIONS) or None)
            try:
                return self._compiled(*args)
            except Exception as exc:  # noqa: BLE001 - fall back to the same math, eagerly
                self._broken = True
                warnings.warn(f"dist_stab: torch.compile of {self.fn.__name__} failed ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); using the eager kernel", RuntimeWarning)
        return self.fn(*args)


# ----------------------------------------------------------------------------- segments
# Segment / segments / seg_view and the per-row/column sums live in dist_stab.stats (the core).
def dim_sumsq_vector(x: torch.Tensor, spec: ShardSpec, keep_dim: int, segs: List[Segment]) -> torch.Tensor:
    """:func:`dist_stab.stats.local_dim_sumsq` with precomputed segments."""
    return local_dim_sumsq(x, spec, keep_dim, segs)


# ----------------------------------------------------------------------------- optimizer base
def _normalize_params(params) -> Tuple[List[dict], Dict[int, str]]:
    """Module / tensors / (name, tensor) pairs / param-group dicts -> (groups, {id: fqn}).

    A group whose parameters all have names (pairs, a module, or its own ``param_names``) keeps them as
    ``param_names``, as ``torch.optim.Optimizer`` does since torch 2.6, so state dicts carry them."""
    names: Dict[int, str] = {}
    if isinstance(params, torch.nn.Module):
        params = list(params.named_parameters())
    elif isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, named pairs or dicts, or a module; got a tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")

    def strip(seq):
        out, nm = [], []
        for x in seq:
            if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
                names.setdefault(id(x[1]), x[0])
                out.append(x[1])
                nm.append(x[0])
            elif isinstance(x, torch.Tensor):
                out.append(x)
                nm.append(None)
            else:
                raise TypeError(f"cannot interpret {type(x).__name__} as a parameter")
        return out, nm

    def group(g: dict, ps) -> dict:
        ps, nm = strip(ps)
        given = g.pop("param_names", None)
        if given is not None and len(given) == len(ps):
            nm = [a if a is not None else b for a, b in zip(nm, given)]
            for p, n in zip(ps, nm):
                if n is not None:
                    names.setdefault(id(p), n)
        g["params"] = ps
        if ps and all(n is not None for n in nm):
            g["param_names"] = nm
        return g

    if isinstance(items[0], dict):
        groups = []
        for g in items:
            g = dict(g)
            ps = g["params"]
            ps = list(ps.named_parameters()) if isinstance(ps, torch.nn.Module) else (
                [ps] if isinstance(ps, torch.Tensor) else list(ps))
            groups.append(group(g, ps))
    else:
        groups = [group({}, items)]
    return groups, names


class _Item:
    """``f"{name}[{i}]"``, formatted only when a check fails."""

    __slots__ = ("name", "i")

    def __init__(self, name, i: int):
        self.name, self.i = name, i

    def __str__(self) -> str:
        return f"{self.name}[{self.i}]"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


class _Where:
    """``"<tag>: param_groups[i]['key']"``, formatted only when a check fails (validation runs every step)."""

    __slots__ = ("tag", "gi", "key")

    def __init__(self, tag: str, gi: int, key: str):
        self.tag, self.gi, self.key = tag, gi, key

    def __str__(self) -> str:
        return f"{self.tag}: param_groups[{self.gi}][{self.key!r}]"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


#: Instance attributes of ``torch.optim.Optimizer`` that copies do not keep (torch's own ``__getstate__``
#: keeps only defaults, state and param_groups): hooks may be lambdas or closures over the original.
_HOOK_ATTRS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")
_COPY_MARK = "_dist_stab_getstate"


class ShardedOptimizer(torch.optim.Optimizer):
    """Base: keeps parameter FQNs, caches shard descriptions, and builds :class:`OptItem` lists.

    What every dist_stab optimizer shares as a ``torch.optim.Optimizer``:

    * **Hyperparameters** (:attr:`_hp_rules`) are checked on the host in every param group at
      construction, in ``add_param_group``, in ``load_state_dict`` (before anything is replaced) and at
      the start of every ``step()`` (so a later edit of ``param_groups`` is caught before any parameter
      is touched): ``ValueError`` naming the group and key. A few float checks per group; a tensor
      hyperparameter must be a CPU tensor (read without a sync).
    * **State is lazy** (created at a parameter's first gradient), but ``state_dict()`` always has an
      entry for every parameter: one that never had a gradient (an MoE expert not yet routed) gets the
      zeros its first step would create (an empty dict where the optimizer keeps none, e.g. SCALE's
      matrices). Loading such an entry gives the same steps as having no state, and every checkpoint
      holds the same keys, so ``torch.distributed.checkpoint`` never misses one.
    * ``load_state_dict`` runs torch's hooks in torch's order; dist_stab's own fix-ups (per-tensor
      statistics kept in fp32/fp64, step counters on the parameter's device) are done before the user's
      post-hooks; non-dict values in ``state`` (as torch allows) are carried as they are.
    * **Copies** (``copy.deepcopy``, pickle, ``torch.save``) keep everything but caches and hooks
      (torch's copies drop hooks too); caches are rebuilt at the next step, so a copy steps bit-identically.
    * **Complex parameters** raise ``TypeError`` naming the parameter (at construction, in
      ``add_param_group``, and at a step that meets one).
    """

    tag = "optim"
    host_step_counters = True  # step counts are host ints in param_groups: SkipStep decides on the host
    #: ``{group key: check(name, value)}``: validated in every param group (see the class docstring).
    _hp_rules: Dict[str, Callable] = {}
    #: Per-parameter state keys kept as fp32 (fp64 for fp64 parameters) 0-d tensors on the parameter's local
    #: device when loaded (torch would cast them to the parameter dtype).
    _fp32_state_keys: Tuple[str, ...] = ()
    #: Attributes keyed by ``id(param)``: copies re-key them by position.
    _by_param_attrs: Tuple[str, ...] = ("_names",)

    def __init__(self, params, defaults: dict, fused: Optional[bool] = None):
        groups, names = _normalize_params(params)
        self._names = names
        self.fused = fused
        self._reset_caches()
        super().__init__(groups, defaults)
        self._pos_names = self._positional_names()
        self._check_groups()

    # ------------------------------------------------------------------ names, caches
    def _flat_params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _follow_params(self) -> None:
        """Bind late: per-parameter facts (``_by_param_attrs``: names, SCALE's kinds and ``[in, out]`` flags, keyed by
        ``id(param)``) follow a swap of the parameter objects at the same places in ``param_groups`` (Accelerate's and
        the HF Trainer's FSDP2 ``prepare``, torchtitan re-sharding): re-keyed by position, caches dropped. Checked
        every step, and in ``state_dict`` / ``load_state_dict`` (a checkpoint template built right after the swap),
        with two C-level passes; a change in the number of parameters (``add_param_group``) only
        refreshes the record."""
        ids = list(map(id, chain.from_iterable(map(_PARAMS, self.param_groups))))
        old = getattr(self, "_param_ids", None)
        if old == ids:
            return
        if old is not None and len(old) == len(ids):
            for k in self._by_param_attrs:
                d = getattr(self, k, None)
                if d is None:
                    continue
                moved = {}
                for o, n in zip(old, ids):
                    if o in d:
                        moved.setdefault(n, d[o])
                setattr(self, k, moved)
            self._pos_names = self._positional_names()
            self._reset_caches()
        self._param_ids = ids

    def _positional_names(self) -> Dict[int, str]:
        out: Dict[int, str] = {}
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                out.setdefault(id(p), f"group{gi}.param{pi}")
        return out

    def _param_name(self, p: torch.Tensor, where: str = "") -> str:
        return self._names.get(id(p)) or getattr(self, "_pos_names", {}).get(id(p)) or where or "a parameter"

    def _reset_caches(self) -> None:
        """Forget everything derived from the parameters' identities, storage or group dicts (rebuilt lazily)."""
        self._shards: Dict[int, Optional[ShardedParam]] = {}
        self._layouts: Dict[tuple, object] = {}
        self._hp_seen: Dict[tuple, tuple] = {}  # hyperparameter values that passed (see _check_groups)

    def _shard(self, p: torch.Tensor) -> Optional[ShardedParam]:
        key = id(p)
        if key not in self._shards:
            name = self._names.get(key) or self._pos_names.get(key) or f"param@{len(self._shards)}"
            found = describe([(name, p)])
            self._shards[key] = found[0] if found else None
        return self._shards[key]

    # ------------------------------------------------------------------ validation
    def _check_group(self, gi: int, g: dict) -> None:
        for key, rule in self._hp_rules.items():
            if key in g:
                rule(_Where(self.tag, gi, key), g[key])
            elif key in self.defaults:
                raise ValueError(f"{self.tag}: param_groups[{gi}] has no {key!r}")

    def _check_groups(self, groups: Optional[Sequence[dict]] = None) -> None:
        """Validate every group's hyperparameters on the host (``ValueError`` naming the group and key).

        The live groups' values that passed are remembered (per group dict; lists as tuples, so an in-place edit
        shows); a group whose values are the same is not checked again, except one holding a tensor (a scheduler
        may ``fill_`` it in place)."""
        if groups is not None:
            for gi, g in enumerate(groups):
                self._check_group(gi, g)
            return
        self._follow_params()
        keys = tuple(self._hp_rules)
        seen = self._hp_seen
        for gi, g in enumerate(self.param_groups):
            vals = tuple(map(g.get, keys))
            sig = tuple(map(type, vals))
            if tuple in sig or list in sig:  # (a list may be edited in place; entries of pairs are typed too)
                vals = tuple([tuple(v) if type(v) in (tuple, list) else v for v in vals])
                sig += tuple(type(x) for v in vals if type(v) is tuple for x in v)
            hit = seen.get((gi, id(g)))
            # equal types first: a remembered entry holds no tensor, so == never calls a tensor's __eq__ (a sync)
            if hit is not None and hit[0] == sig and hit[1] == vals:
                continue
            self._check_group(gi, g)
            if len(seen) > 4 * len(self.param_groups) + 16:
                seen.clear()
            if not any(issubclass(t, torch.Tensor) for t in sig):
                seen[(gi, id(g))] = (sig, vals)

    def _check_complex(self, gi: int, g: dict) -> None:
        for pi, p in enumerate(g["params"]):
            if p.is_complex():
                raise TypeError(f"{self.tag} does not take complex parameters: "
                                f"{self._param_name(p, f'param_groups[{gi}][params][{pi}]')} is {p.dtype} "
                                "(optimize torch.view_as_real(p) instead, if treating real and imaginary parts "
                                "as separate entries is what you want)")

    def _reconcile_names(self, param_group: dict) -> None:
        """torch (>= 2.6) refuses a group with ``param_names`` next to groups without (and the other way round).
        dist_stab names groups itself (a module gives names), so instead: names are filled in from the known FQNs
        where every parameter has one, else ``param_names`` are dropped from every group (the names stay known to
        the optimizer)."""
        ps = param_group.get("params")
        if isinstance(ps, torch.Tensor):
            ps = [ps]
        if ps is None or isinstance(ps, set):
            return  # torch's error
        ps = list(ps)
        tensors, names = [], []
        for x in ps:
            named = isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
            names.append(x[0] if named else None)
            tensors.append(x[1] if named else x)
        if any(n is not None for n in names):
            if not all(n is not None for n in names):
                return  # torch's error: some names missing
            param_group["params"], param_group["param_names"] = tensors, names
        else:
            param_group["params"] = tensors
        given = param_group.get("param_names")
        if given is not None and len(given) == len(tensors):
            for t, n in zip(tensors, given):
                self._names.setdefault(id(t), n)
        if not self.param_groups:
            return
        others = all("param_names" in g for g in self.param_groups)
        if "param_names" in param_group and not others:
            if all(id(p) in self._names for g in self.param_groups for p in g["params"]):
                for g in self.param_groups:
                    g["param_names"] = [self._names[id(p)] for p in g["params"]]
            else:
                param_group.pop("param_names")
        elif "param_names" not in param_group and others:
            if all(isinstance(t, torch.Tensor) and id(t) in self._names for t in tensors):
                param_group["param_names"] = [self._names[id(t)] for t in tensors]
            else:
                for g in self.param_groups:
                    g.pop("param_names", None)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            self._reconcile_names(param_group)
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        g = self.param_groups[gi]
        try:
            self._check_group(gi, g)
            self._check_complex(gi, g)
        except Exception:
            self.param_groups.pop()
            raise
        for p, n in zip(g["params"], g.get("param_names") or ()):
            self._names.setdefault(id(p), n)
        if hasattr(self, "_pos_names"):
            self._pos_names = self._positional_names()

    # ------------------------------------------------------------------ steps
    def _collect(self, positions: Optional[List[int]] = None) -> List[Tuple[dict, torch.Tensor, ShardedParam, torch.Tensor]]:
        """(group, param, shard, local grad) for every parameter with a gradient, in group order;
        ``positions`` (if given) receives each one's index among all parameters of all groups."""
        out = []
        pos = -1
        for group in self.param_groups:
            for p in group["params"]:
                pos += 1
                if p.grad is None:
                    continue
                if p.is_complex():
                    raise TypeError(f"{self.tag} does not take complex parameters: {self._param_name(p)} is "
                                    f"{p.dtype}")
                sp = self._shard(p)
                if sp is None:
                    continue
                g = sp.local_grad()
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({sp.fqn})")
                out.append((group, p, sp, g))
                if positions is not None:
                    positions.append(pos)
        return out

    def _fused(self, device) -> bool:
        return resolve_fused(self.fused, device)

    def _initial_state(self, p: torch.Tensor) -> dict:
        """The state the first step with a gradient creates for ``p`` (zeros; {} where the optimizer keeps none)."""
        return {}

    def _scalar_dtype(self, p: torch.Tensor, key: str) -> torch.dtype:
        """dtype of a loaded :attr:`_fp32_state_keys` entry."""
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ state dicts
    @torch._disable_dynamo
    def state_dict(self) -> dict:
        """torch's format (``state`` by position, ``param_groups`` with ``param_names`` where known), with an
        entry for every parameter that has or would have state (see the class docstring). Hooks as in torch."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._follow_params()  # after a parameter swap (FSDP2 prepare) the entries' kinds follow the new objects
        mapping: Dict[int, int] = {}
        groups = []
        start = 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            mapping.update({id(p): i for i, p in enumerate(g["params"], start) if id(p) not in mapping})
            packed["params"] = [mapping[id(p)] for p in g["params"]]
            start += len(packed["params"])
            groups.append(packed)
        packed_state: Dict = {}
        for k, v in self.state.items():
            if isinstance(k, torch.Tensor):
                if id(k) in mapping:  # state of a tensor no longer in param_groups cannot be loaded anywhere
                    packed_state[mapping[id(k)]] = v
            else:
                packed_state[k] = v
        for g in self.param_groups:
            for p in g["params"]:
                i = mapping[id(p)]
                cur = packed_state.get(i)
                if cur is None or (isinstance(cur, dict) and not cur):
                    packed_state[i] = self._initial_state(p)
        state_dict = {"state": packed_state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, state_dict)
            if out is not None:
                state_dict = out
        return state_dict

    def _load_value(self, p: torch.Tensor, key, value):
        """A loaded per-parameter state value for ``p`` (torch's casting rules, except :attr:`_fp32_state_keys`)."""
        if key in self._fp32_state_keys:
            return torch.as_tensor(value).to(device=local_tensor(p).device, dtype=self._scalar_dtype(p, key))
        if isinstance(value, torch.Tensor):
            if key == "step":  # torch keeps step counters as they are
                return value
            if p.is_floating_point():
                return value.to(dtype=p.dtype, device=p.device)
            return value.to(device=p.device)
        if isinstance(value, dict):
            return {k: self._load_value(p, k, v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._load_value(p, None, v) for v in value)
        return value

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` (same hooks, same checks, same casting), plus: hyperparameters of the
        loaded groups are validated, keys missing from an older state dict keep the current group's values,
        dist_stab's fix-ups run before the post-hooks, and nothing changes if anything fails."""
        state_dict = state_dict.copy()  # shallow, as torch does
        self._follow_params()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        for g, sg in zip(groups, saved_groups):  # an older state dict: keys it lacks keep their current values
            for k, v in g.items():
                if k not in ("params", "param_names") and k not in sg:
                    sg[k] = copy.deepcopy(v)
        self._check_groups(saved_groups)
        id_map = dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                          itertools.chain.from_iterable(g["params"] for g in groups)))
        state: defaultdict = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                p = id_map[k]
                state[p] = self._load_value(p, None, v) if isinstance(v, dict) else v
            else:
                state[k] = v
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
            new_groups.append(sg)
        self.state = state
        self.param_groups = new_groups
        self._after_load()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _after_load(self) -> None:
        """Subclass fix-ups after a load (before the user's post-hooks). The caches keyed by parameter identity and
        checked against data pointers (shards, layouts, kernel plans) stay valid."""

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in _HOOK_ATTRS:
            state.pop(k, None)
        for k in list(state):  # instance overrides of methods (an LR scheduler's step wrapper holds the original)
            if callable(getattr(type(self), k, None)) and not k.startswith("__"):
                state.pop(k)
        params = self._flat_params()
        for k in self._by_param_attrs:
            d = state.pop(k, {})
            state[k] = [d.get(id(p)) for p in params]
        state.pop("_pos_names", None)
        state.pop("_param_ids", None)  # ids of this process's objects: the copy records its own
        probe = type(self).__new__(type(self))  # which attributes are caches: what _reset_caches sets
        probe._reset_caches()
        for k in probe.__dict__:
            state.pop(k, None)
        state[_COPY_MARK] = 1
        return state

    def __setstate__(self, state: dict) -> None:
        if _COPY_MARK not in state:  # torch's own partial __setstate__ ({"state", "param_groups"}) or an old pickle
            self.__dict__.update(state)
            for k in _HOOK_ATTRS:
                if k not in self.__dict__:
                    setattr(self, k, OrderedDict())
            self._patch_step_function()
            self._reset_caches()
            self._param_ids = None
            return
        state = dict(state)
        state.pop(_COPY_MARK)
        by_pos = {k: state.pop(k) for k in self._by_param_attrs if k in state}
        self.__dict__.update(state)
        for k in _HOOK_ATTRS:
            setattr(self, k, OrderedDict())
        self._patch_step_function()
        params = self._flat_params()
        for k, vals in by_pos.items():
            d = {}
            for p, v in zip(params, vals):
                if v is not None:
                    d.setdefault(id(p), v)
            setattr(self, k, d)
        self._pos_names = self._positional_names()
        self._reset_caches()
        self._param_ids = list(map(id, params))


def maxabs_vector(grads: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """max|g| per piece (0 for an empty piece) in ``dtype``; fp64 pieces keep fp64.

    Like :func:`dist_stab.stats.local_maxabs` (one fused multi-tensor reduction per dtype),
    which refuses fp64 inputs because it asks ``_foreach_norm`` for an fp32 result.
    """
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(grads), dtype=dtype, device=device)
    for want in (torch.float64, None):
        idx = [i for i, g in enumerate(grads) if g.numel() > 0 and ((g.dtype == torch.float64) == (want is not None))]
        if not idx:
            continue
        kw = {} if want is not None else {"dtype": torch.float32}
        maxes = torch._foreach_norm([grads[i] for i in idx], float("inf"), **kw)
        vals = torch.stack(maxes).to(dtype)
        if len(idx) == len(grads):
            return vals
        out[idx] = vals
    return out


# ----------------------------------------------------------------------------- multi-tensor (foreach) helpers
def resolve_foreach(foreach: Optional[bool], fused: bool) -> bool:
    """Whether an element-wise step runs as ``torch._foreach_*`` ops: None = when the fused path is not used."""
    if foreach is None:
        return not fused
    return bool(foreach)


def group_indices(*lists: Sequence[torch.Tensor]) -> List[List[int]]:
    """Indices of the items grouped by (device, dtype of each list's tensor), in first-seen order."""
    groups: Dict[tuple, List[int]] = {}
    for j in range(len(lists[0])):
        key = tuple((lst[j].device, lst[j].dtype) for lst in lists)
        groups.setdefault(key, []).append(j)
    return list(groups.values())
