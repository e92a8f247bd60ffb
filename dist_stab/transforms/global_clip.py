"""Global-norm clipping, the baseline every peer ships (Megatron, DeepSpeed, torchtitan).

    total = sqrt(sum_i ||g_i||^2)
    g_i  <- g_i * min(1, max_norm / (total + 1e-6))          (torch.nn.utils.clip_grad_norm_)

Distributed: the per-tensor partial sums of squares are completed with one SUM per group
(every rank then knows every tensor's norm; no extra collective for the total), plus one
scalar SUM over ``global_group`` when pipeline stages hold different tensors. Works on
models that mix DTensors of several meshes and plain tensors, where torch's own
``clip_grad_norm_`` raises.
Non-finite total norm: the gradients are left as they are (factor 1) and
``num_nonfinite`` reports it; torch would multiply them by NaN.
"""
from __future__ import annotations

import torch

from .base import GradTransform, check_positive


def global_clip_factor(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return torch.where(torch.isfinite(total), coef, torch.ones_like(coef))


class GlobalClip(GradTransform):
    tag = "GlobalClip"

    def __init__(self, params=None, max_norm: float = 1.0, **kw):
        check_positive("max_norm", max_norm)
        self.max_norm = float(max_norm)
        super().__init__(params, **kw)

    def _compute(self, sumsq, maxabs, active):
        total = self.global_sumsq(sumsq).sqrt()
        coef = global_clip_factor(total, self.max_norm)
        return coef.expand(sumsq.shape).contiguous(), {"global_norm": total}
