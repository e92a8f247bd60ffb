"""Spike statistics of the training loss and the pre-clip global gradient norm, on device.

For each series x (the reduced loss, the global grad norm) the monitor keeps a ring buffer of
the last ``window`` finite values of *applied* steps (a skipped step's values stay out, and so does
the norm of a step on which no tensor had a gradient) (default 1000, the AdaGC paper's metric) and, at step t,
compares x_t with the mean and (unbiased) std of that trailing window, which **excludes**
x_t::

    z_t      = (x_t - mean) / std
    spike_t  = z_t > sigma                  (one-sided; ``spike_abs``: |z_t| > sigma)
    score    = 100 * #loss spikes / #steps   (AdaGC's spike score, sigma = 10)

No decision is taken before ``min_history`` values are in the window. A non-finite x_t is
flagged ``nonfinite``, is not a spike and is not added to the window.

Identical on every rank: the grad norm comes already reduced from the transforms (no extra
collective); the loss is reduced over ``group`` as a (value, present) pair with one 2-element
all-reduce, issued on every rank every step whether or not it passed a loss (a loss on some ranks
only is averaged over those; none at all: the loss series is not observed). Skip it with
``reduce_loss=False`` when the loss passed in is already global. Nothing syncs with the host.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import comm
from .spec import GroupRef

SERIES = ("loss", "grad_norm")


def reduce_loss_pair(loss: Optional[torch.Tensor], group=None, device=None):
    """``(value, present)`` of this step's loss, averaged over the ranks of ``group`` that passed one.

    One 2-element SUM of ``(loss, 1)`` (``(0, 0)`` on a rank without a loss) when torch.distributed is
    initialised and ``group`` is not False (False: the loss is already global, nothing is reduced)."""
    if loss is not None:
        loss = torch.as_tensor(loss).detach()
        device = loss.device
    device = torch.device("cpu") if device is None else device
    if group is False or not (dist.is_available() and dist.is_initialized()):
        if loss is None:
            return torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), dtype=torch.bool, device=device)
        return loss.float().reshape(()), torch.ones((), dtype=torch.bool, device=device)
    ref = group if isinstance(group, GroupRef) else GroupRef.of("spike_loss", group)
    if loss is None:
        buf = torch.zeros(2, dtype=torch.float32, device=device)
    else:
        buf = torch.stack([loss.float().reshape(()), torch.ones((), dtype=torch.float32, device=device)])
    comm.all_reduce(buf, "sum", ref, "SpikeMonitor")
    return buf[0] / buf[1].clamp(min=1.0), buf[1] > 0.5


class SpikeMonitor:
    def __init__(self, window: int = 1000, sigma: float = 10.0, min_history: int = 20, group=None,
                 reduce_loss: bool = True):
        if int(window) != window or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        if not (float(sigma) > 0 and math.isfinite(float(sigma))):
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        if int(min_history) != min_history or not (2 <= min_history <= window):
            raise ValueError(f"min_history must be an integer in [2, window], got {min_history!r}")
        self.window, self.sigma, self.min_history = int(window), float(sigma), int(min_history)
        self.reduce_loss = reduce_loss
        self._group = group
        self.state: Dict[str, torch.Tensor] = {}
        for s in SERIES:
            self.state[f"{s}_buf"] = torch.zeros(self.window, dtype=torch.float64)
            self.state[f"{s}_count"] = torch.zeros((), dtype=torch.int64)  # finite values seen
            self.state[f"{s}_spikes"] = torch.zeros((), dtype=torch.int64)
        self.state["steps"] = torch.zeros((), dtype=torch.int64)

    def _to(self, device) -> None:
        for k, v in self.state.items():
            if v.device != device:
                self.state[k] = v.to(device)

    def reduce_loss_pair(self, loss: Optional[torch.Tensor], device=None):
        """(mean loss over the ranks that passed one, present): a (value, present) pair reduced with one
        2-element SUM over ``group`` -- issued on every rank whether or not it has a loss, so a loss given
        on some ranks only neither hangs nor lies. ``present`` is a device bool (False: no rank had one)."""
        return reduce_loss_pair(loss, self._group if self.reduce_loss else False, device)

    def zscore(self, name: str, x: torch.Tensor):
        """(z, ready) of x against the current window of series ``name`` (window not updated)."""
        buf, count = self.state[f"{name}_buf"], self.state[f"{name}_count"]
        n = count.clamp(max=self.window).to(torch.float64)
        valid = torch.arange(self.window, device=buf.device) < n
        mean = torch.where(valid, buf, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (buf - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
        std = var.sqrt()
        xd = x.to(torch.float64)
        z = (xd - mean) / std.clamp(min=1e-12 * mean.abs().clamp(min=1e-30))
        ready = n >= self.min_history
        return torch.where(ready, z, torch.zeros_like(z)), ready

    def observe(self, loss: Optional[torch.Tensor] = None, grad_norm: Optional[torch.Tensor] = None,
                loss_present: Optional[torch.Tensor] = None, grad_present: Optional[torch.Tensor] = None,
                reduced: bool = False):
        """Score this step's values against the trailing windows. Returns device tensors per series:
        ``{name}`` (the value used), ``{name}_z``, ``{name}_spike``, ``{name}_spike_abs``,
        ``{name}_nonfinite``, ``{name}_present``. Call :meth:`commit` afterwards to add them to the windows.

        ``loss`` is reduced here (:meth:`reduce_loss_pair`) unless ``reduced`` (then ``loss_present`` says
        whether any rank had one). ``grad_present``: False when no tensor had a gradient this step (a
        norm of 0 that must not enter the window)."""
        out: Dict[str, torch.Tensor] = {}
        dev = grad_norm.device if grad_norm is not None else None
        if not reduced:
            loss, loss_present = self.reduce_loss_pair(loss, dev)
        values = {"loss": (loss, loss_present), "grad_norm": (grad_norm, grad_present)}
        for name, (x, present) in values.items():
            if x is None:
                continue
            x = x.detach().reshape(())
            self._to(x.device)
            present = (torch.ones((), dtype=torch.bool, device=x.device) if present is None
                       else present.to(x.device).reshape(()))
            z, ready = self.zscore(name, x)
            finite = torch.isfinite(x)
            out[name] = x
            out[f"{name}_z"] = torch.where(present, z, torch.zeros_like(z))
            out[f"{name}_spike"] = present & ready & finite & (z > self.sigma)
            out[f"{name}_spike_abs"] = present & ready & finite & (z.abs() > self.sigma)
            out[f"{name}_nonfinite"] = present & ~finite
            out[f"{name}_present"] = present
        self._pending = out
        return out

    def commit(self, applied: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Add the observed values to the windows and count spikes; returns the running scores.

        ``applied`` (device bool): False for a skipped step, whose values stay out of the windows (so a
        skipped spike cannot widen the window and hide the next one). Spikes are counted either way."""
        out = getattr(self, "_pending", None) or {}
        present = [out[f"{n}_present"] for n in SERIES if n in out]
        if present:  # a step with neither a loss nor a gradient anywhere (a framework's dry step) is not counted
            any_present = present[0]
            for q in present[1:]:
                any_present = any_present | q
            self.state["steps"] += any_present.long()
        for name in SERIES:
            if name not in out:
                continue
            x = out[name]
            keep_it = out[f"{name}_present"] & ~out[f"{name}_nonfinite"]
            if applied is not None:
                keep_it = keep_it & applied.to(keep_it.device)
            buf, count = self.state[f"{name}_buf"], self.state[f"{name}_count"]
            slot = (count % self.window).reshape(1)
            keep = buf.index_select(0, slot)
            buf.index_copy_(0, slot, torch.where(keep_it, x.to(torch.float64).reshape(1), keep))
            count += keep_it.long()
            self.state[f"{name}_spikes"] += out[f"{name}_spike"].long()
        self._pending = None
        return self.scores()

    def update(self, loss=None, grad_norm=None):
        """observe + commit."""
        out = self.observe(loss, grad_norm)
        out.update(self.commit())
        return out

    def scores(self) -> Dict[str, torch.Tensor]:
        steps = self.state["steps"].clamp(min=1).to(torch.float64)
        return {f"{s}_spike_score": 100.0 * self.state[f"{s}_spikes"].to(torch.float64) / steps for s in SERIES}

    def state_dict(self) -> dict:
        return {"window": self.window, "sigma": self.sigma, "min_history": self.min_history,
                "state": {k: v.detach().clone() for k, v in self.state.items()}}

    def check_loadable(self, sd: dict) -> None:
        if sd.get("window") != self.window:
            raise ValueError(f"saved window {sd.get('window')} differs from this monitor's {self.window}")
        missing = {f"{s}_{k}" for s in SERIES for k in ("buf", "count", "spikes")} - set(sd.get("state", {}))
        if missing:
            raise ValueError(f"saved monitor state lacks {sorted(missing)}")

    def load_state_dict(self, sd: dict) -> None:
        self.check_loadable(sd)
        self.state = {k: torch.as_tensor(v).clone() for k, v in sd["state"].items()}
