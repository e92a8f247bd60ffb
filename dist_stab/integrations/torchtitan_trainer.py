"""torchtitan's ``Trainer`` handing each micro-batch's loss to the dist_stab optimizer container (tested with
torchtitan 0.3.0 on CPU at the level of ``forward_backward_step``; the full Trainer needs a GPU).

torchtitan's trainer calls ``optimizers.step()`` with no arguments, so the spike monitor and loss-based
``SkipStep`` would see gradient norms only. :class:`DistStabTrainer` overrides ``forward_backward_step``: the loss it
returns (the micro-batch's token sum over the step's global token count, so the micro-batches of a step add up to
the step's loss) goes to ``optimizers.observe_loss``, times the size of torchtitan's loss mesh (data parallel x
context parallel): the wrapper averages the ranks' losses, torchtitan's add up. With pipeline parallelism only the
last stage has the loss; the other stages observe nothing, and the wrapper's (value, present) reduction averages
over the ranks that do.
:func:`dist_stab.integrations.torchtitan.use_dist_stab` returns a ``DistStabTrainer.Config`` when given torchtitan's
``Trainer.Config``, so ``torchtitan.train`` builds this trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchtitan.trainer import Trainer


class DistStabTrainer(Trainer):
    """torchtitan's Trainer; each micro-batch's loss reaches ``optimizers.observe_loss`` (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def forward_backward_step(self, **kwargs):
        loss = super().forward_backward_step(**kwargs)
        observe = getattr(self.optimizers, "observe_loss", None)
        dims = self.parallel_dims
        if observe is not None and (not dims.pp_enabled or getattr(self, "pp_has_last_stage", False)):
            # each rank's loss is its share of the step's loss (its token sum over the global token count): the
            # step's loss is their sum over the loss mesh (dp x cp); the wrapper averages over the ranks, so scale
            observe(loss.detach() * (dims.dp_replicate * dims.dp_shard * dims.cp))
        return loss


def as_dist_stab_trainer(config: Trainer.Config) -> "DistStabTrainer.Config":
    """The same settings (the same objects) as a ``DistStabTrainer.Config``."""
    if isinstance(config, DistStabTrainer.Config):
        return config
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    out = DistStabTrainer.Config(**values)
    for f in dataclasses.fields(config):
        if not f.init:
            object.__setattr__(out, f.name, getattr(config, f.name))
    return out
