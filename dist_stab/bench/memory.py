"""Weights + optimizer state of LLaMA 60M..7B for AdamW, SCALE, StableSPAM (meta device, no allocation).

    python -m dist_stab.bench.memory --json docs/bench_memory.json

Counts with :func:`dist_stab.memory.predicted_state_bytes` on the trainer's models (vocab 32000, untied
lm_head) built on the meta device. Two conventions: bf16 weights and bf16 state (the SCALE paper's
tables: 0.15 vs 0.35 GB at 60M, 2.81 vs 8.04 GB at 1B) and fp32 weights and state.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..memory import predicted_state_bytes

SIZES = ("60M", "130M", "350M", "1B", "7B")
PAPER = {"60M": (0.15, 0.35), "1B": (2.81, 8.04)}  # SCALE, AdamW GB (bf16), arXiv 2506.16659


def measure(size: str, vocab: int = 32000, seq: int = 256):
    from ..optim import SCALE, StableSPAM
    from ..train.model import build_model, model_args

    model = build_model(model_args(size, vocab_size=vocab, max_seq_len=seq), device="meta")
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    opts = {"AdamW": torch.optim.AdamW(params, lr=1e-3), "SCALE": SCALE(model, lr=1e-3),
            "StableSPAM": StableSPAM(model.named_parameters(), lr=1e-3)}
    row = {"params": n}
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        w = n * torch.empty((), dtype=dtype).element_size()
        for name, opt in opts.items():
            row[f"{name}_{label}_GB"] = (w + predicted_state_bytes(opt, state_dtype=dtype)) / 1e9
        row[f"SCALE/AdamW_{label}"] = row[f"SCALE_{label}_GB"] / row[f"AdamW_{label}_GB"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--sizes", default=",".join(SIZES))
    args = ap.parse_args(argv)
    rows = {s: measure(s) for s in args.sizes.split(",")}
    print("| model | params | AdamW GB | SCALE GB | StableSPAM GB | SCALE/AdamW | paper SCALE vs AdamW | "
          "fp32: AdamW / SCALE GB |\n|---|---|---|---|---|---|---|---|")
    for s, r in rows.items():
        paper = f"{PAPER[s][0]} vs {PAPER[s][1]}" if s in PAPER else "-"
        print(f"| {s} | {r['params'] / 1e6:.0f}M | {r['AdamW_bf16_GB']:.2f} | {r['SCALE_bf16_GB']:.2f} | "
              f"{r['StableSPAM_bf16_GB']:.2f} | {r['SCALE/AdamW_bf16']:.2f} | {paper} | "
              f"{r['AdamW_fp32_GB']:.2f} / {r['SCALE_fp32_GB']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
