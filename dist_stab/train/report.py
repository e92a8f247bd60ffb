"""Communication report: what the stability transform sends per step, and what the alternatives would.

:class:`CommTally` reads :data:`dist_stab.comm_log` (one record per collective that dist_stab
issues) step by step. :func:`reference_costs` measures, with ``CommDebugMode``, the collectives
that torch's global-norm computation (``clip_grad_norm_``'s ``get_total_norm``) and a naive
per-tensor norm (``.norm()`` of each DTensor, then ``full_tensor()``) issue on the same model:
the two usual ways to get a global or a per-tensor norm without dist_stab.
Used by the trainer; a benchmark can use it on its own.
"""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from dist_stab.skip import reason_names

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
                "bytes_per_step": 4 * n, "note": f"measured, {len(dt)} DTensor params", "tensors": len(dt)})
    return out


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


# what the packed fp32 buffer of a transform carries per tensor: one value (the squared norm of the local
# shard, max |g| for a MAX), or two (the squared norm and a presence flag: 1 if this rank holds a gradient for
# the tensor), whichever the transforms' layout uses (dist_stab/transforms/base.py)
_PER_TENSOR = {1: "its local shard's {stat}", 2: "its local shard's {stat} and a presence flag (1 if this rank "
                                                "holds a gradient for it)"}
_NORM_TAGS = ("GlobalClip", "AdaGC", "GradientStabilizer", "ZClip", "GradNorm")


def explain_rows(rows: List[dict], world: int, n_tensors: Optional[int] = None) -> List[str]:
    """One sentence per row of :func:`format_report`: what the collective carries. ``n_tensors``: the
    number of sharded tensors (from the measured naive per-tensor row), to say how many values each has."""
    out = []
    for r in rows:
        calls, nbytes = r["calls_per_step"], r["bytes_per_step"]
        slots = nbytes / 4 / calls if calls else 0
        head = (f"{r['tag']} {r['op']}: {calls:.2f} all-reduce(s) per step over {r['group']} "
                f"({r.get('group_size') or '?'} ranks), each one fp32 buffer of {slots:.0f} values")
        if r["tag"].startswith("deepspeed:"):
            out.append(f"{r['tag']} {r['op']}: DeepSpeed's own overflow check of its flat fp32 partitions")
            continue
        per = slots / n_tensors if n_tensors else None
        stat = "max |g|" if r["op"] == "max" else "squared norm"
        if r["tag"] == "SCALE":
            out.append(f"{head}: per matrix row whose reduced dim is sharded, its partial sum of squares, so that "
                       f"every rank knows every row's norm")
            continue
        if per is None or per not in _PER_TENSOR or r["tag"] not in _NORM_TAGS + ("StableSPAM",):
            out.append(f"{head} (x 4 B)")
            continue
        line = (f"{head} = {per:.0f} per tensor x {n_tensors} tensors x 4 B: per tensor "
                f"{_PER_TENSOR[int(per)].format(stat=stat)}, {r['op'].upper()}-reduced, so that every rank knows "
                f"every tensor's {'max |g|' if r['op'] == 'max' else 'norm'}")
        if r["tag"] == "GlobalClip":
            line += (f". GlobalClip then adds the squares up for the global norm. It sends {4 * per:.0f} B x "
                     f"tensors instead of torch's one 4-byte total so that the per-tensor norms "
                     f"(last_stats['GlobalClip']['norms']) and the per-tensor non-finite check that the skip policy "
                     f"reads come with the same one collective")
        elif r["tag"] in ("AdaGC", "GradientStabilizer"):
            line += f": {r['tag']} clips or rescales each tensor by its own norm"
        out.append(line)
    return out


def format_report(rows: List[dict], refs: List[dict], title: str = "communication report", world: int = 1,
                  monitor: bool = True, n_tensors: Optional[int] = None) -> str:
    """The trainer's end-of-run report: per (tag, op, group) the collectives dist_stab issued per optimizer
    step (from :data:`dist_stab.comm_log`), the alternatives, what each row carries, and a footer for this
    world size (``monitor``: a SpikeMonitor reduced the loss). ``n_tensors``: the tensors the transform handles,
    used where no measured naive per-tensor row counts the sharded ones."""
    lines = [f"{title} (collectives issued by the stability transform, per optimizer step)"]
    lines.append(f"  {'source':<34} {'op':<4} {'group':<22} {'calls/step':>10} {'bytes/step':>11}")
    if not rows:
        lines.append(f"  {'(none issued)':<34} {'-':<4} {'-':<22} {0:>10} {'0 B':>11}")
    for r in rows:
        lines.append(f"  {r['tag']:<34} {r['op']:<4} {r['group'][:22]:<22} {r['calls_per_step']:>10.2f} "
                     f"{_fmt_bytes(r['bytes_per_step']):>11}")
    if refs and world > 1:  # one process: nothing to compare (every alternative issues nothing either)
        lines.append("  for comparison, on the same model and mesh:")
        for r in refs:
            calls = "-" if r["calls_per_step"] is None else f"{r['calls_per_step']:.0f}"
            lines.append(f"  {r['method']:<61} {calls:>10} {_fmt_bytes(r['bytes_per_step']):>11}  ({r['note']})")
    n_tensors = next((r["tensors"] for r in refs if r.get("tensors")), None) or n_tensors
    notes = explain_rows(rows, world, n_tensors)
    methods = " ".join(r["method"] for r in refs) if world > 1 else ""
    if "torch clip_grad_norm_" in methods:
        notes.append("torch clip_grad_norm_ (counted with torch's CommDebugMode): one all-reduce of the 4-byte total "
                     "per mesh, no per-tensor norms; naive per-tensor norms: one collective per sharded tensor. "
                     "Hundreds of bytes or 4: one all-reduce either way, whose time at that size is mostly its "
                     "latency (the alpha-beta model, docs/benchmarks.md section 4)")
    if "DeepSpeed gradient_clipping" in methods:
        notes.append("DeepSpeed gradient_clipping: its own global norm, one 4-byte all-reduce per ZeRO param group "
                     "(what the transform replaces)")
    notes.extend(footer_lines(world, monitor))
    lines.append("  what is counted:")
    for e in notes:
        lines.extend(textwrap.wrap(e, width=118, initial_indent="  - ", subsequent_indent="    "))
    return "\n".join(lines)


def footer_lines(world: int, monitor: bool = True) -> List[str]:
    """What the counts leave out, for this world size."""
    if world <= 1:
        return ["one process: nothing to reduce, so dist_stab issued no collective (neither did the spike monitor)"]
    out = "not counted above: the gradient reduce-scatter / all-reduce of FSDP2 / DDP / ZeRO themselves"
    if monitor:
        out += f", and the spike monitor's loss all-reduce (one 4-byte SUM per step over the {world} ranks)"
    return [out]


# ---------------------------------------------------------------------- comparing runs
NAMES = {"global_clip": "global clipping", "adagc": "AdaGC", "gradient_stabilizer": "GradientStabilizer",
         "zclip": "ZClip", "none": "no transform"}
TAIL = 20  # steps at the end of a run over which losses are averaged and runs are compared


def load_run(run_dir) -> dict:
    """``{"steps": [...per-step records, last one per step...], "val": [...], "summary": {...}, "config": {...}}``."""
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
    cfg_path = Path(run_dir) / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    return {"dir": str(run_dir), "steps": [steps[k] for k in sorted(steps)], "val": [val[k] for k in sorted(val)],
            "summary": summary or {}, "config": config}


def run_facts(r: dict) -> dict:
    """Numbers of one loaded run that the tables and sentences use (all read from its files)."""
    s, st, cfg = r["summary"], r["steps"], r.get("config") or {}
    tr = cfg.get("train", {})
    transform = s.get("transform") or cfg.get("transform", {}).get("name") or "?"
    losses = [(x["step"], x["loss"]) for x in st if "loss" in x]
    finite = [(k, v) for k, v in losses if math.isfinite(v)]
    jump = max(((losses[i][1] - losses[i - 1][1], losses[i][0]) for i in range(1, len(losses))
                if math.isfinite(losses[i][1]) and math.isfinite(losses[i - 1][1])), default=(float("nan"), None))
    tail = [v for _, v in losses[-TAIL:]]
    last_step = losses[-1][0] if losses else 0
    every = int(tr.get("inject_spike_every") or 0)
    injected = [k for k in range(1, last_step + 1) if every and k % every == 0]
    skipped = []  # (step, [reasons])
    for x in st:
        if x.get("skipped"):
            why = reason_names(x["skip_reason"]) if "skip_reason" in x else []
            skipped.append((x["step"], why))
    if not skipped and s.get("skipped_steps"):  # runs written before per-step reasons existed
        skipped = [(k, []) for k in s["skipped_steps"]]
    lr_at_jump = next((x.get("lr") for x in st if x["step"] == jump[1]), None)
    return {
        "name": s.get("name") or r["dir"], "transform": transform, "label": NAMES.get(transform, transform),
        "world": s.get("world_size", 1), "first": losses[0][1] if losses else float("nan"),
        "last": losses[-1][1] if losses else float("nan"),
        "min": min(finite, key=lambda kv: kv[1]) if finite else (None, float("nan")),
        "tail_mean": sum(tail) / len(tail) if tail else float("nan"), "tail": dict(losses[-TAIL:]),
        "val": r["val"][-1]["val_loss"] if r["val"] else float("nan"),
        "val_step": r["val"][-1]["step"] if r["val"] else None,
        "jump": jump[0], "jump_step": jump[1], "lr_at_jump": lr_at_jump,
        "loss_spikes": [x["step"] for x in st if x.get("loss_spike")],
        "grad_spikes": [x["step"] for x in st if x.get("grad_spike")],
        "skipped": skipped, "injected": injected, "spike_scale": tr.get("inject_spike_scale"),
        "nan_at": tr.get("inject_nan_at") if (tr.get("inject_nan_at") or 0) <= last_step else None,
        "clip_events": sum(x.get("num_clipped", 0) for x in st), "tokens_per_s": s.get("tokens_per_s"),
        "wall_s": s.get("wall_s"), "calls": s.get("comm_calls_per_step"), "bytes": s.get("comm_bytes_per_step"),
        "comm": s.get("comm", []), "refs": s.get("comm_reference") or [], "lr": cfg.get("optim", {}).get("lr"),
        "sigma": cfg.get("spikes", {}).get("sigma"), "window": cfg.get("spikes", {}).get("window"),
        "last_step": last_step, "n_steps": len(losses), "warmup": cfg.get("schedule", {}).get("warmup_steps"),
        "lr_max": max((x.get("lr", 0) for x in st), default=None),
        "clipped_steps": sum(1 for x in st if x.get("num_clipped", 0)) if st and "num_clipped" in st[0] else None,
    }


def _steps(xs) -> str:
    return ", ".join(str(x) for x in xs) if xs else "none"


def _skips(skipped) -> str:
    if not skipped:
        return "none"
    return ", ".join(f"{k} ({'+'.join(w) if w else 'reason not recorded'})" for k, w in skipped)


def run_summary(r: dict) -> str:
    """A few lines on one run: its loss curve, the spikes detected, the steps skipped and why."""
    f = run_facts(r)
    out = [f"{f['name']} ({f['label']}, {f['world']} process(es), lr {f['lr']}):"]
    ms, mv = f["min"]
    out.append(f"  train loss {f['first']:.3f} at step 1 -> lowest {mv:.3f} at step {ms} -> {f['last']:.3f} at step "
               f"{f['last_step']} (mean of the last {TAIL} steps {f['tail_mean']:.3f}); val loss {f['val']:.3f} "
               f"at step {f['val_step']}")
    if f["jump_step"] is not None:
        lr = f" (lr {f['lr_at_jump']:.2e})" if f["lr_at_jump"] is not None else ""
        out.append(f"  largest one-step rise of the train loss: {f['jump']:+.3f} at step {f['jump_step']}{lr}")
    if f["injected"] or f["nan_at"]:
        inj = []
        if f["injected"]:
            inj.append(f"every gradient x{f['spike_scale']:g} at steps {_steps(f['injected'])}")
        if f["nan_at"]:
            inj.append(f"a NaN in one gradient element at step {f['nan_at']}")
        out.append("  injected: " + "; ".join(inj))
    out.append(f"  spikes detected (> {f['sigma']:g} std above the trailing {f['window']}-step window): "
               f"grad norm at steps {_steps(f['grad_spikes'])}; loss at steps {_steps(f['loss_spikes'])}")
    out.append(f"  steps skipped (whole step dropped on every rank): {_skips(f['skipped'])}")
    return "\n".join(out)


def compare_runs(run_dirs) -> str:
    """A table of several runs: loss, val loss, spikes, skips, clipping, throughput and communication per step."""
    runs = [load_run(d) for d in run_dirs]
    facts = [run_facts(r) for r in runs]
    head = (f"{'run':<26} {'loss@1':>7} {'loss@end':>8} {f'last{TAIL}':>7} {'val@end':>8} {'max rise':>13} "
            f"{'loss spk':>8} {'grad spk':>8} {'skipped':>7} {'clip events':>11} {'tok/s':>6} {'wall s':>6} "
            f"{'coll/step':>9} {'bytes/step':>10}")
    lines = [head, "-" * len(head)]
    for f in facts:
        rise = f"{f['jump']:+.2f} @{f['jump_step']}" if f["jump_step"] is not None else "-"
        lines.append(f"{f['name'][:26]:<26} {f['first']:>7.3f} {f['last']:>8.3f} {f['tail_mean']:>7.3f} "
                     f"{f['val']:>8.3f} {rise:>13} {len(f['loss_spikes']):>8d} {len(f['grad_spikes']):>8d} "
                     f"{len(f['skipped']):>7d} {f['clip_events']:>11d} {f['tokens_per_s'] or float('nan'):>6.0f} "
                     f"{f['wall_s'] or float('nan'):>6.1f} {f['calls'] or 0:>9.2f} {_fmt_bytes(f['bytes']):>10}")
    for f in facts:
        parts = [f"{c['tag']} {c['op']} over {c['group']}: {c['calls_per_step']:.2f}/step, "
                 f"{_fmt_bytes(c['bytes_per_step'])}/step" for c in f["comm"]] or ["no collectives"]
        lines.append(f"{f['name']}: " + "; ".join(parts))
    refs = next((f["refs"] for f in facts if f["refs"]), None)
    for ref in refs or []:
        calls = "-" if ref["calls_per_step"] is None else f"{ref['calls_per_step']:.0f}"
        lines.append(f"  vs {ref['method']}: {calls} collectives/step, {_fmt_bytes(ref['bytes_per_step'])}/step "
                     f"({ref['note']})")
    legend = (f"loss@end: train loss at the last step; last{TAIL}: its mean over the last {TAIL} steps; max rise: "
              "the largest one-step increase of the train loss and its step; loss/grad spk: steps whose loss / "
              "pre-clip grad norm was > sigma std above the trailing window; skipped: steps dropped by the skip "
              "policy; clip events: sum over steps of tensors whose gradient was scaled down (global clipping "
              "scales all tensors at once); coll/step, bytes/step: the stability transform's collectives")
    lines.extend(textwrap.wrap(legend, width=118))
    worlds = {f["world"] for f in facts}
    for w in sorted(worlds):
        for x in footer_lines(w):
            lines.extend(textwrap.wrap((f"{w} process(es): " if len(worlds) > 1 else "") + x, width=118))
    return "\n".join(lines)


def _paired(a: dict, b: dict):
    """Mean and standard error of b - a over the steps both ran in their last TAIL steps (same batches)."""
    common = sorted(set(a["tail"]) & set(b["tail"]))
    d = [b["tail"][k] - a["tail"][k] for k in common if math.isfinite(a["tail"][k]) and math.isfinite(b["tail"][k])]
    if len(d) < 2:
        return float("nan"), float("nan"), len(d)
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    return m, sd / math.sqrt(len(d)), len(d)


def conclusions(run_dirs) -> List[str]:
    """Sentences stating what the runs showed, each computed from their files (nothing is assumed)."""
    facts = [run_facts(load_run(d)) for d in run_dirs]
    if not facts:
        return []
    out = []
    ranked = sorted(facts, key=lambda f: (math.isnan(f["val"]), f["val"]))
    best = ranked[0]
    if not math.isnan(best["val"]):
        rest = ", ".join(f"{f['label']} {f['val']:.3f} ({f['val'] - best['val']:+.3f})" for f in ranked[1:])
        out.append(f"Lowest validation loss at step {best['val_step']}: {best['label']} {best['val']:.3f}"
                   + (f"; then {rest}." if rest else "."))
    for f in facts:
        if f is best:
            continue
        m, se, n = _paired(best, f)
        if math.isnan(m):
            continue
        if se == 0:
            verdict = "identical at every step" if m == 0 else "the same gap at every step"
        elif abs(m) > 2 * se:
            verdict = (f"{abs(m) / se:.0f} standard errors: a consistent gap in this run; one seed, so the spread "
                       f"between seeds is not measured")
        else:
            verdict = "within 2 standard errors: this run does not separate them"
        out.append(f"Over the last {n} steps (same batches) {f['label']}'s train loss was {m:+.3f} ± {se:.3f} "
                   f"against {best['label']}'s ({verdict}).")
    jumps = [f for f in facts if f["jump_step"] is not None]
    if jumps:
        txt = "; ".join(f"{f['label']} {f['jump']:+.2f} at step {f['jump_step']}"
                        + (f" (lr {f['lr_at_jump']:.1e})" if f["lr_at_jump"] is not None else "") for f in jumps)
        out.append(f"Largest one-step rise of the train loss: {txt}.")
        small = min(jumps, key=lambda f: f["jump"])
        big = [f for f in jumps if small["jump"] > 0 and f["jump"] > 3 * small["jump"]]
        if big:
            near = {k + d for f in big for k in f["injected"] for d in (0, 1)}
            at_peak = [f for f in big if f["warmup"] and f["warmup"] <= f["jump_step"] <= f["warmup"] + 2]
            what = ("right after an injected spike" if all(f["jump_step"] in near for f in big) else
                    "at no injected spike or NaN" if not any(f["jump_step"] in near for f in big) else
                    "some at an injected spike")
            peak = (f", as the LR reached its peak (warm-up ends at step {big[0]['warmup']})"
                    if len(at_peak) == len(big) else "")
            names = " and ".join(f["label"] for f in big)
            ratios = ", ".join("{:.0f}x".format(f["jump"] / small["jump"]) for f in big)
            out.append(f"{names[0].upper() + names[1:]}: {ratios} {small['label']}'s largest rise, {what}{peak}: an instability of the "
                       f"training itself, which {small['label']} did not have.")
    clip = []
    for f in facts:
        if f["transform"] == "global_clip" and f["clipped_steps"] is not None:
            clip.append(f"global clipping scaled the whole gradient down on {f['clipped_steps']} of "
                        f"{f['n_steps']} steps")
        elif f["clip_events"]:
            clip.append(f"{f['label']} scaled down {f['clip_events'] / max(f['n_steps'], 1):.1f} tensors per step "
                        f"on average, each by its own norm")
    if clip:
        out.append("Clipping: " + "; ".join(clip) + ".")
    inj = facts[0]["injected"]
    if inj:
        det = "; ".join(f"{f['label']} {len(set(f['grad_spikes']) & set(inj))}/{len(inj)}" for f in facts)
        out.append(f"Injected gradient spikes (x{facts[0]['spike_scale']:g} at steps {_steps(inj)}) flagged by the "
                   f"spike monitor as grad-norm spikes: {det}.")
    other = {f["label"]: sorted((set(f["grad_spikes"]) | set(f["loss_spikes"])) - set(inj)) for f in facts}
    if any(other.values()):
        out.append("Other spikes detected: " + "; ".join(f"{k} at step(s) {_steps(v)}" for k, v in other.items()
                                                          if v) + ".")
    skips = {f["label"]: f["skipped"] for f in facts}
    nan_at = facts[0]["nan_at"]
    if nan_at:
        caught = [k for k, v in skips.items() if any(s == nan_at for s, _ in v)]
        why = sorted({"+".join(w) for v in skips.values() for s, w in v if s == nan_at and w})
        out.append(f"The NaN injected at step {nan_at} was skipped in {len(caught)} of {len(skips)} runs"
                   + (f" (reason: {', '.join(why)})" if why else "") + "; parameters and optimizer state were left "
                   "as they were, and training went on.")
    extra = {k: [s for s, _ in v if s != nan_at] for k, v in skips.items()}
    if any(extra.values()):
        out.append("Other skipped steps: " + "; ".join(f"{k}: {_steps(v)}" for k, v in extra.items() if v) + ".")
    elif not nan_at:
        out.append("No step was skipped.")
    comm = {(f["calls"], f["bytes"]) for f in facts}
    if len(comm) == 1:
        calls, nbytes = comm.pop()
        refs = facts[0]["refs"]
        ref = "; ".join(f"{r['method']}: {r['calls_per_step']} call(s), {_fmt_bytes(r['bytes_per_step'])}" for r in refs
                        if r["calls_per_step"] is not None)
        out.append(f"Communication: every method issued {calls:.2f} all-reduce(s) per step, "
                   f"{_fmt_bytes(nbytes)} per step in all" + (f" (measured alternatives: {ref})." if ref else "."))
    else:
        out.append("Communication per step: " + "; ".join(f"{f['label']} {f['calls']:.2f} x, {_fmt_bytes(f['bytes'])}"
                                                          for f in facts) + ".")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dist_stab.train.report",
                                 description="Compare runs of the reference trainer (their metrics.jsonl).")
    ap.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    ap.add_argument("--summaries", action="store_true", help="first a few lines per run: loss, spikes, skips")
    ap.add_argument("--conclusions", action="store_true", help="last, sentences computed from the numbers")
    ap.add_argument("--plot", metavar="PNG", help="also write the comparison plot (dist_stab.plot; matplotlib)")
    args = ap.parse_args(argv)
    if args.summaries:
        for d in args.runs:
            print(run_summary(load_run(d)))
        print()
    print(compare_runs(args.runs))
    if args.conclusions:
        print()
        print("What these runs showed (computed from the numbers above):")
        for c in conclusions(args.runs):
            print(textwrap.fill(c, width=118, initial_indent="  * ", subsequent_indent="    "))
    if args.plot:
        try:
            from dist_stab.plot import plot_runs
            print(f"\nwrote {plot_runs(args.runs, args.plot)}")
        except ImportError as exc:
            print(f"\nno plot: {exc} (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
