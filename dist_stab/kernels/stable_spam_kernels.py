"""Stable-SPAM's step as multi-tensor Triton kernels: every tensor of a step in one launch per phase.

Tensor i is cut into chunks of ``BLOCK * ITERS`` elements (an empty tensor gets one empty chunk,
so every tensor has a first chunk); program c of an element-wise kernel handles chunk c. Tables
(numels, first chunk per tensor, tensor per chunk) are built once per list of tensors and the
int64 pointer table again only when a data pointer moves (:func:`make_plan`). Per step, with
M = max|g| and S = sum clip(g)^2 per tensor::

    maxabs          pmax[c] = max |g| (NaN -> +inf), psq[c] = sum g^2 over chunk c;  M[i] = max of i's pmax
    (MAX all-reduce of M)
    clipped_sumsq   thr = m^, f = m^/M (AdaClip);  psq[c] = sum clip(g)^2, clip(g) = g*f where |g| > thr,
                    recomputed only where pmax[c] > thr;  S[i] = sum of i's psq
    (SUM all-reduce of S)
    adam_update     per tensor: AdaGN and the EMAs m_max, m_n, v_n (updated in place) -> row[i];
                    per element: Adam with the row's scalars

Six launches (three element-wise, two segment reductions, one per-tensor scalar kernel). Traffic
per parameter element: read g for the statistics, read g, p, m, v and write p, m, v in the update
(8 elements; AdamW: 7), plus one more read of g in the chunks that hold a clipped element.
Reductions are deterministic (chunk partials, then a fixed-order segment reduction; no atomics).
Per-group constants come in a float64 ``[groups, NCONST]`` table (columns :data:`CONST_COLUMNS`);
the per-tensor scalar math is float64 like the eager path.

A chunk entirely inside its tensor is read without masks from 16-byte aligned pointers (vector
loads); only each tensor's last chunk is masked. Element-wise kernels launch once per
(param, grad, moment) dtype combination and alignment (views at odd offsets, e.g. ZeRO
partition pieces, run without vector loads), all in the same tables.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 2048
ITERS = 16
SEG_BLOCK = 1024
SCALAR_BLOCK = 128
NUM_WARPS = 8
DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: Columns of the per-group constants (float64): theta, 1-theta^t, g1', 1-g1'^t, g2, 1-g2^t, eps,
#: decay = 1-lr*wd, 1-b1', b2, step_size = lr/(1-b1'^k), 1/sqrt(1-b2^k).
CONST_COLUMNS = ("theta", "bc_max", "g1", "bc_m", "g2", "bc_v", "eps", "decay", "a1", "b2", "step_size", "rbc2")
NCONST = len(CONST_COLUMNS)
#: Per-tensor row (float32) read by the element-wise update; also the eager path's ``sc`` row:
#: thr, f, gscale, active, decay, decay_inactive, 1-b1', b2, step_size, rbc2, eps, 0.
ROW = 12


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _chunk(chunk_tensor, first, numels, CHUNK: tl.constexpr):
    """(global chunk index, tensor index, first element, numel) of this program's chunk."""
    c = tl.program_id(0) + tl.load(chunk_tensor)  # entry 0 of a launch's slice: its first global chunk
    t = tl.load(chunk_tensor + 1 + tl.program_id(0))
    start = (c - tl.load(first + t)).to(tl.int64) * CHUNK
    return c, t, start, tl.load(numels + t)


@triton.jit
def _base(ptrs, role, t, n_tensors, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer ``ptrs[role, t]`` as ``*DT`` (16-byte aligned when ALIGNED)."""
    p = tl.load(ptrs + role * n_tensors + t).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _stat_ptr(ptrs, role, i, n_tensors, ok):
    """Pointers ``ptrs[role, i]`` to 0-d fp32 statistics (a vector of tensors)."""
    return tl.load(ptrs + role * n_tensors + i, mask=ok, other=0).to(tl.pointer_type(tl.float32))


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _adaclip(M, m_max, theta, bc_max):
    """m_max' = theta m_max + (1-theta) M;  m^ = m_max'/bc_max;  thr = m^ (inf if not finite);
    f = m^/M (0 if M = 0)."""
    m_new = theta * m_max + (1.0 - theta) * M
    m_hat = m_new / bc_max
    thr = tl.where(_finite(m_hat), m_hat, float("inf"))
    f = tl.where(M > 0, m_hat / tl.where(M > 0, M, 1.0), 0.0)
    return m_new, thr.to(tl.float32), f.to(tl.float32)


@triton.jit
def _cast(x, DT: tl.constexpr):
    """fp32 -> DT, rounded to nearest even; bf16 by hand (Triton's interpreter truncates), NaN stays NaN."""
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = tl.where(x == x, (u + 0x7FFF + ((u >> 16) & 1)) >> 16, 0x7FC0)
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _clip(x, thr, f):
    return tl.where(tl.abs(x) > thr, x * f, x)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _stats_kernel(ptrs, n_tensors, numels, chunk_tensor, first, pmax, psq, GDT: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """pmax[c] = max |g| (NaN -> +inf: it must survive a MAX all-reduce), psq[c] = sum g^2 over chunk c."""
    c, t, start, n = _chunk(chunk_tensor, first, numels, BLOCK * ITERS)
    g = _base(ptrs, 0, t, n_tensors, GDT, ALIGNED)
    mx = tl.zeros([BLOCK], tl.float32)
    sq = tl.zeros([BLOCK], tl.float32)
    if start + BLOCK * ITERS <= n:
        for i in range(ITERS):
            x = tl.load(g + start + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            mx = tl.maximum(mx, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
            sq += x * x
    else:
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(g + offs, mask=offs < n, other=0.0).to(tl.float32)
            mx = tl.maximum(mx, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
            sq += x * x
    tl.store(pmax + c, tl.max(tl.where(mx == mx, mx, float("inf")), 0))
    tl.store(psq + c, tl.sum(sq, 0))


@triton.jit
def _clipped_sumsq_kernel(ptrs, n_tensors, numels, chunk_tensor, first, pmax, psq, gidx, consts, M,
                          NC: tl.constexpr, GDT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                          ITERS: tl.constexpr):
    """psq[c] = sum clip(g)^2 over chunk c (AdaClip: thr, f from the completed M and m_max).

    Only a chunk with max |g| > thr is read again; elsewhere clip(g) = g and psq[c] already holds the sum.
    """
    c, t, start, n = _chunk(chunk_tensor, first, numels, BLOCK * ITERS)
    k = consts + tl.load(gidx + t) * NC
    m_max = tl.load(_base(ptrs, 4, t, n_tensors, tl.float32, False)).to(tl.float64)
    _, thr, f = _adaclip(tl.load(M + t).to(tl.float64), m_max, tl.load(k), tl.load(k + 1))
    if tl.load(pmax + c) > thr:
        g = _base(ptrs, 0, t, n_tensors, GDT, ALIGNED)
        acc = tl.zeros([BLOCK], tl.float32)
        if start + BLOCK * ITERS <= n:
            for i in range(ITERS):
                y = _clip(tl.load(g + start + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32), thr, f)
                acc += y * y
        else:
            for i in range(ITERS):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                y = _clip(tl.load(g + offs, mask=offs < n, other=0.0).to(tl.float32), thr, f)
                acc += y * y
        tl.store(psq + c, tl.sum(acc, 0))


@triton.jit
def _segment_kernel(part, first, count, out, IS_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = max (IS_MAX) or float64 sum of part[first[i] : first[i] + count[i]], in a fixed order."""
    t = tl.program_id(0)
    s = tl.load(first + t)
    n = tl.load(count + t)
    acc = tl.zeros([BLOCK], tl.float64)
    j = 0
    while j < n:
        offs = j + tl.arange(0, BLOCK)
        x = tl.load(part + s + offs, mask=offs < n, other=0.0).to(tl.float64)
        acc = tl.maximum(acc, x) if IS_MAX else acc + x
        j += BLOCK
    tl.store(out + t, (tl.max(acc, 0) if IS_MAX else tl.sum(acc, 0)).to(tl.float32))


@triton.jit
def _scalars_kernel(ptrs, n_tensors, gidx, consts, M, S, rows, active, NC: tl.constexpr, ROW: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Per tensor (float64), R = sqrt(S), finite = M, R finite, active = finite and R > 0:

    m_max <- m_max' where finite;  m_n <- m_n + (1-g1')(R - m_n), v_n <- v_n + (1-g2)(R^2 - v_n) where active;
    gscale = [m_n/bc_m] / (sqrt(v_n/bc_v) + eps) / R (0 where not active);
    row = [thr, f, gscale, active, decay, decay if finite else 1, 1-b1', b2, step_size, rbc2, eps, 0].
    """
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_tensors
    k = consts + tl.load(gidx + i, mask=ok, other=0) * NC  # padding lanes read group 0
    p_max = _stat_ptr(ptrs, 4, i, n_tensors, ok)
    p_mn = _stat_ptr(ptrs, 5, i, n_tensors, ok)
    p_vn = _stat_ptr(ptrs, 6, i, n_tensors, ok)
    m_max = tl.load(p_max, mask=ok).to(tl.float64)
    m_n = tl.load(p_mn, mask=ok).to(tl.float64)
    v_n = tl.load(p_vn, mask=ok).to(tl.float64)
    Mv = tl.load(M + i, mask=ok).to(tl.float64)
    R = tl.sqrt(tl.load(S + i, mask=ok).to(tl.float64))
    m_new, thr, f = _adaclip(Mv, m_max, tl.load(k), tl.load(k + 1))
    finite = _finite(Mv) & _finite(R)
    act = finite & (R > 0)
    g1, bc_m, g2, bc_v, eps = (tl.load(k + 2), tl.load(k + 3), tl.load(k + 4),
                               tl.load(k + 5), tl.load(k + 6))
    m_n_new = m_n + (1.0 - g1) * (R - m_n)
    v_n_new = v_n + (1.0 - g2) * (R * R - v_n)
    c = (m_n_new / bc_m) / (tl.sqrt(v_n_new / bc_v) + eps)
    gscale = tl.where(act, c / tl.where(act, R, 1.0), 0.0)
    tl.store(p_max, tl.where(finite, m_new, m_max).to(tl.float32), mask=ok)
    tl.store(p_mn, tl.where(act, m_n_new, m_n).to(tl.float32), mask=ok)
    tl.store(p_vn, tl.where(act, v_n_new, v_n).to(tl.float32), mask=ok)
    decay = tl.load(k + 7)
    r = rows + i * ROW
    tl.store(r, thr, mask=ok)
    tl.store(r + 1, f, mask=ok)
    tl.store(r + 2, gscale.to(tl.float32), mask=ok)
    tl.store(r + 3, act.to(tl.float32), mask=ok)
    tl.store(r + 4, decay.to(tl.float32), mask=ok)
    tl.store(r + 5, tl.where(finite, decay, 1.0).to(tl.float32), mask=ok)
    for j in tl.static_range(4):  # 1-b1', b2, step_size, rbc2
        tl.store(r + 6 + j, tl.load(k + 8 + j).to(tl.float32), mask=ok)
    tl.store(r + 10, eps.to(tl.float32), mask=ok)
    tl.store(r + 11, tl.zeros([BLOCK], tl.float32), mask=ok)
    tl.store(active + i, act.to(tl.uint8), mask=ok)


@triton.jit
def _adam_block(pp, gp, mp, vp, offs, mask, thr, f, gs, a1, b2, step, rbc2, eps, decay, PDT: tl.constexpr,
                MDT: tl.constexpr):
    """gt = clip(g) * gscale;  m' = m + (1-b1')(gt - m);  v' = b2 v + (1-b2) gt^2;
    p' = p * decay - step_size * m' / (sqrt(v') * rbc2 + eps)."""
    gt = _clip(tl.load(gp + offs, mask=mask).to(tl.float32), thr, f) * gs
    m = tl.load(mp + offs, mask=mask).to(tl.float32)
    v = tl.load(vp + offs, mask=mask).to(tl.float32)
    p = tl.load(pp + offs, mask=mask).to(tl.float32)
    m = m + a1 * (gt - m)
    v = v * b2 + (1.0 - b2) * (gt * gt)
    p = p * decay - step * tl.div_rn(m, tl.sqrt_rn(v) * rbc2 + eps)
    tl.store(mp + offs, _cast(m, MDT), mask=mask)
    tl.store(vp + offs, _cast(v, MDT), mask=mask)
    tl.store(pp + offs, _cast(p, PDT), mask=mask)


@triton.jit
def _scale_block(pp, offs, mask, d, PDT: tl.constexpr):
    tl.store(pp + offs, _cast(tl.load(pp + offs, mask=mask).to(tl.float32) * d, PDT), mask=mask)


@triton.jit
def _adam_kernel(ptrs, n_tensors, numels, chunk_tensor, first, rows, PDT: tl.constexpr, GDT: tl.constexpr,
                 MDT: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
                 ITERS: tl.constexpr):
    """Adam on chunk c with its tensor's row; an inactive tensor only gets p *= decay_inactive (if != 1)."""
    c, t, start, n = _chunk(chunk_tensor, first, numels, BLOCK * ITERS)
    r = rows + t * ROW
    pp = _base(ptrs, 1, t, n_tensors, PDT, ALIGNED)
    full = start + BLOCK * ITERS <= n
    if tl.load(r + 3) != 0:
        gp = _base(ptrs, 0, t, n_tensors, GDT, ALIGNED)
        mp = _base(ptrs, 2, t, n_tensors, MDT, ALIGNED)
        vp = _base(ptrs, 3, t, n_tensors, MDT, ALIGNED)
        thr, f, gs = tl.load(r), tl.load(r + 1), tl.load(r + 2)
        decay, a1, b2 = tl.load(r + 4), tl.load(r + 6), tl.load(r + 7)
        step, rbc2, eps = tl.load(r + 8), tl.load(r + 9), tl.load(r + 10)
        if full:
            for i in range(ITERS):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                _adam_block(pp, gp, mp, vp, offs, None, thr, f, gs, a1, b2, step, rbc2, eps, decay, PDT, MDT)
        else:
            for i in range(ITERS):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                _adam_block(pp, gp, mp, vp, offs, offs < n, thr, f, gs, a1, b2, step, rbc2, eps, decay, PDT,
                            MDT)
    else:
        d = tl.load(r + 5)
        if d != 1.0:
            if full:
                for i in range(ITERS):
                    _scale_block(pp, start + i * BLOCK + tl.arange(0, BLOCK), None, d, PDT)
            else:
                for i in range(ITERS):
                    offs = start + i * BLOCK + tl.arange(0, BLOCK)
                    _scale_block(pp, offs, offs < n, d, PDT)


# ----------------------------------------------------------------------------- host side
@dataclass(eq=False)
class Plan:
    """Tables and scratch for one list of tensors (all on one device).

    ``ptrs``: int64 ``[7, n]`` = data pointers of g, p, exp_avg, exp_avg_sq, m_max, m_norm, v_norm
    (``host_ptrs``: the same, flat, on the host).
    ``launches``: (chunk_tensor slice, {"PDT", "GDT", "MDT"}: Triton dtypes, aligned) per dtype
    combination and 16-byte alignment of g, p, m, v; a slice holds its first global chunk, then the
    tensor of each of its chunks. ``key``: what every table but ``ptrs`` depends on.
    """

    key: tuple
    n: int
    block: int
    iters: int
    numels: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    gidx: torch.Tensor
    launches: List[Tuple[torch.Tensor, Dict[str, tl.dtype], bool]]
    pmax: torch.Tensor
    psq: torch.Tensor
    M: torch.Tensor
    S: torch.Tensor
    rows: torch.Tensor
    host_ptrs: Optional[List[int]] = None
    ptrs: Optional[torch.Tensor] = None


def _describe(roles: Sequence[List[torch.Tensor]], ptrs: List[int]) -> Optional[tuple]:
    """Per piece (numel, p dtype, g dtype, moment dtype, g/p/m/v 16-byte aligned), or None where the kernels do
    not take a piece: g, p, m, v contiguous with one numel and dtype fp32/bf16/fp16 (m, v alike); the statistics
    fp32 with one element."""
    gs, ps, ms, vs, *stats = roles
    n = len(gs)
    four = gs + ps + ms + vs
    numel = list(map(torch.Tensor.numel, four))
    dt = [t.dtype for t in four]
    scalars = [t for r in stats for t in r]
    if not (all(map(torch.Tensor.is_contiguous, four)) and set(dt) <= DTYPES.keys() and dt[2 * n:3 * n] == dt[3 * n:]
            and numel[:n] == numel[n:2 * n] == numel[2 * n:3 * n] == numel[3 * n:]
            and all(t.dtype == torch.float32 for t in scalars) and set(map(torch.Tensor.numel, scalars)) <= {1}):
        return None
    return tuple(zip(numel[:n], dt[n:2 * n], dt[:n], dt[2 * n:3 * n], _aligned(ptrs, n)))


def _new_grads(gs: List[torch.Tensor], ptrs: List[int], pieces: tuple) -> Optional[tuple]:
    """``pieces`` (see :func:`_describe`) with new gradients ``gs`` (the other pieces are where they were)."""
    dt = [g.dtype for g in gs]
    if not (all(map(torch.Tensor.is_contiguous, gs)) and set(dt) <= DTYPES.keys()
            and list(map(torch.Tensor.numel, gs)) == [k[0] for k in pieces]):
        return None
    return tuple((k[0], k[1], d, k[3], a) for k, d, a in zip(pieces, dt, _aligned(ptrs, len(gs))))


def _aligned(ptrs: List[int], n: int) -> List[bool]:
    """Whether g, p, m, v of each piece start on a 16-byte boundary (vector loads)."""
    g, p, m, v = (ptrs[r * n:(r + 1) * n] for r in range(4))
    return [(a | b | c | d) % 16 == 0 for a, b, c, d in zip(g, p, m, v)]


def _upload(values: List[int], device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def make_plan(roles: Sequence[List[torch.Tensor]], ptrs: List[int], gidx: Sequence[int], device,
              old: Optional[Plan] = None) -> Optional[Plan]:
    """Tables for the pieces ``roles`` = (g, p, exp_avg, exp_avg_sq, m_max, m_norm, v_norm) lists with data
    pointers ``ptrs`` (role-major), None if the kernels do not take one of them. When only the gradients
    moved since ``old``, only they are checked; only the pointer table is uploaded again when numels,
    dtypes, alignment and grouping are ``old``'s.
    """
    n, gidx = len(roles[0]), tuple(gidx)
    if old is not None and old.key[2] == gidx and old.host_ptrs[n:] == ptrs[n:]:
        pieces = _new_grads(roles[0], ptrs, old.key[3:])
    else:
        pieces = _describe(roles, ptrs)
    if pieces is None:
        return None
    key = (BLOCK, ITERS, gidx) + pieces
    plan = old if old is not None and old.key == key else _tables(key, device)
    return replace(plan, host_ptrs=ptrs, ptrs=_upload(ptrs, device))


def _tables(key: tuple, device) -> Plan:
    block, iters, gidx = key[:3]
    n = len(gidx)
    numels = [k[0] for k in key[3:]]
    per = [max(1, -(-k // (block * iters))) for k in numels]
    first = [0] * n
    by_sig: Dict[tuple, List[int]] = {}
    for i, k in enumerate(key[3:]):
        by_sig.setdefault(k[1:], []).append(i)
    tables, pos = [], 0
    for idx in by_sig.values():
        for i in idx:
            first[i] = pos
            pos += per[i]
        tables.append([first[idx[0]]] + [i for i in idx for _ in range(per[i])])
    dev = _upload(numels + first + per + list(gidx) + [x for tb in tables for x in tb], device)
    numel_t, first_t, count_t, gidx_t, *chunk_ts = torch.split(dev, [n, n, n, n] + [len(tb) for tb in tables])
    f32 = dict(dtype=torch.float32, device=device)
    return Plan(key, n, block, iters, numel_t, first_t, count_t, gidx_t,
                [(ct, dict(PDT=DTYPES[p], GDT=DTYPES[g], MDT=DTYPES[m]), aligned)
                 for ct, (p, g, m, aligned) in zip(chunk_ts, by_sig)],
                torch.empty(pos, **f32), torch.empty(pos, **f32), torch.empty(n, **f32), torch.empty(n, **f32),
                torch.empty((n, ROW), **f32))


def _elementwise(plan: Plan, kernel, dtypes: Sequence[str], *args, **const) -> None:
    """One launch of ``kernel`` per dtype combination, one program per chunk."""
    for ct, dts, aligned in plan.launches:
        kernel[(ct.numel() - 1,)](plan.ptrs, plan.n, plan.numels, ct, plan.first, *args, ALIGNED=aligned,
                                  BLOCK=plan.block, ITERS=plan.iters, num_warps=NUM_WARPS,
                                  **{d: dts[d] for d in dtypes}, **const)


def _segment(plan: Plan, part: torch.Tensor, out: torch.Tensor, is_max: bool) -> torch.Tensor:
    _segment_kernel[(plan.n,)](part, plan.first, plan.count, out, IS_MAX=is_max, BLOCK=SEG_BLOCK, num_warps=4)
    return out


def maxabs(plan: Plan) -> torch.Tensor:
    """fp32 ``[n]``: max|g| per tensor (0 if empty, +inf if any NaN/inf); the MAX all-reduce buffer.

    Also keeps each chunk's sum g^2 for :func:`clipped_sumsq`.
    """
    _elementwise(plan, _stats_kernel, ("GDT",), plan.pmax, plan.psq)
    return _segment(plan, plan.pmax, plan.M, True)


def clipped_sumsq(plan: Plan, M: torch.Tensor, consts: torch.Tensor) -> torch.Tensor:
    """fp32 ``[n]``: sum clip(g)^2 per tensor from the completed ``M``; the SUM all-reduce buffer."""
    _elementwise(plan, _clipped_sumsq_kernel, ("GDT",), plan.pmax, plan.psq, plan.gidx, consts, M,
                 NC=consts.shape[1])
    return _segment(plan, plan.psq, plan.S, False)


def adam_update(plan: Plan, M: torch.Tensor, S: torch.Tensor, consts: torch.Tensor) -> torch.Tensor:
    """Update m_max, m_norm, v_norm, then p, exp_avg, exp_avg_sq in place; returns the bool ``active`` mask."""
    active = torch.empty(plan.n, dtype=torch.uint8, device=M.device)
    _scalars_kernel[(triton.cdiv(plan.n, SCALAR_BLOCK),)](plan.ptrs, plan.n, plan.gidx, consts, M, S, plan.rows,
                                                          active, NC=consts.shape[1], ROW=ROW, BLOCK=SCALAR_BLOCK,
                                                          num_warps=4)
    _elementwise(plan, _adam_kernel, ("PDT", "GDT", "MDT"), plan.rows, ROW=ROW)
    return active.view(torch.bool)


def adam_elementwise(plan: Plan, rows: torch.Tensor) -> None:
    """Only the element-wise Adam of :func:`adam_update`, with the caller's fp32 ``[n, ROW]`` rows (columns as
    :func:`_scalars_kernel` writes them; plain AdamW: ``dist_stab.optim.adamw``); a plan of the four roles
    g, p, exp_avg, exp_avg_sq is enough."""
    _elementwise(plan, _adam_kernel, ("PDT", "GDT", "MDT"), rows.contiguous(), ROW=ROW)
