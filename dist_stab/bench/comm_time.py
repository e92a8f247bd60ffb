"""Wall time of the clipping step and of its collectives on N ranks, against the alpha-beta model.

    torchrun --nproc_per_node 8 -m dist_stab.bench.comm_time --layout fsdp --shapes 1b --json docs/comm_time_fsdp8.json
    torchrun --nproc_per_node 8 -m dist_stab.bench.comm_time --layout fsdp_tp --tp 4 --shapes 1b
    torchrun --nproc_per_node 2 -m dist_stab.bench.comm_time --layout fsdp --shapes tiny   # CPU: gloo, a dry run

Every rank holds the tensors of ``--shapes`` (LLaMA-1B, as ``dist_stab.bench.clip``) as DTensors on the layout's
mesh: ``fsdp`` Shard(0) over all ranks; ``tp`` Shard(0) / Shard(1) alternating over all ranks (1-D tensors
replicated); ``fsdp_tp`` a (world/tp, tp) mesh, Shard(0) over dp and Shard(1) over tp. Gradients are random. Then:

1. bare all-reduces of the sizes the transforms send (8 bytes per tensor: sum of squares and presence) over each process group
   they use, timed, next to ``dist_stab.bench.cost_model.allreduce_s`` for the same size and group (intra-node
   link figures: the model's prediction for one node of GPUs);
2. one clip step of torch ``clip_grad_norm_`` (foreach), GlobalClip, AdaGC exact (steady: nothing clipped),
   AdaGC shard_local and GradientStabilizer (its factors folded: no rescale pass), timed, with the collectives
   it issued (``CommDebugMode``: c10d and DTensor's own).

Timing: a barrier, then the call between CUDA events (wall clock on CPU); the median over ``--iters`` per rank,
then the MAX over ranks (the slowest rank is the step's time). On CPU the backend is gloo and the times say
nothing about GPUs: that run checks the script (tests/test_comm_time.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from .clip import SHAPES
from .cost_model import allreduce_s


def _placements(layout: str, shape, i: int):
    from torch.distributed.tensor import Replicate, Shard

    if layout == "fsdp":
        return [Shard(0)]
    if layout == "tp":
        return [Shard(i % 2)] if len(shape) == 2 else [Replicate()]
    return [Shard(0), Shard(1)] if len(shape) == 2 else [Shard(0), Replicate()]  # fsdp_tp: (dp, tp)


def build(layout: str, shapes, device: torch.device, tp: int = 2):
    """(mesh, named DTensor parameters with random DTensor gradients) on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, empty

    world = dist.get_world_size()
    if layout == "fsdp_tp":
        if world % tp:
            raise ValueError(f"fsdp_tp needs the world size ({world}) divisible by --tp ({tp})")
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp" if layout == "fsdp" else "tp",))
    gen = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
    named = []
    for i, shape in enumerate(shapes):
        pl = _placements(layout, shape, i)
        p = torch.nn.Parameter(empty(*shape, device_mesh=mesh, placements=pl))
        local = torch.randn(p._local_tensor.shape, device=device, generator=gen) * 1e-2
        p.grad = DTensor.from_local(local, mesh, pl, shape=p.shape, stride=p.stride(), run_check=False)
        named.append((f"p{i}", p))
    return mesh, named


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], iters: int, device: torch.device, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``iters`` calls, each after a barrier; the MAX of the medians over ranks."""
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        _sync(device)
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            ms = s.elapsed_time(e)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    med = torch.tensor([statistics.median(times)], device=device, dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def _collectives(fn: Callable[[], object]) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as cm:
        fn()
    return int(cm.get_total_counts())


def measure(layout: str = "fsdp", shapes: str = "tiny", iters: int = 20, tp: int = 2) -> dict:
    """Run in an initialised process group; returns the rows (identical on every rank)."""
    import dist_stab as ds

    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    mesh, named = build(layout, SHAPES[shapes](), device, tp)
    params = [p for _, p in named]
    n_tensors = len(params)
    groups = ([("world", None)] if mesh.ndim == 1 else
              [(f"{name} ({mesh.size(i)} ranks)", mesh.get_group(i)) for i, name in enumerate(mesh.mesh_dim_names)])
    rows: List[Dict] = []
    for gname, group in groups:
        size = dist.get_world_size(group)
        for nbytes in (4, 8 * n_tensors):  # a scalar; the transforms' (sum of squares, presence) vector
            buf = torch.zeros(nbytes // 4, device=device)
            ms = time_ms(lambda: dist.all_reduce(buf, group=group), iters, device)
            rows.append({"kind": "all_reduce", "group": gname, "ranks": size, "bytes": nbytes, "ms": ms,
                         "model_ms": allreduce_s(size, nbytes, False) * 1e3})
    methods = {
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
        "GlobalClip": ds.GlobalClip(named, max_norm=1e9).step,
        "AdaGC exact (steady)": ds.AdaGC(named, warmup_steps=0, lambda_rel=1e30).step,
        "AdaGC shard_local (steady)": ds.AdaGC(named, warmup_steps=0, lambda_rel=1e30, mode="shard_local").step,
    }
    gs = ds.GradientStabilizer(named)
    gs.apply_factors = False  # folded into the optimizer (dist_stab.optim.AdamW), as wrap() runs it
    methods["GradientStabilizer (folded)"] = gs.step
    for name, fn in methods.items():
        try:
            fn()  # first step: plans, layouts, AdaGC's gamma seed
            rows.append({"kind": "clip", "method": name, "collectives": _collectives(fn),
                         "ms": time_ms(fn, iters, device)})
        except Exception as exc:  # noqa: BLE001 - e.g. torch's clip on a mesh it cannot handle: a row saying so
            rows.append({"kind": "clip", "method": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
    info = {"layout": layout, "shapes": shapes, "tensors": n_tensors, "world": dist.get_world_size(),
            "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape)), "backend": dist.get_backend(), "iters": iters,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    return {"info": info, "rows": rows}


def format_report(res: dict) -> str:
    i = res["info"]
    out = [f"# clip-step communication, {i['world']} x {i['device']} ({i['backend']}), layout {i['layout']} "
           f"{i['mesh']}, {i['tensors']} tensors ({i['shapes']}), median of {i['iters']}, MAX over ranks", "",
           "| all-reduce over | ranks | bytes | measured ms | model ms (intra-node) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] == "all_reduce":
            out.append(f"| {r['group']} | {r['ranks']} | {r['bytes']} | {r['ms']:.4f} | {r['model_ms']:.4f} |")
    out += ["", "| clip step | collectives | ms |", "|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] == "clip":
            out.append(f"| {r['method']} | - | {r['error']} |" if "error" in r else
                       f"| {r['method']} | {r['collectives']} | {r['ms']:.4f} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="fsdp", choices=["fsdp", "tp", "fsdp_tp"])
    ap.add_argument("--shapes", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--tp", type=int, default=2, help="fsdp_tp: the TP degree")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        res = measure(args.layout, args.shapes, args.iters, args.tp)
        if dist.get_rank() == 0:
            print(format_report(res))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
    finally:
        dist.destroy_process_group()
    return res


if __name__ == "__main__":
    main()
