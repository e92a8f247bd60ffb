"""Stable-SPAM: AdaClip + AdaGN + momentum reset around Adam (arXiv 2502.17055 v1/v2)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from ..kernels import use_triton
from ..reducer import SlotLayout
from ._base import (Kernel, OptItem, ShardedOptimizer, check_betas, check_count, check_int, check_lr, check_nonneg,
                    check_optional_int1, check_positive, check_unit, group_indices, local_tensor, maxabs_vector,
                    pack_scalars, resolve_foreach)


def cosine_factor(step: int, total_steps: Optional[int], eta_min: float) -> float:
    """Multiplier s of beta1 and gamma1 at global step t (1-based): 1 -> eta_min over ``total_steps``.

    ``s(t) = eta_min + (1 - eta_min) * (1 + cos(pi * min(t, T + 1) / (T + 1))) / 2`` (1 if T is None):
    the authors' ``CosineDecay`` values (algorithms.md §2.1, checked numerically there), held at
    ``eta_min`` after ``T + 1`` steps.
    """
    if total_steps is None:
        return 1.0
    T = int(total_steps)
    x = min(int(step), T + 1)
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * x / (T + 1))) / 2.0


# ----------------------------------------------------------------------------- kernels
# Scalar row: [thr, f, gscale, active, decay_active, decay_inactive, 1-b1', b2, step_size, 1/sqrt(bc2), eps]
def _clipped_sumsq(g, sc):
    """sum(clip(g)^2), clip(g) = g * m_hat/M where |g| > m_hat (AdaClip rescale)."""
    gf = g.to(sc.dtype)
    c = torch.where(gf.abs() > sc[0], gf * sc[1], gf)
    return (c * c).sum()


def _adam_update(p, g, m, v, sc):
    gf = g.to(sc.dtype)
    gt = torch.where(gf.abs() > sc[0], gf * sc[1], gf) * sc[2]
    mf, vf, pf = m.to(sc.dtype), v.to(sc.dtype), p.to(sc.dtype)
    mn = mf + sc[6] * (gt - mf)
    vn = vf * sc[7] + (1.0 - sc[7]) * (gt * gt)
    new = pf * sc[4] - sc[8] * (mn / (vn.sqrt() * sc[9] + sc[10]))
    act = sc[3] > 0
    m.copy_(torch.where(act, mn, mf))
    v.copy_(torch.where(act, vn, vf))
    p.copy_(torch.where(act, new, pf * sc[5]))


def _clipped_sumsq_many(gs, sc):
    return torch.stack([_clipped_sumsq(g, sc[j]) for j, g in enumerate(gs)])


def _adam_many(ps, gs, ms, vs, sc):
    for j, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs)):
        _adam_update(p, g, m, v, sc[j])


K_CLIPPED_SUMSQ = Kernel(_clipped_sumsq_many)
K_ADAM = Kernel(_adam_many)


def _col(sc, c, idx):
    """Column ``c`` of the scalar table for items ``idx`` as 0-d views (no copy, no host sync)."""
    col = sc[:, c]
    return [col[j] for j in idx]


def _clipped_foreach(gs, sc, unclipped=None):
    """AdaClip'd gradients ``where(|g| > thr, g f, g)`` (in ``sc.dtype``) with the multiplications as
    ``torch._foreach_*`` ops per (device, dtype) group; the per-element select is one compare + ``where``
    per tensor. Bitwise the ``c`` of :func:`_clipped_sumsq` / :func:`_adam_update`. ``unclipped``: host
    flags of tensors with max|g| <= thr (CPU, where reading them costs no sync): those are g itself."""
    out = [None] * len(gs)
    for idx in group_indices(gs):
        gf = [gs[j].to(sc.dtype) for j in idx]  # may alias: read only
        todo = [i for i, j in enumerate(idx) if not (unclipped and unclipped[j])]
        for i, j in enumerate(idx):
            out[j] = gf[i]
        if not todo:
            continue
        sub = [gf[i] for i in todo]
        ab = torch._foreach_abs(sub)
        gm = torch._foreach_mul(sub, _col(sc, 1, [idx[i] for i in todo]))
        for a, i in enumerate(todo):
            j = idx[i]
            out[j] = torch.where(ab[a] > sc[j, 0], gm[a], gf[i])
    return out


def _clipped_sumsq_foreach(cs, sdt):
    """sum(c^2) per tensor: squares as one foreach op, the sums per tensor (same reduction order as the loop)."""
    if not cs:
        return torch.zeros(0, dtype=sdt)
    return torch.stack([t.sum() for t in torch._foreach_mul(cs, cs)])


def _adam_foreach(ps, cs, ms, vs, sc):
    """:func:`_adam_many` as ``torch._foreach_*`` ops on the clipped gradients ``cs`` (from
    :func:`_clipped_foreach`), per (device, dtype) group; per-tensor scalars are 0-d views of ``sc``, so no
    host sync. The per-tensor ``active`` select stays one ``where`` per tensor and state (a NaN update of a
    skipped tensor must not leak), written back with one ``_foreach_copy_``."""
    sdt = sc.dtype
    omb2 = 1.0 - sc[:, 7]
    act = sc[:, 3] > 0
    for idx in group_indices(ps, ms, vs):
        p_, m_, v_ = ([lst[j] for j in idx] for lst in (ps, ms, vs))
        mf, vf, pf = ([t.to(sdt) for t in lst] for lst in (m_, v_, p_))  # may alias: read only
        gt = torch._foreach_mul([cs[j] for j in idx], _col(sc, 2, idx))
        mn = torch._foreach_sub(gt, mf)
        torch._foreach_mul_(mn, _col(sc, 6, idx))
        mn = torch._foreach_add(mf, mn)
        gg = torch._foreach_mul(gt, gt)
        torch._foreach_mul_(gg, [omb2[j] for j in idx])
        vn = torch._foreach_mul(vf, _col(sc, 7, idx))
        torch._foreach_add_(vn, gg)
        den = torch._foreach_sqrt(vn)
        torch._foreach_mul_(den, _col(sc, 9, idx))
        torch._foreach_add_(den, _col(sc, 10, idx))
        q = torch._foreach_div(mn, den)
        torch._foreach_mul_(q, _col(sc, 8, idx))
        new = torch._foreach_mul(pf, _col(sc, 4, idx))
        torch._foreach_sub_(new, q)
        pin = torch._foreach_mul(pf, _col(sc, 5, idx))
        if sc.device.type == "cpu":  # the flags read without a sync: pick whole tensors (what where() would give)
            a = act[idx].tolist() if idx else []
            src = ([y if x else z for x, y, z in zip(a, mn, mf)] + [y if x else z for x, y, z in zip(a, vn, vf)]
                   + [y if x else z for x, y, z in zip(a, new, pin)])
        else:
            a = [act[j] for j in idx]
            src = ([torch.where(x, y, z) for x, y, z in zip(a, mn, mf)]
                   + [torch.where(x, y, z) for x, y, z in zip(a, vn, vf)]
                   + [torch.where(x, y, z) for x, y, z in zip(a, new, pin)])
        torch._foreach_copy_(m_ + v_ + p_, src)


def stable_spam_step(items: Sequence[OptItem], *, step: int, moment_step: Optional[int], reset: bool,
                     layouts: Optional[Dict] = None, fused: bool = False, validate: bool = True,
                     tag: str = "StableSPAM", foreach: Optional[bool] = None) -> torch.Tensor:
    """One Stable-SPAM step over local pieces; updates params and state in place.

    ``step`` = global step t (>= 1, bias corrections of the max/norm EMAs and the cosine
    factor); ``moment_step`` = Adam's k (1 right after a reset), or None: each item's group's
    ``hp["moment_step"]`` (groups with their own ``reset_interval``); ``reset``: zero the moments
    before this step's update. ``item.state``: ``exp_avg``, ``exp_avg_sq`` (local pieces) and
    ``m_max``, ``m_norm``, ``v_norm`` (0-d fp32, identical on all ranks). ``item.hp``: ``lr``,
    ``betas``, ``gamma1``, ``gamma2``, ``theta``, ``eps``, ``weight_decay``, ``total_steps``,
    ``eta_min``.

    Two dependent reductions, each one all-reduce per process group for all tensors: MAX of
    max|g|, then SUM of the clipped gradients' sums of squares. The per-tensor scalar math is
    done in fp64. ``fused`` with Triton (CUDA): six multi-tensor launches for all pieces
    (:mod:`dist_stab.kernels.stable_spam_kernels`; pieces they do not take, e.g. non-contiguous
    ones, send the step to the torch path); else torch ops, the element-wise ones compiled when
    ``fused``, else as ``torch._foreach_*`` ops when ``foreach`` (None: when not ``fused``; False:
    the per-tensor loop, the reference). Returns the per-item ``active`` mask (device tensor; False = skipped: zero or
    non-finite clipped norm).
    """
    if not items:
        return torch.zeros(0)
    device = items[0].param.device
    sdt = torch.float64 if any(it.param.dtype == torch.float64 for it in items) else torch.float32
    t, k = int(step), (None if moment_step is None else int(moment_step))
    key = tuple(it.spec.fqn for it in items)
    cache = layouts if layouts is not None else {}
    lay = cache.get(key)
    if lay is None:
        groups = [it.spec.groups() for it in items]
        lay = (SlotLayout([f + ":maxabs" for f in key], [1] * len(items), groups, validate, device),
               SlotLayout([f + ":sumsq" for f in key], [1] * len(items), groups, validate, device))
        cache[key] = lay
    max_layout, sum_layout = lay
    if reset:
        torch._foreach_zero_([it.state["exp_avg"] for it in items] + [it.state["exp_avg_sq"] for it in items])
    hps, gidx = _hp_groups(items)
    consts = [_group_constants(hp, t, int(hp["moment_step"]) if k is None else k) for hp in hps]
    if fused and sdt == torch.float32 and use_triton(items[0].grad):
        plan = _triton_plan(items, gidx, cache, key, device)
        if plan is not None:
            return _triton_step(plan, consts, max_layout, sum_layout, device, tag)
    return _torch_step(items, [consts[j] for j in gidx], max_layout, sum_layout, sdt, device, bool(fused), tag,
                       foreach=not fused and resolve_foreach(foreach, bool(fused)))


def _hp_groups(items: Sequence[OptItem]):
    """The distinct parameter groups of ``items`` and each item's index into them."""
    groups = {id(it.hp): it.hp for it in items}
    pos = {key: j for j, key in enumerate(groups)}
    return list(groups.values()), [pos[id(it.hp)] for it in items]


def _group_constants(hp: dict, t: int, k: int) -> tuple:
    """Host constants of one group at steps (t, k), in ``stable_spam_kernels.CONST_COLUMNS`` order:

    theta, 1-theta^t, g1' = g1 s, 1-g1'^t, g2, 1-g2^t, eps, 1-lr*wd, 1-b1', b2, lr/(1-b1'^k), 1/sqrt(1-b2^k).
    """
    s = cosine_factor(t, hp["total_steps"], float(hp["eta_min"]))
    th, g1, g2 = float(hp["theta"]), float(hp["gamma1"]) * s, float(hp["gamma2"])
    b1, b2 = float(hp["betas"][0]) * s, float(hp["betas"][1])
    lr, wd = float(hp["lr"]), float(hp["weight_decay"])
    return (th, 1.0 - th ** t, g1, 1.0 - g1 ** t, g2, 1.0 - g2 ** t, float(hp["eps"]),
            1.0 - lr * wd, 1.0 - b1, b2, lr / (1.0 - b1 ** k), 1.0 / math.sqrt(1.0 - b2 ** k))


def _triton_plan(items: Sequence[OptItem], gidx: List[int], cache: dict, key: tuple, device):
    """The kernels' tables for these pieces (None: a piece the kernels do not take), checked again only when a
    data pointer or the grouping changes; then only the pointer table is uploaded unless shapes, dtypes or
    alignment changed too."""
    from ..kernels import stable_spam_kernels as ssk

    roles = [[it.grad for it in items], [it.param for it in items]] + [[it.state[n] for it in items] for n in _STATE]
    ptrs = list(map(torch.Tensor.data_ptr, [t for r in roles for t in r]))
    old_sig, plan = cache.get(("triton",) + key, (None, None))
    if (ptrs, gidx) != old_sig:
        plan = ssk.make_plan(roles, ptrs, gidx, device, plan)
        cache[("triton",) + key] = ((ptrs, gidx), plan)
    return plan


_STATE = ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm")


def _triton_step(plan, consts, max_layout: SlotLayout, sum_layout: SlotLayout, device, tag: str) -> torch.Tensor:
    """The step as :mod:`dist_stab.kernels.stable_spam_kernels` launches around the two all-reduces."""
    from ..kernels import stable_spam_kernels as ssk

    with torch.cuda.device(device.index if device.type == "cuda" else -1):  # Triton launches on the current device
        M = ssk.maxabs(plan)
        table = pack_scalars(consts, device, torch.float64, ssk.NCONST)  # uploads while max|g| runs
        max_layout.complete(M, "max", tag)
        S = ssk.clipped_sumsq(plan, M, table)
        sum_layout.complete(S, "sum", tag)
        return ssk.adam_update(plan, M, S, table)


def _torch_step(items, rows, max_layout: SlotLayout, sum_layout: SlotLayout, sdt, device, fused_: bool,
                tag: str, foreach: bool = False) -> torch.Tensor:
    """The step as torch ops on per-item vectors (eager, or the kernels through ``torch.compile``)."""
    both = pack_scalars(rows, device, torch.float64, 12)
    theta, bc_max, g1, bc_m, g2, bc_v, eps, decay, a1, b2, step_size, rbc2 = both.unbind(1)

    # AdaClip: EMA of the (completed) max|g|; NaN would get lost in a MAX all-reduce, inf does not
    grads = [it.grad for it in items]
    M = torch.nan_to_num(maxabs_vector(grads, sdt), nan=math.inf)
    max_layout.complete(M, "max", tag)
    M = M.double()
    m_max = torch.stack([it.state["m_max"] for it in items]).double()
    m_max_new = theta * m_max + (1.0 - theta) * M
    m_hat = m_max_new / bc_max
    f = torch.where(M > 0, m_hat / M, torch.zeros_like(M))
    thr = torch.where(torch.isfinite(m_hat), m_hat, torch.full_like(M, math.inf))
    if foreach:
        unclipped = (M <= thr).tolist() if M.device.type == "cpu" else None  # CPU: no sync to read
        clipped = _clipped_foreach(grads, torch.stack([thr, f], 1).to(sdt), unclipped)
        sumsq = _clipped_sumsq_foreach(clipped, sdt).to(sdt)
    else:
        sumsq = K_CLIPPED_SUMSQ(fused_, grads, torch.stack([thr, f], 1).to(sdt)).to(sdt)
    sum_layout.complete(sumsq, "sum", tag)

    # AdaGN: EMAs of the clipped norm (fp64 vectors)
    R = sumsq.double().sqrt()
    finite = torch.isfinite(M) & torch.isfinite(R)
    active = finite & (R > 0)
    m_n = torch.stack([it.state["m_norm"] for it in items]).double()
    v_n = torch.stack([it.state["v_norm"] for it in items]).double()
    m_n_new = m_n + (1.0 - g1) * (R - m_n)
    v_n_new = v_n + (1.0 - g2) * (R * R - v_n)
    c = (m_n_new / bc_m) / ((v_n_new / bc_v).sqrt() + eps)
    gscale = torch.where(active, c / torch.where(active, R, torch.ones_like(R)), torch.zeros_like(R))
    state_dt = items[0].state["m_max"].dtype
    torch._foreach_copy_([it.state["m_max"] for it in items],
                         list(torch.where(finite, m_max_new, m_max).to(state_dt).unbind()))
    torch._foreach_copy_([it.state["m_norm"] for it in items],
                         list(torch.where(active, m_n_new, m_n).to(state_dt).unbind()))
    torch._foreach_copy_([it.state["v_norm"] for it in items],
                         list(torch.where(active, v_n_new, v_n).to(state_dt).unbind()))

    # Adam with cosine-decayed beta1, bias corrections from k
    sc = torch.stack([thr, f, gscale, active.double(), decay, torch.where(finite, decay, torch.ones_like(decay)),
                      a1, b2, step_size, rbc2, eps, torch.zeros_like(decay)], 1).to(sdt)
    if foreach:
        _adam_foreach([it.param for it in items], clipped, [it.state["exp_avg"] for it in items],
                      [it.state["exp_avg_sq"] for it in items], sc)
        return active
    K_ADAM(fused_, [it.param for it in items], grads, [it.state["exp_avg"] for it in items],
           [it.state["exp_avg_sq"] for it in items], sc)
    return active


class StableSPAM(ShardedOptimizer):
    r"""Stable-SPAM (Huang et al., arXiv 2502.17055 v1/v2): Adam with AdaClip, AdaGN and momentum reset.

    At global step t (k = Adam's step, reset to 1 by MoRet), per tensor, s = cosine factor::

        p      <- p * (1 - lr*wd)                                   (decoupled, first)
        M       = max|g| ;  m_max <- theta*m_max + (1-theta)*M ;  m^ = m_max / (1 - theta^t)
        g       = g * m^/M      where |g| > m^                      (AdaClip: rescale, not clamp)
        R       = ||g||_2 ;  m_n <- (g1 s) m_n + (1 - g1 s) R ;  v_n <- g2 v_n + (1-g2) R^2
        g       = g / R * [m_n/(1-(g1 s)^t)] / (sqrt(v_n/(1-g2^t)) + eps)        (AdaGN)
        if t % reset_interval == 0:  exp_avg, exp_avg_sq <- 0 ; k <- 1            (MoRet)
        b1' = b1 s ;  m <- b1' m + (1-b1') g ;  v <- b2 v + (1-b2) g^2
        p      <- p - lr/(1-b1'^k) * m / (sqrt(v)/sqrt(1-b2^k) + eps)

    Args (defaults: the authors' constructor, TianjinYellow/StableSPAM ``stablespam.py``):
        lr: 1e-3.  betas: (0.9, 0.999).  gamma1: 0.7 (their BF16 scripts: 0.85).
        gamma2: 0.9 (BF16 scripts: 0.99999).  theta: 0.999 (``gamma3``).
        reset_interval: 1000 (``update_proj_gap``); 0 disables MoRet. A param group may set its own: its
            moments reset (and its k restarts) on its own schedule; t stays global.
        total_steps: None (``total_T``): no cosine decay; else s goes 1 -> eta_min.
        eta_min: 0.5.  eps: 1e-8 (shared by AdaGN and Adam).  weight_decay: 0.
        fused: the step as Triton multi-tensor kernels on CUDA (torch.compile'd element-wise kernels where
        they do not apply); None: on CUDA when Triton is available.
        foreach: unfused element-wise steps as ``torch._foreach_*`` ops over all tensors (None: whenever not fused; False: per-tensor loop).

    Distributed: two dependent rounds, each one all-reduce per process group for all tensors
    packed together: MAX of the local max|g|, then SUM of the clipped local sums of squares.
    Per-tensor scalars (m_max, m_n, v_n) are fp32 0-d tensors computed only from reduced
    values, identical on every rank. Adam moments live on the local piece (DTensors with the
    parameter's placements for DTensor parameters, loadable on another mesh through
    ``torch.distributed.checkpoint``).

    Bad input: a tensor whose completed max|g| or clipped norm is not finite is skipped
    entirely: parameter (no weight decay), moments, m_max, m_n, v_n keep their values. A
    zero clipped norm skips Adam and the norm EMAs but keeps weight decay and the m_max update
    (as pytorch-optimizer does). Parameters without a gradient are skipped; t and k still
    advance.

    Deviations from the authors' released code (algorithms.md §2.1): (1) bias corrections of
    m_max, m_n, v_n use the global step t (the code uses the per-parameter k that MoRet resets,
    which switches AdaClip off after each reset); (2) a reset zeroes the moments at the reset
    step itself (the code's reset takes effect one step late); (3) zero-norm tensors skip
    Adam. (1)-(3) are also pytorch-optimizer 4.1.0's ``StableSPAM``; its cosine factor is not:
    it steps torch's recursive ``CosineAnnealingLR`` from epoch 1 instead of 0, which gives
    values off the cosine (s(1) = 0.9856 instead of 0.9952 for T = 15), so the two agree only
    without ``total_steps``. Here s(t) is the closed form (:func:`cosine_factor`).
    """

    tag = "StableSPAM"
    _fp32_state_keys = ("m_max", "m_norm", "v_norm")
    _hp_rules = {"lr": check_lr, "betas": check_betas, "gamma1": check_unit, "gamma2": check_unit, "theta": check_unit,
                 "reset_interval": check_count, "total_steps": check_optional_int1, "eta_min": check_unit,
                 "eps": check_positive, "weight_decay": check_nonneg, "step": check_count, "moment_step": check_count}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), gamma1: float = 0.7, gamma2: float = 0.9,
                 theta: float = 0.999, reset_interval: int = 1000, total_steps: Optional[int] = None,
                 eta_min: float = 0.5, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 fused: Optional[bool] = None, validate: bool = True, foreach: Optional[bool] = None):
        check_lr("lr", lr)
        check_betas("betas", betas)
        check_unit("gamma1", gamma1)
        check_unit("gamma2", gamma2)
        check_unit("theta", theta)
        check_int("reset_interval", reset_interval, 0)
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        check_unit("eta_min", eta_min)
        check_nonneg("eps", eps, positive=True)
        check_nonneg("weight_decay", weight_decay)
        self.validate = validate
        self.foreach = foreach
        defaults = dict(lr=lr, betas=tuple(betas), gamma1=gamma1, gamma2=gamma2, theta=theta,
                        reset_interval=int(reset_interval), total_steps=total_steps, eta_min=eta_min, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, fused=fused)

    @property
    def reset_interval(self) -> int:
        """The default MoRet interval (a param group's own ``reset_interval`` overrides it for that group)."""
        return int(self.defaults["reset_interval"])

    @reset_interval.setter
    def reset_interval(self, value: int) -> None:
        check_int("reset_interval", value, 0)
        self.defaults["reset_interval"] = int(value)
        for g in self.param_groups:
            g["reset_interval"] = int(value)

    def add_param_group(self, param_group: dict) -> None:
        first = self.param_groups[0] if self.param_groups else {}
        param_group.setdefault("step", first.get("step", 0))
        param_group.setdefault("moment_step", first.get("moment_step", 0))
        super().add_param_group(param_group)

    def _initial_state(self, p: torch.Tensor) -> dict:
        sdt = torch.float64 if p.dtype == torch.float64 else torch.float32
        dev = local_tensor(p).device
        st = {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
              "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        for name in ("m_max", "m_norm", "v_norm"):
            st[name] = torch.zeros((), dtype=sdt, device=dev)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        self._check_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = int(self.param_groups[0]["step"]) + 1
        resets = []  # groups whose MoRet falls on this step (each group may have its own reset_interval)
        for g in self.param_groups:
            dT = int(g["reset_interval"])
            reset = dT > 0 and t % dT == 0
            g["step"], g["moment_step"] = t, (1 if reset else int(g["moment_step"]) + 1)
            if reset:
                resets.append(g)
        items: List[OptItem] = []
        for group, p, sp, g in self._collect():
            st = self.state[p]
            if "exp_avg" not in st:
                st.update(self._initial_state(p))
            local = {k_: local_tensor(v) for k_, v in st.items()} if sp.kind == "dtensor" else st
            items.append(OptItem(sp.spec, sp.local_param(), g, local, group))
        # MoRet: the moments of every parameter of a resetting group, with a gradient this step or not
        zero = [local_tensor(st[n]) for g in resets for p in g["params"]
                for st in (self.state.get(p),) if isinstance(st, dict) and "exp_avg" in st
                for n in ("exp_avg", "exp_avg_sq")]
        if zero:
            torch._foreach_zero_(zero)
        if items:
            self.last_active = stable_spam_step(items, step=t, moment_step=None, reset=False, layouts=self._layouts,
                                                fused=self._fused(items[0].param.device), validate=self.validate,
                                                tag=self.tag, foreach=self.foreach)
        return loss
