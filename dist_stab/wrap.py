"""``dist_stab.wrap(optimizer, *transforms, skip=None, monitor=None)``: run gradient transforms,
spike statistics and the skip-step policy inside ``optimizer.step()``.

The result is a ``torch.optim.Optimizer`` (LR schedulers accept it) that shares the inner
optimizer's ``param_groups`` and ``state``; its ``state_dict`` holds the inner optimizer's,
every transform's, the monitor's and the skip counters' state, so one checkpoint restores all.

Late binding. The transforms follow the inner optimizer's *current* parameters: whenever the
``param_groups`` hold other parameter objects than at the last step (``fully_shard`` followed by
Accelerate's or the HF Trainer's swap of the sharded parameters into ``param_groups``,
``add_param_group``, a parameter unfrozen later) every transform is rebound, by name, and its
per-tensor state follows the names. Names come from, in order: the parameter objects a transform
was built with (and the module it was built from, re-read), torch's ``param_names`` in the
groups, the name that the previous object at the same place in ``param_groups`` had (a swap), and
else ``param_groups.{i}.{j}``. A transform built with parameters covers the optimizer's parameters
of those names (built from a module: of the module's parameters as they are at the rebind, so a
head attached later is covered); one built with none (``AdaGC()``, or a generator the optimizer already consumed)
covers all of them. ``wrap()`` refuses a transform holding trainable parameters the optimizer does
not update, naming them. Checking for a change costs two C-level passes over the parameter list.

``step(closure=None, loss=None)``: pass this step's (local) loss for the spike monitor and the
loss-based skip tests; it is reduced over the data-parallel group as a (value, present) pair with
one 2-element all-reduce, on every rank, so a loss passed on some ranks only is averaged over
those. Statistics land in ``last_stats`` as device tensors (read them at log time).

Folding (``fold=None``: whenever possible): when the inner optimizer reads gradients through
per-tensor factors (``supports_grad_factors``, e.g. :class:`dist_stab.optim.AdamW`), the last
transform does not rescale the gradients; its factors go to ``optimizer.step(grad_factors=...)``
instead, which saves a read and a write of every gradient it scales (GradientStabilizer scales
all of them). The update is the same; ``.grad`` then holds the gradients as the last transform
saw them. Possible when every parameter of the last transform is a plain or DTensor parameter
of the optimizer. ``fold=True`` raises where it is not possible, ``fold=False`` never folds. The
transform itself is not changed: used alone afterwards, it scales gradients as usual.
"""
from __future__ import annotations

import operator
import warnings
import weakref
from collections import OrderedDict
from itertools import chain
from typing import Dict, List, Optional, Tuple

import torch

from . import wrap_state
from .spikes import reduce_loss_pair

_PARAMS = operator.itemgetter("params")


class _Names:
    """id(param) -> name for live parameter objects (weakly held: a dead object's id may be reused)."""

    def __init__(self):
        self._by_id: Dict[int, Tuple[weakref.ref, str]] = {}

    def add(self, p: torch.Tensor, name: str) -> None:
        self._by_id[id(p)] = (weakref.ref(p), name)

    def get(self, p: torch.Tensor) -> Optional[str]:
        hit = self._by_id.get(id(p))
        return hit[1] if hit is not None and hit[0]() is p else None

    def prune(self) -> None:
        self._by_id = {k: v for k, v in self._by_id.items() if v[0]() is not None}


class PreClipDetector:
    """Warns once when the gradients reaching the transforms were evidently clipped already: the global norm
    equals the previous step's (relative 1e-5) while the per-tensor norms moved, on ``repeats`` consecutive
    steps, which a real gradient norm never does, while one that a framework clipped to its threshold
    (HF Trainer's ``max_grad_norm=1.0``,
    Lightning's ``gradient_clip_val``, torchtitan's ``clip_grad_norm_``) does on every step it clips.

    Device side: a counter updated with ``torch.where``. Its value reaches the host without a sync: on CPU it is
    read directly, on CUDA copied to pinned memory and read at the next step once the copy has landed."""

    def __init__(self, repeats: int = 3, rtol: float = 1e-5):
        self.repeats, self.rtol = repeats, rtol
        self.prev = self.prev_norms = None
        self.run = None
        self.warned = False
        self._pending = None

    def update(self, norm: torch.Tensor, norms: torch.Tensor, who: str) -> None:
        if self.warned:
            return
        self._check(who)
        norm = norm.detach().float().reshape(())
        norms = norms.detach().float()
        if self.prev is None or self.prev.device != norm.device or self.prev_norms.shape != norms.shape:
            self.prev, self.prev_norms = norm.clone(), norms.clone()
            self.run = torch.zeros((), dtype=torch.int64, device=norm.device)
            return
        # the same global norm while the gradients changed (some per-tensor norm moved by > 1e-3 of the total):
        # stepping twice on the same gradients, lr 0, or a constant gradient is not a clip
        moved = (norms - self.prev_norms).abs().max() > 1e-3 * norm if norms.numel() else torch.zeros_like(norm > 0)
        same = (norm > 0) & torch.isfinite(norm) & ((norm - self.prev).abs() <= self.rtol * norm) & moved
        self.run = torch.where(same, self.run + 1, torch.zeros_like(self.run))
        self.prev.copy_(norm)
        self.prev_norms.copy_(norms)
        if norm.device.type == "cpu":
            self._warn_if(int(self.run), float(norm), who)  # host-sync-ok: a CPU tensor
            return
        host = torch.empty(2, dtype=torch.float64, pin_memory=True)
        host.copy_(torch.stack([self.run.double(), norm.double()]), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)

    def _check(self, who: str) -> None:
        if self._pending is not None and self._pending[1].query():
            host, _ = self._pending
            self._pending = None
            self._warn_if(int(host[0]), float(host[1]), who)

    def _warn_if(self, run: int, norm: float, who: str) -> None:
        if run + 1 >= self.repeats and not self.warned:
            self.warned = True
            warnings.warn(
                f"dist_stab: the gradients reaching {who} have had the same global norm ({norm:.4g}) on {run + 1} "
                "consecutive steps: something clipped them before the optimizer step (HF Trainer's max_grad_norm, "
                "Lightning's gradient_clip_val, torchtitan's max_norm, DeepSpeed's gradient_clipping). Turn that off "
                "so that the transforms see the raw gradients and one clipping owner remains.", RuntimeWarning,
                stacklevel=4)


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
        self._probe = None
        if (skip is not None or self.monitor is not None) and not self.transforms:
            from .transforms import GradNorm
            self._probe = GradNorm()  # binds to every parameter of the optimizer
        self._preclip = PreClipDetector()
        self._observed_loss = None
        self._fold_request = fold
        self._fold_index: Optional[List[int]] = None  # optimizer param -> factor position (last: 1.0)
        self._fold_perm: Optional[torch.Tensor] = None
        self._names = _Names()  # any transform's name for an object: for objects a transform does not know
        self._known: Dict[int, _Names] = {}  # per transform (by position): its own names for objects
        self._pos_names: Dict[int, Dict[Tuple[int, int], str]] = {}  # per transform: names by place in the groups
        self._bound_flat: Optional[list] = None
        for i, t in enumerate(self._all_transforms()):
            t.wrapped = True
            if getattr(t, "late_bindable", False):
                known = self._known.setdefault(i, _Names())
                for s in t.shards:
                    known.add(s.param, s.fqn)
                    if self._names.get(s.param) is None:
                        self._names.add(s.param, s.fqn)
        self._sync_binding()
        self._install_placeholder()

    def _install_placeholder(self) -> None:
        """DCP's flattened load restores only group keys the live optimizer has (see :mod:`.wrap_state`)."""
        groups = self.optimizer.param_groups
        if groups and wrap_state.KEY not in groups[0]:
            groups[0][wrap_state.KEY] = b""

    def _all_transforms(self) -> list:
        return self.transforms + ([self._probe] if self._probe is not None else [])

    # ------------------------------------------------------------------ binding
    def _sync_binding(self) -> None:
        """Rebind the transforms if ``param_groups`` holds other parameter objects than last time."""
        flat = list(chain.from_iterable(map(_PARAMS, self.optimizer.param_groups)))
        bound = self._bound_flat
        if bound is not None and len(flat) == len(bound) and all(map(operator.is_, flat, bound)):
            return
        self._rebind(flat)

    def _resolve_names(self, i: int, t) -> List[Tuple[str, torch.Tensor]]:
        """(name, param) in transform ``t``'s naming for every distinct parameter of the groups (module docstring).

        Names the transform knows for the object come first, then torch's ``param_names``; the name the previous
        object at the same place had (a swap) only where no other parameter claims it; else the place itself."""
        known = self._known.setdefault(i, _Names())
        module = getattr(t, "_module", None)
        if module is not None:
            for n, p in module.named_parameters(remove_duplicate=False):
                if known.get(p) is None:
                    known.add(p, n)
        pos = self._pos_names.get(i, {})
        seen_ids, slots = set(), []
        for gi, g in enumerate(self.optimizer.param_groups):
            given = g.get("param_names")
            for j, p in enumerate(g["params"]):
                if id(p) in seen_ids:
                    continue  # a parameter listed twice (torch allows it) is transformed once
                seen_ids.add(id(p))
                name = known.get(p) or self._names.get(p)
                if name is None and given is not None and j < len(given):
                    name = given[j]
                slots.append([gi, j, p, name])
        claimed = {sl[3] for sl in slots if sl[3] is not None}
        for sl in slots:
            if sl[3] is None:
                carried = pos.get((sl[0], sl[1]))
                sl[3] = carried if carried is not None and carried not in claimed else f"param_groups.{sl[0]}.{sl[1]}"
                claimed.add(sl[3])
        return [(name, p) for _, _, p, name in slots]

    def _rebind(self, flat: list) -> None:
        for i, t in enumerate(self._all_transforms()):
            if not getattr(t, "late_bindable", False):
                self._check_fixed(t, flat)
                continue
            slots = self._resolve_names(i, t)
            pairs = [(n, p) for n, p in slots]
            seen, dup = set(), set()
            for n, _ in pairs:
                (dup if n in seen else seen).add(n)
            if dup:
                raise ValueError(f"wrap(): parameters of the optimizer share the names {sorted(dup)[:5]} for "
                                 f"{type(t).__name__}; names key the transforms' state")
            scope, trainable = t.scope, getattr(t, "scope_trainable", t.scope)
            module = getattr(t, "_module", None)
            if module is not None:  # built from a module: its parameters as they are now (a head added later too)
                mod = list(module.named_parameters())
                scope = frozenset(n for n, _ in mod)
                trainable = frozenset(n for n, p in mod if p.requires_grad)
            if scope is not None:
                lost = sorted(trainable - seen)
                if lost:
                    raise ValueError(
                        f"wrap(): {type(t).__name__} holds {len(lost)} trainable parameter(s) the optimizer does not "
                        f"update: {lost[:5]}{'...' if len(lost) > 5 else ''}. Build the transform from the "
                        "optimizer's parameters (or give it none: it then takes all of the optimizer's).")
            mine = pairs if scope is None else [(n, p) for n, p in pairs if n in scope]
            t._bind(_describe(mine))
            known = self._known[i]
            for n, p in pairs:
                known.add(p, n)
                if self._names.get(p) is None:
                    self._names.add(p, n)
            known.prune()
            where = {id(p): n for n, p in pairs}
            self._pos_names[i] = {(gi, j): where[id(p)] for gi, g in enumerate(self.optimizer.param_groups)
                                  for j, p in enumerate(g["params"])}
        self._names.prune()
        self._bound_flat = flat
        self._setup_fold(flat)

    @staticmethod
    def _check_fixed(t, flat: list) -> None:
        ids = {id(p) for p in flat}
        stray = [s.fqn for s in t.shards if id(s.param) not in ids]
        if stray:
            raise ValueError(f"wrap(): {type(t).__name__} holds parameters the optimizer does not update: {stray[:5]}")

    def _setup_fold(self, flat: list) -> None:
        self._fold_index, self._fold_perm = None, None
        fold = self._fold_request
        if fold is False or not self.transforms:
            return
        last = self.transforms[-1]
        reason = None
        if not getattr(self.optimizer, "supports_grad_factors", False):
            reason = f"{type(self.optimizer).__name__} does not take grad_factors"
        elif not getattr(type(last), "apply_factors", False):
            reason = f"{type(last).__name__} does not scale gradients"
        elif not all(getattr(s, "kind", None) in ("plain", "dtensor") for s in last.shards):
            reason = f"{type(last).__name__} holds parameters other than plain or DTensor ones"
        if reason is not None:
            if fold:
                raise ValueError(f"wrap(fold=True): cannot fold {type(last).__name__} into the optimizer: {reason}")
            return
        pos = {id(s.param): i for i, s in enumerate(last.shards)}
        self._fold_index = [pos.get(id(p), len(last.shards)) for p in flat]

    @property
    def folded(self) -> bool:
        """Whether the last transform's factors go to the optimizer instead of into the gradients."""
        return self._fold_index is not None

    def _step_kwargs(self, stats: list) -> dict:
        if self._fold_index is None:
            return {}
        f = stats[len(self.transforms) - 1]["factors"].float()
        if self._fold_perm is None or self._fold_perm.device != f.device:
            from .kernels import _int64_on
            self._fold_perm = _int64_on(self._fold_index, f.device)
        return {"grad_factors": torch.cat([f, f.new_ones(1)]).index_select(0, self._fold_perm)}

    # ------------------------------------------------------------------ torch.optim.Optimizer surface
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

    def observe_loss(self, loss, reduce: str = "mean") -> None:
        """Give the loss to the next ``step()``, for frameworks that call ``step()`` with no arguments (HF Trainer,
        Accelerate, Lightning): call it after each ``backward()``. With gradient accumulation, call it once per
        micro-batch; the step sees the losses observed since the previous step combined by ``reduce``:

        * ``"mean"`` (default): their mean, for un-scaled micro-batch losses (Accelerate's ``loss`` before
          ``accelerator.backward`` divides it, a plain loop's ``loss`` before ``/ accum``);
        * ``"sum"``: their sum, for losses already divided by the accumulation count (what the HF Trainer's
          ``training_step`` and torchtitan's ``forward_backward_step`` return).

        A loss passed to ``step`` itself wins (the observed ones are then dropped). ``observe_loss(None)`` drops the
        losses observed so far (for a step the framework did not take, e.g. a ``GradScaler`` overflow, whose losses
        would otherwise join the next step's). Device-side: no sync."""
        if reduce not in ("mean", "sum"):
            raise ValueError(f"observe_loss: reduce must be 'mean' or 'sum', got {reduce!r}")
        if loss is None:
            self._observed_loss = None
            return
        loss = torch.as_tensor(loss).detach().float()
        prev = self._observed_loss
        if prev is None:
            self._observed_loss = (loss, 1, reduce)
            return
        if prev[2] != reduce:
            raise ValueError(f"observe_loss: reduce={reduce!r} after reduce={prev[2]!r} in the same step")
        self._observed_loss = (prev[0] + loss, prev[1] + 1, reduce)

    def _take_observed_loss(self):
        obs, self._observed_loss = getattr(self, "_observed_loss", None), None
        if obs is None:
            return None
        total, n, reduce = obs
        return total / n if (reduce == "mean" and n > 1) else total

    def step(self, closure=None, loss=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        observed = self._take_observed_loss()
        if loss is None:
            loss = observed
        self._sync_binding()
        snaps = [t.snapshot() for t in self.transforms] if self.skip is not None else None
        stats = []
        last = len(self.transforms) - 1
        for i, t in enumerate(self.transforms):
            st = t.step(apply=False) if (i == last and self._fold_index is not None) else t.step()
            stats.append(st)
            self.last_stats[getattr(t, "tag", type(t).__name__)] = st
        if self._probe is not None:
            stats.append(self._probe.step())
            self.last_stats["GradNorm"] = stats[-1]
        kw = self._step_kwargs(stats)
        if self.transforms:
            self._preclip.update(stats[0]["global_norm"], stats[0]["norms"], type(self.transforms[0]).__name__)
        if self.skip is None and self.monitor is None:
            self._inner_step(**kw)
            return loss
        first = stats[0]  # the first transform sees the raw gradients: its norm is the pre-clip one
        nonfinite = sum(st["num_nonfinite"] for st in stats) > 0
        grad_present = (first["num_active"] > 0) & (first["global_norm"] > 0)  # a zero norm stays out of the window
        if self.monitor is not None:
            obs = self.monitor.observe(loss, first["global_norm"], grad_present=grad_present)
        else:  # SkipStep alone: the loss is still reduced, for its non-finite test
            value, present = reduce_loss_pair(loss, None, first["global_norm"].device)
            obs = {"loss": value, "loss_present": present, "loss_nonfinite": present & ~torch.isfinite(value)}
        applied = None
        if self.skip is not None:
            skip = self.skip.decide(nonfinite, obs)
            for t, snap in zip(self.transforms, snaps):
                t.restore_where(snap, skip)
            self.skip.step_optimizer(self.optimizer, skip, step_fn=self._inner_step, **kw)
            self.skip.record(skip, obs.get("skip_reason"))
            obs["skip"] = skip
            obs["skipped"] = self.skip.skipped
            applied = ~skip
        else:
            self._inner_step(**kw)
        if self.monitor is not None:
            obs.update(self.monitor.commit(applied))
        self.last_stats["spikes"] = obs
        return loss

    def _inner_step(self, **kw):
        """The inner optimizer's step with its own hooks but not the global ones: those fired for this step
        already (the wrapper is an optimizer too), and must fire once."""
        import torch.optim.optimizer as topt
        saved = topt._global_optimizer_pre_hooks, topt._global_optimizer_post_hooks
        topt._global_optimizer_pre_hooks, topt._global_optimizer_post_hooks = OrderedDict(), OrderedDict()
        try:
            return self.optimizer.step(**kw)
        finally:
            topt._global_optimizer_pre_hooks, topt._global_optimizer_post_hooks = saved

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)  # the transforms rebind at the next step

    # ------------------------------------------------------------------ state dict (torch's format, see wrap_state)
    def state_dict(self) -> dict:
        """The inner optimizer's state dict (torch's ``{"state", "param_groups"}``); dist_stab's state is the
        opaque ``param_groups[0]["dist_stab"]`` (:mod:`dist_stab.wrap_state`). State-dict hooks run as torch's."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync_binding()
        sd = self.optimizer.state_dict()
        groups = [dict(g) for g in sd["param_groups"]]
        if groups:
            groups[0][wrap_state.KEY] = wrap_state.encode(wrap_state.payload_of(self))
        sd = {**sd, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of :meth:`state_dict` (or of the earlier ``{"optimizer", "transforms", ...}`` format,
        or a plain optimizer's). Everything is checked before anything changes; resume rule: :mod:`.wrap_state`."""
        sd = state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, sd)
            if out is not None:
                sd = out
        inner_sd, payload = wrap_state.split(sd)
        self._sync_binding()
        todo, notes = wrap_state.plan_load(self, payload)
        self.optimizer.load_state_dict(inner_sd)
        for component, saved, kw in todo:
            component.load_state_dict(saved, **kw)
        self._install_placeholder()
        wrap_state.warn_notes(notes)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ copies (deepcopy, pickle, torch.save)
    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        for k in ("_names", "_known"):  # weak references; rebuilt from the positions at the next step
            d[k] = None
        d["_bound_flat"] = None
        d["_fold_perm"] = None
        d["_preclip"] = PreClipDetector()
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._names = _Names()
        self._known = {}
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n  ".join(line for line in repr(self.optimizer).splitlines()
                             if not line.strip().startswith(wrap_state.KEY + ":"))
        return f"WrappedOptimizer(\n  {inner},\n  transforms={[type(t).__name__ for t in self.transforms]})"


def _describe(pairs):
    from .backends import describe
    return describe(pairs, include_frozen=True)


def wrap(optimizer: torch.optim.Optimizer, *transforms, skip=None, monitor=None,
         fold: Optional[bool] = None) -> WrappedOptimizer:
    return WrappedOptimizer(optimizer, *transforms, skip=skip, monitor=monitor, fold=fold)
