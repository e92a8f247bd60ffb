"""Time one ``step()`` of SCALE, StableSPAM and SPAM against ``torch.optim.AdamW(fused=True)``.

    python -m dist_stab.bench.optim --device cuda --shapes 1b --json out.json
    python -m dist_stab.bench.optim --device cpu --shapes tiny            # smoke run

Parameters have the shapes of a LLaMA-1B (d 2048, 16 layers, ff 5632, vocab 32000, untied
lm_head: 0.95B parameters) in fp32 by default (``--dtype bf16`` for bf16 parameters and
gradients; AdamW and our optimizers then keep bf16 state). Gradients are random and fixed.
Each optimizer is built alone (the previous one is freed), run ``--warmup`` steps (the first
compiles the fused kernels), then ``--iters`` steps are timed one by one (CUDA events on
GPU, ``perf_counter`` on CPU) and the median is reported, with the ratio to AdamW measured in
the same run. An isolated step starts on an idle GPU, so its host time before and between
launches counts in full. "pipelined" times ``--iters`` steps back to back and divides: the host
runs ahead of the GPU, as in training, where the step is queued behind the backward pass.

Roofline: the bytes an optimizer must move per step divided by the peak memory bandwidth,
measured in the same run by a large device-to-device copy. Per element, with b = bytes of
the parameter dtype:

* AdamW, SPAM: read p, g, m, v and write p, m, v: 7b.
* StableSPAM: AdamW's 7b plus one read of g for max|g| and the sum of squares: 8b (the clipped
  sum of squares re-reads g only in chunks holding an entry above the AdaClip threshold: up to 9b).
* SCALE: matrices 3b (one pass: read g, p, write p; the row sums come from g in registers); the
  lm_head 5b (read g, m, p, write m, p); the embedding 4b (its column sums over the vocab need
  a pass of their own: read g; then read p, g, write p); 1-D params 7b (AdamW).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

SHAPES = {
    "1b": dict(d=2048, layers=16, ff=5632, vocab=32000),
    "tiny": dict(d=64, layers=2, ff=160, vocab=256),
}


def llama_shapes(d: int, layers: int, ff: int, vocab: int) -> List[Tuple[str, tuple]]:
    out = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,))]
        out += [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        out += [(p + "post_attention_layernorm.weight", (d,))]
        out += [(p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                (p + "mlp.down_proj.weight", (d, ff))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return out


def roofline_bytes(name: str, shapes: List[Tuple[str, tuple]], b: int) -> int:
    total = 0
    for n, s in shapes:
        numel = 1
        for x in s:
            numel *= x
        if name in ("AdamW", "SPAM"):
            per = 7
        elif name == "StableSPAM":
            per = 8
        else:  # SCALE
            per = 7 if len(s) == 1 else {"lm_head.weight": 5, "model.embed_tokens.weight": 4}.get(n, 3)
        total += per * b * numel
    return total


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time_many(self, fn: Callable[[], None], n: int) -> float:
        """Seconds per call of ``fn`` called ``n`` times back to back."""
        return self.time(lambda: [fn() for _ in range(n)]) / n

    def time(self, fn: Callable[[], None]) -> float:
        """Seconds for one call of ``fn``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure_bandwidth(device: torch.device, timer: Timer, nbytes: int, iters: int = 10) -> float:
    """Bytes/s of a device copy (read + write counted), median of ``iters``."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer.time(lambda: dst.copy_(src)) for _ in range(iters)]
    del src, dst
    return 2 * n * 4 / statistics.median(times)


def build_params(shapes, dtype, device, seed=0):
    """Parameters (normal 0.02, norm gains 1) and fixed random gradients, reproducible from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    named = []
    for n, s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
        with torch.no_grad():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
        p.grad = torch.empty_like(p).normal_(0.0, 1e-2, generator=gen)
        named.append((n, p))
    return named


def make_optimizer(name: str, named, fused):
    from dist_stab.optim import SCALE, SPAM, StableSPAM

    params = [p for _, p in named]
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=params[0].is_cuda or None)
    if name == "SCALE":
        return SCALE(named, lr=1e-3, adam_lr=1e-3, last_layer="lm_head.weight", fused=fused)
    if name == "StableSPAM":
        return StableSPAM(named, lr=1e-3, fused=fused)
    if name == "SPAM":
        return SPAM(named, lr=1e-3, fused=fused)
    raise ValueError(f"unknown optimizer {name!r}")


def profile_steps(opt, device: torch.device, name: str, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"--- profile {name} ({steps} steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def check_fused(device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """Max relative difference of the parameters after 3 steps: fused (compiled) vs eager kernels."""
    shapes = llama_shapes(**SHAPES["tiny"])
    out = {}
    for name in ("SCALE", "StableSPAM", "SPAM"):
        res = []
        for fused in (True, False):
            named = build_params(shapes, dtype, device)
            gen = torch.Generator(device=device).manual_seed(1)
            grads = [[torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * (1 + 10 * (s == 1))
                      for _, p in named] for s in range(3)]
            opt = make_optimizer(name, named, fused)
            for gs in grads:
                for (_, p), g in zip(named, gs):
                    p.grad = g
                opt.step()
            res.append([p.detach().clone() for _, p in named])
        out[name] = max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                        for a, b in zip(*res))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--optims", default="AdamW,SCALE,StableSPAM,SPAM")
    ap.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                    help="our element-wise kernels: torch.compile'd (on), eager (off), auto = on for CUDA")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bw-bytes", type=int, default=0, help="bytes per copy buffer (default 2 GiB on CUDA)")
    ap.add_argument("--check-fused", action="store_true", help="also compare fused vs eager results (tiny shapes)")
    ap.add_argument("--dynamic", default="false", choices=["false", "auto"],
                    help="torch.compile shapes of the fused kernels: static per shape (false) or automatic dynamic")
    ap.add_argument("--combo", default="on", choices=["on", "off"],
                    help="inductor combo_kernels (horizontal fusion) for our kernels")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of 3 profiled steps per optimizer")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    b = 4 if dtype == torch.float32 else 2
    fused = {"auto": None, "on": True, "off": False}[args.fused]
    from dist_stab.optim import _base
    _base.COMPILE_DYNAMIC = False if args.dynamic == "false" else None
    _base.COMPILE_OPTIONS = {"combo_kernels": True} if args.combo == "on" else {}
    shapes = llama_shapes(**SHAPES[args.shapes])
    n_params = sum(torch.Size(s).numel() for _, s in shapes)
    timer = Timer(device)
    bw_bytes = args.bw_bytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    peak_bw = measure_bandwidth(device, timer, bw_bytes)

    results: Dict[str, dict] = {}
    for name in [x.strip() for x in args.optims.split(",") if x.strip()]:
        named = build_params(shapes, dtype, device)
        opt = make_optimizer(name, named, fused)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        times = [timer.time(opt.step) for _ in range(args.iters)]
        piped = statistics.median(timer.time_many(opt.step, args.iters) for _ in range(3))
        if args.profile:
            profile_steps(opt, device, name)
        med = statistics.median(times)
        roof = roofline_bytes(name, shapes, b) / peak_bw
        results[name] = dict(median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
                             roofline_ms=roof * 1e3, time_over_roofline=med / roof, warmup_s=warm_s,
                             pipelined_ms=piped * 1e3, pipelined_over_roofline=piped / roof,
                             fused=getattr(opt, "fused", None))
        del opt, named
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results.get("AdamW", {}).get("median_ms")
    base_piped = results.get("AdamW", {}).get("pipelined_ms")
    for r in results.values():
        r["ratio_vs_adamw"] = r["median_ms"] / base if base else None
        r["pipelined_ratio_vs_adamw"] = r["pipelined_ms"] / base_piped if base_piped else None

    info = dict(compile_options=dict(_base.COMPILE_OPTIONS), dynamic=args.dynamic, device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=args.dtype, shapes=args.shapes, n_params=n_params,
                peak_bw_GBps=peak_bw / 1e9, warmup=args.warmup, iters=args.iters, results=results)
    if args.check_fused:
        info["fused_vs_eager_max_rel_diff"] = check_fused(device, dtype)

    print(f"device {info['device']}  torch {info['torch']}  {args.shapes}: {n_params / 1e9:.3f}B params, {args.dtype}; "
          f"copy bandwidth {peak_bw / 1e9:.0f} GB/s; median of {args.iters} steps after {args.warmup} warm-up")
    print(f"{'optimizer':<12}{'median ms':>11}{'min ms':>9}{'x AdamW':>9}{'roofline ms':>13}{'x roofline':>12}"
          f"{'pipelined ms':>14}{'x AdamW':>9}{'x roofline':>12}")
    for name, r in results.items():
        ratio = f"{r['ratio_vs_adamw']:.2f}" if r["ratio_vs_adamw"] is not None else "-"
        pratio = f"{r['pipelined_ratio_vs_adamw']:.2f}" if r["pipelined_ratio_vs_adamw"] is not None else "-"
        print(f"{name:<12}{r['median_ms']:>11.3f}{r['min_ms']:>9.3f}{ratio:>9}{r['roofline_ms']:>13.3f}"
              f"{r['time_over_roofline']:>12.2f}{r['pipelined_ms']:>14.3f}{pratio:>9}{r['pipelined_over_roofline']:>12.2f}")
    if args.check_fused:
        print("fused vs eager, max rel diff after 3 steps:", info["fused_vs_eager_max_rel_diff"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return info


if __name__ == "__main__":
    main()
