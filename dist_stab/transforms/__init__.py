from .adagc import AdaGC
from .base import GradTransform
from .global_clip import GlobalClip
from .gradient_stabilizer import GradientStabilizer
from .zclip import ZClip

__all__ = ["AdaGC", "GlobalClip", "GradientStabilizer", "GradTransform", "ZClip"]
