"""DTensor parameters: FSDP2 ``fully_shard`` (incl. uneven and empty dim-0 shards), HSDP,
TP ``ColwiseParallel`` / ``RowwiseParallel``, and FSDP x TP (``_StridedShard``).

Each mesh dim that shards the tensor becomes one :class:`ShardAxis` with that mesh dim's
process group; ``Replicate`` dims add nothing (HSDP's replicas already hold equal grads).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..spec import GroupRef, ShardAxis, ShardedParam, ShardSpec

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Replicate, Shard
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        _StridedShard = Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None


def mesh_group_ref(mesh, mesh_dim: int) -> GroupRef:
    """Name a mesh dim's group by its role and member ranks: equal on all of its members."""
    group = mesh.get_group(mesh_dim)
    names = mesh.mesh_dim_names
    role = names[mesh_dim] if names else f"axis{mesh_dim}"
    ranks = dist.get_process_group_ranks(group)
    return GroupRef(f"{role}{ranks}", group, len(ranks))


def _shard_dim(placement) -> Optional[int]:
    if isinstance(placement, (Shard, _StridedShard)):
        return placement.dim
    if isinstance(placement, Replicate):
        return None
    raise ValueError(f"unsupported DTensor placement {placement!r} on a parameter (Partial grads "
                     "must be reduced before the transform runs)")


def describe(fqn: str, p: torch.Tensor) -> Optional[ShardedParam]:
    if DTensor is None or not isinstance(p, DTensor):
        return None
    mesh, placements = p.device_mesh, p.placements
    global_shape = tuple(p.shape)
    local_shape, offsets = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    ndim = len(global_shape)
    axes = []
    for mesh_dim, pl in enumerate(placements):
        d = _shard_dim(pl)
        if d is None:
            continue
        d = d % ndim if ndim else 0
        if mesh.size(mesh_dim) > 1:
            axes.append(ShardAxis(d, mesh_group_ref(mesh, mesh_dim)))
    spec = ShardSpec(fqn=fqn, global_shape=global_shape, local_shape=tuple(local_shape),
                     offsets=tuple(offsets), axes=tuple(axes))

    def local_grad():
        g = p.grad
        if g is None:
            return None
        if not isinstance(g, DTensor) or tuple(g.placements) != tuple(placements):
            raise ValueError(f"{fqn}: the grad must be a DTensor placed like its parameter "
                             f"({placements}), got {type(g).__name__} {getattr(g, 'placements', '')}")
        return g._local_tensor

    return ShardedParam(spec, p, local_grad=local_grad, local_param=lambda: p._local_tensor.detach(), kind="dtensor")
