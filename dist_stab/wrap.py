"""``dist_stab.wrap(optimizer, *transforms)``: run gradient transforms inside ``optimizer.step()``.

The result is a ``torch.optim.Optimizer`` (LR schedulers accept it) that shares the inner
optimizer's ``param_groups`` and ``state``; its ``state_dict`` holds the inner optimizer's and
every transform's state, so one checkpoint restores both.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, *transforms):
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

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for t in self.transforms:
            self.last_stats[getattr(t, "tag", type(t).__name__)] = t.step()
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "transforms": [t.state_dict() for t in self.transforms]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["transforms"]
        if len(saved) != len(self.transforms):
            raise ValueError(f"checkpoint has {len(saved)} transforms, this optimizer has {len(self.transforms)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for t, sd in zip(self.transforms, saved):
            t.load_state_dict(sd)

    def __repr__(self) -> str:
        inner = "\n  ".join(repr(self.optimizer).splitlines())
        return f"WrappedOptimizer(\n  {inner},\n  transforms={[type(t).__name__ for t in self.transforms]})"


def wrap(optimizer: torch.optim.Optimizer, *transforms) -> WrappedOptimizer:
    return WrappedOptimizer(optimizer, *transforms)
