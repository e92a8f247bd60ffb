"""GradientStabilizer: keep each tensor's gradient direction, replace its norm
("Fix the Norm, Not the Gradient", arXiv:2502.17055 v4, ICML 2026; official code
TianjinYellow/GradientStabilizer ``gradient_stabilizer.py``). Per tensor::

    R   = ||g||                      (fp32, the FULL tensor's norm, completed across shards)
    if R is not finite or R <= 0:    leave g alone, do not advance k, m, v  (as the code; also when the
                                     tensor is inactive: no rank has a gradient for it)
    k  += 1
    m   = gamma1 m + (1 - gamma1) R ;          v = gamma2 v + (1 - gamma2) R^2
    rho = m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - gamma1^k), v_hat = v / (1 - gamma2^k)
    g  <- g * rho / max(R, eps)

Defaults (paper and code): gamma1 0.6, gamma2 0.999, eps 1e-12, bias_correction True (the
paper's Algorithm 1 has none; the code has it; ``bias_correction=False`` follows the paper).

Distributed: one SUM of per-tensor sums of squares per group. The official README lets each
FSDP shard keep its own norm; that changes the algorithm with the mesh, so it is only
available here as the explicit ``mode="shard_local"``.
"""
from __future__ import annotations

import math

import torch

from .base import GradTransform, check_open_unit, check_positive


class GradientStabilizer(GradTransform):
    tag = "GradientStabilizer"
    state_init = {"m": 0.0, "v": 0.0, "k": 0.0}

    def __init__(self, params=None, gamma1: float = 0.6, gamma2: float = 0.999, eps: float = 1e-12,
                 bias_correction: bool = True, mode: str = "exact", **kw):
        check_open_unit("gamma1", gamma1)
        check_open_unit("gamma2", gamma2)
        check_positive("eps", eps)
        self.gamma1, self.gamma2, self.eps = float(gamma1), float(gamma2), float(eps)
        self.bias_correction = bool(bias_correction)
        super().__init__(params, mode=mode, **kw)

    def _compute(self, sumsq, maxabs, active):
        R = sumsq.sqrt()
        ok = active & torch.isfinite(R) & (R > 0)
        m, v, k = (self._get(n) for n in ("m", "v", "k"))
        k_new = k + ok.float()
        m_new = torch.where(ok, self.gamma1 * m + (1 - self.gamma1) * R, m)
        v_new = torch.where(ok, self.gamma2 * v + (1 - self.gamma2) * R * R, v)
        if self.bias_correction:
            k_safe = k_new.clamp(min=1.0)
            # 1 - gamma^k as -expm1(k log gamma): exact in fp32 even when gamma^k is close to 1
            m_hat = m_new / -torch.expm1(k_safe * math.log(self.gamma1))
            v_hat = v_new / -torch.expm1(k_safe * math.log(self.gamma2))
        else:
            m_hat, v_hat = m_new, v_new
        rho = m_hat / (v_hat.sqrt() + self.eps)
        factors = torch.where(ok, rho / R.clamp(min=self.eps), torch.ones_like(R))
        for name, val in (("m", m_new), ("v", v_new), ("k", k_new)):
            self._set(name, val)
        return factors, {"rho": torch.where(ok, rho, torch.zeros_like(rho))}
