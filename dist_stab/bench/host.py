"""Host (Python) cost of a transform step with many tensors, measured on CPU.

    python -m dist_stab.bench.host --counts 1000,5000,20000
    python -m dist_stab.bench.host --counts 20000 --set-to-none
    python -m dist_stab.bench.host --counts 20000 --path fallback --profile
    python -m dist_stab.bench.host --counts 1000,5000,20000 --persistent-grads

``--path triton`` (default): the CUDA path's host code (``dist_stab.kernels.multi_tensor``) on CPU
tensors with its two kernel launches stubbed out, so the time is what a GPU step costs the host
(needs Triton importable; sets ``DIST_STAB_TRITON_CPU=1 TRITON_INTERPRET=1``). ``--path fallback``:
the ``torch._foreach_*`` path that really runs on CPU, and, for comparison, torch's own
``_foreach_norm`` + ``_foreach_mul_`` on the same tensors (C++ per-tensor cost, not ours).
``--persistent-grads``: the transforms built with ``persistent_grads=True`` (first and last grad checked).
``--set-to-none``: every step sees new gradient tensors (``zero_grad(set_to_none=True)``);
otherwise the same ones. Times are CPU time of this process (one torch thread; nothing waits on CPU,
so it equals wall time on an idle machine and stays steady on a shared one). Each cell: best (median)
of ``--iters`` steps after two untimed ones; the median includes garbage-collector pauses.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch

import dist_stab as ds

METHODS = {"AdaGC": lambda named: ds.AdaGC(named, warmup_steps=0),
           "GradientStabilizer": lambda named: ds.GradientStabilizer(named),
           "GlobalClip": lambda named: ds.GlobalClip(named, max_norm=1e6)}


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton() -> None:
    os.environ.update(DIST_STAB_TRITON_CPU="1", TRITON_INTERPRET="1")
    from dist_stab.kernels import multi_tensor
    multi_tensor._sumsq_kernel = multi_tensor._scale_kernel = _NoLaunch()


def setup(n: int, shape, make, persistent_grads: bool = False):
    params = [torch.nn.Parameter(torch.zeros(shape)) for _ in range(n)]
    grads = [torch.randn(shape) * 1e-2 for _ in range(n)]
    for p, g in zip(params, grads):
        p.grad = g
    t = make([(f"p{i}", p) for i, p in enumerate(params)])
    t.persistent_grads = persistent_grads
    return params, grads, t


def best_median(times):
    return min(times), statistics.median(times)


def time_steps(t, params, grads, iters: int, set_to_none: bool):
    times = []
    for i in range(iters + 2):
        if set_to_none:  # untimed: new gradient objects, as after zero_grad(set_to_none=True) + backward
            for p, g in zip(params, grads):
                p.grad = g.clone()
        t0 = time.process_time()
        t.step()
        if i >= 2:
            times.append((time.process_time() - t0) * 1e3)
    return best_median(times)


def foreach_floor(grads, iters: int):
    """torch's own per-tensor C++ cost: ``_foreach_norm`` + ``_foreach_mul_`` by per-tensor factors."""
    factors = list(torch.full((len(grads),), 0.5).unbind())
    times = []
    for _ in range(iters):
        t0 = time.process_time()
        torch._foreach_norm(grads, 2)
        torch._foreach_mul_(grads, factors)
        times.append((time.process_time() - t0) * 1e3)
    return best_median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1000,5000,20000")
    ap.add_argument("--shape", default="4,4", help="shape of every tensor (small: the time is host time)")
    ap.add_argument("--path", default="triton", choices=["triton", "fallback"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--set-to-none", action="store_true")
    ap.add_argument("--no-pointer-check", action="store_true",
                    help="GradTransform.check_pointers = False: identity check only (see dist_stab.transforms.base)")
    ap.add_argument("--persistent-grads", action="store_true", help="transforms with persistent_grads=True")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--profile", action="store_true", help="cProfile 5 steps of the first method at the last count")
    args = ap.parse_args(argv)
    ds.GradTransform.check_pointers = not args.no_pointer_check
    torch.set_num_threads(1)
    if args.path == "triton":
        stub_triton()
    shape = tuple(int(s) for s in args.shape.split(","))
    methods = args.methods.split(",")
    print(f"# host ms per step, path {args.path}, shape {shape}, "
          f"{'new grads every step' if args.set_to_none else 'same grads'}"
          f"{', no pointer check' if args.no_pointer_check else ''}"
          f"{', persistent_grads' if args.persistent_grads else ''}, best (median) of {args.iters}")
    print("| tensors | " + " | ".join(methods) + (" | torch foreach norm+mul |" if args.path == "fallback" else " |"))
    print("|---" * (len(methods) + 1 + (args.path == "fallback")) + "|")
    for n in [int(c) for c in args.counts.split(",")]:
        row = []
        for name in methods:
            params, grads, t = setup(n, shape, METHODS[name], args.persistent_grads)
            row.append(time_steps(t, params, grads, args.iters, args.set_to_none))
        if args.path == "fallback":
            row.append(foreach_floor([p.grad for p in params], args.iters))
        print(f"| {n} | " + " | ".join(f"{lo:.2f} ({med:.2f})" for lo, med in row) + " |")
    if args.profile:
        params, grads, t = setup(n, shape, METHODS[methods[0]], args.persistent_grads)
        prof = cProfile.Profile(time.process_time)
        prof.runcall(time_steps, t, params, grads, 5, args.set_to_none)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
