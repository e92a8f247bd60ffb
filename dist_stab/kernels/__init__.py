"""Multi-tensor kernels used in the step, with a plain-torch fallback.

``sumsq_tensors(ts)`` -> fp32 vector of sum(x^2) per tensor; ``scale_tensors_(ts, f)``: ts[i] *= f[i].
On CUDA with Triton they run the kernels of :mod:`.multi_tensor` (one launch per dtype; the
scale kernel does not touch a tensor whose factor is exactly 1, so a clipping transform that
clips nothing costs one read of the gradients). Elsewhere, and for non-contiguous tensors,
``torch._foreach_norm`` / ``torch._foreach_mul_``. ``DIST_STAB_NO_TRITON=1`` forces the fallback.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

_mt = None
if os.environ.get("DIST_STAB_NO_TRITON") != "1" and torch.cuda.is_available():
    try:
        from . import multi_tensor as _mt
    except Exception:  # noqa: BLE001 - no Triton, or it cannot compile here: use the fallback
        _mt = None


def _split(tensors: Sequence[torch.Tensor]):
    """Indices per dtype of tensors the kernels can take, and the rest."""
    groups: Dict[torch.dtype, List[int]] = {}
    rest: List[int] = []
    for i, t in enumerate(tensors):
        if t.is_cuda and t.dtype in _mt.DTYPES and t.is_contiguous():
            groups.setdefault(t.dtype, []).append(i)
        else:
            rest.append(i)
    return groups, rest


def _norms_fp32(tensors: Sequence[torch.Tensor], ord) -> torch.Tensor:
    """Per-tensor norms as fp32; fp64 tensors are reduced in fp64 (``_foreach_norm`` cannot narrow)."""
    try:
        return torch.stack(torch._foreach_norm(list(tensors), ord, dtype=torch.float32))
    except RuntimeError:  # an fp64 tensor in the list (no per-tensor dtype check on the common path)
        return torch.stack([torch.linalg.vector_norm(t, ord).float() for t in tensors])


def sumsq_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0)
    if _mt is not None and tensors[0].is_cuda:
        groups, rest = _split(tensors)
        if not rest and len(groups) == 1:
            return _mt.sumsq(list(tensors))
        out = torch.empty(len(tensors), dtype=torch.float32, device=tensors[0].device)
        for idx in groups.values():
            out[idx] = _mt.sumsq([tensors[i] for i in idx])
        if rest:
            out[rest] = _norms_fp32([tensors[i] for i in rest], 2).square()
        return out
    return _norms_fp32(tensors, 2).square()


def scale_tensors_(tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
    if not tensors:
        return
    if _mt is not None and factors.is_cuda:
        groups, rest = _split(tensors)
        factors = factors.float()
        for idx in groups.values():
            f = factors if len(idx) == len(tensors) else factors[idx]
            _mt.scale_([tensors[i] for i in idx], f.contiguous())
        if rest:
            torch._foreach_mul_([tensors[i] for i in rest], list(factors[rest].unbind()))
        return
    torch._foreach_mul_(list(tensors), list(factors.unbind()))


__all__ = ["scale_tensors_", "sumsq_tensors"]
