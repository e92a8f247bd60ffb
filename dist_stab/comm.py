"""A log of the collectives dist_stab issues, for tests and the communication report.

Every collective goes through :func:`all_reduce`, which records (tag, op, group, numel, bytes) in
:data:`comm_log`. Recording is a Python append of a tuple and two counter updates: no device work,
no host sync.

The log is bounded, so a training loop that never clears it does not grow without limit:

* ``comm_log.records`` holds the newest ``maxlen`` records (default 4096; a ring: the oldest
  record is dropped when a new one arrives and the ring is full; ``comm_log.dropped`` counts them);
* ``comm_log.summary()`` gives exact (calls, bytes) per (tag, op, group) since the last
  :meth:`CommLog.clear`, however many records the ring has dropped (a counter per key: its size is
  the number of distinct keys, not of steps).

The reference trainer clears it after every step (it tallies each step's records first). In a loop of
your own::

    import dist_stab as ds
    ds.comm_log.clear(); loss.backward(); opt.step()
    print(ds.comm_log)           # a table: calls and bytes per (tag, op, group) since the clear
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

DEFAULT_MAXLEN = 4096  # records kept; one step of a transform issues one record per (group, op)


@dataclass(frozen=True)
class CommRecord:
    tag: str  # who asked, e.g. "AdaGC"
    op: str  # "sum" | "max"
    group: str  # GroupRef.name
    group_size: int
    numel: int
    nbytes: int


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)  # pragma: no cover


class CommLog:
    """The collectives issued since the last :meth:`clear`: the newest ``maxlen`` records (a ring) and
    exact per-key totals. ``print(comm_log)`` shows the totals as a table."""

    def __init__(self, maxlen: int = DEFAULT_MAXLEN):
        if int(maxlen) != maxlen or maxlen < 1:
            raise ValueError(f"maxlen must be an integer >= 1, got {maxlen!r}")
        self._ring: deque = deque(maxlen=int(maxlen))
        self._calls: Counter = Counter()
        self._bytes: Counter = Counter()
        self._group_size: Dict[str, int] = {}
        self.added = 0  # records added since the last clear (kept + dropped)
        self.enabled = True

    @property
    def maxlen(self) -> int:
        return self._ring.maxlen

    @maxlen.setter
    def maxlen(self, n: int) -> None:
        if int(n) != n or n < 1:
            raise ValueError(f"maxlen must be an integer >= 1, got {n!r}")
        self._ring = deque(self._ring, maxlen=int(n))

    @property
    def records(self) -> List[CommRecord]:
        """The newest ``maxlen`` records since the last clear, oldest first (a copy)."""
        return list(self._ring)

    @property
    def dropped(self) -> int:
        """Records added since the last clear that the ring no longer holds."""
        return self.added - len(self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def clear(self) -> None:
        self._ring.clear()
        self._calls.clear()
        self._bytes.clear()
        self._group_size.clear()
        self.added = 0

    def add(self, rec: CommRecord) -> None:
        if not self.enabled:
            return
        self._ring.append(rec)
        key = (rec.tag, rec.op, rec.group)
        self._calls[key] += 1
        self._bytes[key] += rec.nbytes
        self._group_size[rec.group] = rec.group_size
        self.added += 1

    def summary(self) -> Dict[Tuple[str, str, str], Tuple[int, int]]:
        """``{(tag, op, group): (calls, bytes)}`` since the last clear (exact, dropped records included)."""
        return {k: (self._calls[k], self._bytes[k]) for k in self._calls}

    def table(self) -> str:
        lines = [f"comm_log: {self.added} collective(s) since the last clear "
                 f"({len(self._ring)} kept, ring of {self.maxlen}{', recording off' if not self.enabled else ''})"]
        if self._calls:
            w = max(12, *(len(k[0]) for k in self._calls))
            g = max(5, *(len(k[2]) for k in self._calls))
            lines.append(f"  {'tag':<{w}} {'op':<4} {'group':<{g}} {'size':>4} {'calls':>6} {'bytes':>10}")
            for k in sorted(self._calls):
                lines.append(f"  {k[0]:<{w}} {k[1]:<4} {k[2]:<{g}} {self._group_size.get(k[2], 0):>4} "
                             f"{self._calls[k]:>6} {_fmt_bytes(self._bytes[k]):>10}")
        return "\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return self.table()


comm_log = CommLog()

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


def all_reduce(t: torch.Tensor, op: str, group_ref, tag: str) -> None:
    """In-place all-reduce of ``t`` over ``group_ref.group``, recorded in :data:`comm_log`."""
    comm_log.add(CommRecord(tag, op, group_ref.name, group_ref.size, t.numel(), t.numel() * t.element_size()))
    dist.all_reduce(t, op=_OPS[op], group=group_ref.group)
