"""Multi-tensor Triton kernels over a list of tensors, one launch per dtype.

The tensors are cut into chunks of ``CHUNK`` elements; program ``pid`` handles chunk ``pid``
(``chunk_tensor[pid]`` = which tensor, ``chunk_start[pid]`` = where in it). Pointers are passed
as an int64 table, so the same compiled kernel serves any list of tensors.

* ``sumsq``: fp32 sum of x^2 of each chunk into ``partials[pid]``; per-tensor sums follow with a
  deterministic segmented sum (no atomics: equal inputs give bit-equal outputs).
* ``scale``: ``x *= factor[tensor]``; a chunk whose factor is exactly 1 returns at once.

Only imported on CUDA with Triton; :mod:`dist_stab.kernels` falls back to ``torch._foreach_*``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

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


def _ptrs(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, pin_memory=True)
    return ptrs.to(device, non_blocking=True)


def sumsq(tensors: List[torch.Tensor]) -> torch.Tensor:
    """fp32 [len(tensors)]: sum of squares; all tensors contiguous, same CUDA device and dtype."""
    device = tensors[0].device
    numel_t, tensor_idx, start, per = chunk_tables(tuple(t.numel() for t in tensors), device)
    partials = torch.empty(tensor_idx.numel(), dtype=torch.float32, device=device)
    if tensor_idx.numel():
        _sumsq_kernel[(tensor_idx.numel(),)](_ptrs(tensors, device), numel_t, tensor_idx, start, partials,
                                             BLOCK=BLOCK, ITERS=ITERS, DTYPE=DTYPES[tensors[0].dtype], num_warps=8)
    return torch.segment_reduce(partials, "sum", lengths=per, unsafe=True, initial=0.0)


def scale_(tensors: List[torch.Tensor], factors: torch.Tensor) -> None:
    device = tensors[0].device
    numel_t, tensor_idx, start, _ = chunk_tables(tuple(t.numel() for t in tensors), device)
    if tensor_idx.numel():
        _scale_kernel[(tensor_idx.numel(),)](_ptrs(tensors, device), numel_t, tensor_idx, start, factors,
                                             BLOCK=BLOCK, ITERS=ITERS, DTYPE=DTYPES[tensors[0].dtype], num_warps=8)
