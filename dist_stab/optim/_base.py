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

import math
import warnings
from dataclasses import dataclass
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
def check_lr(name: str, value) -> None:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")


def check_unit(name: str, value, closed_low: bool = True) -> None:
    v = float(value)
    ok = (0.0 <= v < 1.0) if closed_low else (0.0 < v < 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'[0, 1)' if closed_low else '(0, 1)'}, got {value!r}")


def check_nonneg(name: str, value, positive: bool = False) -> None:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")


def check_int(name: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_betas(name: str, betas) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}") from None
    check_unit(f"{name}[0]", b1)
    check_unit(f"{name}[1]", b2)


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
    ``hp`` is the parameter group (read only); ``kind`` is used by SCALE.
    """

    spec: ShardSpec
    param: torch.Tensor
    grad: torch.Tensor
    state: Dict[str, torch.Tensor]
    hp: dict
    kind: str = ""


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
    """Module / tensors / (name, tensor) pairs / param-group dicts -> (groups, {id: fqn})."""
    names: Dict[int, str] = {}
    if isinstance(params, torch.nn.Module):
        params = list(params.named_parameters())
    elif isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, named pairs or dicts, or a module; got a tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")

    def strip(seq):
        out = []
        for x in seq:
            if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
                names.setdefault(id(x[1]), x[0])
                out.append(x[1])
            elif isinstance(x, torch.Tensor):
                out.append(x)
            else:
                raise TypeError(f"cannot interpret {type(x).__name__} as a parameter")
        return out

    if isinstance(items[0], dict):
        groups = []
        for g in items:
            g = dict(g)
            ps = g["params"]
            ps = list(ps.named_parameters()) if isinstance(ps, torch.nn.Module) else (
                [ps] if isinstance(ps, torch.Tensor) else list(ps))
            g["params"] = strip(ps)
            g.pop("param_names", None)
            groups.append(g)
    else:
        groups = [{"params": strip(items)}]
    return groups, names


class ShardedOptimizer(torch.optim.Optimizer):
    """Base: keeps parameter FQNs, caches shard descriptions, and builds :class:`OptItem` lists."""

    tag = "optim"
    host_step_counters = True  # step counts are host ints in param_groups: SkipStep decides on the host

    def __init__(self, params, defaults: dict, fused: Optional[bool] = None):
        groups, names = _normalize_params(params)
        self._names = names
        self.fused = fused
        self._shards: Dict[int, Optional[ShardedParam]] = {}
        self._layouts: Dict[tuple, object] = {}
        super().__init__(groups, defaults)
        self._pos_names = {}
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                self._pos_names.setdefault(id(p), f"group{gi}.param{pi}")

    def _shard(self, p: torch.Tensor) -> Optional[ShardedParam]:
        key = id(p)
        if key not in self._shards:
            name = self._names.get(key) or self._pos_names.get(key) or f"param@{len(self._shards)}"
            found = describe([(name, p)])
            self._shards[key] = found[0] if found else None
        return self._shards[key]

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

    _fp32_state_keys: Tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; per-tensor statistics stay fp32.
        for st in self.state.values():
            for k in self._fp32_state_keys:
                if k in st and torch.is_tensor(st[k]) and st[k].dtype != torch.float64:
                    st[k] = st[k].float()


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
