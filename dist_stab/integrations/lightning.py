"""dist_stab in PyTorch Lightning (tested with lightning 2.6.6).

Recipe: build the wrapper in ``configure_optimizers`` and the scheduler *on the wrapper* (one built on the inner
optimizer is refused by Lightning: "Some schedulers are attached with an optimizer that wasn't returned")::

    def configure_optimizers(self):
        opt = ds.wrap(torch.optim.AdamW(self.named_parameters(), lr=1e-3), ds.AdaGC(), monitor=ds.SpikeMonitor())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer = L.Trainer(callbacks=[DistStabCallback()], gradient_clip_val=None)   # dist_stab clips

Automatic optimisation calls ``optimizer.step(closure=...)``: the wrapper runs the closure (forward/backward) and
takes the loss it returns, so the spike monitor and loss-based ``SkipStep`` see it without ``observe_loss``.
:class:`DistStabCallback` refuses ``gradient_clip_val`` next to a dist_stab transform (one clipping owner) and logs
``last_stats`` (per-transform global norm and clipped-tensor count, spike flags, skips) every
``log_every_n_steps``. Checkpoints: ``ModelCheckpoint`` / ``trainer.save_checkpoint`` store the wrapper's
``state_dict`` (dist_stab's state included); ``fit(ckpt_path=...)`` restores it.
Not supported here: manual optimisation (call ``opt.observe_loss(loss)`` before ``opt.step()`` yourself).
"""
from __future__ import annotations

from typing import Optional

import lightning as L

from dist_stab.wrap import WrappedOptimizer

from ._stats import stats_for_logging


def _wrapper(optimizer) -> Optional[WrappedOptimizer]:
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, WrappedOptimizer):
            break
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return optimizer if isinstance(optimizer, WrappedOptimizer) else None


class DistStabCallback(L.Callback):
    """One clipping owner and ``last_stats`` in Lightning's logs (module docstring)."""

    def on_fit_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            w = _wrapper(opt)
            if w is not None and w.transforms and trainer.gradient_clip_val:
                names = [type(t).__name__ for t in w.transforms]
                raise ValueError(
                    f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips globally before the optimizer "
                    f"step, so {names} would see clipped gradients: set gradient_clip_val=None (dist_stab clips).")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.global_step % max(1, trainer.log_every_n_steps)) != 0:
            return
        for i, opt in enumerate(trainer.optimizers):
            w = _wrapper(opt)
            if w is not None and w.last_stats:
                prefix = "" if len(trainer.optimizers) == 1 else f"{i}/"
                pl_module.log_dict({prefix + k: v for k, v in stats_for_logging(w).items()}, on_step=True,
                                   on_epoch=False)
