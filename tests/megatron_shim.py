"""TEST-ONLY CUDA -> CPU shim for megatron-core (see shared/docs/cpu-stack.md §3).

megatron-core hard-codes ``device='cuda'`` (``get_grad_norm_fp32``, optimizer wrappers,
``GlobalMemoryBuffer``), asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``
(``clip_grad_by_total_norm_fp32``) and reads the CUDA RNG (``model_parallel_cuda_manual_seed``).
On a machine without CUDA, :func:`install` routes those calls to the CPU:

* a ``TorchFunctionMode`` rewrites ``device='cuda'`` / ``device=<int>`` keyword arguments to
  ``'cpu'`` and makes ``Tensor.type()`` report ``torch.cuda.*Tensor`` names;
* ``torch.cuda.current_device`` / RNG getters and setters and megatron's RNG helpers use the
  CPU generator; ``torch.cuda.synchronize`` is a no-op (pipeline p2p calls it) and
  ``torch.cuda.current_stream()`` a no-op stream (megatron-core 0.17+ DDP waits on it).

This file lives in ``tests/`` on purpose: it must never be imported by the ``dist_stab``
package. When CUDA is available, :func:`install` does nothing and returns False, so the same
tests run unchanged on a GPU machine.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        d = kwargs.get("device")
        if d is not None and _is_cuda_device(d):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:  # t.cuda() -> t
            return args[0]
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str) \
                and ".cuda." not in out:
            out = out.replace("torch.", "torch.cuda.", 1)
        return out


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` on the CPU: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def install() -> bool:
    """Install the shim (idempotent). Returns True if installed, False on a CUDA machine."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None  # pipeline p2p calls it after batched send/recv
    torch.cuda.current_stream = lambda device=None: _NullStream()  # megatron-core 0.17+ DDP grad sync
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda s, device="cuda": torch.set_rng_state(s)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    import megatron.core.tensor_parallel.random as r

    r._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    r._set_cuda_rng_state = lambda s, device=-1, graph_safe=False: torch.set_rng_state(s)
    import logging

    logging.getLogger(r.__name__).setLevel(logging.ERROR)  # "CPU RNG state changed within GPU RNG context"
    CudaToCpuMode().__enter__()
    _INSTALLED = True
    return True


def device() -> torch.device:
    """The device the tests put tensors on: the current CUDA device if any, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
