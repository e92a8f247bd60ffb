"""Communication report: what the stability transform sends per step, and what the alternatives would.

:class:`CommTally` reads :data:`dist_stab.comm_log` (one record per collective that dist_stab
issues) step by step. :func:`reference_costs` measures, with ``CommDebugMode``, the collectives
that torch's global-norm computation (``clip_grad_norm_``'s ``get_total_norm``) and a naive
per-tensor norm (``.norm()`` of each DTensor, then ``full_tensor()``) issue on the same model:
the two usual ways to get a global or a per-tensor norm without dist_stab.
Used by the trainer; a benchmark can use it on its own.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

Key = Tuple[str, str, str]  # (tag, op, group)


class CommTally:
    """Collectives per (tag, op, group), counted over steps."""

    def __init__(self):
        self.calls: Dict[Key, int] = defaultdict(int)
        self.nbytes: Dict[Key, int] = defaultdict(int)
        self.group_size: Dict[str, int] = {}
        self.steps = 0

    def add_step(self, records) -> Tuple[int, int]:
        """Count one step's records; return (calls, bytes) of that step."""
        self.steps += 1
        calls = nbytes = 0
        for r in records:
            k = (r.tag, r.op, r.group)
            self.calls[k] += 1
            self.nbytes[k] += r.nbytes
            self.group_size[r.group] = r.group_size
            calls += 1
            nbytes += r.nbytes
        return calls, nbytes

    def per_step(self) -> List[dict]:
        n = max(self.steps, 1)
        return [{"tag": k[0], "op": k[1], "group": k[2], "group_size": self.group_size.get(k[2]),
                 "calls_per_step": self.calls[k] / n, "bytes_per_step": self.nbytes[k] / n}
                for k in sorted(self.calls)]

    def totals_per_step(self) -> Tuple[float, float]:
        n = max(self.steps, 1)
        return sum(self.calls.values()) / n, sum(self.nbytes.values()) / n


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


@torch.no_grad()
def reference_costs(params: List[torch.Tensor]) -> List[dict]:
    """Measure the collectives of the usual alternatives on ``params`` (parameters stand in for
    gradients: same placements, same collectives). Call on every rank (they are collectives)."""
    params = [p for p in params if p.requires_grad]
    out = []
    try:
        from torch.distributed.tensor.debug import CommDebugMode
    except ImportError:  # pragma: no cover
        return out
    dt = [p for p in params if _is_dtensor(p)]
    # 1. global clipping as torch does it (clip_grad_norm_ -> get_total_norm -> full_tensor)
    mode = CommDebugMode()
    try:
        with mode:
            total = torch.nn.utils.get_total_norm(params, 2.0)
            if _is_dtensor(total):
                total.full_tensor()
        n = mode.get_total_counts()
        out.append({"method": "torch clip_grad_norm_ (global)", "calls_per_step": n, "bytes_per_step": 4 * n,
                    "note": "measured"})
    except Exception as exc:  # noqa: BLE001 - a mixed-mesh model makes torch raise; report that
        out.append({"method": "torch clip_grad_norm_ (global)", "calls_per_step": None, "bytes_per_step": None,
                    "note": f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
    # 2. per-tensor norms the naive way: one reduction per sharded tensor
    mode = CommDebugMode()
    with mode:
        for p in dt:
            p.norm().full_tensor()
    n = mode.get_total_counts()
    out.append({"method": "naive per-tensor norms (.norm().full_tensor())", "calls_per_step": n,
                "bytes_per_step": 4 * n, "note": f"measured, {len(dt)} DTensor params"})
    return out


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def format_report(rows: List[dict], refs: List[dict], title: str = "communication report") -> str:
    lines = [f"{title} (collectives issued by the stability transform, per optimizer step)"]
    lines.append(f"  {'source':<34} {'op':<4} {'group':<22} {'calls/step':>10} {'bytes/step':>11}")
    if not rows:
        lines.append(f"  {'(none issued)':<34} {'-':<4} {'-':<22} {0:>10} {'0 B':>11}")
    for r in rows:
        lines.append(f"  {r['tag']:<34} {r['op']:<4} {r['group'][:22]:<22} {r['calls_per_step']:>10.2f} "
                     f"{_fmt_bytes(r['bytes_per_step']):>11}")
    if refs:
        lines.append("  for comparison, on the same model and mesh:")
        for r in refs:
            calls = "-" if r["calls_per_step"] is None else f"{r['calls_per_step']:.0f}"
            lines.append(f"  {r['method']:<61} {calls:>10} {_fmt_bytes(r['bytes_per_step']):>11}  ({r['note']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- comparing runs
def load_run(run_dir) -> dict:
    """``{"steps": [...per-step records, last one per step...], "val": [...], "summary": {...}}``."""
    import json
    from pathlib import Path

    steps, val, summary = {}, {}, None
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r.get("summary"):
                summary = r
            elif "val_loss" in r:
                val[r["step"]] = r
            else:
                steps[r["step"]] = r
    return {"dir": str(run_dir), "steps": [steps[k] for k in sorted(steps)], "val": [val[k] for k in sorted(val)],
            "summary": summary or {}}


def compare_runs(run_dirs) -> str:
    """A table of several runs: loss, val loss, clipping, throughput and communication per step."""
    runs = [load_run(d) for d in run_dirs]
    head = (f"{'run':<24} {'loss@1':>7} {'loss@end':>8} {'val@end':>8} {'clip events':>11} {'tok/s':>7} "
            f"{'wall s':>6} {'coll/step':>9} {'bytes/step':>10} {'loss spikes':>11} {'skipped':>7}")
    lines = [head, "-" * len(head)]
    for r in runs:
        s, st = r["summary"], r["steps"]
        name = s.get("name") or r["dir"]
        first = st[0]["loss"] if st else float("nan")
        last = st[-1]["loss"] if st else float("nan")
        val = r["val"][-1]["val_loss"] if r["val"] else float("nan")
        clipped = sum(x.get("num_clipped", 0) for x in st)
        lines.append(f"{name[:24]:<24} {first:>7.3f} {last:>8.3f} {val:>8.3f} {clipped:>11d} "
                     f"{s.get('tokens_per_s', float('nan')):>7.0f} {s.get('wall_s', float('nan')):>6.1f} "
                     f"{s.get('comm_calls_per_step', 0):>9.2f} {_fmt_bytes(s.get('comm_bytes_per_step')):>10} "
                     f"{s.get('loss_spikes', 0):>11d} {s.get('skipped', 0):>7d}")
    for r in runs:
        s = r["summary"]
        name = s.get("name") or r["dir"]
        parts = [f"{c['tag']} {c['op']} over {c['group']}: {c['calls_per_step']:.2f}/step, "
                 f"{_fmt_bytes(c['bytes_per_step'])}/step" for c in s.get("comm", [])] or ["no collectives"]
        lines.append(f"{name}: " + "; ".join(parts))
    refs = next((r["summary"].get("comm_reference") for r in runs if r["summary"].get("comm_reference")), None)
    for ref in refs or []:
        calls = "-" if ref["calls_per_step"] is None else f"{ref['calls_per_step']:.0f}"
        lines.append(f"  vs {ref['method']}: {calls} collectives/step, {_fmt_bytes(ref['bytes_per_step'])}/step "
                     f"({ref['note']})")
    lines.append("clip events: sum over steps of tensors whose gradient was scaled down (global clipping "
                 "scales all tensors at once); loss spikes: steps whose loss was > sigma std above the trailing "
                 "window (spike score = 100 x spikes / steps); skipped: steps dropped by the skip policy")
    lines.append("collectives per step above are the stability transform's; the spike monitor adds one 4-byte "
                 "loss all-reduce per step")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m dist_stab.train.report RUN_DIR [RUN_DIR ...]")
    print(compare_runs(sys.argv[1:]))
