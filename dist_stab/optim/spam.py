"""SPAM: spike-aware Adam with momentum reset (Huang et al., arXiv 2501.06842, ICLR 2025)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ._base import (Kernel, OptItem, ShardedOptimizer, check_betas, check_count, check_int, check_lr, check_nonneg,
                    check_positive, group_indices, local_tensor, pack_scalars, resolve_foreach)


def warmup_scale(current_step: int, warmup_steps: int) -> float:
    """1 - CosineDecay(0.99, N)(c): 1 - 0.99 * (1 + cos(pi * min(c + 1, N + 1) / (N + 1))) / 2.

    The values of the authors' ``CosineDecay`` (torch ``CosineAnnealingLR``, ``T_max = N + 1``),
    as in pytorch-optimizer 4.1.0: 0.0101 at the reset step for N = 150, 1 from c = N on.
    """
    N = int(warmup_steps)
    if N <= 0:
        return 1.0
    x = min(current_step + 1, N + 1)
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * x / (N + 1))) / 2.0


# Scalar row: [1-b1, b2, clip_on, threshold, step_size, eps, decay]
def _spam_update(p, g, m, v, sc):
    gf = g.to(sc.dtype)
    ok = torch.isfinite(gf)
    mf, vf, pf = m.to(sc.dtype), v.to(sc.dtype), p.to(sc.dtype)
    bound = (sc[3] * vf).sqrt()
    gc = torch.where(sc[2] > 0, torch.minimum(torch.maximum(gf, -bound), bound), gf)  # = sign(g) sqrt(thr v) if g^2 > thr v
    mn = mf + sc[0] * (gc - mf)
    vn = vf * sc[1] + (1.0 - sc[1]) * (gc * gc)
    new = (pf - sc[4] * (mn / (vn.sqrt() + sc[5]))) * sc[6]
    m.copy_(torch.where(ok, mn, mf))
    v.copy_(torch.where(ok, vn, vf))
    p.copy_(torch.where(ok, new, pf))


def _spam_many(ps, gs, ms, vs, sc):
    for j, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        _spam_update(p, g, m, v, sc[j])


K_SPAM = Kernel(_spam_many)


def _spam_foreach(ps, gs, ms, vs, rows, sdt) -> None:
    """:func:`_spam_many` as ``torch._foreach_*`` ops per (device, dtype) group, same op order and rounding.

    ``rows`` are the host rows of the scalar table; they are rounded to ``sdt`` here (host only) and
    passed as Python scalar lists, so each op sees the values the per-tensor kernel reads from ``sc``.
    The element-wise skip of non-finite gradient entries stays one ``isfinite`` + ``where`` per tensor
    (no foreach comparison/select exists); the results go back with one ``_foreach_copy_``.
    """
    host = torch.tensor([list(r) for r in rows], dtype=torch.float64).to(sdt)
    omb2 = (1.0 - host[:, 1]).tolist()  # (1 - sc[1]) in sdt, as the per-tensor kernel computes it
    cols = host.t().tolist()
    for idx in group_indices(ps, gs, ms, vs):
        p_, g_, m_, v_ = ([lst[j] for j in idx] for lst in (ps, gs, ms, vs))
        gf, mf, vf, pf = ([t.to(sdt) for t in lst] for lst in (g_, m_, v_, p_))  # may alias: read only
        # spike clipping where the row's flag is on: min(max(g, -sqrt(thr v)), sqrt(thr v))
        gc = list(gf)
        cl = [i for i, j in enumerate(idx) if cols[2][j] > 0]
        if cl:
            bound = torch._foreach_mul([vf[i] for i in cl], [cols[3][idx[i]] for i in cl])
            torch._foreach_sqrt_(bound)
            c = torch._foreach_maximum([gf[i] for i in cl], torch._foreach_neg(bound))
            torch._foreach_minimum_(c, bound)
            for i, t in zip(cl, c):
                gc[i] = t
        # m + (1-b1) (g - m)
        mn = torch._foreach_sub(gc, mf)
        torch._foreach_mul_(mn, [cols[0][j] for j in idx])
        mn = torch._foreach_add(mf, mn)
        # v b2 + (1-b2) g^2
        gg = torch._foreach_mul(gc, gc)
        torch._foreach_mul_(gg, [omb2[j] for j in idx])
        vn = torch._foreach_mul(vf, [cols[1][j] for j in idx])
        torch._foreach_add_(vn, gg)
        # (p - step * m / (sqrt(v) + eps)) * decay
        den = torch._foreach_sqrt(vn)
        torch._foreach_add_(den, [cols[5][j] for j in idx])
        q = torch._foreach_div(mn, den)
        torch._foreach_mul_(q, [cols[4][j] for j in idx])
        new = torch._foreach_sub(pf, q)
        torch._foreach_mul_(new, [cols[6][j] for j in idx])
        # CPU (flags read without a sync): a tensor whose max|g| is finite has no entry to skip, its results
        # are taken whole (what where() gives); the others, and every tensor on other devices, select per entry
        fin = _all_finite_on_cpu(gf)
        oks = [None if f else torch.isfinite(t) for f, t in zip(fin, gf)]
        src = ([a if ok is None else torch.where(ok, a, b) for ok, a, b in zip(oks, mn, mf)]
               + [a if ok is None else torch.where(ok, a, b) for ok, a, b in zip(oks, vn, vf)]
               + [a if ok is None else torch.where(ok, a, b) for ok, a, b in zip(oks, new, pf)])
        torch._foreach_copy_(m_ + v_ + p_, src)


def _all_finite_on_cpu(ts: List[torch.Tensor]) -> List[bool]:
    """Per tensor: no NaN/inf entry (an empty one has none); all False (unknown) off the CPU, where reading it
    would sync."""
    if not ts or ts[0].device.type != "cpu":
        return [False] * len(ts)
    fin = [True] * len(ts)
    nonempty = [i for i, t in enumerate(ts) if t.numel()]  # max|.| has no identity for an empty tensor
    if nonempty:
        maxes = torch.stack(torch._foreach_norm([ts[i] for i in nonempty], math.inf)).tolist()
        for i, x in zip(nonempty, maxes):
            fin[i] = math.isfinite(x)
    return fin


def spam_step(items: Sequence[OptItem], *, total_step: int, current_step: Optional[int], moment_step: int,
              fused: bool = False, foreach: Optional[bool] = None) -> None:
    """One SPAM step on local pieces (element-wise: no collective).

    ``total_step`` = steps done before this one (the reset/clip schedule uses ``cs = total_step + 1``),
    ``current_step`` = steps since the last warm-up restart (None: each item's group's
    ``hp["current_step"]``, for groups with their own ``reset_interval``), ``moment_step`` = k (never reset).
    ``item.state``: ``exp_avg``, ``exp_avg_sq``; ``item.hp``: ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``threshold``, ``reset_interval``, ``warmup_steps``, ``grad_accu_steps``.
    ``foreach``: when not ``fused``, the update as ``torch._foreach_*`` ops (None: yes; False: the
    per-tensor loop, the reference).
    """
    if not items:
        return
    device = items[0].param.device
    sdt = torch.float64 if any(it.param.dtype == torch.float64 for it in items) else torch.float32
    cs, k = int(total_step) + 1, int(moment_step)
    to_zero = []
    rows = []
    for it in items:
        hp = it.hp
        dT, G, th = int(hp["reset_interval"]), int(hp["grad_accu_steps"]), float(hp["threshold"])
        if dT > 0 and cs % dT == 0:
            to_zero += [it.state["exp_avg"], it.state["exp_avg_sq"]]
        clip = th != 0 and cs >= G and (dT == 0 or cs % dT >= G)
        b1, b2 = (float(b) for b in hp["betas"])
        lr, wd = float(hp["lr"]), float(hp["weight_decay"])
        scale = warmup_scale(int(hp["current_step"]) if current_step is None else current_step,
                             int(hp["warmup_steps"]))
        step_size = lr * scale * math.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k)
        rows.append((1.0 - b1, b2, 1.0 if clip else 0.0, th, step_size, float(hp["eps"]), 1.0 - lr * wd))
    if to_zero:
        torch._foreach_zero_(to_zero)
    fused_ = bool(fused)
    if not fused_ and resolve_foreach(foreach, fused_):
        _spam_foreach([it.param for it in items], [it.grad for it in items], [it.state["exp_avg"] for it in items],
                      [it.state["exp_avg_sq"] for it in items], rows, sdt)
        return
    sc = pack_scalars(rows, device, sdt, 7)
    K_SPAM(fused_, [it.param for it in items], [it.grad for it in items], [it.state["exp_avg"] for it in items],
           [it.state["exp_avg_sq"] for it in items], sc)


class SPAM(ShardedOptimizer):
    r"""SPAM (arXiv 2501.06842): Adam with spike clipping, periodic momentum reset and a post-reset warm-up.

    With cs = 1-based global step, k = Adam step (never reset), per element::

        if cs % reset_interval == 0:  m, v <- 0                    (k is NOT reset)
        if cs >= G and cs % reset_interval >= G:                   (G = grad_accu_steps)
            g <- sign(g) * sqrt(threshold * v)   where g^2 > threshold * v     (v: previous)
        m <- b1 m + (1-b1) g ;  v <- b2 v + (1-b2) g^2
        p <- p - lr * w(c) * sqrt(1-b2^k)/(1-b1^k) * m / (sqrt(v) + eps)
        p <- p * (1 - lr*wd)                                        (decoupled, after the update)

    ``w(c) = 1 - 0.99*(1 + cos(pi*min(c+1, N+1)/(N+1)))/2`` restarts (c = 0) on each reset step
    and reaches 1 after ``warmup_steps`` = N steps (see :func:`warmup_scale`).

    Args (defaults: the authors' constructor, TianjinYellow/SPAM-Optimizer ``SPAM.py``):
        lr: 1e-3.  betas: (0.9, 0.999).  threshold: 5000 (0 disables clipping).
        reset_interval: 500 (``DeltaT``; 0 disables resets); a param group may set its own (its moments reset
        and its warm-up restarts on its own schedule).  warmup_steps: 150 (paper; the
        released launcher passes the LR warm-up, 1000; pytorch-optimizer's default is 50).
        grad_accu_steps: 20.  eps: 1e-6.  weight_decay: 0.
        fused: compile the element-wise kernel (None: on CUDA when Triton is available).
        foreach: unfused update as ``torch._foreach_*`` ops over all tensors (None: whenever not fused; False: per-tensor loop).

    Distributed: none needed; every operation is element-wise on the local piece, so any
    sharding gives the same result with zero collectives. Moments are DTensors with the
    parameter's placements for DTensor parameters.

    Bad input: non-finite gradient entries are skipped element-wise (parameter, m and v keep
    their values, no weight decay there); decided locally per element, so it is the same on
    any mesh.

    Deviations: no random sparse masks (density 1 only; the authors' and pytorch-optimizer's
    masks at density 1 select every entry, so the math is the same without them).
    """

    tag = "SPAM"
    _hp_rules = {"lr": check_lr, "betas": check_betas, "threshold": check_nonneg, "reset_interval": check_count,
                 "warmup_steps": check_count, "grad_accu_steps": check_count, "eps": check_positive,
                 "weight_decay": check_nonneg, "total_step": check_count, "current_step": check_count,
                 "step": check_count}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), threshold: float = 5000,
                 reset_interval: int = 500, warmup_steps: int = 150, grad_accu_steps: int = 20,
                 eps: float = 1e-6, weight_decay: float = 0.0, *, fused: Optional[bool] = None,
                 foreach: Optional[bool] = None):
        check_lr("lr", lr)
        check_betas("betas", betas)
        check_nonneg("threshold", threshold)
        check_int("reset_interval", reset_interval, 0)
        check_int("warmup_steps", warmup_steps, 0)
        check_int("grad_accu_steps", grad_accu_steps, 0)
        check_nonneg("eps", eps, positive=True)
        check_nonneg("weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), threshold=threshold, reset_interval=reset_interval,
                        warmup_steps=warmup_steps, grad_accu_steps=grad_accu_steps, eps=eps,
                        weight_decay=weight_decay)
        self.foreach = foreach
        super().__init__(params, defaults, fused=fused)

    def add_param_group(self, param_group: dict) -> None:
        """A group added after steps were taken joins the global counters (and the first group's warm-up phase);
        before that, its warm-up counter starts past its own ``warmup_steps``."""
        first = self.param_groups[0] if self.param_groups else {}
        param_group.setdefault("total_step", first.get("total_step", 0))
        param_group.setdefault("step", first.get("step", 0))
        if param_group["total_step"] and "current_step" in first:
            param_group.setdefault("current_step", first["current_step"])
        try:
            param_group.setdefault("current_step",
                                   int(param_group.get("warmup_steps", self.defaults["warmup_steps"])) + 1)
        except (TypeError, ValueError):
            pass  # a bad warmup_steps: the validation in add_param_group names it
        super().add_param_group(param_group)

    def _initial_state(self, p: torch.Tensor) -> dict:
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self, closure=None):
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g0 = self.param_groups[0]
        total, k = int(g0["total_step"]), int(g0["step"]) + 1
        items: List[OptItem] = []
        for group, p, sp, g in self._collect():
            st = self.state[p]
            if "exp_avg" not in st:
                st.update(self._initial_state(p))
            local = {k_: local_tensor(v) for k_, v in st.items()}
            items.append(OptItem(sp.spec, sp.local_param(), g, local, group))
        # moments of parameters without a gradient are reset on schedule too
        cs = total + 1
        with_grad = {id(it.state["exp_avg"]) for it in items}
        for group in self.param_groups:
            dT = int(group["reset_interval"])
            if dT > 0 and cs % dT == 0:
                rest = [local_tensor(st[n]) for p in group["params"] for st in (self.state.get(p),)
                        if isinstance(st, dict) and "exp_avg" in st
                        and id(local_tensor(st["exp_avg"])) not in with_grad for n in ("exp_avg", "exp_avg_sq")]
                if rest:
                    torch._foreach_zero_(rest)
        if items:
            spam_step(items, total_step=total, current_step=None, moment_step=k,
                      fused=self._fused(items[0].param.device), foreach=self.foreach)
        total += 1
        for group in self.param_groups:  # each group's warm-up restarts on its own reset schedule
            dT = int(group["reset_interval"])
            new_current = 0 if dT > 0 and (total + 1) % dT == 0 else int(group["current_step"]) + 1
            group["total_step"], group["current_step"], group["step"] = total, new_current, k
        return loss
