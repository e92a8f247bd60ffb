"""Training quality and stability of every method on real text, side by side.

    python -m dist_stab.bench.quality --config configs/tiny_cpu.yaml --out docs/quality_cpu
    python -m dist_stab.bench.quality --config configs/llama_60m.yaml --out docs/quality_60m --lrs 1e-3,3e-3,1e-2

Runs the reference trainer (one process) once per method and setting, with the same seed and data:
AdamW, AdamW + global clipping, + AdaGC, + GradientStabilizer, Stable-SPAM, SPAM and SCALE, at each LR of
``--lrs`` and once at the first LR with an injected gradient spike (all gradients x ``--spike-scale`` every
``--spike-every`` steps). A run "diverged" when its final training loss is not finite or above its first.
Writes ``OUT.json``, ``OUT.md`` (tables) and ``OUT.png`` (final validation loss vs LR; loss curves of the
spike runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "AdamW": ["optim.name=adamw", "transform.name=none"],
    "AdamW+GlobalClip": ["optim.name=adamw", "transform.name=global_clip"],
    "AdamW+AdaGC": ["optim.name=adamw", "transform.name=adagc"],
    "AdamW+GradientStabilizer": ["optim.name=adamw", "transform.name=gradient_stabilizer"],
    "StableSPAM": ["optim.name=stable_spam", "transform.name=none"],
    "SPAM": ["optim.name=spam", "transform.name=none"],
    "SCALE": ["optim.name=scale", "transform.name=none"],
}


def run_one(config, sets, run_dir, timeout, extra=()):
    cmd = [sys.executable, "-m", "dist_stab.train", "--config", config, "--set", "parallel.mode=none",
           "log.progress_bar=false", f"log.run_dir={run_dir}", "checkpoint.resume=false", *extra, *sets]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-800:], "wall_s": time.time() - t0}
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and not r.get("summary")]
    vals = [r for r in recs if "val_loss" in r]
    summ = next(r for r in recs if r.get("summary"))
    first, last = steps[0]["loss"], steps[-1]["loss"]
    return {"losses": [r["loss"] for r in steps], "first_loss": first, "final_loss": last,
            "final_val_loss": vals[-1]["val_loss"] if vals else None,
            "diverged": not math.isfinite(last) or last > first, "tokens_per_s": summ.get("tokens_per_s"),
            "clipped": summ.get("total_clipped"), "wall_s": time.time() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--out", default="docs/quality_cpu")
    ap.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--spike-every", type=int, default=25)
    ap.add_argument("--spike-scale", type=float, default=1000.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs-dir", default="runs/quality")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--set", nargs="*", default=[], help="extra trainer overrides for every run")
    args = ap.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    results = {}
    for name in args.methods.split(","):
        for lr in lrs:
            key = f"{name}|lr={lr:g}"
            sets = METHODS[name] + [f"optim.lr={lr}", f"train.steps={args.steps}", f"eval.every={args.steps}"]
            results[key] = run_one(args.config, sets, os.path.join(args.runs_dir, key.replace("|", "_")),
                                   args.timeout, args.set)
            print(key, {k: v for k, v in results[key].items() if k != "losses"}, flush=True)
        key = f"{name}|spike"
        sets = METHODS[name] + [f"optim.lr={lrs[0]}", f"train.steps={args.steps}", f"eval.every={args.steps}",
                                f"train.inject_spike_every={args.spike_every}",
                                f"train.inject_spike_scale={args.spike_scale}"]
        results[key] = run_one(args.config, sets, os.path.join(args.runs_dir, key.replace("|", "_")), args.timeout,
                               args.set)
        print(key, {k: v for k, v in results[key].items() if k != "losses"}, flush=True)
    meta = {"config": args.config, "steps": args.steps, "lrs": lrs, "spike_every": args.spike_every,
            "spike_scale": args.spike_scale, "python": sys.version.split()[0]}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    names = args.methods.split(",")
    lines = [f"Final validation loss after {args.steps} steps (`{args.config}`, one process, same seed and data; "
             "'div' = final training loss above the first or not finite):\n",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + f" | spike x{args.spike_scale:g} every "
             f"{args.spike_every} (lr {lrs[0]:g}) | tokens/s |", "|---" * (len(lrs) + 3) + "|"]
    for name in names:
        cells = []
        for key in [f"{name}|lr={lr:g}" for lr in lrs] + [f"{name}|spike"]:
            r = results[key]
            cells.append("error" if "error" in r else
                         ("div" if r["diverged"] else f"{r['final_val_loss']:.3f}"))
        tps = results[f"{name}|lr={lrs[0]:g}"].get("tokens_per_s") or float("nan")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {tps:,.0f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        ys = [results[f"{name}|lr={lr:g}"].get("final_val_loss") for lr in lrs]
        ys = [y if y is not None and math.isfinite(y) else float("nan") for y in ys]
        a.plot(lrs, ys, marker="o", label=name)
        r = results[f"{name}|spike"]
        if "losses" in r:
            b.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name)
    a.set_xscale("log")
    a.set_xlabel("peak learning rate")
    a.set_ylabel("final validation loss")
    a.set_title("LR sweep")
    b.set_xlabel("step")
    b.set_ylabel("training loss")
    b.set_yscale("log")
    b.set_title(f"gradient x{args.spike_scale:g} every {args.spike_every} steps")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)


if __name__ == "__main__":
    main()
