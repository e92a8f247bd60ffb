"""Batched completion of per-tensor partial statistics: one collective per (group, op).

A :class:`SlotLayout` is built once for a fixed list of slots (one slot = one parameter's
partial statistic: a scalar or a vector) and the groups that complete each slot. Completing
a flat fp32 buffer in that layout issues, for every distinct group, **one** all-reduce over
exactly the slots that group completes (a view when they are contiguous, else a gather and
scatter). Groups are visited in name order, a total order shared by all ranks, so no two
ranks can wait on each other in opposite orders.

When ``validate`` is set, building a layout checks once that every member of each group
packs the same slots (a hash all-reduced MIN/MAX): mismatched packing would mix up
statistics silently.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import comm
from .spec import GroupRef


class SlotLayout:
    def __init__(self, keys: Sequence[str], lengths: Sequence[int], groups: Sequence[Tuple[GroupRef, ...]],
                 validate: bool = True, device=None):
        if not (len(keys) == len(lengths) == len(groups)):
            raise ValueError("keys, lengths and groups must have equal lengths")
        self.lengths = list(lengths)
        self.offsets = [0] * len(lengths)
        total = 0
        for i, n in enumerate(lengths):
            self.offsets[i] = total
            total += n
        self.numel = total
        by_name: Dict[str, GroupRef] = {}
        members: Dict[str, List[int]] = {}
        for i, gs in enumerate(groups):
            for g in gs:
                prev = by_name.setdefault(g.name, g)
                if prev.size != g.size:
                    raise ValueError(f"two different groups are both named {g.name!r}")
                members.setdefault(g.name, []).append(i)
        self.groups: List[GroupRef] = [by_name[n] for n in sorted(by_name)]
        self._ranges: Dict[str, List[Tuple[int, int]]] = {}
        for name, idx in members.items():
            ranges: List[Tuple[int, int]] = []
            for i in idx:
                s, e = self.offsets[i], self.offsets[i] + self.lengths[i]
                if s == e:
                    continue
                if ranges and ranges[-1][1] == s:
                    ranges[-1] = (ranges[-1][0], e)
                else:
                    ranges.append((s, e))
            self._ranges[name] = ranges
        self._index: Dict[Tuple[str, object], torch.Tensor] = {}
        if validate:
            self._validate(keys, groups, device)

    def _validate(self, keys, groups, device) -> None:
        for g in self.groups:
            desc = "|".join(f"{k}:{n}" for k, n, gs in zip(keys, self.lengths, groups) if g in gs)
            h = int.from_bytes(hashlib.sha256(desc.encode()).digest()[:7], "little")
            t = torch.tensor([h, -h], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g.group)
            if int(t[0]) != h or -int(t[1]) != h:  # host-sync-ok: once per layout, at build time
                raise RuntimeError(f"ranks of group {g.name} pack different statistics; this rank packs: "
                                   f"{desc[:500]}")

    def split(self, buf: torch.Tensor) -> List[torch.Tensor]:
        return list(torch.split(buf, self.lengths))

    def complete(self, buf: torch.Tensor, op: str, tag: str) -> torch.Tensor:
        """All-reduce ``buf`` (fp32, ``numel`` long) in place: one collective per group."""
        if buf.numel() != self.numel:
            raise ValueError(f"buffer has {buf.numel()} elements, layout expects {self.numel}")
        for g in self.groups:
            ranges = self._ranges[g.name]
            if not ranges:
                continue
            if len(ranges) == 1:
                s, e = ranges[0]
                view = buf if (s, e) == (0, self.numel) else buf[s:e]
                comm.all_reduce(view, op, g, tag)  # a view: reduced in place
                continue
            key = (g.name, buf.device)
            idx = self._index.get(key)
            if idx is None:
                idx = torch.cat([torch.arange(s, e) for s, e in ranges]).to(buf.device)
                self._index[key] = idx
            sub = buf.index_select(0, idx)
            comm.all_reduce(sub, op, g, tag)
            buf.index_copy_(0, idx, sub)
        return buf


def num_collectives(layout: Optional[SlotLayout]) -> int:
    return 0 if layout is None else sum(1 for g in layout.groups if layout._ranges[g.name])
