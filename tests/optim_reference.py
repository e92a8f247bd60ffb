"""Plain single-process references for SCALE, Stable-SPAM and SPAM, written from the equations.

One tensor at a time, Python control flow, no sharding: oracles for the tests only.
"""
from __future__ import annotations

import math

import torch


def _cos(x: float, T: int, lo: float, hi: float) -> float:
    """torch CosineAnnealingLR value at epoch x, T_max = T + 1, from hi to lo."""
    return lo + (hi - lo) * (1 + math.cos(math.pi * x / (T + 1))) / 2


class RefSCALE:
    """Authors' SCALE: matrices / embedding / last layer / 1-D AdamW (scale_optimizer.py).

    ``transposed[i]``: parameter i is a 2-D weight stored ``[in, out]`` (transformers' Conv1D): the scales are
    taken per output unit, i.e. per column (per row for an embedding stored ``[d, vocab]``)."""

    def __init__(self, params, kinds, lr=1e-3, beta=0.9, weight_decay=0.0, adam_lr=None, adam_betas=(0.9, 0.999),
                 eps=1e-8, transposed=None):
        self.params, self.kinds = list(params), list(kinds)
        self.transposed = list(transposed) if transposed is not None else [False] * len(self.params)
        self.lr, self.max_lr, self.beta, self.wd, self.eps = lr, lr, beta, weight_decay, eps
        self.adam_lr = lr if adam_lr is None else adam_lr
        self.b1, self.b2 = adam_betas
        self.state = [{} for _ in self.params]

    @torch.no_grad()
    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        for p, g, kind, st, tr in zip(self.params, grads, self.kinds, self.state, self.transposed):
            if g is None:
                continue
            if kind in ("matrix", "embedding", "last"):
                if kind == "last":
                    st.setdefault("momentum", torch.zeros_like(g))
                    st["momentum"].lerp_(g, 1 - self.beta)
                    g = st["momentum"]
                g2 = g.reshape(g.shape[0], -1)
                dim = 0 if (kind == "embedding") != bool(tr) else 1  # the dim reduced over
                s = torch.sqrt(torch.mean(g2 * g2, dim=dim, keepdim=True)).clamp_min(self.eps)
                u = (g2 / s).reshape(p.shape)
                p.mul_(1 - lr * self.wd)
                p.add_(u, alpha=-lr)
            else:
                alr = self.adam_lr / self.max_lr * lr
                st.setdefault("step", 0)
                st.setdefault("m", torch.zeros_like(g))
                st.setdefault("v", torch.zeros_like(g))
                st["step"] += 1
                k = st["step"]
                st["m"].lerp_(g, 1 - self.b1)
                st["v"].lerp_(g * g, 1 - self.b2)
                upd = st["m"] / (self.eps + st["v"].sqrt())
                scale = (1 - self.b1 ** k) / (1 - self.b2 ** k) ** 0.5
                p.mul_(1 - alr * self.wd)
                p.add_(upd, alpha=-alr / scale)


class RefStableSPAM:
    """Stable-SPAM with the paper's semantics: global-step bias corrections, reset at the reset step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), gamma1=0.7, gamma2=0.9, theta=0.999,
                 reset_interval=1000, total_steps=None, eta_min=0.5, eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.lr, self.b1, self.b2 = lr, betas[0], betas[1]
        self.g1, self.g2, self.theta, self.dT = gamma1, gamma2, theta, reset_interval
        self.T, self.eta_min, self.eps, self.wd = total_steps, eta_min, eps, weight_decay
        self.t, self.k = 0, 0
        self.state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), m_max=0.0, m_n=0.0, v_n=0.0)
                      for p in self.params]

    @torch.no_grad()
    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        t = self.t
        s = 1.0 if self.T is None else (_cos(t, self.T, self.eta_min, 1.0) if t <= self.T else self.eta_min)
        if self.dT and t % self.dT == 0:
            self.k = 1
            for st in self.state:
                st["m"].zero_()
                st["v"].zero_()
        else:
            self.k += 1
        k = self.k
        for p, g, st in zip(self.params, grads, self.state):
            if g is None:
                continue
            g = g.clone()
            p.mul_(1 - lr * self.wd)
            M = g.abs().max().item()
            st["m_max"] = self.theta * st["m_max"] + (1 - self.theta) * M
            m_hat = st["m_max"] / (1 - self.theta ** t)
            mask = g.abs() > m_hat
            g[mask] = g[mask] / M * m_hat
            R = g.norm().item()
            if R == 0:
                continue
            g1 = self.g1 * s
            st["m_n"] = g1 * st["m_n"] + (1 - g1) * R
            st["v_n"] = self.g2 * st["v_n"] + (1 - self.g2) * R * R
            c = (st["m_n"] / (1 - g1 ** t)) / (math.sqrt(st["v_n"] / (1 - self.g2 ** t)) + self.eps)
            g = g / R * c
            b1 = self.b1 * s
            st["m"].mul_(b1).add_(g, alpha=1 - b1)
            st["v"].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            bc1, bc2 = 1 - b1 ** k, 1 - self.b2 ** k
            p.addcdiv_(st["m"], st["v"].sqrt() / math.sqrt(bc2) + self.eps, value=-lr / bc1)


class RefSPAM:
    """SPAM, density 1: reset without re-bias-correction, spike clip, post-reset cosine warm-up."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), threshold=5000, reset_interval=500, warmup_steps=150,
                 grad_accu_steps=20, eps=1e-6, weight_decay=0.0):
        self.params = list(params)
        self.lr, self.b1, self.b2, self.th = lr, betas[0], betas[1], threshold
        self.dT, self.N, self.G, self.eps, self.wd = reset_interval, warmup_steps, grad_accu_steps, eps, weight_decay
        self.total, self.current, self.k = 0, warmup_steps + 1, 0
        self.state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in self.params]

    @torch.no_grad()
    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        c = self.current
        dr = 0.0 if c >= self.N else _cos(c + 1, self.N, 0.0, 0.99)
        scale = 1 - dr
        self.k += 1
        k = self.k
        cs = self.total + 1
        for p, g, st in zip(self.params, grads, self.state):
            if g is None:
                continue
            g = g.clone()
            if self.dT and cs % self.dT == 0:
                st["m"].zero_()
                st["v"].zero_()
            if self.th != 0 and cs >= self.G and (cs % self.dT) >= self.G:
                mask = g * g > self.th * st["v"]
                g[mask] = g[mask].sign() * torch.sqrt(self.th * st["v"][mask])
            st["m"].mul_(self.b1).add_(g, alpha=1 - self.b1)
            st["v"].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            step_size = lr * scale * math.sqrt(1 - self.b2 ** k) / (1 - self.b1 ** k)
            p.addcdiv_(st["m"], st["v"].sqrt() + self.eps, value=-step_size)
            p.mul_(1 - lr * self.wd)
        self.total += 1
        self.current += 1
        if self.dT and (self.total + 1) % self.dT == 0:
            self.current = 0
