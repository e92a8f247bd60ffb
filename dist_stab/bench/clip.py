"""Cost of one clipping step on the same gradients: torch ``clip_grad_norm_`` vs dist_stab transforms.

    python -m dist_stab.bench.clip --device cuda --shapes 1b --json docs/bench_clip_1b.json
    python -m dist_stab.bench.clip --device cuda --shapes many --json docs/bench_clip_many.json
    python -m dist_stab.bench.clip --device cuda --shapes many --counts 1000,5000,20000 --set-to-none
    python -m dist_stab.bench.clip --device cuda --shapes many --counts 1000,5000,20000 --persistent-grads
    python -m dist_stab.bench.clip --device cuda --shapes 1b --with-optimizer --json docs/bench_clip_fold_1b.json

``--shapes 1b``: the tensors of a LLaMA-1B (d 2048, 24 layers, ff 5461, vocab 32000, untied
lm_head). ``--shapes many``: 1k..20k small tensors (an MoE-like count), to see how the cost grows
with the tensor count. Every iteration restores the same gradients (untimed) and times only the
clipping call with CUDA events (median of ``--iters``); ratios are taken inside one run. The host
column is the time until the call returns, from a synchronized start: the Python/launch cost (when it
is close to the CUDA-event time, the step is host bound). ``--set-to-none``: every iteration gives the
parameters new gradient tensors (as ``zero_grad(set_to_none=True)`` + backward) instead of copying into
the same ones. Regimes: AdaGC "steady" (no tensor above its threshold: the usual step) and "all clipped".

``--with-optimizer``: the clip step together with the AdamW step that follows it, through ``dist_stab.wrap``:
torch ``clip_grad_norm_`` + torch fused AdamW against each transform in place + torch fused AdamW, and folded
into :class:`dist_stab.optim.AdamW` (the transform's factors read by the optimizer's kernel instead of a
rescale pass). The clip overhead of a row is its time minus the time of its optimizer alone; its ratio is
taken against the overhead of ``clip_grad_norm_`` (the "folded" rows also carry any difference between
dist_stab's and torch's AdamW kernels, since they are measured against torch's fused AdamW alone). The rows
are timed round robin (each iteration times every row once), so a drift of the GPU's speed during the run hits
all rows alike.
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


def timeit(fn, restore, iters, device, warmup=3):
    """Medians of (ms by CUDA events, host ms until ``fn`` returns) over ``iters`` calls after ``warmup``;
    on CPU both are wall time."""
    times, host = [], []
    for i in range(iters + warmup):
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
        if i >= warmup:
            times.append(ms)
            host.append(h)
    return statistics.median(times), statistics.median(host)


def bench(shapes, device, dtype, iters, set_to_none=False, persistent_grads=False):
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
    kw = {"persistent_grads": True} if persistent_grads else {}
    gc = ds.GlobalClip(named, max_norm=1e-3, **kw)
    rows["GlobalClip"] = timeit(gc.step, restore, iters, device)
    ada = ds.AdaGC(named, warmup_steps=0, **kw)
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
    gs = ds.GradientStabilizer(named, **kw)
    rows["GradientStabilizer"] = timeit(gs.step, restore, iters, device)
    gs_folded = ds.GradientStabilizer(named, **kw)
    gs_folded.apply_factors = False  # what wrap() sets when it folds the factors into dist_stab.optim.AdamW
    rows["GradientStabilizer folded (no rescale pass)"] = timeit(gs_folded.step, restore, iters, device)
    zc = ds.ZClip(named, warmup_steps=1, **kw)
    rows["ZClip"] = timeit(zc.step, restore, iters, device)
    base = rows["torch clip_grad_norm_"][0]
    return {k: {"ms": ms, "host_ms": h, "ratio_vs_torch_clip": ms / base} for k, (ms, h) in rows.items()}


def bench_with_optimizer(shapes, device, dtype, iters):
    """(clip + AdamW) step times; see the module docstring."""
    from dist_stab.optim import AdamW

    params, grads = make_grads(shapes, device, dtype)
    for p, g in zip(params, grads):
        p.grad = g.clone()

    def restore():
        torch._foreach_copy_([p.grad for p in params], grads)

    named = [(f"p{i}", p) for i, p in enumerate(params)]
    fused = device.type == "cuda"
    torch_adamw = torch.optim.AdamW(params, lr=1e-6, fused=fused or None)
    ds_adamw = AdamW(params, lr=1e-6)

    def clip_then_torch():
        torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True)
        torch_adamw.step()
    fns = {"torch fused AdamW alone": torch_adamw.step, "dist_stab AdamW alone": ds_adamw.step,
           "torch clip_grad_norm_ + torch AdamW": clip_then_torch}
    makers = {"GradientStabilizer": lambda: ds.GradientStabilizer(named),
              "AdaGC (steady)": lambda: ds.AdaGC(named, warmup_steps=0, lambda_rel=1e30),
              "AdaGC (all clipped)": lambda: ds.AdaGC(named, warmup_steps=0, lambda_rel=1.0 + 1e-6)}
    for name, make in makers.items():
        for label, opt, fold in (("in place + torch AdamW", torch_adamw, False),
                                 ("folded into dist_stab AdamW", ds_adamw, True)):
            w = ds.wrap(opt, make(), fold=fold)
            restore()
            w.step()  # AdaGC: seeds gamma (the regime holds from the next step on)
            if name == "AdaGC (all clipped)":
                w.transforms[0].state["gamma"].fill_(1e-30)
            fns[f"{name} {label}"] = w.step
    # round robin: every iteration times each row once, so drifts of the GPU's speed hit all rows alike
    per_row = {k: ([], []) for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            ms, h = timeit(fn, restore, 1, device, warmup=0 if per_row[k][0] else 3)
            per_row[k][0].append(ms)
            per_row[k][1].append(h)
    rows = {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in per_row.items()}
    alone = {"torch": rows["torch fused AdamW alone"][0], "dist_stab": rows["dist_stab AdamW alone"][0]}
    clip_over = rows["torch clip_grad_norm_ + torch AdamW"][0] - alone["torch"]
    out = {}
    for k, (ms, h) in rows.items():
        over = None if "alone" in k else ms - alone["torch"]
        out[k] = {"ms": ms, "host_ms": h, "overhead_ms": over,
                  "overhead_vs_torch_clip": None if over is None else over / clip_over}
    return out


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
    ap.add_argument("--persistent-grads", action="store_true",
                    help="transforms built with persistent_grads=True (first/last grad checked; see transforms.base)")
    ap.add_argument("--with-optimizer", action="store_true",
                    help="time clip + AdamW steps, incl. transforms folded into dist_stab.optim.AdamW")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ds.GradTransform.check_pointers = not args.no_pointer_check
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "shapes": args.shapes, "iters": args.iters,
            "set_to_none": args.set_to_none, "pointer_check": not args.no_pointer_check,
            "with_optimizer": args.with_optimizer, "persistent_grads": args.persistent_grads}
    results = {}
    if args.with_optimizer:
        shapes = SHAPES[args.shapes]() if args.shapes != "many" else [(128, 64)] * int(args.counts.split(",")[-1])
        info["num_tensors"] = len(shapes)
        info["num_elements"] = sum(torch.Size(s).numel() for s in shapes)
        res = bench_with_optimizer(shapes, device, dtype, args.iters)
        print(f"# clip + AdamW step, {info['device']}, torch {info['torch']}, {args.dtype}, {len(shapes)} tensors, "
              f"{info['num_elements'] / 1e9:.3f} B elements, median of {args.iters}")
        print("| step | ms | host ms | clip overhead ms | overhead x clip_grad_norm_'s |\n|---|---|---|---|---|")
        for name, r in res.items():
            over = "" if r["overhead_ms"] is None else f"{r['overhead_ms']:.3f}"
            ratio = "" if r["overhead_vs_torch_clip"] is None else f"{r['overhead_vs_torch_clip']:.2f}"
            print(f"| {name} | {r['ms']:.3f} | {r['host_ms']:.3f} | {over} | {ratio} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"info": info, "results": res}, f, indent=1)
        return info, res
    if args.shapes == "many":
        for n in [int(c) for c in args.counts.split(",")]:
            results[str(n)] = bench([(128, 64)] * n, device, dtype, args.iters, args.set_to_none,
                                    args.persistent_grads)
    else:
        shapes = SHAPES[args.shapes]()
        info["num_tensors"] = len(shapes)
        info["num_elements"] = sum(torch.Size(s).numel() for s in shapes)
        results[args.shapes] = bench(shapes, device, dtype, args.iters, args.set_to_none, args.persistent_grads)
    print(f"# clip step cost, {info['device']}, torch {info['torch']}, {args.dtype} grads, median of {args.iters}"
          f"{', new grads every step' if args.set_to_none else ''}"
          f"{', no pointer check' if args.no_pointer_check else ''}"
          f"{', persistent_grads' if args.persistent_grads else ''}")
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
