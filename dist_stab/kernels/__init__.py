"""Device kernels with a plain-torch fallback (the fallback is what runs on CPU and in CI)."""
from .scale import scale_tensors_

__all__ = ["scale_tensors_"]
