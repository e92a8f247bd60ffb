"""Multi-tensor Triton kernels over a list of tensors, one launch per dtype.

The tensors are cut into chunks of ``CHUNK`` elements; program ``pid`` handles chunk ``pid``
(``chunk_tensor[pid]`` = which tensor, ``chunk_start[pid]`` = where in it). Pointers are passed
as an int64 table, so the same compiled kernel serves any list of tensors.

* ``sumsq``: fp32 sum of x^2 of each chunk into ``partials[pid]``; per-tensor sums follow with a
  deterministic segmented sum (no atomics: equal inputs give bit-equal outputs).
* ``scale``: ``x *= factor[tensor]``; a chunk whose factor is exactly 1 returns at once.

:class:`Batch` holds the tables of one list; :class:`dist_stab.kernels.TensorBatch` builds it where
:func:`dist_stab.kernels.use_triton` says so and falls back to ``torch._foreach_*`` elsewhere.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 2048
ITERS = 16
CHUNK = BLOCK * ITERS
DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _sumsq_kernel(ptrs, numels, chunk_tensor, chunk_start, partials, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partials + pid, tl.sum(acc, axis=0))


@triton.jit
def _scale_kernel(ptrs, numels, chunk_tensor, chunk_start, factors, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    f = tl.load(factors + t)
    if f != 1.0:
        start = tl.load(chunk_start + pid)
        n = tl.load(numels + t)
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(base + offs, mask=mask)
            tl.store(base + offs, (x.to(tl.float32) * f).to(DTYPE), mask=mask)


_tables: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def chunk_tables(numels: Tuple[int, ...], device):
    """(numels, chunk_tensor, chunk_start, chunks_per_tensor) on ``device``; cached per shape list."""
    key = (numels, str(device))
    hit = _tables.get(key)
    if hit is None:
        n = torch.tensor(numels, dtype=torch.int64)
        per = (n + CHUNK - 1) // CHUNK
        tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), per)
        first = torch.cumsum(per, 0) - per
        start = (torch.arange(int(per.sum())) - torch.repeat_interleave(first, per)) * CHUNK
        hit = (n.to(device), tensor_idx.to(torch.int32).to(device), start.to(device), per.to(device))
        if len(_tables) > 64:
            _tables.clear()
        _tables[key] = hit
    return hit


class Batch:
    """Same-dtype contiguous tensors on one device as the kernels see them: every table built once.

    ``ptrs``: their int64 data pointers on ``device``. Keeps no reference to the tensors.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], ptrs: torch.Tensor, device):
        self.ptrs, self.device, self.dtype = ptrs, device, DTYPES[tensors[0].dtype]
        self.numels, self.chunk_tensor, self.chunk_start, self.per = chunk_tables(
            tuple(map(torch.Tensor.numel, tensors)), device)
        self.chunks = self.chunk_tensor.numel()

    def _launch(self, kernel, out: torch.Tensor) -> None:
        if self.chunks:
            kernel[(self.chunks,)](self.ptrs, self.numels, self.chunk_tensor, self.chunk_start, out,
                                   BLOCK=BLOCK, ITERS=ITERS, DTYPE=self.dtype, num_warps=8)

    def sumsq(self) -> torch.Tensor:
        """fp32 [len(tensors)]: the sum of squares of each tensor."""
        partials = torch.empty(self.chunks, dtype=torch.float32, device=self.device)
        self._launch(_sumsq_kernel, partials)
        return torch.segment_reduce(partials, "sum", lengths=self.per, unsafe=True, initial=0.0)

    def scale_(self, factors: torch.Tensor) -> None:
        """``tensors[i] *= factors[i]`` (fp32 contiguous factors; a factor of exactly 1 skips its tensor)."""
        self._launch(_scale_kernel, factors)
