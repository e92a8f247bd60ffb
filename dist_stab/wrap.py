"""``dist_stab.wrap(optimizer, *transforms, skip=None, monitor=None)``: run gradient transforms,
spike statistics and the skip-step policy inside ``optimizer.step()``.

The result is a ``torch.optim.Optimizer`` (LR schedulers accept it) that shares the inner
optimizer's ``param_groups`` and ``state``; its ``state_dict`` holds the inner optimizer's,
every transform's, the monitor's and the skip counters' state, so one checkpoint restores all.

``step(closure=None, loss=None)``: pass this step's (local) loss for the spike monitor and the
loss-based skip test; it is averaged over the data-parallel group with one 1-element
all-reduce. Statistics land in ``last_stats`` as device tensors (read them at log time).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, *transforms, skip=None, monitor=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"wrap() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for t in transforms:
            if not hasattr(t, "step") or not hasattr(t, "state_dict"):
                raise TypeError(f"{t!r} is not a gradient transform")
        # Optimizer.__init__ would rebuild param_groups; share the inner optimizer's instead.
        self.optimizer = optimizer
        self.transforms = list(transforms)
        self.defaults = optimizer.defaults
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self.last_stats: Dict[str, Dict[str, torch.Tensor]] = {}
        self.skip = skip
        self.monitor = monitor
        if skip is not None and skip.needs_monitor and monitor is None:
            from .spikes import SpikeMonitor
            self.monitor = SpikeMonitor()
        self._probe = None
        if (skip is not None or self.monitor is not None) and not self.transforms:
            from .transforms import GradNorm
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self._probe = GradNorm([(f"param.{i}", p) for i, p in enumerate(params)])

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def step(self, closure=None, loss=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        snaps = [t.snapshot() for t in self.transforms] if self.skip is not None else None
        stats = []
        for t in self.transforms:
            st = t.step()
            stats.append(st)
            self.last_stats[getattr(t, "tag", type(t).__name__)] = st
        if self._probe is not None:
            stats.append(self._probe.step())
            self.last_stats["GradNorm"] = stats[-1]
        if self.skip is None and self.monitor is None:
            self.optimizer.step()
            return loss
        first = stats[0]  # the first transform sees the raw gradients: its norm is the pre-clip one
        nonfinite = sum(st["num_nonfinite"] for st in stats) > 0
        obs = self.monitor.observe(loss, first["global_norm"]) if self.monitor is not None else {}
        if self.skip is None:
            self.optimizer.step()
        else:
            skip = self.skip.decide(nonfinite, obs)
            for t, snap in zip(self.transforms, snaps):
                t.restore_where(snap, skip)
            self.skip.step_optimizer(self.optimizer, skip)
            self.skip.record(skip)
            obs["skip"] = skip
            obs["skipped"] = self.skip.skipped
        if self.monitor is not None:
            obs.update(self.monitor.commit())
        self.last_stats["spikes"] = obs
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        sd = {"optimizer": self.optimizer.state_dict(), "transforms": [t.state_dict() for t in self.transforms]}
        if self.monitor is not None:
            sd["monitor"] = self.monitor.state_dict()
        if self.skip is not None:
            sd["skip"] = self.skip.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["transforms"]
        if len(saved) != len(self.transforms):
            raise ValueError(f"checkpoint has {len(saved)} transforms, this optimizer has {len(self.transforms)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for t, sd in zip(self.transforms, saved):
            t.load_state_dict(sd)
        if self.monitor is not None and "monitor" in state_dict:
            self.monitor.load_state_dict(state_dict["monitor"])
        if self.skip is not None and "skip" in state_dict:
            self.skip.load_state_dict(state_dict["skip"])

    def __repr__(self) -> str:
        inner = "\n  ".join(repr(self.optimizer).splitlines())
        return f"WrappedOptimizer(\n  {inner},\n  transforms={[type(t).__name__ for t in self.transforms]})"


def wrap(optimizer: torch.optim.Optimizer, *transforms, skip=None, monitor=None) -> WrappedOptimizer:
    return WrappedOptimizer(optimizer, *transforms, skip=skip, monitor=monitor)
