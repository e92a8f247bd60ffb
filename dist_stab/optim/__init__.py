"""Sharding-aware optimizers: :class:`SCALE`, :class:`StableSPAM`, :class:`SPAM`, and :class:`AdamW`
(torch's AdamW that also takes per-tensor gradient factors, for transforms folded by ``wrap``).

Each is a ``torch.optim.Optimizer`` around a functional core (:func:`scale_step`,
:func:`stable_spam_step`, :func:`spam_step`) that works on local pieces described by
:class:`~dist_stab.spec.ShardSpec` (rectangular DTensor/plain pieces or flat fragments).
"""
from ._base import OptItem, segments
from .adamw import AdamW
from .scale import SCALE, find_last_layer, scale_step
from .spam import SPAM, spam_step, warmup_scale
from .stable_spam import StableSPAM, cosine_factor, stable_spam_step

__all__ = ["AdamW", "OptItem", "SCALE", "SPAM", "StableSPAM", "cosine_factor", "find_last_layer", "scale_step",
           "segments", "spam_step", "stable_spam_step", "warmup_scale"]
