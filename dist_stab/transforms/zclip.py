"""ZClip: z-score adaptive global-norm clipping (arXiv:2504.02507; pip ``zclip`` 1.0.0).

With g the global gradient norm, after ``warmup_steps`` finite norms have been collected
(mean/var of that buffer seed the EMAs)::

    z = (g - mu) / (sigma + eps)
    if z > z_thresh:  T = mu + z_thresh * sigma / (z / z_thresh)   ('adaptive_scaling'; x clip_factor)
                      T = mu                                         ('mean')
    percentile mode:  T = mu + z_thresh * sigma, applied when g > T
    effective = min(T if spike else g, max_grad_norm)     # max_grad_norm=None: no hard cap
    g_i <- g_i * effective / (g + 1e-6)  if g > effective
    x = T if spike else g ;  mu <- a mu + (1-a) x ;  sigma^2 <- a sigma^2 + (1-a)(x - mu_new)^2

During warm-up the gradients are clipped to ``max_grad_norm`` like ``clip_grad_norm_``.
Defaults follow the package (alpha 0.97, z_thresh 2.5, warmup 25, eps 1e-6) except
``max_grad_norm=None``: the package's 1.0 keeps a hard global clip forever.

Distributed: one SUM of per-tensor sums of squares per group (+ one scalar over
``global_group`` across pipeline stages). Every decision is device side; the package calls
a host read (``item``) each step and only reduces under FSDP1. A non-finite norm is not recorded and
leaves the gradients untouched; a zero norm (no gradient on any rank, an all-zero dry step) is not
recorded either.
"""
from __future__ import annotations

import torch

from .base import GradTransform, check_open_unit, check_positive


class ZClip(GradTransform):
    tag = "ZClip"

    def __init__(self, params=None, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 max_grad_norm=None, eps: float = 1e-6, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, **kw):
        check_open_unit("alpha", alpha)
        check_positive("z_thresh", z_thresh)
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps!r}")
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        check_positive("eps", eps)
        check_positive("clip_factor", clip_factor)
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.alpha, self.z_thresh, self.warmup_steps = float(alpha), float(z_thresh), int(warmup_steps)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.eps, self.zmode, self.clip_option = float(eps), mode, clip_option
        self.clip_factor, self.skip_update_on_spike = float(clip_factor), bool(skip_update_on_spike)
        super().__init__(params, **kw)
        self.zstate = {"buffer": torch.zeros(self.warmup_steps), "count": torch.zeros(()),
                       "mean": torch.zeros(()), "var": torch.zeros(())}

    def _compute(self, sumsq, maxabs, active):
        st = {k: v.to(sumsq.device) for k, v in self.zstate.items()}
        g = self.global_sumsq(sumsq).sqrt()
        finite = torch.isfinite(g)
        ok = finite & (g > 0)  # a zero norm (no gradient anywhere, a dry step) is not recorded
        W = self.warmup_steps
        initialized = st["count"] >= W
        # warm-up: record the norm, clip to max_grad_norm like clip_grad_norm_
        record = ok & ~initialized
        slot = st["count"].clamp(max=W - 1).long().reshape(1)
        buf = st["buffer"].index_copy(0, slot, torch.where(record, g, st["buffer"].index_select(0, slot).squeeze(0)).reshape(1))
        count = st["count"] + record.float()
        now_init = (count >= W) & ~initialized
        b_mean = buf.mean()
        b_var = (buf - b_mean).square().mean()
        warm_coef = (torch.clamp(self.max_grad_norm / (g + 1e-6), max=1.0) if self.max_grad_norm is not None
                     else torch.ones_like(g))
        # after warm-up
        mean, var = st["mean"], st["var"]
        std = var.sqrt()
        z = (g - mean) / (std + self.eps)
        if self.zmode == "percentile":
            thr = mean + self.z_thresh * std
            spike = g > thr
        else:
            spike = z > self.z_thresh
            thr = (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor \
                if self.clip_option == "adaptive_scaling" else mean
        eff = torch.where(spike, thr, g)
        if self.max_grad_norm is not None:
            eff = torch.clamp(eff, max=self.max_grad_norm)
        post_coef = torch.where(g > eff, eff / (g + 1e-6), torch.ones_like(g))
        x = torch.where(spike, thr, g)
        upd = ok & initialized & ~(spike & self.skip_update_on_spike)
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        new_var = self.alpha * var + (1 - self.alpha) * (x - new_mean).square()
        coef = torch.where(initialized, post_coef, warm_coef)
        coef = torch.where(finite, coef, torch.ones_like(coef))
        new = {"buffer": buf, "count": count,
               "mean": torch.where(now_init, b_mean, torch.where(upd, new_mean, mean)),
               "var": torch.where(now_init, b_var, torch.where(upd, new_var, var))}
        for k, v in new.items():
            st[k].copy_(v)
        self.zstate = st
        return coef.expand(sumsq.shape).contiguous(), {
            "global_norm": g, "zscore": torch.where(initialized, z, torch.zeros_like(z)),
            "spike": initialized & finite & spike}

    def _tensor_state(self):
        return {**self.state, **{"zclip." + k: v for k, v in self.zstate.items()}}

    def _scalar_state(self) -> dict:
        d = super()._scalar_state()
        d["zclip"] = {k: v.detach().clone() for k, v in self.zstate.items()}
        return d

    def _load_scalar_state(self, sd: dict) -> None:
        super()._load_scalar_state(sd)
        self.zstate = {k: torch.as_tensor(v, dtype=torch.float32).clone() for k, v in sd["zclip"].items()}
