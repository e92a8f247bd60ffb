"""Save and restore a training state with ``torch.distributed.checkpoint`` (DCP), on any mesh.

``save(path, model, optimizer, extra=None)`` / ``load(path, model, optimizer, extra=None)``:

* model and inner-optimizer state go through ``get_state_dict`` / ``set_state_dict``, keyed by
  parameter FQN, so FSDP2/DTensor shards are resharded on load (saved on 4 ranks, load on 2);
* a :class:`~dist_stab.wrap.WrappedOptimizer` adds its transforms', spike monitor's and skip
  counters' state: per-tensor fp32 scalars keyed by FQN and window buffers, replicated on
  every rank, so any world size can load them;
* ``extra``: a flat dict of further state (step counters, RNG states as tensors, ...).

All ranks must call both functions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .wrap import WrappedOptimizer


def _split(optimizer):
    if isinstance(optimizer, WrappedOptimizer):
        return optimizer.optimizer, optimizer
    return optimizer, None


def _dist_stab_state(wrapped: Optional[WrappedOptimizer]) -> dict:
    if wrapped is None:
        return {}
    sd = wrapped.state_dict()
    sd.pop("optimizer")
    return sd


def save(path: str, model: torch.nn.Module, optimizer, extra: Optional[dict] = None) -> None:
    inner, wrapped = _split(optimizer)
    model_sd, optim_sd = get_state_dict(model, inner)
    state = {"model": model_sd, "optim": optim_sd, "dist_stab": _dist_stab_state(wrapped), "extra": extra or {}}
    dcp.save(state, checkpoint_id=path)


def load(path: str, model: torch.nn.Module, optimizer, extra: Optional[dict] = None) -> dict:
    """Load in place; returns the loaded ``extra`` dict."""
    inner, wrapped = _split(optimizer)
    model_sd, optim_sd = get_state_dict(model, inner)
    state = {"model": model_sd, "optim": optim_sd, "dist_stab": _dist_stab_state(wrapped), "extra": extra or {}}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if wrapped is not None:
        ds = state["dist_stab"]
        for t, sd in zip(wrapped.transforms, ds["transforms"]):
            t.load_state_dict(sd)
        if wrapped.monitor is not None:
            wrapped.monitor.load_state_dict(ds["monitor"])
        if wrapped.skip is not None:
            wrapped.skip.load_state_dict(ds["skip"])
    return state["extra"]
