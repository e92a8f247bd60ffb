"""Optimizer-state memory: what an optimizer keeps per parameter, counted or predicted.

``optimizer_state_bytes(optimizer)``: bytes of the state tensors the optimizer holds now (local pieces
of DTensors: this rank's share). ``predicted_state_bytes(optimizer, state_dtype=None)``: the same,
predicted from each optimizer's rules before any step (works on meta-device models):

    torch Adam/AdamW   2 moments per element + a 4-byte step per tensor (also dist_stab's AdamW)
    SPAM               2 moments per element
    StableSPAM         2 moments per element + 3 fp32 scalars per tensor (m_max, m_norm, v_norm)
    SCALE              momentum only on the last layer (lm_head); AdamW moments on 1-D params; nothing
                       on the other matrices and the input embedding
    SGD                1 momentum buffer per element when momentum > 0

Moments take the parameter's dtype unless ``state_dtype`` is given (the paper's tables use bf16 for
weights and state).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def _local_numel(t: torch.Tensor) -> int:
    return t._local_tensor.numel() if DTensor is not None and isinstance(t, DTensor) else t.numel()


def _nbytes(t: torch.Tensor) -> int:
    return _local_numel(t) * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (this rank's pieces); 0 before the first step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a dist_stab.wrap()ped optimizer
    return sum(_nbytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))


def _per_param_rule(optimizer, p: torch.Tensor):
    """(moment tensors of p's size, extra bytes) that ``optimizer`` keeps for parameter ``p``."""
    from .optim import SCALE, SPAM, AdamW, StableSPAM
    from .optim.scale import ADAM, LAST

    if isinstance(optimizer, SCALE):
        kind = optimizer.kind_of(p)
        return {LAST: (1, 0), ADAM: (2, 0)}.get(kind, (0, 0))
    if isinstance(optimizer, StableSPAM):
        return 2, 3 * 4
    if isinstance(optimizer, SPAM):
        return 2, 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, AdamW)):
        return 2, 4
    if isinstance(optimizer, torch.optim.SGD):
        return (1 if any(g["momentum"] > 0 for g in optimizer.param_groups if any(q is p for q in g["params"])) else 0), 0
    raise TypeError(f"no state rule for {type(optimizer).__name__}")


def predicted_state_bytes(optimizer: torch.optim.Optimizer, state_dtype: Optional[torch.dtype] = None) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for group in inner.param_groups:
        for p in group["params"]:
            n_moments, extra = _per_param_rule(inner, p)
            itemsize = torch.empty((), dtype=state_dtype or p.dtype).element_size()
            total += n_moments * _local_numel(p) * itemsize + extra
    return total
