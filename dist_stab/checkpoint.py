"""Save and restore a training state with ``torch.distributed.checkpoint`` (DCP), on any mesh.

``save(path, model, optimizer, extra=None)`` / ``load(path, model, optimizer, extra=None)``:

* model and inner-optimizer state go through ``get_state_dict`` / ``set_state_dict``, keyed by
  parameter FQN, so FSDP2/DTensor shards are resharded on load (saved on 4 ranks, load on 2);
* a :class:`~dist_stab.wrap.WrappedOptimizer` adds its transforms', spike monitor's and skip
  counters' state: per-tensor fp32 scalars keyed by FQN and window buffers, replicated on
  every rank, so any world size can load them;
* ``extra``: a flat dict of further state (step counters, RNG states as tensors, ...).

Parameters that never had a gradient (an MoE expert not yet routed): dist_stab's optimizers put the
state their first step would create (zeros) into every state dict, so checkpoints always hold every
parameter's keys and ``torch.distributed.checkpoint``'s own ``get/set_optimizer_state_dict`` work as
well. ``load`` also reads checkpoints written without those entries (by torch's optimizers, or by
dist_stab before this rule): such a parameter's state is left empty, as if it had never been stepped.
A checkpoint whose optimizer state has other keys than this optimizer's (saved with another optimizer)
raises a ``ValueError`` naming the parameter and both key sets.

All ranks must call both functions.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

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


def _saved_keys(path) -> Optional[set]:
    """Keys of a file-system checkpoint (None when ``path`` is not one whose metadata can be read)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception:  # noqa: BLE001 - not a file-system checkpoint: dcp.load reports what is wrong
        return None


def _flat_keys(prefix: str, value) -> set:
    if isinstance(value, dict):
        return set().union(*[_flat_keys(f"{prefix}.{k}", v) for k, v in value.items()]) if value else set()
    return {prefix}


def _split_unsaved_state(path, optim_sd: dict, inner) -> Dict[str, dict]:
    """Take out of ``optim_sd["state"]`` the parameters of which the checkpoint holds no optimizer state (never
    stepped when it was saved); raise if it holds a different set of keys for one."""
    saved = _saved_keys(path)
    if saved is None or not isinstance(optim_sd, dict) or "state" not in optim_sd:
        return {}
    unsaved = {}
    for fqn, entry in list(optim_sd["state"].items()):
        need = _flat_keys(f"optim.state.{fqn}", entry)
        if not need or need <= saved:
            continue
        have = {k for k in saved if k.startswith(f"optim.state.{fqn}.")}
        if not have:
            unsaved[fqn] = optim_sd["state"].pop(fqn)
            continue
        cut = len(f"optim.state.{fqn}.")
        raise ValueError(f"checkpoint {path}: the optimizer state of {fqn!r} has {sorted(k[cut:] for k in have)}, "
                         f"{type(inner).__name__} needs {sorted(k[cut:] for k in need)} (saved with another "
                         "optimizer?)")
    return unsaved


def _params_by_fqn(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError:  # pragma: no cover - older torch
        _get_fqns = None
    out = {}
    for name, p in model.named_parameters():
        for fqn in (_get_fqns(model, name) if _get_fqns is not None else {name}):
            out[fqn] = p
    return out


def load(path: str, model: torch.nn.Module, optimizer, extra: Optional[dict] = None) -> dict:
    """Load in place; returns the loaded ``extra`` dict."""
    inner, wrapped = _split(optimizer)
    model_sd, optim_sd = get_state_dict(model, inner)
    unsaved = _split_unsaved_state(path, optim_sd, inner)
    state = {"model": model_sd, "optim": optim_sd, "dist_stab": _dist_stab_state(wrapped), "extra": extra or {}}
    dcp.load(state, checkpoint_id=path)
    state["optim"]["state"].update(unsaved)  # placeholders for set_state_dict; emptied below
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if unsaved:
        by_fqn = _params_by_fqn(model)
        for fqn in unsaved:
            p = by_fqn.get(fqn)
            if p is not None:
                inner.state.pop(p, None)
    if wrapped is not None:
        ds = state["dist_stab"]
        for t, sd in zip(wrapped.transforms, ds["transforms"]):
            t.load_state_dict(sd)
        if wrapped.monitor is not None:
            wrapped.monitor.load_state_dict(ds["monitor"])
        if wrapped.skip is not None:
            wrapped.skip.load_state_dict(ds["skip"])
    return state["extra"]
