"""A log of the collectives dist_stab issues, for tests and the communication report.

Every collective goes through :func:`all_reduce`, which records (tag, op, group, numel, bytes).
Recording is a Python append of a tuple: no device work, no host sync.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CommRecord:
    tag: str  # who asked, e.g. "AdaGC"
    op: str  # "sum" | "max"
    group: str  # GroupRef.name
    group_size: int
    numel: int
    nbytes: int


class CommLog:
    def __init__(self):
        self.records: List[CommRecord] = []
        self.enabled = True

    def clear(self) -> None:
        self.records.clear()

    def add(self, rec: CommRecord) -> None:
        if self.enabled:
            self.records.append(rec)

    def summary(self):
        """{(tag, op, group): (calls, bytes)}"""
        calls, nbytes = Counter(), Counter()
        for r in self.records:
            key = (r.tag, r.op, r.group)
            calls[key] += 1
            nbytes[key] += r.nbytes
        return {k: (calls[k], nbytes[k]) for k in calls}


comm_log = CommLog()

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


def all_reduce(t: torch.Tensor, op: str, group_ref, tag: str) -> None:
    """In-place all-reduce of ``t`` over ``group_ref.group``, recorded in :data:`comm_log`."""
    comm_log.add(CommRecord(tag, op, group_ref.name, group_ref.size, t.numel(), t.numel() * t.element_size()))
    dist.all_reduce(t, op=_OPS[op], group=group_ref.group)
