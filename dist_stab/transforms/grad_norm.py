"""GradNorm: measure only. Per-tensor and global norms and the non-finite count, gradients untouched.

Used by the skip-step policy and the spike monitor when no other transform runs; one SUM per
group like the others.
"""
from __future__ import annotations

import torch

from .base import GradTransform


class GradNorm(GradTransform):
    tag = "GradNorm"
    apply_factors = False

    def _compute(self, sumsq, maxabs, active):
        return torch.ones_like(sumsq), {}
