"""Multi-tensor kernels used in the step, with a plain-torch fallback.

``sumsq_tensors(ts)`` -> fp32 vector of sum(x^2) per tensor; ``scale_tensors_(ts, f)``: ts[i] *= f[i].
Where :func:`use_triton` says so they run the kernels of :mod:`.multi_tensor` (one launch per dtype;
the scale kernel does not touch a tensor whose factor is exactly 1, so a clipping transform that
clips nothing costs one read of the gradients). Elsewhere, and for non-contiguous or fp64 tensors,
``torch._foreach_norm`` / ``torch._foreach_mul_`` (on CPU, where reading the factors costs no sync,
a tensor whose factor is exactly 1 is skipped as well). ``DIST_STAB_NO_TRITON=1`` forces the fallback.

:class:`TensorBatch` does the per-tensor host work once (dtype split, pointer and chunk tables) for
a caller that sees the same tensors step after step (the transforms); the two functions above build
one per call.

:func:`use_triton` is the one switch the optimizers' Triton kernels consult: CUDA tensors with
Triton importable, or CPU tensors when ``DIST_STAB_TRITON_CPU=1`` and ``TRITON_INTERPRET=1`` (the
tests run the kernels in Triton's interpreter that way; far too slow for anything else).
"""
from __future__ import annotations

import array
import operator
import os
from itertools import compress
from typing import Dict, List, Optional, Sequence, Tuple

import torch

_triton_ok: Optional[bool] = None
_mt_module = None  # dist_stab.kernels.multi_tensor once imported; False if it cannot be


def triton_importable() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels should handle tensors like ``t`` (see the module docstring)."""
    if os.environ.get("DIST_STAB_NO_TRITON") == "1" or not triton_importable():
        return False
    if t.is_cuda:
        return True
    return (t.device.type == "cpu" and os.environ.get("DIST_STAB_TRITON_CPU") == "1"
            and os.environ.get("TRITON_INTERPRET") == "1")


def _multi_tensor(t: torch.Tensor):
    """The :mod:`.multi_tensor` module if its kernels should take tensors like ``t``, else None."""
    global _mt_module
    if not use_triton(t):
        return None
    if _mt_module is None:
        try:
            from . import multi_tensor
            _mt_module = multi_tensor
        except Exception:  # noqa: BLE001 - Triton cannot compile here: use the fallback
            _mt_module = False
    return _mt_module or None


def _int64_on(values: List[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``: one async copy from pinned memory on CUDA (no sync)."""
    host = torch.frombuffer(array.array("q", values), dtype=torch.int64) if values else torch.zeros(0, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def pointer_table(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """int64 ``data_ptr()`` of each tensor, on ``device`` (one async copy from pinned memory on CUDA)."""
    return _int64_on(list(map(torch.Tensor.data_ptr, tensors)), torch.device(device))


_DTYPE = operator.attrgetter("dtype")


def _split(tensors: Sequence[torch.Tensor], kernel_dtypes) -> Tuple[Dict[torch.dtype, List[int]], List[int]]:
    """Positions per dtype of the tensors the kernels take (contiguous, a kernel dtype, on the first
    tensor's device), and the rest; one C-level pass per property when all qualify."""
    n = len(tensors)
    dtypes = list(map(_DTYPE, tensors))
    contiguous = list(map(torch.Tensor.is_contiguous, tensors))
    devices = list(map(torch.Tensor.get_device, tensors))
    dev = devices[0]
    if dtypes[0] in kernel_dtypes and dtypes.count(dtypes[0]) == n and all(contiguous) and devices.count(dev) == n:
        return {dtypes[0]: list(range(n))}, []
    groups: Dict[torch.dtype, List[int]] = {}
    rest: List[int] = []
    for i, (dt, c, d) in enumerate(zip(dtypes, contiguous, devices)):
        if c and d == dev and dt in kernel_dtypes:
            groups.setdefault(dt, []).append(i)
        else:
            rest.append(i)
    return groups, rest


def _norms_fp32(tensors: Sequence[torch.Tensor], ord) -> torch.Tensor:
    """Per-tensor norms as fp32; fp64 tensors are reduced in fp64 (``_foreach_norm`` cannot narrow)."""
    try:
        return torch.stack(torch._foreach_norm(list(tensors), ord, dtype=torch.float32))
    except RuntimeError:  # an fp64 tensor in the list (no per-tensor dtype check on the common path)
        return torch.stack([torch.linalg.vector_norm(t, ord).float() for t in tensors])


def _mul_(tensors: List[torch.Tensor], factors: torch.Tensor) -> None:
    """``tensors[i] *= factors[i]`` with torch's foreach op; on CPU only where the factor is not 1."""
    if factors.device.type == "cpu":  # a host read, but no sync: nothing runs asynchronously on CPU
        scaled = factors != 1
        mask = scaled.tolist()
        if not all(mask):
            tensors, factors = list(compress(tensors, mask)), factors[scaled]
    if tensors:
        torch._foreach_mul_(tensors, list(factors.unbind()))


class TensorBatch:
    """A tensor list prepared once for :meth:`sumsq` and :meth:`scale_`.

    Holds no reference to the tensors: each call passes the same tensors (same order, dtypes,
    shapes) again. With the Triton kernels, their pointer tables are built here; :meth:`same_storage`
    tells whether every tensor still has the data pointer it had (``.set_()`` or ``.data =`` can move
    a tensor's storage and keep the object).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.n = len(tensors)
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.ptrs: Optional[List[int]] = None  # data pointers the kernel tables point at
        self.batches: List[Tuple[Optional[torch.Tensor], object]] = []  # (positions on device, None: all; kernel batch)
        self.rest: List[int] = list(range(self.n))  # positions left to torch's foreach ops
        self._rest_mask: Optional[List[bool]] = None  # ``rest`` as a mask over all positions (None: all)
        self._rest_pos: Optional[torch.Tensor] = None  # ``rest`` on device (None: all)
        mt = _multi_tensor(tensors[0]) if tensors else None
        if mt is not None:
            self._build(tensors, mt)

    def _build(self, tensors: Sequence[torch.Tensor], mt) -> None:
        self.ptrs = list(map(torch.Tensor.data_ptr, tensors))
        groups, self.rest = _split(tensors, mt.DTYPES)
        for idx in groups.values():
            if len(idx) == self.n:
                self.batches.append((None, mt.Batch(tensors, _int64_on(self.ptrs, self.device), self.device)))
                continue
            table = _int64_on([self.ptrs[i] for i in idx], self.device)
            batch = mt.Batch([tensors[i] for i in idx], table, self.device)
            self.batches.append((_int64_on(idx, self.device), batch))
        if 0 < len(self.rest) < self.n:
            rest = set(self.rest)
            self._rest_mask = [i in rest for i in range(self.n)]
            self._rest_pos = _int64_on(self.rest, self.device)

    def same_storage(self, tensors: Sequence[torch.Tensor]) -> bool:
        """False if a kernel table points at storage some tensor has left (always True for the fallback).

        A ``data_ptr`` call per tensor from Python (torch's C++ ``_tensors_data_ptrs_at_indices_equal``, which
        casts every list item through pybind11, took 4 ms more at 20,000 tensors on an H200 host)."""
        return self.ptrs is None or list(map(torch.Tensor.data_ptr, tensors)) == self.ptrs

    def _rest(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return list(tensors) if self._rest_mask is None else list(compress(tensors, self._rest_mask))

    def sumsq(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """fp32 [n]: sum of x^2 of each tensor."""
        if not self.n:
            return torch.zeros(0)
        if len(self.batches) == 1 and self.batches[0][0] is None:
            return self.batches[0][1].sumsq()
        if not self.batches:
            return _norms_fp32(self._rest(tensors), 2).square()
        out = torch.empty(self.n, dtype=torch.float32, device=self.device)
        for pos, b in self.batches:
            out.index_copy_(0, pos, b.sumsq())
        if self.rest:
            out.index_copy_(0, self._rest_pos, _norms_fp32(self._rest(tensors), 2).square())
        return out

    def scale_(self, tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
        """``tensors[i] *= factors[i]``."""
        if not self.n:
            return
        factors = factors.float()
        for pos, b in self.batches:
            b.scale_((factors if pos is None else factors.index_select(0, pos)).contiguous())
        if self.rest:
            _mul_(self._rest(tensors), factors if self._rest_pos is None else factors.index_select(0, self._rest_pos))


def sumsq_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return TensorBatch(tensors).sumsq(tensors)


def scale_tensors_(tensors: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
    TensorBatch(tensors).scale_(tensors, factors)


__all__ = ["TensorBatch", "pointer_table", "scale_tensors_", "sumsq_tensors", "triton_importable", "use_triton"]
