"""Optimizers and gradient transforms by name.

Optimizers from ``dist_stab.optim`` are imported only when asked for, so the trainer runs
whether or not that subpackage (or one of its classes) exists yet.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """nanoGPT's rule: weights with >= 2 dims decay; norms (1-D) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lazy(module: str, cls: str) -> Callable:
    def get():
        try:
            mod = importlib.import_module(module)
            return getattr(mod, cls)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"optimizer class {module}.{cls} is not available ({exc})") from exc
    return get


# name -> (class getter, how to pass parameters: "groups" | "params" | "model")
OPTIMIZERS: Dict[str, tuple] = {
    "adamw": (lambda: torch.optim.AdamW, "groups"),
    # dist_stab's AdamW: same update, reads the last transform's factors (wrap folds them: no rescale pass)
    "ds_adamw": (_lazy("dist_stab.optim", "AdamW"), "groups"),
    "adam": (lambda: torch.optim.Adam, "params"),
    "sgd": (lambda: torch.optim.SGD, "params"),
    "stable_spam": (_lazy("dist_stab.optim", "StableSPAM"), "params"),
    "spam": (_lazy("dist_stab.optim", "SPAM"), "params"),
    "scale": (_lazy("dist_stab.optim", "SCALE"), "model"),
}


def build_optimizer(cfg, model: nn.Module, total_steps: Optional[int] = None) -> torch.optim.Optimizer:
    """``cfg`` is an OptimConfig; ``cfg.kwargs`` goes to the optimizer as is and wins over the rest.

    ``betas``, ``eps``, ``weight_decay`` and ``total_steps`` (the run's length, for schedules inside
    an optimizer such as Stable-SPAM's) are passed where the optimizer's signature takes them.
    dist_stab optimizers get ``model.named_parameters()`` (state keyed by FQN) or the model (SCALE).
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; known: {sorted(OPTIMIZERS)}")
    getter, how = OPTIMIZERS[cfg.name]
    cls = getter()
    accepts = inspect.signature(cls).parameters
    kw = {}
    if "betas" in accepts:
        kw["betas"] = tuple(cfg.betas)
    if "eps" in accepts:
        kw["eps"] = cfg.eps
    if "total_steps" in accepts and total_steps:
        kw["total_steps"] = total_steps
    if cfg.name in ("adamw", "adam") and torch.cuda.is_available():
        kw["fused"] = True
    if how != "groups" and "weight_decay" in accepts:
        kw["weight_decay"] = cfg.weight_decay
    kw.update(cfg.kwargs)
    if how == "groups":
        return cls(param_groups(model, cfg.weight_decay), lr=cfg.lr, **kw)
    if how == "model":
        return cls(model, lr=cfg.lr, **kw)
    if cfg.name.startswith(("spam", "stable_spam")):
        return cls([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=cfg.lr, **kw)
    return cls([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, **kw)


TRANSFORMS = ("none", "global_clip", "adagc", "gradient_stabilizer", "zclip")


def build_transforms(cfg, model: nn.Module, persistent_grads: bool = False) -> list:
    """``cfg`` is a TransformConfig; returns a list (empty for ``none``) of dist_stab transforms.

    Transforms receive ``model.named_parameters()`` so their state is keyed by FQN; ``persistent_grads``
    goes to each (the trainer's ``train.keep_grads``).
    """
    import dist_stab

    classes = {"global_clip": dist_stab.GlobalClip, "adagc": dist_stab.AdaGC,
               "gradient_stabilizer": dist_stab.GradientStabilizer, "zclip": dist_stab.ZClip}
    if cfg.name == "none":
        return []
    if cfg.name not in classes:
        raise ValueError(f"unknown transform {cfg.name!r}; known: {TRANSFORMS}")
    kw = {"persistent_grads": True} if persistent_grads else {}
    return [classes[cfg.name](list(model.named_parameters()), **kw, **cfg.kwargs)]
