"""dist_stab: sharding-aware training stability for distributed LLM pretraining.

Gradient transforms (run between ``backward()`` and ``optimizer.step()``, or inside it via
:func:`wrap`): :class:`GlobalClip`, :class:`AdaGC`, :class:`GradientStabilizer`, :class:`ZClip`.
All of them complete their per-tensor statistics with one collective per process group.
"""
from .backends import describe, register_describer
from .comm import comm_log
from .skip import SkipStep
from .spec import GroupRef, ShardAxis, ShardedParam, ShardSpec
from .spikes import SpikeMonitor
from .transforms import AdaGC, GlobalClip, GradientStabilizer, GradNorm, GradTransform, ZClip
from .wrap import WrappedOptimizer, wrap

__version__ = "0.1.0"

__all__ = [
    "AdaGC", "GlobalClip", "GradNorm", "GradientStabilizer", "GradTransform", "GroupRef", "ShardAxis",
    "ShardSpec", "ShardedParam", "SkipStep", "SpikeMonitor", "WrappedOptimizer", "ZClip", "comm_log", "describe",
    "register_describer", "wrap",
]
