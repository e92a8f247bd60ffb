"""Save and restore a training state with ``torch.distributed.checkpoint`` (DCP), on any mesh.

``save(path, model, optimizer, extra=None)`` / ``load(path, model, optimizer, extra=None)``:

* model and inner-optimizer state go through ``get_state_dict`` / ``set_state_dict``, keyed by
  parameter FQN, so FSDP2/DTensor shards are resharded on load (saved on 4 ranks, load on 2);
* a :class:`~dist_stab.wrap.WrappedOptimizer` goes through the same helpers as any torch optimizer: its state
  dict is torch's, with the transforms', spike monitor's and skip counters' state in one opaque value keyed by
  parameter FQN (:mod:`dist_stab.wrap_state`), identical on every rank, so any world size can load it. Checkpoints
  written before that format (a top-level ``dist_stab`` entry) still load;
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

from . import wrap_state
from .wrap import WrappedOptimizer


def _split(optimizer):
    if isinstance(optimizer, WrappedOptimizer):
        return optimizer.optimizer, optimizer
    return optimizer, None


def _legacy_template(wrapped: WrappedOptimizer) -> dict:
    """What checkpoints of the earlier format hold under the top-level ``dist_stab`` key."""
    sd = {"transforms": [t.state_dict() for t in wrapped.transforms]}
    if wrapped.monitor is not None:
        sd["monitor"] = wrapped.monitor.state_dict()
    if wrapped.skip is not None:
        sd["skip"] = wrapped.skip.state_dict()
    return sd


def save(path: str, model: torch.nn.Module, optimizer, extra: Optional[dict] = None) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "extra": extra or {}}, checkpoint_id=path)


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
    model_sd, optim_sd = get_state_dict(model, optimizer)
    saved = _saved_keys(path)
    legacy = (wrapped is not None and saved is not None and any(k.startswith("dist_stab.") for k in saved)
              and not any(k.endswith("." + wrap_state.KEY) and k.startswith("optim.param_groups") for k in saved))
    state = {"model": model_sd, "optim": optim_sd, "extra": extra or {}}
    if legacy:  # the earlier format: dist_stab's state beside the inner optimizer's, not inside it
        for g in optim_sd["param_groups"]:
            g.pop(wrap_state.KEY, None)
        state["dist_stab"] = _legacy_template(wrapped)
    unsaved = _split_unsaved_state(path, optim_sd, inner)
    dcp.load(state, checkpoint_id=path)
    if legacy:
        old = state["dist_stab"]
        payload = wrap_state._from_format1({"optimizer": None, "transforms": old["transforms"],
                                            "monitor": old.get("monitor"), "skip": old.get("skip")})[1]
        state["optim"]["param_groups"][0][wrap_state.KEY] = wrap_state.encode(payload)
    state["optim"]["state"].update(unsaved)  # placeholders for set_state_dict; emptied below
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if unsaved:
        by_fqn = _params_by_fqn(model)
        for fqn in unsaved:
            p = by_fqn.get(fqn)
            if p is not None:
                inner.state.pop(p, None)
    return state["extra"]
