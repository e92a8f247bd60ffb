"""dist_stab in the Hugging Face Trainer and Accelerate (tested with transformers 5.25.0, accelerate 1.16.0).

Trainer::

    from dist_stab.integrations.hf import DistStabTrainer
    trainer = DistStabTrainer(model=model, args=args, train_dataset=ds_train,
                              optimizer_cls_and_kwargs=(SCALE, {"lr": 2e-2}),     # or args.optim (AdamW)
                              transforms=[ds.AdaGC()], skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
    trainer.train()

* ``create_optimizer`` builds the optimizer as the Trainer does (its class and kwargs, its weight-decay
  groups) but with ``param_names`` in the groups (SCALE finds the embedding and the lm_head by name, the
  transforms key their state by name), then wraps it with ``dist_stab.wrap``. Built before Accelerate shards
  the model: the wrapper follows the parameters Accelerate swaps into the optimizer (late binding by name).
  ``optimizers=(ds.wrap(...), scheduler)`` works too (not with FSDP, where the Trainer refuses it).
* ``training_step`` hands each micro-batch's loss to ``observe_loss(loss, reduce="sum")`` (the Trainer's
  micro-batch losses are already divided by the accumulation count, so they add up to the step's loss): the
  Trainer calls ``optimizer.step()`` with no arguments. Losses left by a step the optimizer did not take (fp16
  ``GradScaler`` overflow) are dropped at the next step's first micro-batch.
* :class:`DistStabCallback` (added by ``DistStabTrainer``; usable alone with a plain Trainer and a wrapped
  optimizer) keeps one clipping owner: with a dist_stab transform active and ``args.max_grad_norm > 0`` (the
  Trainer's default is 1.0) it sets ``max_grad_norm`` to 0 with a warning (``refuse_clipping=True``: raises),
  and it adds ``last_stats`` to every log: per transform the global norm and the number of clipped tensors,
  the spike z-scores and flags, the skip count.

Accelerate: ``accelerator.prepare(model, ds.wrap(opt, ...))`` works as is (FSDP2 too: the parameter swap is
followed by the transforms and by dist_stab's optimizers, SCALE's embedding / lm_head / ``Conv1D`` facts
included); ``observe_loss(loss)`` after each ``accelerator.backward(loss)`` (the step sees the mean of its
micro-batches' losses); with ``accelerator.accumulate(model)`` the wrapper's ``step()`` runs only on sync steps, on
the accumulated gradients. Do not call
``accelerator.clip_grad_norm_`` next to a transform (and keep DeepSpeed's ``gradient_clipping`` at 0).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from transformers import Trainer, TrainerCallback

import dist_stab as ds
from dist_stab.wrap import WrappedOptimizer

from ._stats import stats_for_logging  # noqa: F401 (re-exported)


def find_wrapper(optimizer) -> Optional[WrappedOptimizer]:
    """The dist_stab wrapper inside Accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, WrappedOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, WrappedOptimizer) else None


class DistStabCallback(TrainerCallback):
    """One clipping owner and ``last_stats`` in the logs (module docstring)."""

    def __init__(self, refuse_clipping: bool = False):
        self.refuse_clipping = refuse_clipping

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        wrapper = find_wrapper(optimizer)
        if wrapper is None or not wrapper.transforms or not (args.max_grad_norm and args.max_grad_norm > 0):
            return
        names = [type(t).__name__ for t in wrapper.transforms]
        msg = (f"TrainingArguments.max_grad_norm={args.max_grad_norm} clips globally before the optimizer step, so "
               f"{names} would see clipped gradients")
        if self.refuse_clipping:
            raise ValueError(msg + ": set max_grad_norm=0 (dist_stab clips).")
        warnings.warn(msg + ": dist_stab sets max_grad_norm=0 (one clipping owner).", UserWarning, stacklevel=2)
        args.max_grad_norm = 0.0

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        wrapper = find_wrapper(optimizer)
        if wrapper is None or logs is None or not wrapper.last_stats or "loss" not in logs:
            return  # training log lines only (not the end-of-training summary)
        extra = stats_for_logging(wrapper)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


class DistStabTrainer(Trainer):
    """``transformers.Trainer`` with a dist_stab-wrapped optimizer (module docstring). Extra arguments:
    ``transforms`` (gradient transforms, e.g. ``[ds.AdaGC()]``: built without parameters they cover all of the
    optimizer's, by name), ``skip``, ``monitor``, ``refuse_clipping``."""

    def __init__(self, *args, transforms: Sequence[Any] = (), skip=None, monitor=None,
                 refuse_clipping: bool = False, **kwargs):
        self._ds_transforms, self._ds_skip, self._ds_monitor = list(transforms), skip, monitor
        self._ds_observed_at: Optional[int] = None  # the global step whose micro-batch losses are being observed
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks.append(DistStabCallback(refuse_clipping=refuse_clipping))
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = []
        for members, wd in (([x for x in named if x[0] in decay], self.args.weight_decay),
                            ([x for x in named if x[0] not in decay], 0.0)):
            if members:
                groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                               "weight_decay": wd})
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        if {"params", "model", "optimizer_dict"} & set(kwargs):
            raise ValueError(f"DistStabTrainer: the optimizer {cls.__name__} builds its own parameter groups; "
                             "pass optimizers=(ds.wrap(...), scheduler) instead")
        from ..optim import SCALE
        if isinstance(cls, type) and issubclass(cls, SCALE):
            kwargs.setdefault("module", opt_model)  # SCALE finds Conv1D (transposed) weights, embeddings, lm_head
        inner = cls(groups, **kwargs)
        if self._ds_transforms or self._ds_skip is not None or self._ds_monitor is not None:
            self.optimizer = ds.wrap(inner, *self._ds_transforms, skip=self._ds_skip, monitor=self._ds_monitor)
        else:
            self.optimizer = inner
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        wrapper = find_wrapper(self.optimizer)
        if wrapper is not None:
            if self._ds_observed_at != self.state.global_step:  # the first micro-batch of an optimizer step: drop
                wrapper.observe_loss(None)  # what a step the optimizer did not take left (fp16 GradScaler overflow)
                self._ds_observed_at = self.state.global_step
            # the micro-batch losses are already divided by the accumulation: they add up to the step's loss
            wrapper.observe_loss(loss.detach(), reduce="sum")
        return loss
