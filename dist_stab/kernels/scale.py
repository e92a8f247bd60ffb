"""``scale_tensors_(tensors, factors)``: ``tensors[i] *= factors[i]`` for a device vector of factors.

On CUDA with Triton this is one multi-tensor launch per dtype in which every block first
reads its tensor's factor and returns at once when it is exactly 1: tensors that a clipping
transform leaves alone cost no memory traffic, without the host ever looking at the factors.
(``torch._foreach_mul_`` reads and writes every element whatever the factor.)
Elsewhere, or for non-contiguous tensors, it falls back to ``torch._foreach_mul_``.
Set ``DIST_STAB_NO_TRITON=1`` to force the fallback.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

_BLOCK = 4096
_triton = None
if os.environ.get("DIST_STAB_NO_TRITON") != "1" and torch.cuda.is_available():
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _scale_kernel(ptrs, numels, factors, chunk_tensor, chunk_start, BLOCK: tl.constexpr,
                          DTYPE: tl.constexpr):
            pid = tl.program_id(0)
            t = tl.load(chunk_tensor + pid)
            f = tl.load(factors + t)
            if f != 1.0:
                start = tl.load(chunk_start + pid)
                n = tl.load(numels + t)
                base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n
                x = tl.load(base + offs, mask=mask)
                tl.store(base + offs, (x.to(tl.float32) * f).to(DTYPE), mask=mask)

        _triton = triton
        _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    except Exception:  # noqa: BLE001 - any Triton import/compile problem means: use the fallback
        _triton = None

_chunk_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _chunks(numels: Tuple[int, ...], device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (numels, device)
    hit = _chunk_cache.get(key)
    if hit is None:
        n = torch.tensor(numels, dtype=torch.int64)
        per = (n + _BLOCK - 1) // _BLOCK
        tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), per)
        first = torch.cumsum(per, 0) - per
        start = (torch.arange(int(per.sum())) - torch.repeat_interleave(first, per)) * _BLOCK
        hit = (n.to(device), tensor_idx.to(torch.int32).to(device), start.to(device))
        if len(_chunk_cache) > 64:
            _chunk_cache.clear()
        _chunk_cache[key] = hit
    return hit


def _triton_scale(tensors: List[torch.Tensor], factors: torch.Tensor) -> None:
    numels = tuple(t.numel() for t in tensors)
    numel_t, tensor_idx, start = _chunks(numels, factors.device)
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, pin_memory=True)
    ptrs = ptrs.to(factors.device, non_blocking=True)
    grid = (tensor_idx.numel(),)
    _scale_kernel[grid](ptrs, numel_t, factors, tensor_idx, start, BLOCK=_BLOCK,
                        DTYPE=_TL_DTYPES[tensors[0].dtype], num_warps=4)


def scale_tensors_(tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
    """In place: ``tensors[i] *= factors[i]``; ``factors`` is an fp32 vector on the tensors' device."""
    if not tensors:
        return
    if _triton is not None and factors.is_cuda:
        groups: Dict[torch.dtype, List[int]] = {}
        rest: List[int] = []
        for i, t in enumerate(tensors):
            if t.is_cuda and t.dtype in _TL_DTYPES and t.is_contiguous() and t.numel() > 0:
                groups.setdefault(t.dtype, []).append(i)
            elif t.numel() > 0:
                rest.append(i)
        for idx in groups.values():
            if len(idx) == len(tensors):
                _triton_scale(list(tensors), factors.float().contiguous())
            else:
                _triton_scale([tensors[i] for i in idx], factors.float()[idx].contiguous())
        if rest:
            torch._foreach_mul_([tensors[i] for i in rest], list(factors[rest].unbind()))
        return
    torch._foreach_mul_(list(tensors), list(factors.unbind()))
