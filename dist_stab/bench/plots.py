"""Draw the step-cost and memory benchmarks recorded in ``docs/`` as PNG plots.

    python -m dist_stab.bench.plots --docs docs

Reads the JSON the benchmarks wrote (``bench_clip_1b_fp32.json``, ``bench_clip_fold_1b.json``,
``bench_clip_many{,_noptr,_persistent}.json``, ``bench_optim_1b_fp32.json``,
``bench_memory.json``) and writes ``bench_clip.png``, ``bench_optim.png`` and ``bench_memory.png``
next to them. The figures show the numbers in the JSON, nothing else; a missing JSON skips its figure.
Needs matplotlib (the ``train`` extra).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CLIP_TARGET = 0.4  # per-tensor clipping <= 0.4x torch clip_grad_norm_
MANY_TARGET_MS = 5.0  # 20,000 tensors under 5 ms


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def clip_series(docs: Path) -> Dict[str, object]:
    """The series of bench_clip.png: 1B ratios, folded overheads, and ms vs tensor count."""
    out: Dict[str, object] = {}
    one_b = _load(docs / "bench_clip_1b_fp32.json")
    if one_b:
        out["device"] = one_b["info"]["device"]
        rows = one_b["results"]["1b"]
        out["1b"] = [(k, r["ratio_vs_torch_clip"]) for k, r in rows.items()]
    fold = _load(docs / "bench_clip_fold_1b.json")
    if fold:
        out["fold"] = [(k, r["overhead_vs_torch_clip"]) for k, r in fold["results"].items()
                       if r["overhead_vs_torch_clip"] is not None]
    many: Dict[str, List[Tuple[int, float]]] = {}
    for name, label in (("bench_clip_many.json", ""), ("bench_clip_many_noptr.json", ", no pointer check"),
                        ("bench_clip_many_persistent.json", ", persistent_grads")):
        d = _load(docs / name)
        if not d:
            continue
        for method in ("torch clip_grad_norm_", "AdaGC (steady, none clipped)", "GradientStabilizer"):
            if method == "torch clip_grad_norm_" and label:
                continue
            many[method + label] = sorted((int(n), rows[method]["ms"]) for n, rows in d["results"].items())
    if many:
        out["many"] = many
    return out


def optim_series(docs: Path) -> Optional[Tuple[str, List[Tuple[str, float, float]]]]:
    """(what ran where, [(optimizer, isolated ms, roofline ms)]) of bench_optim_1b_fp32.json."""
    d = _load(docs / "bench_optim_1b_fp32.json")
    if not d:
        return None
    return f"{d['device']}, {d['n_params'] / 1e9:.2f} B {d['dtype']} params", [
        (k, r["median_ms"], r["roofline_ms"]) for k, r in d["results"].items()]


def memory_series(docs: Path) -> Optional[List[Tuple[str, float, float, float]]]:
    """(model, AdamW GB, SCALE GB, StableSPAM GB), bf16 weights + state, of bench_memory.json."""
    d = _load(docs / "bench_memory.json")
    if not d:
        return None
    return [(m, r["AdamW_bf16_GB"], r["SCALE_bf16_GB"], r["StableSPAM_bf16_GB"]) for m, r in d.items()
            if isinstance(r, dict) and "AdamW_bf16_GB" in r]


def _barh(ax, items: List[Tuple[str, float]], target: float, title: str, xlabel: str) -> None:
    names = [k for k, _ in items]
    vals = [v for _, v in items]
    colors = ["C2" if v <= target else "C3" for v in vals]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(target, color="k", ls="--", lw=1, label=f"target {target}x")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8, loc="lower right")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(docs: Path) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    clip = clip_series(docs)
    if clip:
        panels = [k for k in ("1b", "fold", "many") if k in clip]
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
        for ax, key in zip(axes[0], panels):
            if key == "1b":
                _barh(ax, clip["1b"], CLIP_TARGET, "clip step, LLaMA-1B shapes", "time / torch clip_grad_norm_")
            elif key == "fold":
                _barh(ax, clip["fold"], CLIP_TARGET, "clip + AdamW step: clip overhead",
                      "overhead / clip_grad_norm_'s overhead")
            else:
                for method, pts in clip["many"].items():
                    ax.plot([n for n, _ in pts], [ms for _, ms in pts], "o-", label=method)
                ax.axhline(MANY_TARGET_MS, color="k", ls="--", lw=1, label=f"target {MANY_TARGET_MS} ms")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("tensors ([128, 64] fp32)")
                ax.set_ylabel("ms per clip step")
                ax.set_title("many small tensors (grads kept across steps)", fontsize=10)
                ax.legend(fontsize=7)
        fig.suptitle(f"dist_stab clip step, {clip.get('device', '?')} (docs/benchmarks.md section 1)", fontsize=11)
        written.append(_save(fig, docs / "bench_clip.png"))
    found = optim_series(docs)
    if found:
        device, opt = found
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(opt))
        ax.bar([x - 0.2 for x in xs], [ms for _, ms, _ in opt], width=0.4, label="measured (isolated step)")
        ax.bar([x + 0.2 for x in xs], [rf for _, _, rf in opt], width=0.4, label="HBM roofline")
        base = opt[0][1]
        for x, (_, ms, _) in zip(xs, opt):
            ax.text(x - 0.2, ms, f"{ms / base:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [k for k, _, _ in opt])
        ax.set_ylabel("ms per step")
        ax.set_title(f"optimizer step vs fused AdamW, {device} (section 2)", fontsize=10)
        ax.legend(fontsize=8)
        written.append(_save(fig, docs / "bench_optim.png"))
    mem = memory_series(docs)
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(mem))
        for j, (name, off) in enumerate((("AdamW", -0.27), ("SCALE", 0.0), ("StableSPAM", 0.27))):
            ax.bar([x + off for x in xs], [row[1 + j] for row in mem], width=0.27, label=name)
        for x, row in zip(xs, mem):
            ax.text(x, row[2], f"{row[2] / row[1]:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [row[0] for row in mem])
        ax.set_ylabel("GB, bf16 weights + optimizer state")
        ax.set_title("optimizer memory (section 2b; label: SCALE / AdamW)", fontsize=10)
        ax.legend(fontsize=8)
        written.append(_save(fig, docs / "bench_memory.png"))
    return written


def main(argv=None) -> List[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default="docs", help="folder with the benchmark JSON; the PNGs are written there")
    args = ap.parse_args(argv)
    written = draw(Path(args.docs))
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
