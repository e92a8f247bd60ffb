"""Training speed of the reference trainer per method: steady-state tokens/s, peak memory, host syncs per
step, and a torch-profiler split of the step into phases (issue 20).

    python -m dist_stab.bench.train_speed --json docs/bench_train_speed.json --plot docs/bench_train_speed.png
    python -m dist_stab.bench.train_speed --configs configs/tiny_cpu.yaml --set model.size=tiny-test \\
        --global-batch 2 --seq-len 32 --vocab 512 --warmup 2 --steps 2 --repeats 2   # CPU smoke run

Each ``--configs`` file is one model size (default: ``configs/llama_60m.yaml`` and ``configs/llama_350m.yaml``),
run on one process (``parallel.mode=none``) with ``--global-batch`` x ``--seq-len`` tokens per step
(default 64 x 256, one micro batch: a small batch, so the optimizer's and the transform's share of the step is
larger than at the configs' 512 sequences). Methods (``--methods``, by the names of :data:`METHODS`): torch fused
AdamW alone and with GlobalClip / AdaGC / ZClip in place, dist_stab AdamW with GradientStabilizer folded,
StableSPAM, SPAM and SCALE. The baseline of every ratio is "AdamW + GlobalClip".

For every repeat, the methods run one after another, in an order rotated by one each repeat (round robin: a
drift of the machine's speed during the run hits every method alike). One run of a method builds the trainer
alone on the device (the previous one freed), runs ``--warmup`` steps (state creation, Triton and
``torch.compile`` compilation, the transforms' warm-ups, shortened to 2 steps so the timed steps take their
steady path), then times ``--steps`` steps: ``Trainer.train_step`` called as ``fit()`` calls it (the LR changes
every step: the configs' warm-up is long), then one device sync, as the trainer's log flush does. tokens/s =
steps x tokens per step / that time. Per method: the median over repeats and its range; the ratio to the
baseline is taken per repeat (same round) and its median and range given. A claim that a method is faster or
slower holds only where the range of its ratio excludes 1.

Also per method (first repeat): peak memory (``torch.cuda.max_memory_allocated`` from the trainer's build to its
last timed step), graphs ``torch.compile`` built during the timed steps (should be 0), and on CUDA the host syncs
of one more step under ``torch.cuda.set_sync_debug_mode("warn")``, with the source lines that synced.

``--profile`` (default: the slowest method of each size, and the baseline): ``--profile-steps`` steps under the
torch profiler with the step's parts annotated: forward+backward (the rest of ``train_step``: data, forward,
backward, zero_grad), transform (the transforms' ``step``, or the skip policy's grad-norm probe when there is
none), skip/monitor (spike statistics, skip decision), skip restore (``SkipStep.step_optimizer`` around the
optimizer: the snapshot/where of restore mode), optimizer step. For each: host (CPU) ms, GPU busy ms of the
kernels it launched, and GPU idle ms before them (host gaps: the GPU waits for the host); they add up to the
GPU's window per step. On CPU only the host column exists.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

BASELINE = "AdamW + GlobalClip"
#: name -> (optim.name, transform.name)
METHODS: Dict[str, tuple] = {
    "AdamW": ("adamw", "none"),
    BASELINE: ("adamw", "global_clip"),
    "AdamW + AdaGC": ("adamw", "adagc"),
    "AdamW + GradientStabilizer folded": ("ds_adamw", "gradient_stabilizer"),
    "AdamW + ZClip": ("adamw", "zclip"),
    "StableSPAM": ("stable_spam", "none"),
    "SPAM": ("spam", "none"),
    "SCALE": ("scale", "none"),
}
TARGETS = {"every method": 0.98, "SCALE": 1.0, "StableSPAM": 0.98}
PHASES = ("forward+backward", "transform", "skip/monitor", "skip restore", "optimizer step")
_LABEL = {"ds:train_step": "forward+backward", "ds:wrap.step": "skip/monitor", "ds:transform": "transform",
          "ds:skip.step_optimizer": "skip restore", "ds:optimizer": "optimizer step"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - dynamo absent
        return 0


def build_config(path: str, method: str, args, run_dir: str):
    from dist_stab.train.config import load_config

    optim, transform = METHODS[method]
    sets = ["parallel.mode=none", f"data.corpus={args.corpus}", f"data.vocab_size={args.vocab}",
            f"data.seq_len={args.seq_len}", f"train.global_batch_size={args.global_batch}",
            f"train.micro_batch_size={args.micro_batch or args.global_batch}", "eval.every=0",
            "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=false", "log.tensorboard=false",
            "log.progress_bar=false", f"log.run_dir={run_dir}", f"optim.name={optim}",
            f"transform.name={transform}", "transform.adagc.warmup_steps=2", "transform.zclip.warmup_steps=2",
            *args.set]
    return load_config(path, sets)


def count_syncs(tr, step: int) -> tuple:
    """Host syncs of one ``train_step`` under sync-debug "warn": (count, sorted 'file:line' sites)."""
    sites: Dict[str, int] = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            tr.train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    n = 0
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        n += 1
        f = str(w.filename)
        key = f"{f[f.index('dist_stab'):] if 'dist_stab' in f else f}:{w.lineno}"
        sites[key] = sites.get(key, 0) + 1
    torch.cuda.synchronize()
    return n, [f"{k} x{v}" if v > 1 else k for k, v in sorted(sites.items())]


def run_one(path: str, method: str, args, device: torch.device, first: bool) -> dict:
    """Build the trainer alone, warm it up, time ``args.steps`` steps."""
    from dist_stab.train.loop import Trainer

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # left by earlier runs: should be ~0
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = build_config(path, method, args, run_dir)
        tr = Trainer(cfg, log_fn=lambda s: None)
        step = 0
        for _ in range(args.warmup):
            step += 1
            tr.train_step(step)
        _sync(device)
        graphs = _graphs()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step += 1
            tr.train_step(step)
        _sync(device)
        dt = time.perf_counter() - t0
        out = {"seconds": dt, "tokens_per_s": tr.tokens_per_step * args.steps / dt,
               "compiled_graphs_in_timed_steps": _graphs() - graphs, "n_params": tr.n_params,
               "tokens_per_step": tr.tokens_per_step, "vocab_size": tr.args.vocab_size}
        if device.type == "cuda":
            out["peak_mem_GB"] = (torch.cuda.max_memory_allocated(device) - held) / 1e9
            out["held_before_GB"] = held / 1e9
            if first:
                step += 1
                out["syncs_per_step"], out["sync_sites"] = count_syncs(tr, step)
        del tr
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------- profile
def _annotate(obj, attr: str, label: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def phase_split(trace: dict, n_steps: int) -> dict:
    """Per phase, per step: host ms (exclusive CPU time of its annotation), GPU busy ms of the kernels it
    launched, GPU idle ms before them (host gaps). From a chrome trace of the profiler."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    ann = sorted(((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), _LABEL[e["name"]])
                  for e in ev if e.get("cat") == "user_annotation" and e.get("name") in _LABEL),
                 key=lambda a: (a[0], -a[1]))
    host = {p: 0.0 for p in PHASES}
    stack: List[list] = []  # [start, end, label, children's time]
    for s, e, lab in ann + [(float("inf"), float("inf"), None)]:
        while stack and stack[-1][1] <= s:
            a = stack.pop()
            host[a[2]] += (a[1] - a[0]) - a[3]
            if stack:
                stack[-1][3] += a[1] - a[0]
        if lab is not None:
            stack.append([s, e, lab, 0.0])
    out = {"steps": n_steps, "host_ms": {p: host[p] / 1e3 / n_steps for p in PHASES}}
    steps = [a for a in ann if a[2] == "forward+backward"]
    out["host_step_ms"] = sum(e - s for s, e, _ in steps) / 1e3 / n_steps
    launch = {e["args"]["correlation"]: float(e["ts"]) for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("args", {}).get("correlation"),
                  e.get("name", "")) for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        return out

    def phase_of(ts: Optional[float]) -> Optional[str]:
        best = None
        for s, e, lab in ann:  # innermost: the latest-starting annotation that holds the launch
            if s > ts:
                break
            if e >= ts:
                best = lab
        return best

    busy = {p: 0.0 for p in PHASES}
    idle = {p: 0.0 for p in PHASES}
    kernels: Dict[str, Dict[str, float]] = {p: {} for p in PHASES}
    cur = None
    for s, e, corr, name in gpu:
        lab = phase_of(launch.get(corr)) if corr in launch else None
        if lab is None:
            continue  # launched outside the annotated steps (e.g. before the profiled window)
        if cur is None:
            cur = s
        idle[lab] += max(0.0, s - cur)
        busy[lab] += max(0.0, e - max(s, cur))
        cur = max(cur, e)
        kernels[lab][name] = kernels[lab].get(name, 0.0) + (e - s)
    out["gpu_busy_ms"] = {p: busy[p] / 1e3 / n_steps for p in PHASES}
    out["gpu_idle_before_ms"] = {p: idle[p] / 1e3 / n_steps for p in PHASES}
    out["gpu_window_ms"] = (sum(busy.values()) + sum(idle.values())) / 1e3 / n_steps
    out["host_gaps_ms"] = sum(idle.values()) / 1e3 / n_steps
    out["top_kernels_ms"] = {p: [[k[:90], v / 1e3 / n_steps] for k, v in sorted(kernels[p].items(),
                                                                               key=lambda kv: -kv[1])[:3]]
                             for p in PHASES if kernels[p]}
    return out


def profile_method(path: str, method: str, args, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dist_stab.train.loop import Trainer

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(build_config(path, method, args, run_dir), log_fn=lambda s: None)
        step = 0
        for _ in range(args.warmup):
            step += 1
            tr.train_step(step)
        _annotate(tr, "train_step", "ds:train_step")
        _annotate(tr.opt, "step", "ds:wrap.step")
        for t in tr.transforms:
            _annotate(t, "step", "ds:transform")
        if getattr(tr.opt, "_probe", None) is not None:
            _annotate(tr.opt._probe, "step", "ds:transform")
        if tr.skip is not None:
            _annotate(tr.skip, "step_optimizer", "ds:skip.step_optimizer")
        _annotate(tr.inner_opt, "step", "ds:optimizer")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        _sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                step += 1
                tr.train_step(step)
            _sync(device)
            wall = time.perf_counter() - t0
        trace_path = Path(run_dir) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        split = phase_split(json.loads(trace_path.read_text()), args.profile_steps)
        del tr, prof
    gc.collect()
    split["method"] = method
    split["wall_step_ms_profiled"] = wall * 1e3 / args.profile_steps
    return split


# ---------------------------------------------------------------------------------------------- summary
def summarize(runs: Dict[str, List[dict]], baseline: str) -> Dict[str, dict]:
    res = {}
    for m, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        row = {"tokens_per_s": tps, "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
               "tokens_per_s_max": max(tps),
               "step_ms_median": statistics.median(r["seconds"] * 1e3 for r in rs) / rs[0]["timed_steps"]}
        if baseline in runs:
            ratios = [a / b["tokens_per_s"] for a, b in zip(tps, runs[baseline])]
            row.update(ratio_vs_baseline=ratios, ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios))
        for k in ("peak_mem_GB", "syncs_per_step", "sync_sites"):  # first repeat
            if k in rs[0]:
                row[k] = rs[0][k]
        if "held_before_GB" in rs[0]:
            row["held_before_GB_max"] = max(r["held_before_GB"] for r in rs)
        row["compiled_graphs_in_timed_steps"] = sum(r["compiled_graphs_in_timed_steps"] for r in rs)
        res[m] = row
    return res


def format_table(size: str, info: dict, rows: Dict[str, dict]) -> str:
    lines = [f"## {size}: {info['n_params'] / 1e6:.1f}M params, vocab {info['vocab_size']}, "
             f"{info['tokens_per_step']} tokens/step, {info['repeats']} repeats x {info['timed_steps']} steps",
             "| method | tokens/s (median) | range over repeats | x AdamW+GlobalClip (median) | ratio range | "
             "step ms | peak GB | syncs/step | graphs compiled in timed steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        pk = f"{r['peak_mem_GB']:.2f}" if "peak_mem_GB" in r else "-"
        sy = str(r["syncs_per_step"]) if "syncs_per_step" in r else "-"
        lines.append(f"| {m} | {r['tokens_per_s_median']:,.0f} | {r['tokens_per_s_min']:,.0f}-"
                     f"{r['tokens_per_s_max']:,.0f} | {r.get('ratio_median', float('nan')):.3f} | "
                     f"{r.get('ratio_min', float('nan')):.3f}-{r.get('ratio_max', float('nan')):.3f} | "
                     f"{r['step_ms_median']:.2f} | {pk} | {sy} | {r['compiled_graphs_in_timed_steps']} |")
    return "\n".join(lines)


def format_profile(p: dict) -> str:
    gpu = "gpu_busy_ms" in p
    head = "| phase | host ms | GPU busy ms | GPU idle before (host gap) ms |" if gpu else "| phase | host ms |"
    lines = [f"profile of {p['method']} ({p['steps']} steps; {p['wall_step_ms_profiled']:.2f} ms/step under the "
             f"profiler" + (f"; GPU window {p['gpu_window_ms']:.2f} ms/step, host gaps {p['host_gaps_ms']:.2f} ms"
                            if gpu else "") + ")", head, "|---" * (4 if gpu else 2) + "|"]
    for ph in PHASES:
        if gpu:
            lines.append(f"| {ph} | {p['host_ms'][ph]:.3f} | {p['gpu_busy_ms'][ph]:.3f} | "
                         f"{p['gpu_idle_before_ms'][ph]:.3f} |")
        else:
            lines.append(f"| {ph} | {p['host_ms'][ph]:.3f} |")
    return "\n".join(lines)


def draw(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save

    sizes = list(result["sizes"])
    prof = [(s, p) for s in sizes for p in result["sizes"][s].get("profiles", []) if "gpu_busy_ms" in p]
    nrow = 2 if prof else 1
    fig, axes = plt.subplots(nrow, len(sizes), figsize=(6.5 * len(sizes), 4.2 * nrow), squeeze=False)
    for ax, s in zip(axes[0], sizes):
        rows = result["sizes"][s]["methods"]
        names = [m for m in rows if "ratio_median" in rows[m]]
        med = [rows[m]["ratio_median"] for m in names]
        lo = [rows[m]["ratio_median"] - rows[m]["ratio_min"] for m in names]
        hi = [rows[m]["ratio_max"] - rows[m]["ratio_median"] for m in names]
        ax.barh(range(len(names)), med, xerr=[lo, hi], color=["C2" if v >= TARGETS["every method"] else "C3"
                                                              for v in med], capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        for x, ls in ((TARGETS["every method"], "--"), (1.0, ":")):
            ax.axvline(x, color="k", ls=ls, lw=1, label=f"{x:g}x")
        ax.set_xlim(min(0.9, min(r - l for r, l in zip(med, lo)) - 0.02), max(1.1, max(r + h for r, h in zip(med, hi)) + 0.02))
        for i, v in enumerate(med):
            ax.text(v + hi[i], i, f" {v:.3f}", va="center", fontsize=8)
        i = result["sizes"][s]["info"]
        ax.set_title(f"{s}: tokens/s / AdamW+GlobalClip's ({i['repeats']} repeats, range shown)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    if prof:
        for ax, s in zip(axes[1], sizes):
            ps = [p for s2, p in prof if s2 == s]
            bottom = [0.0] * len(ps)
            for j, ph in enumerate(PHASES):
                vals = [p["gpu_busy_ms"][ph] for p in ps]
                ax.barh(range(len(ps)), vals, left=bottom, color=f"C{j}", label=f"{ph} (GPU busy)")
                bottom = [b + v for b, v in zip(bottom, vals)]
            gaps = [p["host_gaps_ms"] for p in ps]
            ax.barh(range(len(ps)), gaps, left=bottom, color="lightgrey", hatch="//", label="host gaps (GPU idle)")
            ax.set_yticks(range(len(ps)), [p["method"] for p in ps], fontsize=8)
            ax.set_xlabel("ms per step (torch profiler)")
            ax.set_title(f"{s}: phases of the step", fontsize=9)
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"reference trainer tokens/s per method, {result['device']} (docs/benchmarks.md)", fontsize=10)
    return _save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="configs/llama_60m.yaml,configs/llama_350m.yaml",
                    help="comma-separated trainer configs, one model size each")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=6, help="untimed steps before the timed ones")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the global batch (no accumulation)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--corpus", default="gutenberg-small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more trainer overrides")
    ap.add_argument("--profile", default="slowest,baseline",
                    help="methods to profile: names, 'slowest', 'baseline', or 'none'")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    result = {"command": "python -m dist_stab.bench.train_speed " + " ".join(argv), "device": dev_name,
              "torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda,
              "date": datetime.date.today().isoformat(), "commit": os.environ.get("DIST_STAB_COMMIT"),
              "baseline": BASELINE, "targets": TARGETS,
              "sizes": {}}
    print(f"device {dev_name}, torch {torch.__version__}, triton {triton_v}", flush=True)
    for path in [c.strip() for c in args.configs.split(",") if c.strip()]:
        runs: Dict[str, List[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]
            for m in order:
                r = run_one(path, m, args, device, first=rep == 0)
                r["timed_steps"] = args.steps
                runs[m].append(r)
                print(f"  {path} repeat {rep + 1}/{args.repeats} {m}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
        r0 = runs[methods[0]][0]
        from dist_stab.train.config import load_config
        size = load_config(path, list(args.set)).model.size
        info = {"config": path, "model_size": size, "n_params": r0["n_params"], "vocab_size": r0["vocab_size"],
                "tokens_per_step": r0["tokens_per_step"], "repeats": args.repeats, "warmup_steps": args.warmup,
                "timed_steps": args.steps, "global_batch": args.global_batch,
                "micro_batch": args.micro_batch or args.global_batch, "seq_len": args.seq_len, "corpus": args.corpus}
        rows = summarize(runs, BASELINE)
        entry = {"info": info, "methods": rows, "profiles": []}
        result["sizes"][size] = entry
        print(format_table(size, info, rows), flush=True)
        want = [p.strip() for p in args.profile.split(",") if p.strip() and p.strip() != "none"]
        todo: List[str] = []
        for w in want:
            name = (min(rows, key=lambda m: rows[m]["tokens_per_s_median"]) if w == "slowest"
                    else BASELINE if w == "baseline" else w)
            if name in rows and name not in todo:
                todo.append(name)
        for name in todo:
            p = profile_method(path, name, args, device)
            entry["profiles"].append(p)
            print(format_profile(p), flush=True)
        if args.json:  # after each size: a run cut short keeps the sizes it finished
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        if args.plot:
            print(f"wrote {draw(result, Path(args.plot))}")
    return result


if __name__ == "__main__":
    main()
