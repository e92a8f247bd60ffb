"""Plain single-process references written directly from the papers' / official code's equations.

Per-tensor Python loops in float64; used only as oracles for the tests. Each takes a list of
gradient tensors and modifies them in place, like the transform under test.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch


def ref_global_clip(grads: List[torch.Tensor], max_norm: float) -> float:
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


class RefAdaGC:
    """lishuai-97/AdaGC megatron/optimizer/clip_grads.py, mode AdaGC (arXiv:2502.11034).

    With dist_stab's presence rule on top (README): a gradient that is ``None`` (inactive), or whose norm is
    zero or non-finite, neither seeds nor advances gamma nor the tensor's warm-up count; the warm-up is
    counted per tensor. With every gradient present and non-zero this is the official code."""

    def __init__(self, n: int, lambda_rel=1.04, beta=0.99, warmup_steps=100, max_norm=1.0, eps=1e-6):
        self.lam, self.beta, self.warm, self.max_norm, self.eps = lambda_rel, beta, warmup_steps, max_norm, eps
        self.gamma: List[Optional[float]] = [None] * n
        self.count = [0] * n
        self.steps = 0

    def step(self, grads: List[Optional[torch.Tensor]]) -> List[float]:
        self.steps += 1
        present = [g for g in grads if g is not None]
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in present))
        coef = self.max_norm / (total + 1e-6)
        factors = []
        for i, g in enumerate(grads):
            if g is None:
                factors.append(1.0)
                continue
            n = float(g.double().norm())
            ok = math.isfinite(n) and n > 0
            if self.count[i] < self.warm:  # this tensor's warm-up: global clip, seed gamma with the minimum
                if coef < 1 and math.isfinite(total):
                    g.mul_(coef)
                if ok and math.isfinite(total):
                    post = n * min(coef, 1.0)
                    self.gamma[i] = post if self.gamma[i] is None else min(self.gamma[i], post)
                    self.count[i] += 1
                factors.append(min(coef, 1.0) if math.isfinite(total) else 1.0)
                continue
            f = 1.0
            if ok and self.gamma[i] is None:
                self.gamma[i] = n
            elif ok:
                if n > self.lam * self.gamma[i]:
                    f = self.lam * self.gamma[i] / (n + self.eps)
                    g.mul_(f)
                    n = self.lam * self.gamma[i]
                self.gamma[i] = self.beta * self.gamma[i] + (1 - self.beta) * n
            factors.append(f)
        return factors


class RefGradientStabilizer:
    """TianjinYellow/GradientStabilizer gradient_stabilizer.py (per tensor, bias-corrected)."""

    def __init__(self, n: int, gamma1=0.6, gamma2=0.999, eps=1e-12, bias_correction=True):
        self.g1, self.g2, self.eps, self.bc = gamma1, gamma2, eps, bias_correction
        self.m, self.v, self.k = [0.0] * n, [0.0] * n, [0] * n

    def step(self, grads: List[torch.Tensor]) -> None:
        for i, g in enumerate(grads):
            if g is None:  # inactive: no state change
                continue
            R = float(g.double().norm())
            if not math.isfinite(R) or R <= 0:
                continue
            self.k[i] += 1
            self.m[i] = self.g1 * self.m[i] + (1 - self.g1) * R
            self.v[i] = self.g2 * self.v[i] + (1 - self.g2) * R * R
            m_hat, v_hat = self.m[i], self.v[i]
            if self.bc:
                m_hat /= 1 - self.g1 ** self.k[i]
                v_hat /= 1 - self.g2 ** self.k[i]
            rho = m_hat / (math.sqrt(v_hat) + self.eps)
            g.mul_(rho / max(R, self.eps))
