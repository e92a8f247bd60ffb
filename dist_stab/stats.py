"""Local fp32 partial statistics of gradient pieces, ready to be completed by the reducer.

* ``local_sumsq``     sum of g^2 of each local piece            (complete with SUM)
* ``local_maxabs``    max |g| of each local piece, 0 if empty   (complete with MAX)
* ``local_dim_sumsq`` sum of g^2 over every dim but ``keep_dim`` (complete with SUM). A flat piece
  is cut by :func:`segments` into at most three 2-D blocks (a partial first row, whole rows, a partial
  last row) and writes its partial rows/columns into a full-length vector, so all ranks align.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .kernels import TensorBatch, _norms_fp32
from .spec import ShardSpec


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def local_sumsq(grads: Sequence[torch.Tensor], batch: Optional[TensorBatch] = None) -> torch.Tensor:
    """fp32 vector of sum(g^2) per tensor (one fused pass; empty pieces give 0).

    ``batch``: ``grads`` already prepared (a caller that reuses it across steps); else one is built.
    """
    return (TensorBatch(grads) if batch is None else batch).sumsq(grads)


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


@dataclass(frozen=True)
class Segment:
    """A 2-D block of a local piece, in the ``[R, C]`` matrix view of the full tensor.

    ``lo:hi`` slices the flattened local piece (None: the whole piece, viewed ``shape``);
    ``vec`` is the slice of the per-row (keep_dim 0) or per-column (keep_dim 1) statistic
    vector that scales it.
    """

    lo: Optional[int]
    hi: Optional[int]
    shape: Tuple[int, int]
    vec: Tuple[int, int]


def segments(spec: ShardSpec, keep_dim: int) -> List[Segment]:
    """Cut a local piece into at most three 2-D blocks whose rows/columns are whole-tensor rows/columns.

    Rectangular pieces are one block (statistics vector = the local rows/columns). A flat piece
    ``[flat_start, flat_start + n)`` is a partial first row, a run of full rows and a partial
    last row; its statistic vector is full length (``spec.kept_length``), so the row index of
    element k is ``(flat_start + k) // C``.
    """
    if keep_dim not in (0, 1):
        raise ValueError("keep_dim must be 0 (per row) or 1 (per column)")
    if not spec.is_flat:
        shape = spec.local_shape
        R = shape[0] if shape else 1
        C = math.prod(shape[1:]) if len(shape) > 1 else 1
        if keep_dim == 1 and len(shape) != 2:
            raise ValueError(f"{spec.fqn}: per-column statistics need a 2-D tensor, got {shape}")
        return [Segment(None, None, (R, C), (0, R) if keep_dim == 0 else (0, C))]
    gshape = spec.global_shape
    R = gshape[0]
    C = math.prod(gshape[1:]) if len(gshape) > 1 else 1
    if keep_dim == 1 and len(gshape) != 2:
        raise ValueError(f"{spec.fqn}: per-column statistics need a 2-D tensor, got {gshape}")
    a = spec.flat_start
    b = a + spec.local_numel
    out: List[Segment] = []
    pos = a
    while pos < b:
        r, c = divmod(pos, C)
        if c != 0 or b - pos < C:  # a partial row
            end = min(b, (r + 1) * C)
            vec = (r, r + 1) if keep_dim == 0 else (c, c + end - pos)
            out.append(Segment(pos - a, end - a, (1, end - pos), vec))
            pos = end
        else:
            n = (b - pos) // C
            vec = (r, r + n) if keep_dim == 0 else (0, C)
            out.append(Segment(pos - a, pos - a + n * C, (n, C), vec))
            pos += n * C
    return out


def seg_view(t: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The 2-D view of ``t`` (a local piece) for ``seg``; shares storage with ``t``."""
    if seg.lo is None:
        if t.dim() == 2:
            return t
        if not t.is_contiguous():
            raise ValueError("a non-contiguous local piece of a >2-D tensor cannot be viewed as a matrix")
        return t.view(seg.shape)
    return t.view(-1)[seg.lo:seg.hi].view(seg.shape)


def local_dim_sumsq(x: torch.Tensor, spec: ShardSpec, keep_dim: int,
                    segs: Optional[List[Segment]] = None) -> torch.Tensor:
    """Sum of g^2 over every dim but ``keep_dim`` (rows: keep 0; columns of [out, in]: keep 1).

    Reads ``x`` once per block (``vector_norm`` does not materialise ``x**2``), in fp32 (fp64
    for fp64 pieces); a flat piece writes its partial rows into a full-length vector.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    segs = segments(spec, keep_dim) if segs is None else segs
    red = 1 if keep_dim == 0 else 0
    if not spec.is_flat:
        x2 = seg_view(x, segs[0])
        if x2.numel() == 0:
            return torch.zeros(segs[0].vec[1], dtype=acc, device=x.device)
        return torch.linalg.vector_norm(x2, 2, dim=red, dtype=acc).square()
    out = torch.zeros(spec.kept_length(keep_dim), dtype=acc, device=x.device)
    for s in segs:
        part = torch.linalg.vector_norm(seg_view(x, s), 2, dim=red, dtype=acc).square()
        out[s.vec[0]:s.vec[1]] += part
    return out
