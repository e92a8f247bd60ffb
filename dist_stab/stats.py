"""Local fp32 partial statistics of gradient pieces, ready to be completed by the reducer.

* ``local_sumsq``     sum of g^2 of each local piece            (complete with SUM)
* ``local_maxabs``    max |g| of each local piece, 0 if empty   (complete with MAX)
* ``local_dim_sumsq`` sum of g^2 over every dim but ``keep_dim`` (complete with SUM); a flat
  piece scatters its partial rows/columns into a full-length vector so all ranks align.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .kernels import _norms_fp32, sumsq_tensors
from .spec import ShardSpec


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def local_sumsq(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 vector of sum(g^2) per tensor (one fused pass; empty pieces give 0)."""
    return sumsq_tensors(grads)


def local_maxabs(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 vector of max|g| per tensor; an empty piece gives 0, the identity of MAX over |g|."""
    out = torch.zeros(len(grads), dtype=torch.float32, device=_device_of(grads))
    idx = [i for i, g in enumerate(grads) if g.numel() > 0]  # shapes are static: no host sync
    if idx:
        maxes = _norms_fp32([grads[i] for i in idx], float("inf"))
        if len(idx) == len(grads):
            return maxes
        out[idx] = maxes
    return out


def local_dim_sumsq(grad: torch.Tensor, spec: ShardSpec, keep_dim: int) -> torch.Tensor:
    """fp32 sum of g^2 over all dims but ``keep_dim`` (rows: keep 0; columns of [out,in]: keep 1)."""
    g = grad.float()
    if not spec.is_flat:
        if g.dim() == 0:
            return g.square().reshape(1)
        dims = [d for d in range(g.dim()) if d != keep_dim]
        return g.square().sum(dim=dims) if dims else g.square()
    shape = spec.global_shape
    stride = 1
    for s in shape[keep_dim + 1:]:
        stride *= s
    pos = torch.arange(spec.flat_start, spec.flat_start + g.numel(), device=g.device)
    idx = (pos // stride) % shape[keep_dim]
    out = torch.zeros(shape[keep_dim], dtype=torch.float32, device=g.device)
    return out.index_add_(0, idx, g.reshape(-1).square())


def stack_or_empty(values: List[torch.Tensor], device) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0, device=device)
