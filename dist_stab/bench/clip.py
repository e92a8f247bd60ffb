"""Cost of one clipping step on the same gradients: torch ``clip_grad_norm_`` vs dist_stab transforms.

    python -m dist_stab.bench.clip --device cuda --shapes 1b --json docs/bench_clip_1b.json
    python -m dist_stab.bench.clip --device cuda --shapes many --json docs/bench_clip_many.json
    python -m dist_stab.bench.clip --device cuda --shapes many --counts 1000,5000,20000 --set-to-none

``--shapes 1b``: the tensors of a LLaMA-1B (d 2048, 24 layers, ff 5461, vocab 32000, untied
lm_head). ``--shapes many``: 1k..20k small tensors (an MoE-like count), to see how the cost grows
with the tensor count. Every iteration restores the same gradients (untimed) and times only the
clipping call with CUDA events (median of ``--iters``); ratios are taken inside one run. The host
column is the time until the call returns, from a synchronized start: the Python/launch cost (when it
is close to the CUDA-event time, the step is host bound). ``--set-to-none``: every iteration gives the
parameters new gradient tensors (as ``zero_grad(set_to_none=True)`` + backward) instead of copying into
the same ones. Regimes: AdaGC "steady" (no tensor above its threshold: the usual step) and "all clipped".
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dist_stab as ds


def llama_shapes(d=2048, layers=24, ff=5461, vocab=32000):
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


SHAPES = {
    "1b": lambda: llama_shapes(),
    "tiny": lambda: llama_shapes(d=64, layers=2, ff=172, vocab=256),
}


def make_grads(shapes, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=g) * 1e-2 for s in shapes]
    return params, grads


def timeit(fn, restore, iters, device):
    """Medians of (ms by CUDA events, host ms until ``fn`` returns); on CPU both are wall time."""
    times, host = [], []
    for i in range(iters + 3):
        restore()
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            t0 = time.perf_counter()
            fn()
            h = (time.perf_counter() - t0) * 1e3
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e)
        else:
            t0 = time.perf_counter()
            fn()
            ms = h = (time.perf_counter() - t0) * 1e3
        if i >= 3:
            times.append(ms)
            host.append(h)
    return statistics.median(times), statistics.median(host)


def bench(shapes, device, dtype, iters, set_to_none=False):
    params, grads = make_grads(shapes, device, dtype)
    for p, g in zip(params, grads):
        p.grad = g.clone()

    def restore():
        if set_to_none:  # new gradient objects, as zero_grad(set_to_none=True) + backward give
            for p, g in zip(params, grads):
                p.grad = g.clone()
        else:
            torch._foreach_copy_([p.grad for p in params], grads)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    rows = {}
    rows["torch clip_grad_norm_"] = timeit(lambda: torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True),
                                           restore, iters, device)
    gc = ds.GlobalClip(named, max_norm=1e-3)
    rows["GlobalClip"] = timeit(gc.step, restore, iters, device)
    ada = ds.AdaGC(named, warmup_steps=0)
    restore()
    ada.step()  # seeds gamma
    def steady():
        ada.state["gamma"].fill_(1e30)
        ada.step()
    def clipped():
        ada.state["gamma"].fill_(1e-30)
        ada.step()
    rows["AdaGC (steady, none clipped)"] = timeit(steady, restore, iters, device)
    rows["AdaGC (all clipped)"] = timeit(clipped, restore, iters, device)
    gs = ds.GradientStabilizer(named)
    rows["GradientStabilizer"] = timeit(gs.step, restore, iters, device)
    zc = ds.ZClip(named, warmup_steps=1)
    rows["ZClip"] = timeit(zc.step, restore, iters, device)
    base = rows["torch clip_grad_norm_"][0]
    return {k: {"ms": ms, "host_ms": h, "ratio_vs_torch_clip": ms / base} for k, (ms, h) in rows.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="1b", choices=["1b", "tiny", "many"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--counts", default="1000,5000,10000,20000", help="tensor counts for --shapes many")
    ap.add_argument("--set-to-none", action="store_true", help="new gradient tensors every iteration")
    ap.add_argument("--no-pointer-check", action="store_true",
                    help="GradTransform.check_pointers = False: identity check only (see dist_stab.transforms.base)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ds.GradTransform.check_pointers = not args.no_pointer_check
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "shapes": args.shapes, "iters": args.iters,
            "set_to_none": args.set_to_none, "pointer_check": not args.no_pointer_check}
    results = {}
    if args.shapes == "many":
        for n in [int(c) for c in args.counts.split(",")]:
            results[str(n)] = bench([(128, 64)] * n, device, dtype, args.iters, args.set_to_none)
    else:
        shapes = SHAPES[args.shapes]()
        info["num_tensors"] = len(shapes)
        info["num_elements"] = sum(torch.Size(s).numel() for s in shapes)
        results[args.shapes] = bench(shapes, device, dtype, args.iters, args.set_to_none)
    print(f"# clip step cost, {info['device']}, torch {info['torch']}, {args.dtype} grads, median of {args.iters}"
          f"{', new grads every step' if args.set_to_none else ''}"
          f"{', no pointer check' if args.no_pointer_check else ''}")
    for key, rows in results.items():
        print(f"\n## {key} tensors" if args.shapes == "many" else f"\n## shapes {key}: "
              f"{info.get('num_tensors')} tensors, {info.get('num_elements', 0) / 1e9:.3f} B elements")
        print(f"| method | ms | host ms | x torch clip_grad_norm_ |\n|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['ms']:.3f} | {r['host_ms']:.3f} | {r['ratio_vs_torch_clip']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
