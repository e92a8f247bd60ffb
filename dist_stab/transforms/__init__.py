from .adagc import AdaGC
from .base import GradTransform
from .global_clip import GlobalClip
from .grad_norm import GradNorm
from .gradient_stabilizer import GradientStabilizer
from .zclip import ZClip

__all__ = ["AdaGC", "GlobalClip", "GradNorm", "GradientStabilizer", "GradTransform", "ZClip"]
