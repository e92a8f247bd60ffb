"""``python -m dist_stab.plot RUN_DIR [RUN_DIR ...] [-o out.png]``: compare training runs on one figure.

Panels: training loss (and validation loss as markers; skipped steps as crosses; injected gradient spikes,
``train.inject_spike_every``, as dashed lines), pre-clip global gradient norm (log scale), tensors clipped
per step, and learning rate. Reads each run's ``metrics.jsonl`` (written
by ``python -m dist_stab.train``); needs matplotlib (the ``train`` extra).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _smooth(ys: List[float], k: int) -> List[float]:
    if k <= 1:
        return ys
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(run_dirs, out: Optional[str] = None, smooth: int = 1, title: Optional[str] = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dist_stab.train.report import load_run

    runs = [load_run(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_loss, ax_norm, ax_clip, ax_lr = axes.flat
    for i, r in enumerate(runs):
        label = r["summary"].get("name") or Path(r["dir"]).name
        color = f"C{i}"
        st = r["steps"]
        x = [s["step"] for s in st]
        ax_loss.plot(x, _smooth([s["loss"] for s in st], smooth), color=color, lw=1.2, label=f"{label} (train)")
        if r["val"]:
            ax_loss.plot([v["step"] for v in r["val"]], [v["val_loss"] for v in r["val"]], "o--", color=color,
                         ms=5, lw=0.8, label=f"{label} (val)")
        if st and "grad_norm" in st[0]:
            ax_norm.plot(x, [s["grad_norm"] for s in st], color=color, lw=1.0, label=label)
        if st and "num_clipped" in st[0]:
            ax_clip.plot(x, [s["num_clipped"] for s in st], color=color, lw=1.0, drawstyle="steps-mid",
                         label=label)
            bad = [s["step"] for s in st if s.get("num_nonfinite", 0)]
            for b in bad:
                ax_norm.axvline(b, color=color, ls=":", lw=0.8)
        ax_lr.plot(x, [s["lr"] for s in st], color=color, lw=1.0, label=label)
        skipped = [s for s in st if s.get("skipped")]
        if skipped:
            ax_loss.plot([s["step"] for s in skipped], [s["loss"] if s["loss"] == s["loss"] else float("nan")
                                                         for s in skipped], "x", color=color, ms=8, mew=2,
                         label=f"{label} (skipped step)")
    tr = next((r["config"].get("train", {}) for r in runs if r.get("config")), {})
    every, last = int(tr.get("inject_spike_every") or 0), max((s["step"] for r in runs for s in r["steps"]), default=0)
    for k, step in enumerate(range(every, last + 1, every) if every else []):
        for ax in (ax_loss, ax_norm):
            ax.axvline(step, color="0.6", ls="--", lw=0.8, label="injected gradient spike" if k == 0 and ax is ax_loss
                       else None)
    ax_loss.set(title="loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax_norm.set(title="global gradient norm (before the transform)", xlabel="step", yscale="log")
    ax_clip.set(title="tensors clipped per step", xlabel="step")
    ax_lr.set(title="learning rate", xlabel="step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or " vs ".join(r["summary"].get("name") or Path(r["dir"]).name for r in runs))
    fig.tight_layout()
    path = Path(out) if out else Path(run_dirs[0]).parent / "compare.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dist_stab.plot", description=__doc__)
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("-o", "--out", help="PNG path (default: <parent of the first run>/compare.png)")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over N steps for the loss")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    path = plot_runs(args.runs, args.out, args.smooth, args.title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
