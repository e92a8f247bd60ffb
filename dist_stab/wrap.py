"""``dist_stab.wrap(optimizer, *transforms, skip=None, monitor=None)``: run gradient transforms,
spike statistics and the skip-step policy inside ``optimizer.step()``.

The result is a ``torch.optim.Optimizer`` (LR schedulers accept it) that shares the inner
optimizer's ``param_groups`` and ``state``; its ``state_dict`` holds the inner optimizer's,
every transform's, the monitor's and the skip counters' state, so one checkpoint restores all.

``step(closure=None, loss=None)``: pass this step's (local) loss for the spike monitor and the
loss-based skip test; it is averaged over the data-parallel group with one 1-element
all-reduce. Statistics land in ``last_stats`` as device tensors (read them at log time).

Folding (``fold=None``: whenever possible): when the inner optimizer reads gradients through
per-tensor factors (``supports_grad_factors``, e.g. :class:`dist_stab.optim.AdamW`), the last
transform does not rescale the gradients; its factors go to ``optimizer.step(grad_factors=...)``
instead, which saves a read and a write of every gradient it scales (GradientStabilizer scales
all of them). The update is the same; ``.grad`` then holds the gradients as the last transform
saw them. Possible when every parameter of the last transform is a plain or DTensor parameter
of the optimizer. ``fold=True`` raises where it is not possible, ``fold=False`` never folds.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, *transforms, skip=None, monitor=None,
                 fold: Optional[bool] = None):
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
        self._fold_index: Optional[List[int]] = None  # optimizer param -> factor position (last: 1.0)
        self._fold_perm: Optional[torch.Tensor] = None
        self._setup_fold(fold)
        self._probe = None
        if (skip is not None or self.monitor is not None) and not self.transforms:
            from .transforms import GradNorm
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self._probe = GradNorm([(f"param.{i}", p) for i, p in enumerate(params)])

    def _setup_fold(self, fold: Optional[bool]) -> None:
        if fold is False or not self.transforms:
            return
        last = self.transforms[-1]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        reason = None
        if not getattr(self.optimizer, "supports_grad_factors", False):
            reason = f"{type(self.optimizer).__name__} does not take grad_factors"
        elif not getattr(last, "apply_factors", False):
            reason = f"{type(last).__name__} does not scale gradients"
        elif not all(getattr(s, "kind", None) in ("plain", "dtensor") for s in getattr(last, "shards", [None])):
            reason = f"{type(last).__name__} holds parameters other than plain or DTensor ones"
        else:
            where = {id(p): i for i, p in enumerate(params)}
            if any(id(s.param) not in where for s in last.shards):
                reason = f"{type(last).__name__} holds parameters this optimizer does not update"
        if reason is not None:
            if fold:
                raise ValueError(f"wrap(fold=True): cannot fold {type(last).__name__} into the optimizer: {reason}")
            return
        pos = {id(s.param): i for i, s in enumerate(last.shards)}
        self._fold_index = [pos.get(id(p), len(last.shards)) for p in params]
        last.apply_factors = False

    @property
    def folded(self) -> bool:
        """Whether the last transform's factors go to the optimizer instead of into the gradients."""
        return self._fold_index is not None

    def _step_kwargs(self, stats: list) -> dict:
        if self._fold_index is None:
            return {}
        f = stats[len(self.transforms) - 1]["factors"].float()
        if self._fold_perm is None or self._fold_perm.device != f.device:
            self._fold_perm = torch.tensor(self._fold_index, device=f.device)
        return {"grad_factors": torch.cat([f, f.new_ones(1)]).index_select(0, self._fold_perm)}

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
        kw = self._step_kwargs(stats)
        if self.skip is None and self.monitor is None:
            self.optimizer.step(**kw)
            return loss
        first = stats[0]  # the first transform sees the raw gradients: its norm is the pre-clip one
        nonfinite = sum(st["num_nonfinite"] for st in stats) > 0
        obs = self.monitor.observe(loss, first["global_norm"]) if self.monitor is not None else {}
        if self.skip is None:
            self.optimizer.step(**kw)
        else:
            skip = self.skip.decide(nonfinite, obs)
            for t, snap in zip(self.transforms, snaps):
                t.restore_where(snap, skip)
            self.skip.step_optimizer(self.optimizer, skip, **kw)
            self.skip.record(skip, obs.get("skip_reason"))
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


def wrap(optimizer: torch.optim.Optimizer, *transforms, skip=None, monitor=None,
         fold: Optional[bool] = None) -> WrappedOptimizer:
    return WrappedOptimizer(optimizer, *transforms, skip=skip, monitor=monitor, fold=fold)
