"""Backends turn parameters into :class:`~dist_stab.spec.ShardedParam` descriptions, nothing more.

``describe(params)`` accepts a module, ``named_parameters()`` pairs, or bare tensors, and asks
each registered describer in turn (Megatron TP attributes, DTensor, then plain tensors). Engines that keep gradients
outside ``param.grad`` (DeepSpeed ZeRO, Megatron's distributed optimizer) build their own
``ShardedParam`` lists and pass them to the transforms directly.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch

from ..spec import ShardedParam, check_unique_fqns
from . import dtensor as _dtensor
from . import local as _local
from . import megatron as _megatron  # attribute checks only; megatron-core is imported lazily

Describer = Callable[[str, torch.Tensor], Optional[ShardedParam]]
_DESCRIBERS: List[Describer] = [_megatron.describe, _dtensor.describe, _local.describe]


def register_describer(fn: Describer, first: bool = True) -> None:
    """Add a describer (e.g. one reading Megatron TP attributes); the first match wins."""
    if fn not in _DESCRIBERS:
        _DESCRIBERS.insert(0 if first else len(_DESCRIBERS) - 1, fn)


def named_params(params) -> List[Tuple[str, torch.Tensor]]:
    """Normalise a module / named pairs / bare tensors / param groups to (name, tensor) pairs.

    Bare tensors get positional names ``"param.{i}"``; pass ``model.named_parameters()`` so that
    saved state is keyed by FQN and survives a change of model wrapping.
    """
    if isinstance(params, torch.nn.Module):
        return list(params.named_parameters())
    if isinstance(params, torch.Tensor):
        params = [params]
    items = list(params)
    out: List[Tuple[str, torch.Tensor]] = []
    for i, item in enumerate(items):
        if isinstance(item, ShardedParam):
            out.append((item.fqn, item))  # already described
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)
        elif isinstance(item, dict):  # a param group
            for j, p in enumerate(item["params"]):
                out.append((f"param.{len(out)}", p))
        elif isinstance(item, torch.Tensor):
            out.append((f"param.{i}", item))
        else:
            raise TypeError(f"cannot interpret {type(item).__name__} as a parameter")
    return out


def describe(params, describers: Optional[Iterable[Describer]] = None,
             include_frozen: bool = False) -> List[ShardedParam]:
    """Describe every parameter that requires grad (every one with ``include_frozen``); raise if two share
    a name."""
    chain = list(describers) if describers is not None else _DESCRIBERS
    shards: List[ShardedParam] = []
    seen_ids = set()
    for name, p in named_params(params):
        if isinstance(p, ShardedParam):
            shards.append(p)
            continue
        if (not p.requires_grad and not include_frozen) or id(p) in seen_ids:
            continue  # frozen, or the same tensor under a second name (tied weights count once)
        seen_ids.add(id(p))
        for fn in chain:
            sp = fn(name, p)
            if sp is not None:
                shards.append(sp)
                break
        else:
            raise TypeError(f"no backend can describe parameter {name!r} of type {type(p).__name__}")
    check_unique_fqns(shards)
    return shards
