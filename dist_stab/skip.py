"""Skip-step policy: drop a whole step, device side, on every rank alike.

A step is skipped when (each test optional)

* ``nonfinite``: a gradient holds NaN/inf (any transform's ``num_nonfinite`` > 0, from reduced
  per-tensor norms, so every rank agrees) or the reduced loss is not finite;
* ``loss_z``: the reduced loss is more than ``loss_z`` std above its trailing window;
* ``grad_z``: the pre-clip global grad norm is more than ``grad_z`` std above its window.

A skipped step leaves the parameters, the optimizer state and every transform's state as they
were. How the optimizer update is dropped (``mode``):

* optimizers of this package take ``step(step_factor=...)`` and multiply every update and
  state change by it (OLMo-core's device-side skip) — used automatically;
* ``"restore"`` (other torch optimizers): parameters and optimizer state are copied before
  the step and put back with ``torch.where`` (no host sync; costs one copy of parameters and
  state in memory). The very first step, before the optimizer has created its state, decides
  on the host once. State that lives on the host while the decision is on the GPU (torch
  Adam/AdamW's ``step`` counters unless ``fused=True`` or ``capturable=True``) cannot be put
  back without reading the decision: such an optimizer is stepped the ``"host_sync"`` way, with
  a one-time warning naming the fix;
* ``"host_sync"``: ``if not skip: optimizer.step()`` — one host sync per step, no memory. Also used
  for optimizers that keep their step counters on the host (``host_step_counters = True``: SCALE,
  StableSPAM, SPAM), whose counters a device-side restore could not roll back.

Every skip is counted (``skipped``) and its step number and reason kept in a device ring of the
last ``log_size`` skips, read by the trainer at log time (DeepSpeed#8415: never skip silently).
A reason is a bitmask over :data:`REASONS` (bit i set: ``REASONS[i]`` held this step):
1 ``nonfinite_grad``, 2 ``nonfinite_loss``, 4 ``loss_spike``, 8 ``grad_spike``.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


REASONS = ("nonfinite_grad", "nonfinite_loss", "loss_spike", "grad_spike")


def reason_names(mask: int) -> List[str]:
    """The names of the bits set in a reason bitmask (see :data:`REASONS`)."""
    return [name for i, name in enumerate(REASONS) if int(mask) >> i & 1]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


class SkipStep:
    def __init__(self, nonfinite: bool = True, loss_z: Optional[float] = None, grad_z: Optional[float] = None,
                 mode: str = "restore", log_size: int = 256):
        for name, v in (("loss_z", loss_z), ("grad_z", grad_z)):
            if v is not None and not (float(v) > 0 and math.isfinite(float(v))):
                raise ValueError(f"{name} must be > 0 or None, got {v!r}")
        if mode not in ("restore", "host_sync"):
            raise ValueError(f"mode must be 'restore' or 'host_sync', got {mode!r}")
        self.nonfinite, self.loss_z, self.grad_z, self.mode = bool(nonfinite), loss_z, grad_z, mode
        self.log_size = int(log_size)
        self.skipped = torch.zeros((), dtype=torch.int64)
        self.steps = 0  # host-side call counter: the step number written to the log
        self.log = torch.full((self.log_size,), -1, dtype=torch.int64)
        self.log_reason = torch.zeros((self.log_size,), dtype=torch.int64)
        self._snap: List[torch.Tensor] = []
        self._warned_host_state = False

    @property
    def needs_monitor(self) -> bool:
        return self.loss_z is not None or self.grad_z is not None

    def decide(self, nonfinite_grads: torch.Tensor, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Device bool: skip this step? (The reason bitmask is left in ``obs["skip_reason"]``.)"""
        reason = self.reason(nonfinite_grads, obs)
        obs["skip_reason"] = reason
        return reason > 0

    def reason(self, nonfinite_grads: torch.Tensor, obs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Device int64 bitmask over :data:`REASONS` of the tests that fire this step (0: keep the step)."""
        dev = nonfinite_grads.device
        tests = []
        if self.nonfinite:
            tests.append((0, nonfinite_grads))
            if "loss_nonfinite" in obs:
                tests.append((1, obs["loss_nonfinite"]))
        if self.loss_z is not None and "loss_z" in obs:
            tests.append((2, obs["loss_z"] > self.loss_z))
        if self.grad_z is not None and "grad_norm_z" in obs:
            tests.append((3, obs["grad_norm_z"] > self.grad_z))
        reason = torch.zeros((), dtype=torch.int64, device=dev)
        for bit, cond in tests:
            reason = reason | (cond.to(dev).long() << bit)
        return reason

    def record(self, skip: torch.Tensor, reason: Optional[torch.Tensor] = None) -> None:
        self.steps += 1
        if self.skipped.device != skip.device:
            self.skipped, self.log = self.skipped.to(skip.device), self.log.to(skip.device)
            self.log_reason = self.log_reason.to(skip.device)
        slot = (self.skipped % self.log_size).reshape(1)
        old = self.log.index_select(0, slot)
        self.log.index_copy_(0, slot, torch.where(skip, torch.full_like(old, self.steps), old))
        if reason is not None:
            old_r = self.log_reason.index_select(0, slot)
            self.log_reason.index_copy_(0, slot, torch.where(skip, reason.reshape(1).to(old_r.device), old_r))
        self.skipped += skip.long()

    def skipped_steps(self) -> List[int]:
        """Step numbers (1-based calls) of the most recent skips. Syncs: call at log time."""
        return [s for s, _ in self.skipped_steps_with_reasons()]

    def skipped_steps_with_reasons(self) -> List[Tuple[int, List[str]]]:
        """``(step, reasons)`` of the most recent skips, oldest first (names from :data:`REASONS`).
        Syncs: call at log time."""
        log = self.log.cpu().tolist()  # host-sync-ok: logging only
        why = self.log_reason.cpu().tolist()  # host-sync-ok: logging only
        return sorted((int(s), reason_names(r)) for s, r in zip(log, why) if s >= 0)

    # ------------------------------------------------------------ optimizer update
    def step_optimizer(self, optimizer: torch.optim.Optimizer, skip: torch.Tensor, step_fn=None,
                       **step_kwargs) -> None:
        """Step ``optimizer`` unless ``skip``; ``step_kwargs`` go to its ``step`` (e.g. ``grad_factors``).
        ``step_fn``: what to call instead of ``optimizer.step`` (the wrapper's, which keeps global hooks from
        firing twice)."""
        step = step_fn if step_fn is not None else optimizer.step
        if getattr(optimizer, "supports_step_factor", False):
            step(step_factor=(~skip).float(), **step_kwargs)
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        first = any(len(optimizer.state.get(p, {})) == 0 for p in params if p.grad is not None)
        host_counters = getattr(optimizer, "host_step_counters", False)
        if self.mode == "host_sync" or first or host_counters:
            # host-sync-ok: mode="host_sync"; once before state exists; or an optimizer whose step counters
            # live on the host (dist_stab.optim), which a device-side restore could not roll back
            if not bool(skip):
                step(**step_kwargs)
            return
        tensors = [_local(p.detach()) for p in params]
        for p in params:
            tensors += [_local(v) for v in optimizer.state[p].values() if torch.is_tensor(v)]
        if skip.device.type != "cpu" and any(t.device.type == "cpu" for t in tensors):
            if not self._warned_host_state:
                self._warned_host_state = True
                warnings.warn(f"SkipStep(mode='restore'): {type(optimizer).__name__} keeps part of its state on the host "
                              "(e.g. torch AdamW's step counters without fused=True or capturable=True); its skip "
                              "decision is read on the host, one sync per step. Use AdamW(fused=True) for a "
                              "sync-free skip.", RuntimeWarning)
            if not bool(skip):  # host-sync-ok: state on the host cannot be restored from a device decision
                step(**step_kwargs)
            return
        if len(self._snap) != len(tensors) or any(a.shape != b.shape for a, b in zip(self._snap, tensors)):
            self._snap = [t.clone() for t in tensors]
        else:
            torch._foreach_copy_(self._snap, tensors)
        step(**step_kwargs)
        tensors_after = [_local(p.detach()) for p in params]
        for p in params:
            tensors_after += [_local(v) for v in optimizer.state[p].values() if torch.is_tensor(v)]
        for new, old in zip(tensors_after, self._snap):
            new.copy_(torch.where(skip.to(new.device), old, new))

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.clone(), "log": self.log.clone(), "log_reason": self.log_reason.clone(),
                "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        self.skipped, self.log, self.steps = sd["skipped"].clone(), sd["log"].clone(), int(sd["steps"])
        reason = sd.get("log_reason")  # absent in checkpoints written before reasons were kept
        self.log_reason = torch.zeros_like(self.log) if reason is None else reason.clone()
