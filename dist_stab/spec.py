"""Shard description: what one rank holds of one parameter, and which groups complete it.

Every backend (plain tensors, DTensor/FSDP2/TP, DeepSpeed flat partitions, Megatron TP
attributes) only builds these objects; every algorithm only reads them.

A local piece is either

* rectangular: ``local_shape`` at ``offsets`` inside ``global_shape`` (FSDP2, TP, plain), or
* flat: the range ``[flat_start, flat_start + numel)`` of the row-major flattened full
  tensor (DeepSpeed ZeRO partitions, Megatron distributed-optimizer fragments).

``axes`` lists, for every way the tensor is split, the tensor dim that is split (``None``
for a flat split) and the process group whose members hold the other pieces. Summing a
partial statistic over all ``axes`` groups completes it; replicated mesh dimensions
(HSDP's replicate dim, TP-replicated norm weights) are simply absent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GroupRef:
    """A process group with a role name that is the same on every rank (e.g. ``"dp_shard"``).

    Collectives are issued in the order of ``name``, so all members of a group issue them
    in the same order whatever other groups they also belong to.
    """

    name: str
    group: object = field(compare=False, hash=False, repr=False)
    size: int = 1

    @staticmethod
    def of(name: str, group) -> "GroupRef":
        return GroupRef(name, group, dist.get_world_size(group))


@dataclass(frozen=True)
class ShardAxis:
    """One split of a tensor: ``dim`` is the tensor dim that is split (None: flat split)."""

    dim: Optional[int]
    group: GroupRef


@dataclass(frozen=True)
class ShardSpec:
    fqn: str
    global_shape: tuple
    local_shape: tuple = ()
    offsets: Optional[tuple] = None  # rectangular piece: global offset per dim
    flat_start: Optional[int] = None  # flat piece: start in the flattened full tensor
    axes: tuple = ()  # tuple[ShardAxis, ...]
    counted: bool = True  # False: a duplicate that global (cross-tensor) sums must skip

    def __post_init__(self):
        if (self.offsets is None) == (self.flat_start is None):
            raise ValueError(f"{self.fqn}: give exactly one of offsets (rectangular) or flat_start (flat)")
        if self.flat_start is not None and any(a.dim is not None for a in self.axes):
            raise ValueError(f"{self.fqn}: a flat piece can only have flat axes (dim=None)")

    @property
    def is_flat(self) -> bool:
        return self.flat_start is not None

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def is_sharded(self) -> bool:
        return bool(self.axes)

    def groups(self, keep_dim: Optional[int] = None) -> tuple:
        """Groups that complete a statistic which sums over every dim except ``keep_dim``.

        ``keep_dim=None``: a whole-tensor statistic, reduced over every axis. A flat piece
        always reduces over its axes: its per-row/column partials are laid out full-length.
        """
        return tuple(sorted({a.group for a in self.axes if a.dim is None or a.dim != keep_dim}, key=lambda g: g.name))

    def kept_length(self, keep_dim: int) -> int:
        """Length of the per-index statistic along ``keep_dim`` that this rank contributes."""
        if self.is_flat:
            return self.global_shape[keep_dim]
        return self.local_shape[keep_dim]


@dataclass(eq=False)
class ShardedParam:
    """A parameter as one rank sees it: its description and accessors to the local pieces.

    ``local_grad()`` / ``local_param()`` return plain tensors of ``spec.local_shape`` (flat:
    1-D) that alias the real storage, so in-place edits reach the parameter.
    """

    spec: ShardSpec
    param: torch.Tensor
    local_grad: Callable[[], Optional[torch.Tensor]]
    local_param: Callable[[], torch.Tensor]
    kind: str = "custom"  # "plain" / "dtensor": the grad is param.grad (its local tensor); lets
    # transforms collect thousands of grads without a Python call per parameter

    @property
    def fqn(self) -> str:
        return self.spec.fqn


def check_unique_fqns(shards: Sequence[ShardedParam]) -> None:
    seen = set()
    for s in shards:
        if s.fqn in seen:
            raise ValueError(f"parameter name {s.fqn!r} appears twice; names key the saved state")
        seen.add(s.fqn)
