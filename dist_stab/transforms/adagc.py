"""AdaGC: per-tensor adaptive gradient clipping (arXiv:2502.11034, ICML 2026).

For tensor i at step t > warmup_steps (official Megatron patch, ``clip_grads.py``)::

    n_i     = ||g_i||
    h_i     = min(1, lambda_rel * gamma_i / (n_i + eps))     if n_i > lambda_rel * gamma_i else 1
    g_i    <- h_i * g_i
    gamma_i <- beta * gamma_i + (1 - beta) * min(n_i, lambda_rel * gamma_i)   # the CLIPPED norm

The first warmup_steps steps clip globally with ``max_norm`` and seed each gamma_i with the
**minimum** post-clip norm seen (``gamma_i = min(gamma_i, c * n_i)``). The warm-up is counted per
tensor, on the device (state ``count``): only steps on which the tensor is active with a finite,
non-zero norm (and the global norm is finite) count, so an all-zero gradient (a framework's
dry step, an MoE expert that got no tokens), a missing one or a skipped step neither seeds gamma
nor uses up the warm-up. With every tensor present every step this is the paper's schedule; an
expert seen first at step 500 gets its own warm-up.

Defaults are the official code's: lambda_rel 1.04 (``--clip-ratio``), beta 0.99
(``--clip-beta``), 100 warm-up steps, max_norm 1.0 (``--clip-grad``), eps 1e-6.

Distributed: ``mode="exact"`` completes per-tensor sums of squares with one SUM per group
(during the first ``warmup_steps`` calls: plus one scalar SUM over ``global_group`` if pipeline
stages are used; a tensor still in warm-up after that clips by its stage's norm);
``mode="shard_local"`` ("AdaGC-Shard") treats each local piece as its own tensor and issues
no collective at all (warm-up then clips by this rank's norm).

Bad input: a tensor whose norm is not finite (or zero) is left untouched (factor 1) and its gamma
is not updated; in warm-up a non-finite global norm freezes every gamma for that step.
A tensor still without gamma after warm-up (it never had a finite grad) is seeded with its
first finite norm and not clipped on that step.
Deviations: none in the math. The official code all-reduces the global norm every step for
logging; here ``global_norm`` after warm-up is derived from the per-tensor norms for free.
"""
from __future__ import annotations

import math

import torch

from .base import GradTransform, check_open_unit, check_positive
from .global_clip import global_clip_factor


class AdaGC(GradTransform):
    tag = "AdaGC"
    state_init = {"gamma": math.inf, "count": 0.0}

    def __init__(self, params=None, lambda_rel: float = 1.04, beta: float = 0.99, warmup_steps: int = 100,
                 max_norm: float = 1.0, eps: float = 1e-6, mode: str = "exact", **kw):
        if not float(lambda_rel) > 1.0 or not math.isfinite(float(lambda_rel)):
            raise ValueError(f"lambda_rel must be > 1, got {lambda_rel!r}")
        check_open_unit("beta", beta)
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        check_positive("max_norm", max_norm)
        check_positive("eps", eps)
        self.lambda_rel, self.beta, self.warmup_steps = float(lambda_rel), float(beta), int(warmup_steps)
        self.max_norm, self.eps = float(max_norm), float(eps)
        super().__init__(params, mode=mode, **kw)

    def _global_this_step(self) -> bool:
        return self.num_steps <= self.warmup_steps  # host-side call count: the same on every rank

    def _compute(self, sumsq, maxabs, active):
        norms = sumsq.sqrt()
        ok = active & torch.isfinite(norms) & (norms > 0)  # only these may seed or advance gamma / count
        gamma, count = self._get("gamma"), self._get("count")
        warm = count < self.warmup_steps
        # warm-up: clip by the global norm, seed gamma with the minimum post-clip norm
        total = self.global_sumsq(sumsq).sqrt()
        coef = global_clip_factor(total, self.max_norm)
        seed = ok & warm & torch.isfinite(total)
        gamma_warm = torch.where(seed, torch.minimum(gamma, coef * norms), gamma)
        count_new = count + seed.float()
        # after warm-up: per-tensor clip to lambda_rel * gamma, EMA of the clipped norm
        unseeded = torch.isinf(gamma)
        thresh = self.lambda_rel * gamma
        clip = ok & ~warm & (norms > thresh) & ~unseeded
        factors = torch.where(clip, thresh / (norms + self.eps), torch.ones_like(norms))
        clipped_norm = torch.where(clip, thresh, norms)
        gamma_post = torch.where(unseeded, clipped_norm, self.beta * gamma + (1 - self.beta) * clipped_norm)
        new_gamma = torch.where(warm, gamma_warm, torch.where(ok, gamma_post, gamma))
        self._set("gamma", new_gamma)
        self._set("count", count_new)
        factors = torch.where(warm, coef.expand(norms.shape), factors)
        return factors, {"global_norm": total, "warmup": warm}
