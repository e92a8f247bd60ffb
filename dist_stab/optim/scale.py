"""SCALE: column-normalised SGD with last-layer momentum (arXiv 2506.16659, ICML 2026)."""
from __future__ import annotations

import math
import operator
import re
import sys
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Set

import torch

from ..kernels import use_triton
from ..reducer import SlotLayout, num_collectives
from ._base import (Kernel, OptItem, ShardedOptimizer, check_betas, check_lr, check_nonneg, check_positive,
                    check_unit, local_tensor, pack_scalars, segments, seg_view, _Where)

MATRIX, EMBEDDING, LAST, ADAM = "matrix", "embedding", "last", "adam"
_KEEP = {MATRIX: 0, LAST: 0, EMBEDDING: 1}


def _keep(it) -> int:
    """The dim of an item's units (one scale each): its kind's (:data:`_KEEP`), the other one when transposed."""
    return _KEEP[it.kind] ^ bool(getattr(it, "transposed", False))


# ----------------------------------------------------------------------------- kernels
# Scalar rows: [lr, decay = 1 - lr*wd, w = 1 - beta] for matrices;
# [adam_lr, decay = 1 - adam_lr*wd, 1 - b1, 1 - b2, eps, step_size = adam_lr*sqrt(bc2)/bc1] for 1-D.
def _matrix_update(p, g, inv, ok, sc):
    """p <- p*(1 - lr*wd) - lr * g * inv   on rows/columns whose statistic is finite."""
    pf = p.to(inv.dtype)
    new = pf * sc[1] - sc[0] * (g.to(inv.dtype) * inv)
    p.copy_(torch.where(ok, new, pf))


def _last_norm(m, g, sc, keep=0):
    """Per-row (keep 0) / per-column (keep 1, a transposed lm_head) L2 norm of the updated momentum
    m + (1-beta)(g - m), without writing it."""
    mf = m.to(sc.dtype)
    mn = mf + sc[2] * (g.to(sc.dtype) - mf)
    return (mn * mn).sum(dim=1 - keep).sqrt()


def _last_update(p, g, m, inv, ok, sc):
    """m <- lerp(m, g, 1-beta); p <- p*(1 - lr*wd) - lr * m * inv   on finite rows."""
    mf = m.to(inv.dtype)
    mn = mf + sc[2] * (g.to(inv.dtype) - mf)
    pf = p.to(inv.dtype)
    new = pf * sc[1] - sc[0] * (mn * inv)
    m.copy_(torch.where(ok, mn, mf))
    p.copy_(torch.where(ok, new, pf))


def _adamw_1d(p, g, m, v, sc):
    """Reference AdamW of the 1-D params (eps outside the bias correction), skipping non-finite entries."""
    gf = g.to(sc.dtype)
    ok = torch.isfinite(gf)
    mf, vf, pf = m.to(sc.dtype), v.to(sc.dtype), p.to(sc.dtype)
    mn = mf + sc[2] * (gf - mf)
    vn = vf + sc[3] * (gf * gf - vf)
    new = pf * sc[1] - sc[5] * (mn / (vn.sqrt() + sc[4]))
    m.copy_(torch.where(ok, mn, mf))
    v.copy_(torch.where(ok, vn, vf))
    p.copy_(torch.where(ok, new, pf))


def _norms_many(gs, ms, sc, meta):
    """Per-row (keep 0) / per-column (keep 1) L2 norms of each block; meta[j] = (is_last, keep)."""
    out = []
    for j, (g, m, (last, keep)) in enumerate(zip(gs, ms, meta)):
        if last:
            out.append(_last_norm(m, g, sc[j], keep))
        else:
            out.append(torch.linalg.vector_norm(g, 2, dim=1 - keep, dtype=sc.dtype))
    return out


def _update_many(ps, gs, ms, inv, ok, sc, meta):
    """meta[j] = (is_last, keep, lo, hi): the block's scales are inv[lo:hi] along rows/columns."""
    for j, (p, g, m, (last, keep, lo, hi)) in enumerate(zip(ps, gs, ms, meta)):
        iv, okv = inv[lo:hi], ok[lo:hi]
        iv, okv = (iv[:, None], okv[:, None]) if keep == 0 else (iv[None, :], okv[None, :])
        if last:
            _last_update(p, g, m, iv, okv, sc[j])
        else:
            _matrix_update(p, g, iv, okv, sc[j])


def _local_many(ps, gs, ms, sc, meta):
    """Row norms and update in one pass per block, when no statistic needs completing.

    sc[j] = [lr, decay, 1-beta, 1/n_reduced, eps]; meta[j] = (is_last, keep). Same math as the
    buffer path (norm, square, RMS, floor, reciprocal), one graph: no host gap between phases.
    """
    for j, (p, g, m, (last, keep)) in enumerate(zip(ps, gs, ms, meta)):
        if last:
            n = _last_norm(m, g, sc[j], keep)
        else:
            n = torch.linalg.vector_norm(g, 2, dim=1 - keep, dtype=sc.dtype)
        sq = n * n
        inv = torch.maximum((sq * sc[j, 3]).sqrt(), sc[j, 4]).reciprocal()
        ok = torch.isfinite(sq)
        iv, okv = (inv[:, None], ok[:, None]) if keep == 0 else (inv[None, :], ok[None, :])
        if last:
            _last_update(p, g, m, iv, okv, sc[j])
        else:
            _matrix_update(p, g, iv, okv, sc[j])


def _adamw_many(ps, gs, ms, vs, sc):
    for j, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        _adamw_1d(p, g, m, v, sc[j])


K_NORMS = Kernel(_norms_many)
K_UPDATE = Kernel(_update_many)
K_LOCAL = Kernel(_local_many)
K_ADAMW = Kernel(_adamw_many)


#: Width of the step's scalar table (:meth:`ScalePlan.run`): a row per param group,
#: ``[lr, 1 - lr*wd, 1 - beta, 0, eps, 0]``, then a row per (group, 1-D step count),
#: ``[a, 1 - a*wd, 1 - b1, 1 - b2, eps, a*sqrt(bc2)/bc1]``, ``a = lr * adam_lr_ratio``; padded to 8.
SC_W = 8


def _n_reduced(it) -> int:
    return max(1, it.spec.global_numel // max(1, it.spec.global_shape[_keep(it)]))


def _triton_ok(items, fused: bool, sdt: torch.dtype) -> bool:
    """Whether the Triton kernels (:mod:`dist_stab.kernels.scale_rows`) may take items: fp32 steps; on CUDA
    when ``fused`` (``fused=False`` is the eager reference), on CPU where :func:`dist_stab.kernels.use_triton`
    opts in (Triton's interpreter, tests)."""
    return sdt == torch.float32 and use_triton(items[0].param) and (fused or not items[0].param.is_cuda)


def _row_local(items) -> list:
    """Items for the single-pass row kernel (:class:`dist_stab.kernels.scale_rows.Rows`).

    Matrices and the last layer whose rows are whole on this rank (rectangular pieces that no
    group completes along their rows: plain, FSDP2 ``Shard(0)``, TP colwise), 2-D, contiguous,
    fp32/bf16. These items join no collective, so ranks may choose differently (an empty shard
    stays on the torch path) without changing what the others all-reduce; the choice depends on
    layouts and dtypes only.
    """
    from ..kernels.scale_rows import supported

    return [it for it in items if it.kind in (MATRIX, LAST) and not it.transposed and not it.spec.is_flat
            and all(a.dim == 0 for a in it.spec.axes)  # = not spec.groups(0), without building the tuple
            and supported(it.param, it.grad, it.state["momentum"] if it.kind == LAST else None)]


def _upload(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor of the plan on ``device``: one asynchronous copy from pinned memory on CUDA (no sync)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return t
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


class _Blocks:
    """2-D blocks ``units = [(item position, item, segment)]`` for the torch kernels: param and momentum
    views, and the per-block table ``sc[j] = [lr, decay, 1 - beta, 1/n, eps, 0]`` gathered from the step's."""

    def __init__(self, units, gi, device, sdt):
        self.units = [(i, s) for i, _, s in units]
        self.p = [seg_view(it.param, s) for _, it, s in units]
        self.m = [seg_view(it.state["momentum"], s) if it.kind == LAST else None for _, it, s in units]
        self.last = [it.kind == LAST for _, it, _ in units]
        self.keep = [_keep(it) for _, it, _ in units]
        self.gidx = _upload(torch.tensor([gi[id(it.hp)] for _, it, _ in units], dtype=torch.long), device)
        cols = torch.zeros((len(units), SC_W), dtype=torch.float64)
        cols[:, 3] = torch.tensor([1.0 / _n_reduced(it) for _, it, _ in units], dtype=torch.float64)
        self.inv_n = _upload(cols.to(sdt), device)

    def grads(self, grads) -> list:
        return [seg_view(grads[i], s) for i, s in self.units]

    def scalars(self, sc: torch.Tensor) -> torch.Tensor:
        return sc.index_select(0, self.gidx).add_(self.inv_n)


class ScalePlan:
    """One SCALE step over a fixed list of items; what depends only on the tensors is built once.

    Built here: the kernel of each item (Triton row kernel, Triton 1-D AdamW, else the torch kernels),
    the 2-D block views, the slot layout, per-block group index and 1/n, kernel tables. Per step
    (:meth:`run`): one upload of the scalar table (see :data:`SC_W`), read from the live group dicts (an
    LR scheduler is followed), and the launches. The plan keeps no gradient: :meth:`run` takes the step's
    gradients (``grads[i]`` of ``items[i]``; same dtypes, shapes and layouts as at build time).
    ``counters``: more dicts (one per 1-D item, in order) whose ``"step"`` follows the items'.
    """

    def __init__(self, items: Sequence[OptItem], *, layouts: Optional[Dict] = None, fused: bool = False,
                 validate: bool = True, tag: str = "SCALE", counters: Sequence[dict] = ()):
        self.device = device = items[0].param.device
        self.sdt = sdt = torch.float64 if any(it.param.dtype == torch.float64 for it in items) else torch.float32
        self.fused, self.tag, self.steps = fused, tag, 0
        hps = {id(it.hp): it.hp for it in items}
        self.groups = list(hps.values())
        gi = {k: i for i, k in enumerate(hps)}
        pos = {id(it): i for i, it in enumerate(items)}
        triton = _triton_ok(items, fused, sdt)
        if triton:
            from ..kernels import scale_rows
        # 1-D AdamW: a table row per (group, step count when built)
        adam = [it for it in items if it.kind == ADAM]
        combos: Dict[tuple, int] = {}
        rows = [len(hps) + combos.setdefault((gi[id(it.hp)], int(it.state.get("step", 0))), len(combos))
                for it in adam]
        self.combos = list(combos)
        self.counters = [it.state for it in adam] + list(counters)
        self.k0 = [int(it.state.get("step", 0)) for it in adam] * (1 + bool(counters))
        fast_adam = [j for j, it in enumerate(adam) if triton and scale_rows.supported_1d(
            it.param, it.grad, it.state["exp_avg"], it.state["exp_avg_sq"])]
        self.adam = self._adam(adam, fast_adam, rows, pos, triton)
        # matrices, embedding, lm_head
        fast = _row_local([it for it in items if it.kind != ADAM]) if triton else []
        self.rows = None
        if fast:
            self.rows = (scale_rows.Rows(tuple((it.param.shape, it.param.dtype, it.kind == LAST) for it in fast),
                                         [gi[id(it.hp)] for it in fast], [1.0 / _n_reduced(it) for it in fast],
                                         device),
                         [pos[id(it)] for it in fast], [it.param for it in fast],
                         [it.state["momentum"] if it.kind == LAST else None for it in fast])
        done = {id(it) for it in fast}
        self.norm = self._norm([it for it in items if it.kind != ADAM and id(it) not in done], pos, gi, layouts,
                               validate)

    def _adam(self, adam, fast, rows, pos, triton):
        """(Triton plan, positions, p, m, v) of the kernel's pieces, then (positions, p, m, v, rows) of the rest."""
        out = []
        taken = set(fast)
        for sel in (fast, [j for j in range(len(adam)) if j not in taken]):
            its = [adam[j] for j in sel]
            lists = ([pos[id(it)] for it in its], [it.param for it in its], [it.state["exp_avg"] for it in its],
                     [it.state["exp_avg_sq"] for it in its])
            if sel is fast:
                out.append((self._adam_plan(its, [rows[j] for j in sel]),) + lists if its else None)
            else:
                out.append(lists + (_upload(torch.tensor([rows[j] for j in sel], dtype=torch.long), self.device),)
                           if its else None)
        return out

    def _adam_plan(self, its, rows):
        from ..kernels import scale_rows

        return scale_rows.AdamW(tuple((it.param.numel(), it.param.dtype) for it in its), rows, self.device)

    def _norm(self, items, pos, gi, layouts, validate):
        """The torch path of matrices / embedding / lm_head: blocks, slot layout, per-row 1/n and group."""
        if not items:
            return None
        device, sdt = self.device, self.sdt
        key = tuple((it.spec.fqn, it.kind, _keep(it), it.spec.kept_length(_keep(it))) for it in items)
        cache = layouts if layouts is not None else {}
        hit = cache.get(key)
        if hit is None:
            segs = [segments(it.spec, _keep(it)) for it in items]
            lens = [it.spec.kept_length(_keep(it)) for it in items]
            groups = [it.spec.groups(_keep(it)) for it in items]
            layout = SlotLayout([f"{it.spec.fqn}:{it.kind}" for it in items], lens, groups, validate, device)
            inv_n = _upload(torch.cat([torch.full((n,), 1.0 / _n_reduced(it), dtype=sdt)
                                       for n, it in zip(lens, items)]), device) if sum(lens) else torch.zeros(
                0, dtype=sdt, device=device)
            hit = cache[key] = (segs, lens, layout, inv_n)
        segs, lens, layout, inv_n = hit
        units = [(pos[id(it)], it, s) for it, sg in zip(items, segs) for s in sg]
        local_only = bool(units) and num_collectives(layout) == 0 and not any(it.spec.is_flat for it in items)
        # nothing to complete: norms and update of the matrices in one graph (no host gap between the
        # phases); the last layer keeps the two phases (inductor 2.11 miscompiles a row reduction of m
        # fused with the in-place write of m in one graph)
        loc = _Blocks([u for u in units if u[1].kind != LAST], gi, device, sdt) if local_only else None
        if local_only:
            units = [u for u in units if u[1].kind == LAST]
        blocks = _Blocks(units, gi, device, sdt)
        row_group = _upload(torch.repeat_interleave(torch.tensor([gi[id(it.hp)] for it in items], dtype=torch.long),
                                                    torch.tensor(lens, dtype=torch.long)), device)
        # per item: (flat, kept length, vector slices of its blocks); per block: its slice of the buffer
        parts = [(it.spec.is_flat, n, [s.vec for s in sg]) for it, n, sg in zip(items, lens, segs)]
        ipos = {id(it): i for i, it in enumerate(items)}
        umeta = []
        for _, it, s in units:
            base = layout.offsets[ipos[id(it)]]
            lo, hi = (base + s.vec[0], base + s.vec[1]) if it.spec.is_flat else (base, base + s.vec[1] - s.vec[0])
            umeta.append((it.kind == LAST, _keep(it), lo, hi))
        return local_only, loc, blocks, layout, inv_n, row_group, parts, tuple(umeta)

    def counters_at_rest(self) -> bool:
        """Whether every 1-D step counter is where :meth:`run` left it (nobody else moved it)."""
        return all(int(st.get("step", -1)) == k0 + self.steps for st, k0 in zip(self.counters, self.k0))

    def run(self, grads: Sequence[torch.Tensor]) -> None:
        """One step: params and state updated in place; the 1-D step counters advanced."""
        self.steps += 1
        rows = []
        for hp in self.groups:
            lr, wd = float(hp["lr"]), float(hp["weight_decay"])
            rows.append((lr, 1.0 - lr * wd, 1.0 - float(hp["beta"]), 0.0, float(hp["eps"]), 0.0))
        for g, k0 in self.combos:
            hp, k = self.groups[g], k0 + self.steps
            b1, b2 = (float(b) for b in hp["adam_betas"])
            alr = float(hp["lr"]) * float(hp["adam_lr_ratio"])
            rows.append((alr, 1.0 - alr * float(hp["weight_decay"]), 1.0 - b1, 1.0 - b2, float(hp["eps"]),
                         alr * math.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k)))
        sc = pack_scalars(rows, self.device, self.sdt, SC_W)
        for st, k0 in zip(self.counters, self.k0):
            st["step"] = k0 + self.steps
        if self.rows is not None:
            plan, idx, ps, ms = self.rows
            plan.step_(ps, [grads[i] for i in idx], ms, sc)
        if self.norm is not None:
            self._run_norm(grads, sc)
        fast, rest = self.adam
        if fast is not None:
            plan, idx, ps, ms, vs = fast
            plan.step_(ps, [grads[i] for i in idx], ms, vs, sc)
        if rest is not None:
            idx, ps, ms, vs, ridx = rest
            K_ADAMW(self.fused, ps, [grads[i] for i in idx], ms, vs, sc.index_select(0, ridx))

    def _run_norm(self, grads, sc) -> None:
        local_only, loc, blocks, layout, inv_n, row_group, parts, umeta = self.norm
        fused, device, sdt = self.fused, self.device, self.sdt
        if loc is not None and loc.p:
            K_LOCAL(fused, loc.p, loc.grads(grads), [None] * len(loc.p), loc.scalars(sc),
                    tuple(zip([False] * len(loc.p), loc.keep)))
        if not blocks.p:
            return
        # 1) local partial row norms (of g; of the updated momentum for the last layer), squared at once.
        #    Blocks = 2-D views: one per rectangular piece, up to three per flat piece.
        usc = blocks.scalars(sc)
        g2 = blocks.grads(grads)
        norms = K_NORMS(fused, g2, blocks.m, usc, tuple(zip(blocks.last, blocks.keep)))
        if local_only:  # the last layer of a local-only step
            sqs = [n.square() for n in norms]
            inv = torch.cat([torch.maximum((q * usc[j, 3]).sqrt(), usc[j, 4]).reciprocal() for j, q in enumerate(sqs)])
            ok = torch.isfinite(torch.cat(sqs))
            umeta, off = [], 0
            for n, keep in zip(norms, blocks.keep):
                umeta.append((True, keep, off, off + n.numel()))
                off += n.numel()
            K_UPDATE(fused, blocks.p, g2, blocks.m, inv, ok, usc, tuple(umeta))
            return
        vecs, u = [], 0
        for flat, n, sl in parts:
            if flat:  # partial rows of a flat piece add up as squares
                part = torch.zeros(n, dtype=sdt, device=device)
                for lo, hi in sl:
                    part[lo:hi] += norms[u].square()
                    u += 1
                vecs.append(part.sqrt())
            else:
                vecs.append(norms[u])
                u += 1
        buf = torch.cat(vecs).square_() if vecs else torch.zeros(0, dtype=sdt, device=device)
        # 2) complete them: one SUM per group, for all tensors together
        layout.complete(buf, "sum", self.tag)
        # 3) 1 / max(RMS, eps) per row/column; a non-finite statistic skips its row/column
        inv = torch.maximum((buf * inv_n).sqrt(), sc[:, 4].index_select(0, row_group)).reciprocal()
        ok = torch.isfinite(buf)
        # 4) update, block by block; a block's scales are a slice of the completed buffer
        K_UPDATE(fused, blocks.p, g2, blocks.m, inv, ok, usc, umeta)


# ----------------------------------------------------------------------------- functional core
def scale_step(items: Sequence[OptItem], *, layouts: Optional[Dict] = None, fused: bool = False,
               validate: bool = True, tag: str = "SCALE") -> None:
    """One SCALE step over local pieces (rectangular or flat); updates params and state in place.

    ``item.kind``: ``"matrix"`` (per-row RMS, keep_dim 0), ``"embedding"`` (per-column RMS over
    the vocab, keep_dim 1), ``"last"`` (momentum ``state["momentum"]``, then per-row RMS) or
    ``"adam"`` (``state["exp_avg"]``, ``state["exp_avg_sq"]``, ``state["step"]`` int: AdamW).
    ``item.transposed``: a 2-D matrix / last layer / embedding stored ``[in, out]`` (``Conv1D``): its
    statistic is taken along the other dim (per column for a matrix or the last layer).
    ``item.hp`` needs ``lr``, ``weight_decay``, ``beta``, ``eps``, ``adam_lr_ratio``, ``adam_betas``.

    All per-row/per-column partial sums of squares are packed in one buffer and completed with
    one SUM all-reduce per process group (none when every reduced dim is local). With ``fused``
    on CUDA, matrices and the last layer whose rows are local skip the buffer: the Triton row
    kernel updates them in one pass (see :func:`_row_local`), and the 1-D AdamW is one Triton
    launch. :class:`ScalePlan` is this step built once for many (what :class:`SCALE` does).
    """
    if items:
        ScalePlan(items, layouts=layouts, fused=fused, validate=validate, tag=tag).run([it.grad for it in items])


# ----------------------------------------------------------------------------- model inspection
def _resolve(spec, model: Optional[torch.nn.Module], named: Dict[str, torch.Tensor], what: str) -> torch.Tensor:
    if isinstance(spec, torch.nn.Module):
        w = getattr(spec, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{what}: module {type(spec).__name__} has no weight")
        return w
    if isinstance(spec, torch.Tensor):
        return spec
    if isinstance(spec, str):
        if spec in named:
            return named[spec]
        if model is not None:
            mods = dict(model.named_modules())
            if spec in mods and isinstance(getattr(mods[spec], "weight", None), torch.Tensor):
                return mods[spec].weight
        raise ValueError(f"{what}={spec!r} names no parameter or module (known parameters: "
                         f"{sorted(named)[:8]}{'...' if len(named) > 8 else ''})")
    raise TypeError(f"{what} must be a module, a parameter or a name, got {type(spec).__name__}")


#: Names of transformers' Conv1D weights (GPT-2, OpenAI GPT): only a warning without a module (GPTBigCode's
#: nn.Linear weights have the same names).
_CONV1D_NAME = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")


def _embedding_name(name: str) -> bool:
    """Embeddings found by name (no module): names containing ``embed`` (the authors match ``embed_tokens``) or
    ending in GPT-2's ``wte.weight`` / ``wpe.weight`` (both ``nn.Embedding``, as a module would show)."""
    return "embed" in name or name.endswith("wte.weight") or name.endswith("wpe.weight")


def _is_conv1d(m: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (``transformers.pytorch_utils``; GPT-2, OpenAI GPT): a linear layer whose weight is
    stored ``[in, out] = [nx, nf]``. Recognised by its class name (or a base's) and its ``nf``/``nx`` attributes,
    without importing transformers."""
    if not any(c.__name__ == "Conv1D" for c in type(m).__mro__):
        return False
    w, nf, nx = getattr(m, "weight", None), getattr(m, "nf", None), getattr(m, "nx", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(nf, int) and isinstance(nx, int)
            and tuple(w.shape) == (nx, nf))


def find_last_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module producing the logits: ``get_output_embeddings()`` if the model has it, else the
    largest ``nn.Linear`` whose ``out_features`` equals the vocabulary of an ``nn.Embedding``,
    else the largest Linear named ``lm_head``/``output``, else None."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except NotImplementedError:
            out = None
        if isinstance(out, torch.nn.Module) and isinstance(getattr(out, "weight", None), torch.Tensor):
            return out
    vocabs = {m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    cands = [m for n, m in linears if m.weight.shape[0] in vocabs]
    if not cands:
        cands = [m for n, m in linears if n.split(".")[-1] in ("lm_head", "output", "head")]
    if not cands:
        return None
    return max(cands, key=lambda m: m.weight.numel())


def _no_adam_lr(name: str, value) -> None:
    raise ValueError(f"{name}: SCALE keeps the 1-D learning rate as adam_lr_ratio = adam_lr / lr (so an LR scheduler "
                     "scales both); set 'adam_lr_ratio' in a group that already exists")


class SCALE(ShardedOptimizer):
    r"""SCALE: Stochastic Column-normalized Last-layer Momentum (arXiv 2506.16659).

    For a matrix gradient ``G`` of shape ``[out, in]`` (``nn.Linear.weight``), one scale per
    output unit (row), ``n = in``::

        U = G / max(RMS_row(G), eps),   RMS_row(G)_i = sqrt(mean_j G_ij^2)
        W <- W * (1 - lr*wd) - lr * U

    The input embedding ``[vocab, d]`` is normalised over the vocabulary (one scale per hidden
    unit). The last layer (lm_head) keeps a momentum ``M <- beta*M + (1-beta)*G`` (no bias
    correction) and ``M`` is normalised per row like a matrix. Parameters with ``ndim <= 1``
    (norm gains, biases) use AdamW with the authors' eps placement,
    ``p <- p*(1 - a*wd) - a*sqrt(bc2)/bc1 * m/(sqrt(v) + eps)``, ``a = adam_lr * lr(t)/lr``.
    Tensors with ``ndim > 2`` are viewed ``[size(0), -1]``.

    **Transposed weights.** A 2-D weight stored ``[in, out]`` (transformers' ``Conv1D`` in GPT-2 / OpenAI
    GPT: ``y = x @ W``) is normalised per output unit too, i.e. per *column* (``unit_dim(p) == 1``;
    an lm_head stored ``[d, vocab]`` gets its momentum and one scale per vocabulary column, an embedding
    stored ``[d, vocab]`` one scale per row). ``Conv1D`` weights are detected in the module (by class name
    and its ``nf``/``nx`` attributes; transformers is never imported); ``transposed=`` names others.

    **Names.** SCALE must find the input embedding(s) and the lm_head. From a module (``SCALE(model)`` or
    ``module=model`` next to any parameters / groups: by module type, whatever the names), else from
    parameter names: ``named_parameters()`` pairs, groups with ``param_names`` (torch >= 2.6 named groups,
    as torchtitan's container passes them; kept in ``param_groups`` and state dicts), and strings in
    ``last_layer`` / ``embeddings`` / ``transposed``. Parameters without a name and no module
    (``Trainer(optimizer_cls_and_kwargs=(SCALE, {...}))``, ``ZeroRedundancyOptimizer(optimizer_class=SCALE)``)
    are refused with a ``ValueError`` naming what to pass, unless both ``embeddings=`` and ``last_layer=``
    are given (``[]`` / ``False``: there is none): an embedding taken for a matrix would silently be
    normalised per vocabulary row. By names alone, ``Conv1D`` cannot be told from ``nn.Linear`` (GPT-2's
    ``c_attn``/``c_fc``/``c_proj`` are ``nn.Linear`` in GPTBigCode): such names warn; pass ``module=``.

    **ZeroRedundancyOptimizer**: ``ZeroRedundancyOptimizer(params, optimizer_class=SCALE, module=model, lr=...)``
    (or ``last_layer=`` + ``embeddings=`` + ``transposed=`` as modules or tensors) works on every rank; a rank
    whose partition lacks the lm_head simply has no momentum. ZeRO keeps its kwargs in its own groups and state
    dict (a module object included): ``optimizer_class=functools.partial(SCALE, module=model)`` keeps them out.

    **LR schedulers**: ``OneCycleLR`` and ``CyclicLR`` need ``cycle_momentum=False``: SCALE has no ``momentum``
    or ``betas`` for them to cycle (its last-layer momentum is ``beta``, the 1-D AdamW's ``adam_betas``);
    with the default they raise a ``ValueError`` saying so.

    Args:
        params_or_model: a module (the last layer and embeddings are found in it), or
            parameters / ``named_parameters()`` pairs / param groups (with or without ``param_names``).
        lr: learning rate of matrices. Default 1e-3 (authors' 60M-350M scripts; 1B: 2e-4).
        beta: last-layer momentum. Default 0.9 (authors' code ``momentum``).
        weight_decay: decoupled, ``W <- W*(1 - lr*wd)`` for every parameter. Default 0 (scripts).
        adam_lr: peak lr of the 1-D parameters. Default None = ``lr`` (authors' code); their
            60M-350M scripts use 2e-2. Stored per group as ``adam_lr_ratio = adam_lr / lr``, so an
            LR scheduler that scales ``lr`` scales the 1-D lr alike (the authors' ``adam_lr *
            lr / max_lr``).
        adam_betas: AdamW betas of the 1-D parameters. Default (0.9, 0.999) (authors' code).
        eps: floor of the RMS (authors: 1e-8, hard-coded) and AdamW eps (authors: 1e-8).
        last_layer: module, parameter or FQN of the output layer; ``False``: there is none (no
            momentum anywhere, no warning). With a module and no ``last_layer``:
            ``get_output_embeddings()``, else the largest Linear with a vocabulary-sized output (see
            :func:`find_last_layer`); by names: ``lm_head.weight`` / ``output.weight``. One that is a
            parameter of ``module`` but not among these parameters is held elsewhere (another ZeRO rank,
            a pipeline stage): fine; without a module to tell, that warns (a stale reference?).
        embeddings: modules/parameters/FQNs normalised over their first dim (vocab); ``[]``: none.
            Default: the ``nn.Embedding`` weights of the module, else parameters whose name contains
            ``embed`` or ends with ``wte.weight`` / ``wpe.weight`` (the authors match ``embed_tokens``).
        tied_embeddings: how to treat a last layer that shares its weight with the input
            embedding: None (default) raises; ``"last"``: momentum + per-row normalisation;
            ``"embedding"``: per-hidden-unit normalisation over vocab without momentum (what
            the authors' name matching does).
        transposed: 2-D weights stored ``[in, out]``, in addition to the ``Conv1D`` weights found in
            the module: modules/parameters/FQNs, or a predicate ``(name or None, param) -> bool``;
            ``False``: none, not even ``Conv1D`` (normalised per row, i.e. per input unit, as before).
        module: the model, when ``params_or_model`` are parameters or groups: classification (and names
            for strings) come from it, by parameter identity.
        fused: fast kernels (None: on CUDA when Triton is available): single-pass Triton row
            kernels for the matrices and the lm_head whose rows are local, ``torch.compile`` for
            the rest; False: the same math in eager torch.

    Distributed: per-row (per-column for the embedding) partial sums of squares of all
    tensors are packed into one buffer and completed with one SUM all-reduce per process
    group. Row-sharded matrices (FSDP2 ``Shard(0)``, TP colwise, vocab-parallel lm_head) and a
    hidden-dim-sharded embedding are local: zero collectives if no tensor has its reduced dim
    sharded. Column-sharded matrices (TP rowwise) and a vocab-sharded embedding contribute
    their partial sums. Flat pieces (``flat_start`` set) are cut into at most three 2-D blocks.
    Element-wise state (momentum, AdamW moments) lives on the local piece: a DTensor with the
    parameter's placements for DTensor parameters (``torch.zeros_like(p)``), so
    ``torch.distributed.checkpoint`` can reshard it to another mesh.

    Bad input: a row (column for the embedding) whose completed sum of squares is not finite
    gets no update and no weight decay, and the last layer's momentum of that row is kept; the
    decision depends only on the completed statistic, so it is the same on any mesh. 1-D
    AdamW skips non-finite entries element-wise (moments and parameter kept).

    Deviations from the authors' code (OptimAI-Lab/Minimalist_LLM_Pretraining, scale_optimizer.py):
    one ``eps`` for the RMS floor and AdamW; parameters are classified by module type rather
    than names containing ``attn``/``mlp``/``embed_tokens``; a tied embedding raises unless
    ``tied_embeddings`` is given; the 1-D step counter is per parameter, as in the code; ``[in, out]``
    weights are normalised per output unit (the authors' code would take them per input unit).
    """

    tag = "SCALE"
    _fp32_state_keys = ()
    _by_param_attrs = ("_names", "_kinds", "_transposed")
    _hp_rules = {"lr": check_lr, "beta": check_unit, "weight_decay": check_nonneg, "adam_lr_ratio": check_nonneg,
                 "adam_betas": check_betas, "eps": check_positive, "adam_lr": _no_adam_lr}

    def __init__(self, params_or_model, lr: float = 1e-3, beta: float = 0.9, weight_decay: float = 0.0,
                 adam_lr: Optional[float] = None, adam_betas=(0.9, 0.999), eps: float = 1e-8,
                 last_layer=None, *, embeddings=None, tied_embeddings: Optional[str] = None, transposed=None,
                 module: Optional[torch.nn.Module] = None, fused: Optional[bool] = None, validate: bool = True):
        check_lr("lr", lr)
        check_unit("beta", beta)
        check_nonneg("weight_decay", weight_decay)
        if adam_lr is not None:
            check_lr("adam_lr", adam_lr)
            if float(lr) == 0.0 and float(adam_lr) != 0.0:
                raise ValueError("adam_lr is kept as a ratio to lr, so lr must be > 0 when adam_lr is given")
        check_betas("adam_betas", adam_betas)
        check_nonneg("eps", eps, positive=True)
        if tied_embeddings not in (None, "last", "embedding"):
            raise ValueError(f"tied_embeddings must be None, 'last' or 'embedding', got {tied_embeddings!r}")
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        model = params_or_model if isinstance(params_or_model, torch.nn.Module) else module
        if not isinstance(params_or_model, torch.nn.Module):
            params_or_model = _drop_constructor_keys(params_or_model)
        ratio = 1.0 if adam_lr is None else (float(adam_lr) / float(lr) if float(lr) > 0 else 0.0)
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, adam_lr_ratio=ratio,
                        adam_betas=tuple(adam_betas), eps=eps)
        self.validate = validate
        self._adam_lr_arg = None if adam_lr is None else float(adam_lr)
        self._kinds: Dict[int, str] = {}
        self._transposed: Dict[int, bool] = {}
        super().__init__(params_or_model, defaults, fused=fused)
        self.defaults = _Defaults(self.defaults)
        self._kinds = self._classify(model, last_layer, embeddings, tied_embeddings, transposed)
        self.cache_builds = 0  # how often step() built its items and plan

    # ------------------------------------------------------------------ classification
    def _classify(self, model, last_layer, embeddings, tied, transposed) -> Dict[int, str]:
        named = {n: p for n, p in (model.named_parameters(remove_duplicate=False) if model is not None else [])}
        all_params = [p for g in self.param_groups for p in g["params"]]
        named.update({self._names[id(p)]: p for p in all_params if id(p) in self._names})
        by_id = {id(p): n for n, p in named.items()}
        unnamed = [p for p in all_params if id(p) not in by_id]
        if unnamed and (embeddings is None or last_layer is None):
            raise ValueError(
                f"SCALE: {len(unnamed)} of the {len(all_params)} parameters have no name (the first has shape "
                f"{tuple(unnamed[0].shape)}) and no module was given, so SCALE cannot find the input embedding "
                "(normalised per hidden unit over the vocabulary; taken for a matrix it would be normalised per "
                "vocabulary row), the lm_head (momentum) or transformers' Conv1D weights among them. Pass one of: "
                "module=model (e.g. Trainer(optimizer_cls_and_kwargs=(SCALE, {'module': model, ...})), "
                "ZeroRedundancyOptimizer(params, optimizer_class=SCALE, module=model, ...)); named parameters "
                "(model.named_parameters(), or param groups with 'param_names'); or both embeddings=[<embedding "
                "weights or modules>] (embeddings=[] if there is none) and last_layer=<lm_head module or weight> "
                "(last_layer=False if there is none).")
        # embeddings
        emb_ids: Set[int] = set()
        if embeddings is not None:
            seq = embeddings if isinstance(embeddings, (list, tuple, set)) else [embeddings]
            emb_ids = {id(_resolve(e, model, named, "embeddings")) for e in seq}
        elif model is not None:
            emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        else:
            emb_ids = {id(p) for p in all_params if _embedding_name(by_id.get(id(p), ""))}
        # last layer
        last = None
        if last_layer is False:
            pass
        elif last_layer is not None:
            last = _resolve(last_layer, model, named, "last_layer")
        elif model is not None:
            mod = find_last_layer(model)
            last = mod.weight if mod is not None else None
        else:
            for p in all_params:
                n = by_id.get(id(p), "")
                if n.endswith("lm_head.weight") or n == "output.weight":
                    last = p
        if last is not None and id(last) in emb_ids:
            if tied is None:
                raise ValueError(
                    f"SCALE: the last layer {by_id.get(id(last), '(weight)')!r} is tied to the input embedding. "
                    "SCALE treats them differently (lm_head: momentum + per-row normalisation; embedding: "
                    "per-hidden-unit normalisation over the vocabulary). Untie them, or pass "
                    "tied_embeddings='last' (momentum, per-row) or tied_embeddings='embedding' (no momentum, "
                    "the authors' code behaviour).")
            if tied == "last":
                emb_ids.discard(id(last))
            else:
                last = None
        if last is not None and not any(p is last for p in all_params):
            # held by another optimizer (a ZeroRedundancyOptimizer rank, a pipeline stage) when the module has it
            if model is None or not any(q is last for q in model.parameters()):
                warnings.warn(
                    f"SCALE: last_layer {by_id.get(id(last), '(a tensor)')!r} is not among this optimizer's parameters "
                    "and no module was given to check it: no parameter gets momentum here. Expected where another "
                    "optimizer holds the lm_head (a ZeroRedundancyOptimizer rank, a pipeline stage; pass module=model "
                    "to silence this); otherwise the reference is stale (e.g. taken before fully_shard replaced the "
                    "parameters): pass the module (last_layer=model.lm_head).", UserWarning, stacklevel=3)
            last = None
        elif last is None and last_layer is None and any(p.dim() >= 2 for p in all_params) and tied != "embedding":
            warnings.warn("SCALE: no last layer (lm_head) found; every matrix is normalised without momentum. "
                          "Pass last_layer= to name it (last_layer=False: there is none).", UserWarning, stacklevel=3)
        if (embeddings is None and model is None and last is not None
                and not any(id(p) in emb_ids for p in all_params)):
            like = [by_id.get(id(p), "") for p in all_params
                    if p is not last and p.dim() == 2 and tuple(p.shape) == tuple(last.shape)]
            if like:
                warnings.warn(
                    f"SCALE: {like[0]!r} has the lm_head's shape {tuple(last.shape)} but no embedding name (names "
                    "containing 'embed' or ending in 'wte.weight'/'wpe.weight'), so it is normalised as a matrix, per "
                    "vocabulary row. If it is the input embedding, pass embeddings=[...] (or module=model); "
                    "embeddings=[] says there is none.", UserWarning, stacklevel=3)
        trans = self._find_transposed(model, transposed, named, by_id, all_params)
        kinds = {}
        for p in all_params:
            if p.dim() <= 1:
                kinds[id(p)] = ADAM
            elif last is not None and p is last:
                kinds[id(p)] = LAST
            elif id(p) in emb_ids:
                if p.dim() != 2:
                    raise ValueError(f"embedding {by_id.get(id(p), '')!r} must be 2-D, got shape {tuple(p.shape)}")
                kinds[id(p)] = EMBEDDING
            else:
                kinds[id(p)] = MATRIX
        self._transposed = {id(p): True for p in all_params if id(p) in trans}
        return kinds

    def _find_transposed(self, model, transposed, named, by_id, all_params) -> Set[int]:
        """ids of the 2-D weights stored ``[in, out]``: Conv1D weights of ``model`` (unless ``transposed is False``),
        plus those ``transposed`` names (modules / parameters / FQNs, or a predicate ``(name, param) -> bool``)."""
        if transposed is False:
            return set()
        out: Set[int] = set()
        if model is not None:
            out = {id(m.weight) for m in model.modules() if _is_conv1d(m)}
        elif transposed is None:
            like = [by_id[id(p)] for p in all_params if p.dim() == 2 and _CONV1D_NAME.search(by_id.get(id(p), ""))]
            if like:
                warnings.warn(
                    f"SCALE: {like[0]!r}{f' and {len(like) - 1} more' if len(like) > 1 else ''} look like weights of "
                    "transformers' Conv1D (GPT-2), stored [in, out], but no module was given to tell them from "
                    "nn.Linear weights of the same names (GPTBigCode): they are normalised per row, i.e. per input unit "
                    "if they are Conv1D. Pass module=model (detects Conv1D), or transposed=[...] naming them, or "
                    "transposed=False.", UserWarning, stacklevel=4)
        if transposed is None:
            pass
        elif callable(transposed) and not isinstance(transposed, (torch.nn.Module, torch.Tensor)):
            out |= {id(p) for p in all_params if p.dim() == 2 and transposed(by_id.get(id(p)), p)}
        else:
            seq = transposed if isinstance(transposed, (list, tuple, set)) else [transposed]
            for t in seq:
                w = _resolve(t, model, named, "transposed")
                if w.dim() != 2:
                    raise ValueError(f"transposed: {by_id.get(id(w), '(a tensor)')!r} has shape {tuple(w.shape)}; only "
                                     "2-D weights can be stored transposed")
                out.add(id(w))
        return out

    def kind_of(self, p: torch.Tensor) -> str:
        """``"matrix"``, ``"embedding"``, ``"last"`` or ``"adam"``."""
        return self._kinds.get(id(p)) or (ADAM if p.dim() <= 1 else MATRIX)

    def is_transposed(self, p: torch.Tensor) -> bool:
        """Whether the 2-D weight ``p`` is stored ``[in, out]`` (transformers' ``Conv1D``, ``transposed=``): its
        units (one scale each) are its columns (rows for an embedding stored ``[d, vocab]``)."""
        return bool(self._transposed.get(id(p), False)) and self.kind_of(p) != ADAM

    def unit_dim(self, p: torch.Tensor) -> Optional[int]:
        """The dim of ``p``'s units, one scale each (0: rows, 1: columns); None for a 1-D (AdamW) parameter."""
        kind = self.kind_of(p)
        return None if kind == ADAM else _KEEP[kind] ^ self.is_transposed(p)

    def add_param_group(self, param_group: dict) -> None:
        if "adam_lr" in param_group:
            gi = len(self.param_groups)
            lr = param_group.get("lr", self.defaults["lr"])
            check_lr(_Where(self.tag, gi, "adam_lr"), param_group["adam_lr"])
            check_lr(_Where(self.tag, gi, "lr"), lr)
            lr = float(lr)
            param_group["adam_lr_ratio"] = float(param_group.pop("adam_lr")) / lr if lr > 0 else 0.0
        super().add_param_group(param_group)
        self._cache = None

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._cache = None

    def _after_load(self) -> None:
        self._cache = None  # its plan holds the replaced group dicts

    def _initial_state(self, p: torch.Tensor) -> dict:
        kind = self.kind_of(p)
        if kind == LAST:
            return {"momentum": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if kind == ADAM:
            return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format), "step": 0}
        return {}

    # ------------------------------------------------------------------ step
    def _drop_echoes(self) -> None:
        """``ZeroRedundancyOptimizer(optimizer_class=SCALE, **kwargs)`` keeps its kwargs in its own groups and copies
        them into SCALE's before every step: SCALE's constructor-only arguments are dropped, and so is an
        ``adam_lr`` equal to the constructor's (SCALE keeps it as ``adam_lr_ratio``); any other ``adam_lr`` in a
        group is refused by the group check."""
        for g in self.param_groups:
            if _ECHOES.isdisjoint(g):
                continue
            for k in _CONSTRUCTOR_ONLY.intersection(g):
                del g[k]
            a, given = g.get("adam_lr"), getattr(self, "_adam_lr_arg", None)
            if given is not None and isinstance(a, (int, float)) and not isinstance(a, bool) and float(a) == given:
                del g["adam_lr"]

    def _plan(self, collected: list, raw: list, sig: tuple):
        """(:class:`_StepCache` of the parameters with a gradient (state created on first use), their gradients)."""
        items: List[OptItem] = []
        owners, shards = [], []
        for group, p, sp, g in collected:
            kind = self.kind_of(p)
            st = self.state[p]  # matrices and embeddings: an empty entry (DCP's loader wants one per parameter)
            if kind in (LAST, ADAM) and ("momentum" if kind == LAST else "exp_avg") not in st:
                st.update(self._initial_state(p))
            local = {k: (local_tensor(v) if torch.is_tensor(v) else v) for k, v in st.items()}
            items.append(OptItem(sp.spec, sp.local_param(), g, local, group, kind,
                                 kind != ADAM and bool(self._transposed.get(id(p), False))))
            owners.append(p)
            shards.append(sp)
        if not items:
            return _StepCache(self.state, raw, [], [], None, None, sig), []
        held = [(p, self.state[p], k, self.state[p][k]) for it, p in zip(items, owners)
                for k in {LAST: ("momentum",), ADAM: ("exp_avg", "exp_avg_sq")}.get(it.kind, ())]
        plan = ScalePlan(items, layouts=self._layouts, fused=self._fused(items[0].param.device),
                         validate=self.validate, tag=self.tag,
                         counters=[self.state[p] for it, p in zip(items, owners) if it.kind == ADAM])
        kinds = {sp.kind for sp in shards}
        grad_of = (_GRAD if kinds == {"plain"} else _LOCAL_GRAD if kinds == {"dtensor"} else None)
        return (_StepCache(self.state, raw, owners if kinds == {"plain"} else [], owners, plan, grad_of, sig, held),
                [it.grad for it in items])

    @torch.no_grad()
    def step(self, closure=None):
        """One step. The items and their :class:`ScalePlan` are kept while the same parameters have gradients of
        the same dtypes, shapes and strides in the same groups (and plain parameters keep their storage), whether
        or not the gradient objects are new (``zero_grad()`` sets them to None every step): a steady step builds
        nothing and copies nothing to the device but its scalar table. A parameter gaining or losing its
        gradient, a moved storage, ``load_state_dict`` or ``add_param_group`` builds them again."""
        self._drop_echoes()
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        raw = list(map(_GRAD, params))
        c = self._cache
        if c is not None and c.valid(self.state, raw):  # the same gradient objects as last step
            grads = c.grads()
        else:
            collected = self._collect()
            sig = _signature(collected)
            if c is not None and c.same_plan(self.state, sig):  # new gradient objects, same plan
                c.rebind(raw)
                grads = [g for *_, g in collected]
            else:
                c, grads = self._plan(collected, raw, sig)
                self._cache = c
                self.cache_builds += 1
        if c.plan is not None:
            c.plan.run(grads)
        return loss


def _signature(collected) -> tuple:
    """What a :class:`ScalePlan` depends on besides the state: which parameters have a gradient, in which group,
    where their local storage is, and their gradients' dtypes, devices, shapes and strides (not the gradient
    objects)."""
    return tuple((id(p), id(group), sp.local_param().data_ptr(), g.dtype, g.device, tuple(g.shape), g.stride())
                 for group, p, sp, g in collected)


def _drop_constructor_keys(params):
    """Param groups without SCALE's constructor-only arguments: ``ZeroRedundancyOptimizer(optimizer_class=SCALE,
    **kwargs)`` copies its kwargs (``module``, ``last_layer``...) into every group it hands over; they are used
    as the constructor's arguments, and kept out of ``param_groups`` (and state dicts)."""
    if isinstance(params, (list, tuple)) and params and all(isinstance(g, dict) for g in params):
        return [{k: v for k, v in g.items() if k not in _CONSTRUCTOR_ONLY} for g in params]
    return params


_CONSTRUCTOR_ONLY = frozenset({"last_layer", "embeddings", "tied_embeddings", "transposed", "module", "fused",
                               "validate"})
_ECHOES = _CONSTRUCTOR_ONLY | {"adam_lr"}


class _Defaults(dict):
    """SCALE's ``defaults``: a dict whose membership test tells ``OneCycleLR`` / ``CyclicLR`` (with their default
    ``cycle_momentum=True``) what to pass, instead of torch's generic "optimizer must support momentum or beta1"."""

    def __contains__(self, key) -> bool:
        if key in ("momentum", "betas") and not dict.__contains__(self, key):
            caller = sys._getframe(1)
            if caller.f_code.co_name == "__init__" and isinstance(caller.f_locals.get("self"), _cyclic_schedulers()):
                raise ValueError(
                    f"{type(caller.f_locals['self']).__name__}(cycle_momentum=True) cycles a 'momentum' or 'betas' "
                    "hyperparameter, which SCALE has not (its only momentum is the last layer's 'beta', and its 1-D "
                    "AdamW betas are 'adam_betas'): pass cycle_momentum=False, e.g. OneCycleLR(opt, max_lr=..., "
                    "total_steps=..., cycle_momentum=False).")
        return dict.__contains__(self, key)

    def __reduce__(self):
        return (_Defaults, (dict(self),))


def _cyclic_schedulers() -> tuple:
    from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

    return (OneCycleLR, CyclicLR)


_GRAD = operator.attrgetter("grad")



def _LOCAL_GRAD(p):
    return p.grad._local_tensor


class _StepCache:
    """What :meth:`SCALE.step` reuses: weak references to last step's gradients (the cache must not keep a
    freed gradient alive), the data pointers of plain parameters, the plan, and how to read the local
    gradients (None: ``local_grad()`` is not ``param.grad``; such a cache is valid for one step)."""

    def __init__(self, state, raw, plain, owners, plan, grad_of, sig=None, held=()):
        self.state, self.plan, self.owners, self.grad_of, self.plain = state, plan, owners, grad_of, plain
        self.sig, self.held = sig, list(held)
        self.rebind(raw)
        self.ptrs = list(map(torch.Tensor.data_ptr, plain))

    def state_held(self, state) -> bool:
        """Whether the state tensors the plan updates are still the parameters' state (a loader that writes
        ``optimizer.state`` directly, as ``ZeroRedundancyOptimizer.load_state_dict`` does, replaces them)."""
        return all(state.get(p) is d and d.get(k) is v for p, d, k, v in self.held)

    def rebind(self, raw) -> None:
        """Remember this step's gradient objects (the fast check of the next step)."""
        self.refs = [None if g is None else weakref.ref(g) for g in raw]

    def same_plan(self, state, sig) -> bool:
        """Whether the plan serves a step whose gradients are new objects with signature ``sig``
        (:func:`_signature`); the 1-D step counters must be where the plan left them."""
        return (self.sig is not None and state is self.state and sig == self.sig and self.state_held(state)
                and (self.plan is None or self.plan.counters_at_rest()))

    def valid(self, state, raw) -> bool:
        return (self.grad_of is not None and state is self.state and len(raw) == len(self.refs)
                and all(map(operator.is_, raw, map(_deref, self.refs)))
                and list(map(torch.Tensor.data_ptr, self.plain)) == self.ptrs and self.state_held(state))

    def grads(self) -> list:
        return list(map(self.grad_of, self.owners))


_DEAD = object()


def _deref(ref):
    """The referenced gradient; None where there was none; a gradient since freed matches nothing."""
    if ref is None:
        return None
    g = ref()
    return _DEAD if g is None else g
