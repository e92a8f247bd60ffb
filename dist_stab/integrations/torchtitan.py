"""dist_stab in torchtitan (tested with torchtitan 0.3.0, torch 2.13).

Switch a ``Trainer.Config`` in a few lines::

    from dist_stab.integrations.torchtitan import use_dist_stab

    def llama3_debugmodel_scale():  # a config function of your --module, for torchtitan.train --config
        return use_dist_stab(llama3_debugmodel(), optimizer="SCALE",
                             optimizer_kwargs={"lr": 1e-3, "adam_lr": 1e-3}, transforms=["AdaGC"], skip={"grad_z": 6.0})

or build the container config yourself (``DistStabOptimizersContainer.Config``: torchtitan's
``OptimizersContainer.Config`` plus ``transforms``, ``skip``, ``monitor``) and set
``config.training.max_norm = float("inf")`` (and, for the loss, use
``dist_stab.integrations.torchtitan_trainer.DistStabTrainer.Config``).

What it does:

* ``SCALE``, ``StableSPAM``, ``SPAM`` and ``DistStabAdamW`` (dist_stab's AdamW) become optimizer names of the
  container, next to torchtitan's ``Adam`` / ``AdamW`` / ``DistMuon``, usable in every ``ParamGroupConfig``; they
  receive torchtitan's groups with ``param_names`` (SCALE finds the embedding and ``lm_head`` by name), constructor
  arguments such as SCALE's ``last_layer`` come from ``optimizer_factory_kwargs_by_name``; torchtitan's
  ``implementation`` (fused / foreach) is not passed to them (they pick their own kernels).
* With ``transforms`` / ``skip`` / ``monitor``, each optimizer of the container is ``dist_stab.wrap``-ped: the
  transforms run inside ``optimizers.step()``, on the gradients the backward left, covering that optimizer's
  parameters by name. ``use_dist_stab`` sets ``training.max_norm = inf`` so that torchtitan's own
  ``clip_grad_norm_`` (which it always calls) only measures the norm and multiplies by exactly 1.
* Checkpoints: torchtitan's ``CheckpointManager`` (DCP, its flattened FQN-keyed optimizer state) saves and loads
  the container as usual; dist_stab's state (opaque, identical on every rank, keyed by parameter name) is stored
  once per optimizer (under the first parameter of its first group) and loads on another world size.
* ``optimizers.observe_loss(loss)`` (once per micro-batch: the losses of one step are summed, as torchtitan's
  token-normalised micro-batch losses add up to the step's loss) gives the loss to the spike monitor and to
  loss-based ``SkipStep`` tests at the next ``step()``. ``use_dist_stab`` returns a ``DistStabTrainer`` config
  (:mod:`dist_stab.integrations.torchtitan_trainer`), whose ``forward_backward_step`` calls it.

Not supported: ``skip`` / ``monitor`` with more than one optimizer in the container (pipeline stages or several
optimizer names): each optimizer would decide on its own; with ``max_norm = inf``, a non-finite gradient norm
still makes torchtitan's ``clip_grads_with_norm_`` multiply every gradient by NaN (use ``skip={}``: such a step
is skipped).
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.components.optimizer.utils import get_flat_optim_state_dict, init_optim_state

import dist_stab as ds
from dist_stab import optim as dso
from dist_stab.wrap import WrappedOptimizer
from dist_stab.wrap_state import KEY

logger = logging.getLogger(__name__)

OPTIMIZERS: Dict[str, type] = {"SCALE": dso.SCALE, "StableSPAM": dso.StableSPAM, "SPAM": dso.SPAM,
                               "DistStabAdamW": dso.AdamW}
TRANSFORMS: Dict[str, type] = {"AdaGC": ds.AdaGC, "GradientStabilizer": ds.GradientStabilizer,
                               "ZClip": ds.ZClip, "GlobalClip": ds.GlobalClip}
_IMPL_KEYS = ("fused", "foreach")


@dataclass(kw_only=True, slots=True)
class TransformConfig:
    """One gradient transform: ``name`` in :data:`TRANSFORMS`, ``kwargs`` for its constructor (no parameters:
    it covers all of its optimizer's)."""
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)


def _transform(spec: Union[str, TransformConfig, dict]):
    if isinstance(spec, str):
        spec = TransformConfig(name=spec)
    elif isinstance(spec, dict):
        spec = TransformConfig(**spec)
    if spec.name not in TRANSFORMS:
        raise ValueError(f"dist_stab: unknown transform {spec.name!r}; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[spec.name](**spec.kwargs)


def _factory(cls: type) -> Callable[..., torch.optim.Optimizer]:
    def build(param_groups: List[dict], **kwargs) -> torch.optim.Optimizer:
        groups = [{k: v for k, v in g.items() if k not in _IMPL_KEYS} for g in param_groups]
        return cls(groups, **kwargs)
    build.__name__ = f"build_{cls.__name__}"
    return build


class DistStabOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` with dist_stab's optimizers registered and, when ``transforms``,
    ``skip`` or ``monitor`` are configured, every optimizer wrapped by :func:`dist_stab.wrap` (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        transforms: List[Any] = field(default_factory=list)
        """Gradient transforms, in order: names (``"AdaGC"``), ``TransformConfig`` or ``{"name", "kwargs"}``."""
        skip: Optional[Dict[str, Any]] = None
        """``SkipStep(**skip)`` (``{}``: skip non-finite steps only); None: no skip policy."""
        monitor: Optional[Dict[str, Any]] = None
        """``SpikeMonitor(**monitor)``; None: none (unless ``skip`` needs one)."""

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
        if name in OPTIMIZERS:
            return _factory(OPTIMIZERS[name])
        return OptimizersContainer._resolve_optimizer_factory(name)

    def __init__(self, config: "DistStabOptimizersContainer.Config", *, model_parts: List[torch.nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        wants = bool(config.transforms) or config.skip is not None or config.monitor is not None
        if not wants:
            return
        if (config.skip is not None or config.monitor is not None) and len(self.optimizers) > 1:
            raise ValueError(
                f"dist_stab: skip/monitor need one optimizer in the container, got {len(self.optimizers)} "
                "(model parts x optimizer names); each would decide on its own. Use transforms only, or one "
                "optimizer name and no pipeline parallelism.")
        wrapped = []
        for opt in self.optimizers:
            skip = ds.SkipStep(**config.skip) if config.skip is not None else None
            monitor = ds.SpikeMonitor(**config.monitor) if config.monitor is not None else None
            wrapped.append(ds.wrap(opt, *[_transform(t) for t in config.transforms], skip=skip, monitor=monitor))
        self.optimizers = wrapped

    # ------------------------------------------------------------------ the loss of the step
    def observe_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss for the next ``step()``: the wrapped optimizers add up a step's micro-batch losses
        (``reduce="sum"``: torchtitan's are already normalised by the step's global token count)."""
        for opt in self.optimizers:
            if isinstance(opt, WrappedOptimizer):
                opt.observe_loss(loss, reduce="sum")

    @property
    def last_stats(self) -> Dict[str, Any]:
        """The wrapped optimizers' ``last_stats`` (one optimizer: its dict; several: keyed ``"{i}/{name}"``)."""
        wrapped = [o for o in self.optimizers if isinstance(o, WrappedOptimizer)]
        if len(wrapped) == 1:
            return wrapped[0].last_stats
        return {f"{i}/{k}": v for i, o in enumerate(wrapped) for k, v in o.last_stats.items()}

    # ------------------------------------------------------------------ checkpoints (torchtitan's flat format)
    def state_dict(self) -> Dict[str, Any]:
        """torchtitan's flat FQN-keyed dict; dist_stab's state only under each optimizer's first parameter
        (torchtitan's flattening would repeat the group key for every parameter of the group)."""
        result: Dict[str, Any] = {}
        for opt in self.optimizers:
            init_optim_state(opt)
            flat = get_flat_optim_state_dict(opt)
            if isinstance(opt, WrappedOptimizer):
                keep = f"param_groups.{opt.param_groups[0]['param_names'][0]}.{KEY}"
                flat = {k: v for k, v in flat.items()
                        if k == keep or not (k.startswith("param_groups.") and k.endswith("." + KEY))}
            result.update(flat)
        return result


def use_dist_stab(config: Any, *, optimizer: Optional[str] = None, optimizer_kwargs: Optional[dict] = None,
                  factory_kwargs: Optional[dict] = None, param_groups: Optional[Sequence[ParamGroupConfig]] = None,
                  transforms: Sequence[Any] = (), skip: Optional[dict] = None,
                  monitor: Optional[dict] = None) -> Any:
    """Switch a torchtitan ``Trainer.Config`` (anything with ``.optimizer`` and ``.training``) to dist_stab, in
    place, and return the config to train with: for torchtitan's ``Trainer.Config``, a
    :class:`~dist_stab.integrations.torchtitan_trainer.DistStabTrainer` config with the same settings (its
    ``forward_backward_step`` hands each micro-batch's loss to the spike monitor and ``SkipStep``); otherwise
    ``config`` itself.

    ``optimizer``: one optimizer name for every parameter (``optimizer_kwargs`` its group kwargs, e.g. ``lr``);
    or ``param_groups``: your own ``ParamGroupConfig`` list; neither: the config's groups are kept (AdamW + a
    transform). ``factory_kwargs``: constructor arguments of ``optimizer`` (e.g. SCALE's ``last_layer``).
    With a transform, ``training.max_norm`` is set to ``inf`` (one clipping owner: torchtitan then only
    measures the norm)."""
    old = config.optimizer
    if param_groups is None:
        if optimizer is not None:
            if optimizer_kwargs is None or "lr" not in optimizer_kwargs:
                raise ValueError("use_dist_stab(optimizer=...) needs optimizer_kwargs with at least 'lr'")
            param_groups = [ParamGroupConfig(pattern=r".*", optimizer_name=optimizer,
                                             optimizer_kwargs=dict(optimizer_kwargs))]
        else:
            param_groups = list(old.param_groups)
    by_name = dict(getattr(old, "optimizer_factory_kwargs_by_name", {}) or {})
    if factory_kwargs:
        if optimizer is None:
            raise ValueError("factory_kwargs need optimizer=...")
        by_name[optimizer] = dict(factory_kwargs)
    config.optimizer = DistStabOptimizersContainer.Config(
        param_groups=list(param_groups), implementation=getattr(old, "implementation", "fused"),
        optimizer_factory_kwargs_by_name=by_name, transforms=list(transforms), skip=skip, monitor=monitor)
    if transforms and math.isfinite(float(config.training.max_norm)):
        logger.info("dist_stab: training.max_norm %s -> inf (the dist_stab transforms clip; torchtitan's "
                    "clip_grad_norm_ now only measures)", config.training.max_norm)
        config.training.max_norm = float("inf")
    trainer_module = sys.modules.get("torchtitan.trainer")  # a Trainer.Config was given: torchtitan's trainer is loaded
    if trainer_module is not None and isinstance(config, trainer_module.Trainer.Config):
        from .torchtitan_trainer import as_dist_stab_trainer
        return as_dist_stab_trainer(config)  # its forward_backward_step hands the loss to observe_loss
    return config
