"""Communication report: the collectives of one clipping / optimizer step, counted, per method and layout.

    python -m dist_stab.bench.comm --world 4 --json docs/comm_report.json

Runs ``--world`` gloo processes on this machine (CPU), builds the trainer's tiny LLaMA on each
layout (FSDP2, HSDP, TP, FSDP x TP with DTensors; DeepSpeed ZeRO 1/2/3 when deepspeed is
installed), makes real gradients with one forward/backward, and counts every c10d collective
that one step of each method issues (``torch.distributed`` functions wrapped, plus
``CommDebugMode`` for DTensor's implicit ones). For each: collectives per step, bytes, the
process groups they span and whether one spans the whole world. ``torch clip_grad_norm_`` is
torch's own global clipping (it raises on models mixing meshes and plain tensors). Counts are
the same on a GPU with NCCL; wall times on GPUs: :mod:`dist_stab.bench.comm_time` (torchrun, NCCL).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import traceback
from datetime import timedelta

import torch

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
           "all_reduce_coalesced", "all_to_all_single", "reduce")


class Counter:
    """Counts c10d collectives (name, op, group ranks, bytes) and DTensor's implicit ones."""

    def __init__(self, only=None):
        self.only = only

    def __enter__(self):
        import torch.distributed as dist
        from torch.distributed.tensor.debug import CommDebugMode
        self.calls, self._orig = [], {}
        for n in WRAPPED:
            if hasattr(dist, n):
                self._orig[n] = getattr(dist, n)
                setattr(dist, n, self._wrap(n, self._orig[n]))
        self._cdm = CommDebugMode()
        self._cdm.__enter__()
        return self

    def _wrap(self, name, fn):
        import torch.distributed as dist

        def inner(tensor, *a, **k):
            if self.only is None or name in self.only:
                group = k.get("group")
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
                    range(dist.get_world_size()))
                nbytes = tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0
                op = k.get("op", a[0] if a and name == "all_reduce" else "sum")
                self.calls.append((name, str(op).split(".")[-1].lower(), ranks, nbytes))
            return fn(tensor, *a, **k)
        return inner

    def __exit__(self, *exc):
        import torch.distributed as dist
        self._cdm.__exit__(*exc)
        self.implicit = self._cdm.get_total_counts() - len(self.calls)
        for n, f in self._orig.items():
            setattr(dist, n, f)


def _model(layout, world, device):
    from dist_stab.train.config import ParallelConfig
    from dist_stab.train.model import build_model, model_args
    from dist_stab.train.parallelize import parallelize
    torch.manual_seed(0)
    args = model_args("tiny-test", vocab_size=512, max_seq_len=32)
    model = build_model(args, device=device)
    pc = {"fsdp": ParallelConfig(mode="fsdp"), "hsdp": ParallelConfig(mode="hsdp", dp_replicate=2),
          "tp": ParallelConfig(mode="tp", tp=world), "fsdp_tp": ParallelConfig(mode="fsdp_tp", tp=2),
          "ddp": ParallelConfig(mode="ddp")}[layout]
    par = parallelize(model, pc, device)
    return model, par.wrapper or model, args


def _grads(fwd, args, step=0):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, args.vocab_size, (2, 32), generator=g)
    logits = fwd(x)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()


def _row(method, layout, counter, world, err=None, implicit=True):
    if counter is not None and not implicit:
        counter.implicit = 0
    groups = sorted({(len(c[2]), c[2]) for c in counter.calls}) if counter else []
    return {
        "layout": layout, "method": method, "error": err,
        "collectives": None if err else len(counter.calls) + counter.implicit,
        "bytes": None if err else sum(c[3] for c in counter.calls) + 4 * counter.implicit,  # implicit: a scalar
        "ops": None if err else sorted({f"{c[0]}:{c[1]}" for c in counter.calls}),
        "group_sizes": [g[0] for g in groups],
        "spans_world": any(g[0] == world for g in groups) if world > 1 else False,
        "implicit_dtensor": 0 if err else counter.implicit,
    }


def _dtensor_rows(layout, world, device):
    import dist_stab as ds
    rows = []
    methods = {
        "GlobalClip": lambda m: ds.GlobalClip(m.named_parameters(), max_norm=1.0),
        "ZClip": lambda m: ds.ZClip(m.named_parameters(), warmup_steps=1),
        "AdaGC exact": lambda m: ds.AdaGC(m.named_parameters(), warmup_steps=0),
        "AdaGC shard_local": lambda m: ds.AdaGC(m.named_parameters(), warmup_steps=0, mode="shard_local"),
        "GradientStabilizer": lambda m: ds.GradientStabilizer(m.named_parameters()),
    }
    model, fwd, args = _model(layout, world, device)
    _grads(fwd, args)
    try:
        with Counter() as c:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        rows.append(_row("torch clip_grad_norm_", layout, c, world))
    except Exception as exc:  # noqa: BLE001 - mixed meshes: torch raises; report it
        rows.append(_row("torch clip_grad_norm_", layout, None, world, f"{type(exc).__name__}: raises on this model"))
    for name, make in methods.items():
        t = make(model)
        t.step()  # first step builds the layout (and its one-time rank-agreement check)
        with Counter() as c:
            t.step()
        rows.append(_row(name, layout, c, world))
    try:
        from dist_stab.optim import SCALE, StableSPAM
    except ImportError:
        return rows
    for name, make in {"StableSPAM (optimizer step)": lambda m: StableSPAM(m.named_parameters(), lr=1e-3),
                       "SCALE (optimizer step)": lambda m: SCALE(m, lr=1e-3)}.items():
        m2, fwd2, args2 = _model(layout, world, device)
        _grads(fwd2, args2)
        opt = make(m2)
        opt.step()
        with Counter() as c:
            opt.step()
        rows.append(_row(name, layout, c, world))
    return rows


def _zero_rows(stage, world):
    import deepspeed
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT shm build on CPU
    import dist_stab.deepspeed as dsd
    from dist_stab.train.model import build_model, model_args
    rows = []
    layout = f"zero{stage}"
    variants = [("DeepSpeed gradient_clipping", [], 1.0), ("GlobalClip", ["global_clip"], 0.0),
                ("AdaGC exact", [("adagc", {"warmup_steps": 0})], 0.0),
                ("AdaGC shard_local", [("adagc", {"warmup_steps": 0, "mode": "shard_local"})], 0.0),
                ("GradientStabilizer", ["gradient_stabilizer"], 0.0)]
    for name, transforms, clip in variants:
        torch.manual_seed(0)
        args = model_args("tiny-test", vocab_size=512, max_seq_len=32)
        model = build_model(args, device="cpu")
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": clip, "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": stage}}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if transforms:
            engine, *_ = dsd.initialize(model=model, config=cfg, optimizer=opt, transforms=transforms, norm_probe=False)
        else:
            engine, *_ = deepspeed.initialize(model=model, config=cfg, optimizer=opt)
        for step in range(2):
            x = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.cross_entropy(engine(x).float().flatten(0, 1), x.flatten())
            engine.backward(loss)
            if step == 0:
                engine.step()
                continue
            with Counter(only=("all_reduce", "all_reduce_coalesced")) as c:  # the param all-gather is data path
                engine.step()
        if os.environ.get("DIST_STAB_COMM_DEBUG"):
            print(layout, name, c.calls, flush=True)
        rows.append(_row(name, layout, c, world, implicit=False))  # DeepSpeed's data path is not clipping
    return rows


def _worker(rank, world, port, layouts, q):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        rows = []
        for layout in layouts:
            if layout.startswith("zero"):
                rows += _zero_rows(int(layout[-1]), world)
            else:
                rows += _dtensor_rows(layout, world, torch.device("cpu"))
        q.put((rank, rows, None))
    except BaseException:  # report to the parent
        q.put((rank, None, traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)


def run(world=4, layouts=("ddp", "fsdp", "hsdp", "tp", "fsdp_tp", "zero1", "zero2", "zero3")):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, list(layouts), q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, rows, err = q.get(timeout=900)
        if err:
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {rank} failed:\n{err}")
        results[rank] = rows
    for p in procs:
        p.join(timeout=30)
    return results[0]


def format_table(rows, world):
    out = [f"| layout ({world} ranks) | method | collectives/step | bytes/step | ops | group sizes | spans world |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            out.append(f"| {r['layout']} | {r['method']} | - | - | {r['error']} | - | - |")
            continue
        out.append(f"| {r['layout']} | {r['method']} | {r['collectives']} | {r['bytes']} | {', '.join(r['ops']) or '-'} | "
                   f"{', '.join(map(str, r['group_sizes'])) or '-'} | {'yes' if r['spans_world'] else 'no'} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--layouts", default="ddp,fsdp,hsdp,tp,fsdp_tp,zero1,zero2,zero3")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        layouts = [x for x in layouts if not x.startswith("zero")]
    rows = run(args.world, layouts)
    print(f"# collectives of one step, tiny LLaMA ({args.world} gloo ranks, counted)\n")
    print(format_table(rows, args.world))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": args.world, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
