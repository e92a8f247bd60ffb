"""Plain tensors: single process, DDP (grads are already all-reduced), TP-replicated weights."""
from __future__ import annotations

import torch

from ..spec import ShardedParam, ShardSpec


def describe(fqn: str, p: torch.Tensor) -> ShardedParam:
    shape = tuple(p.shape)
    spec = ShardSpec(fqn=fqn, global_shape=shape, local_shape=shape, offsets=(0,) * len(shape))
    return ShardedParam(spec, p, local_grad=lambda: p.grad, local_param=lambda: p.detach(), kind="plain")
