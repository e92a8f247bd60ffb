"""SCALE's row-local update in one pass: Triton kernels over many tensors per launch.

For a 2-D block ``[R, C]`` normalised per row (matrices, keep_dim 0, and the lm_head) a program
holds ``ROWS`` whole rows in registers and computes, with the block's scalars
``[lr, decay = 1 - lr*wd, w = 1 - beta, 1/n, eps]``::

    u    = g                                   (matrix)
    u    = m + w * (g - m)                     (last layer)
    s    = sum_j u_j^2,   inv = 1 / max(sqrt(s / n), eps),   ok = isfinite(s)
    p   <- p * decay - lr * u * inv            where ok   (and m <- u)

It reads g and p (and m) once and writes p (and m) once: 3 (5) accesses per element. A row
longer than ``MAX_BLOCK`` is walked in chunks twice (sums, then update), reading g (and m) twice.

One launch per (row length, dtype, kind): program k handles rows ``prog_row[k] ...
prog_row[k] + ROWS - 1`` of block ``prog_block[k]``, whose scalars are row ``group[b]`` of the step's
per-group table (one row per param group, uploaded each step) and ``inv_n[b]``. Addresses come
from an int64 pointer table uploaded again only when a data pointer moves (16-byte alignment is
hinted, for vector loads, when every address of the launch has it); :class:`Rows` builds the
tables once per block list. :class:`AdamW` is SCALE's 1-D AdamW, one launch per dtype.
Imported lazily (needs Triton).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _int64_on as int64_on

#: Longest row held in registers at once; longer rows loop over chunks of this length.
MAX_BLOCK = 16384
#: Elements per program at least: short rows are grouped ``MIN_TILE // BLOCK`` to a program.
MIN_TILE = 2048
#: Elements per program of the 1-D AdamW.
ADAM_BLOCK = 1024
DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


@triton.jit
def _base(tab, b, ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """Pointer ``tab[b]`` (16-byte aligned when ``ALIGN``)."""
    ptr = tl.load(tab + b).to(tl.pointer_type(DTYPE))
    if ALIGN:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _moment(g_ptr, m_ptr, offs, mask, w, LAST: tl.constexpr):
    """u = g (matrix) or m + w (g - m) (last layer), in fp32."""
    u = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LAST:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = m + w * (u - m)
    return u


@triton.jit
def _apply(p_ptr, m_ptr, offs, mask, p, u, inv, lr, decay, LAST: tl.constexpr, DTYPE: tl.constexpr):
    """p <- p*decay - lr * u * inv (and m <- u) on ``mask``."""
    new = p.to(tl.float32) * decay - lr * (u * inv[:, None])
    tl.store(p_ptr + offs, new.to(DTYPE), mask=mask)
    if LAST:
        tl.store(m_ptr + offs, u.to(DTYPE), mask=mask)


@triton.jit
def _rows_kernel(p_tab, g_tab, m_tab, sc, blk, inv_n, prog_block, prog_row, C, SC_W: tl.constexpr,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr, CHUNKS: tl.constexpr, LAST: tl.constexpr,
                 ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """Program pid: rows ``prog_row[pid] ...`` of block ``b = prog_block[pid]`` (``blk[b] = (n_rows, group)``)."""
    pid = tl.program_id(0)
    b = tl.load(prog_block + pid)
    rows = tl.load(prog_row + pid) + tl.arange(0, ROWS)
    row_sc = sc + tl.load(blk + 2 * b + 1) * SC_W
    lr = tl.load(row_sc)
    decay = tl.load(row_sc + 1)
    w = tl.load(row_sc + 2)
    eps = tl.load(row_sc + 4)
    inv_n = tl.load(inv_n + b)
    p_ptr = _base(p_tab, b, ALIGN, DTYPE)
    g_ptr = _base(g_tab, b, ALIGN, DTYPE)
    m_ptr = _base(m_tab, b, ALIGN, DTYPE)
    cols = tl.arange(0, BLOCK)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols
    rmask = (rows < tl.load(blk + 2 * b))[:, None]
    if CHUNKS > 1:
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for c in range(CHUNKS):
            k = c * BLOCK
            u = _moment(g_ptr, m_ptr, offs + k, rmask & (cols + k < C), w, LAST)
            acc += u * u
        s = tl.sum(acc, axis=1)
    else:
        mask = rmask & (cols < C)
        u = _moment(g_ptr, m_ptr, offs, mask, w, LAST)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        s = tl.sum(u * u, axis=1)
    inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(s * inv_n), eps))
    ok = (s < float("inf"))[:, None]
    if CHUNKS > 1:
        for c in range(CHUNKS):
            k = c * BLOCK
            mask = rmask & (cols + k < C) & ok
            u = _moment(g_ptr, m_ptr, offs + k, mask, w, LAST)
            p = tl.load(p_ptr + offs + k, mask=mask, other=0.0)
            _apply(p_ptr, m_ptr, offs + k, mask, p, u, inv, lr, decay, LAST, DTYPE)
    else:
        _apply(p_ptr, m_ptr, offs, mask & ok, p, u, inv, lr, decay, LAST, DTYPE)


@triton.jit
def _adamw_kernel(p_tab, g_tab, m_tab, v_tab, sc, meta, chunks, SC_W: tl.constexpr, BLOCK: tl.constexpr,
                  ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """Chunk ``chunks[pid] = (t, start)`` of 1-D piece t, with the row ``meta[t] = (numel, r)`` of the scalar
    table ``[-, decay, 1-b1, 1-b2, eps, step_size]``, on finite g only::

        m <- m + (1-b1)(g - m),  v <- v + (1-b2)(g^2 - v),  p <- p*decay - step_size * m / (sqrt(v) + eps)
    """
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    offs = tl.load(chunks + 2 * pid + 1).to(tl.int64) + tl.arange(0, BLOCK)
    k = sc + tl.load(meta + 2 * t + 1) * SC_W
    decay = tl.load(k + 1)
    a1 = tl.load(k + 2)
    a2 = tl.load(k + 3)
    eps = tl.load(k + 4)
    step = tl.load(k + 5)
    p_ptr = _base(p_tab, t, ALIGN, DTYPE)
    g_ptr = _base(g_tab, t, ALIGN, DTYPE)
    m_ptr = _base(m_tab, t, ALIGN, DTYPE)
    v_ptr = _base(v_tab, t, ALIGN, DTYPE)
    g = tl.load(g_ptr + offs, mask=offs < tl.load(meta + 2 * t), other=0.0).to(tl.float32)
    ok = (offs < tl.load(meta + 2 * t)) & (tl.abs(g) < float("inf"))
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = m + a1 * (g - m)
    v = v + a2 * (g * g - v)
    p = p * decay - step * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=ok)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=ok)
    tl.store(p_ptr + offs, p.to(DTYPE), mask=ok)


def supported(p: torch.Tensor, g: torch.Tensor, m: Optional[torch.Tensor] = None) -> bool:
    """Whether :class:`Rows` takes a block: p (and m) 2-D, non-empty, contiguous, fp32/bf16; g of p's dtype and shape.

    A non-contiguous g is copied (:meth:`Rows.step_`), so the answer depends only on p, m and g's dtype.
    """
    dt, shape = p.dtype, p.shape
    if dt not in DTYPES or len(shape) != 2 or not p.is_contiguous() or g.dtype != dt or g.shape != shape:
        return False
    return p.numel() > 0 and (m is None or (m.dtype == dt and m.shape == shape and m.is_contiguous()))


def supported_1d(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :class:`AdamW` takes a piece: p, g, m, v contiguous, non-empty, of one shape and dtype (fp32/bf16)."""
    return (p.dtype in DTYPES and p.numel() > 0 and all(t.dtype == p.dtype and t.shape == p.shape and t.is_contiguous()
                                                        for t in (p, g, m, v)))


def geometry(C: int) -> Tuple[int, int, int]:
    """(BLOCK, ROWS, CHUNKS) for rows of length ``C``: CHUNKS > 1 walks each row in chunks of BLOCK."""
    block = min(triton.next_power_of_2(C), MAX_BLOCK)
    return block, max(1, MIN_TILE // block), -(-C // block)


def _num_warps(tile: int) -> int:
    """16 elements per thread, 4..16 warps."""
    return max(4, min(16, tile // 512))


def _upload(values: List, dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device``: one async copy from pinned memory on CUDA (no sync)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else host


class _Pointers:
    """int64 table of data pointers, uploaded again only when one moves; ``aligned[j]``: all of launch j's
    pointers (positions ``groups[j]``) are 16-byte aligned."""

    def __init__(self, groups: List[List[int]], device):
        self.groups, self.device = groups, device
        self.host: Optional[List[int]] = None

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        ptrs = list(map(torch.Tensor.data_ptr, tensors))
        if ptrs != self.host:
            self.host, self.table = ptrs, int64_on(ptrs, torch.device(self.device))
            self.aligned = [all(ptrs[j] % 16 == 0 for j in js) for js in self.groups]
        return self.table


_plans: Dict[tuple, list] = {}


def _launches(key: tuple, device) -> list:
    """[(C, dtype, last, geometry(C), block indices, prog_block, prog_row)] for ``key[i] = ((R, C), dtype, last)``:
    launches group blocks by (C, dtype, last). Cached per key, device, ``MAX_BLOCK`` and ``MIN_TILE``."""
    full = (key, str(device), MAX_BLOCK, MIN_TILE)
    hit = _plans.get(full)
    if hit is not None:
        return hit
    groups: Dict[tuple, List[int]] = {}
    for i, ((_, C), dtype, last) in enumerate(key):
        groups.setdefault((C, dtype, last), []).append(i)
    launches = []
    for (C, dtype, last), idx in groups.items():
        geo = geometry(C)
        per = [-(-key[i][0][0] // geo[1]) for i in idx]
        blk = torch.repeat_interleave(torch.tensor(idx), torch.tensor(per))
        row = torch.cat([torch.arange(n) * geo[1] for n in per])
        launches.append((C, dtype, last, geo, idx, blk.to(torch.int32).to(device), row.to(torch.int32).to(device)))
    if len(_plans) > 64:
        _plans.clear()
    _plans[full] = launches
    return launches


def _launch(p_tab, g_tab, m_tab, sc, blk, inv_n, prog_block, prog_row, C, geo, *, last, aligned, dtype):
    block, rows, chunks = geo
    _rows_kernel[(prog_block.numel(),)](p_tab, g_tab, m_tab, sc, blk, inv_n, prog_block, prog_row, C,
                                       SC_W=sc.shape[1], BLOCK=block, ROWS=rows, CHUNKS=chunks, LAST=last,
                                       ALIGN=aligned, DTYPE=DTYPES[dtype], num_warps=_num_warps(rows * block))


class Rows:
    """SCALE's row update of a fixed list of blocks (see the module docstring), tables built once.

    ``key[i] = ((R, C), dtype, last)`` describes block i (:func:`supported` accepts it); block i reads row
    ``gidx[i]`` of the step's scalar table ``[lr, decay, w, -, eps, ...]`` and ``inv_n[i] = 1/n``.
    """

    def __init__(self, key: tuple, gidx: Sequence[int], inv_n: Sequence[float], device):
        self.n, self.device = len(key), device
        self.launches = _launches(key, device)
        self.blk = _upload([x for (shape, *_), g in zip(key, gidx) for x in (shape[0], g)], torch.int32, device)
        self.inv_n = _upload(list(inv_n), torch.float32, device)
        n = self.n
        self.ptrs = _Pointers([[j for i in idx for j in (i, n + i, 2 * n + i)] for *_, idx, _, _ in self.launches],
                              device)

    def step_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              moms: Sequence[Optional[torch.Tensor]], sc: torch.Tensor) -> None:
        """Update ``params`` (and ``moms``; None: a matrix) in place; ``sc`` fp32 on their device."""
        n = self.n
        if not all(map(torch.Tensor.is_contiguous, grads)):
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        tab = self.ptrs((*params, *grads, *(p if m is None else m for p, m in zip(params, moms))))
        for (C, dtype, last, geo, idx, prog_block, prog_row), aligned in zip(self.launches, self.ptrs.aligned):
            _launch(tab[:n], tab[n:2 * n], tab[2 * n:], sc, self.blk, self.inv_n, prog_block, prog_row, C, geo,
                    last=last, aligned=aligned, dtype=dtype)


class AdamW:
    """The 1-D AdamW of a fixed list of pieces (:func:`supported_1d`) in one launch per dtype.

    ``key[i] = (numel, dtype)``; piece i reads row ``rows[i]`` of the step's scalar table.
    """

    def __init__(self, key: tuple, rows: Sequence[int], device):
        self.n, self.device = len(key), device
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, (_, dt) in enumerate(key):
            by_dtype.setdefault(dt, []).append(i)
        self.meta = _upload([x for (numel, _), r in zip(key, rows) for x in (numel, r)], torch.int32, device)
        self.launches = [(dt, _upload([x for i in idx for s in range(0, key[i][0], ADAM_BLOCK) for x in (i, s)],
                                      torch.int32, device)) for dt, idx in by_dtype.items()]
        n = self.n
        self.ptrs = _Pointers([[r * n + i for i in idx for r in range(4)] for idx in by_dtype.values()], device)

    def step_(self, ps, gs, ms, vs, sc: torch.Tensor) -> None:
        """Update ``ps``, ``ms``, ``vs`` in place (see :func:`_adamw_kernel`)."""
        n = self.n
        tab = self.ptrs((*ps, *gs, *ms, *vs))
        for (dt, chunks), aligned in zip(self.launches, self.ptrs.aligned):
            _adamw_kernel[(chunks.numel() // 2,)](tab[:n], tab[n:2 * n], tab[2 * n:3 * n], tab[3 * n:], sc, self.meta,
                                                  chunks, SC_W=sc.shape[1], BLOCK=ADAM_BLOCK, ALIGN=aligned,
                                                  DTYPE=DTYPES[dt], num_warps=4)
