"""Sharding invariance on N ranks: every transform and optimizer on the trainer's parallel layouts vs one process.

    torchrun --nproc_per_node 8 -m dist_stab.bench.equivalence --modes fsdp,hsdp,tp,fsdp_tp --dtypes fp32,bf16 \\
        --json docs/equivalence_8gpu.json
    torchrun --nproc_per_node 4 -m dist_stab.bench.equivalence     # CPU: gloo

For each parallel mode (the trainer's ``dist_stab.train.parallelize``: FSDP2, HSDP, TP, FSDP x TP), dtype and
method, every rank builds the same LLaMA (``--size``, same seed) twice: one copy sharded by the mode, one left
whole (the single-process reference, run on every rank). Each step both get the same full gradients (seeded,
identical on all ranks; the sharded copy's DTensor grads are cut from them, no communication), then
``--steps`` steps of the method. Reported: the largest relative difference of any full parameter (``full_tensor()``)
from the reference, and the collectives of the method's last step (``CommDebugMode``: c10d and DTensor's).
Methods: torch AdamW after GlobalClip, AdaGC (2 warm-up steps), ZClip (2 warm-up steps); GradientStabilizer folded
into ``dist_stab.optim.AdamW``; SCALE, StableSPAM, SPAM. A row passes at fp32 <= 1e-5 and bf16 <= 2e-2 (bf16
parameters round differently when the same update is computed from differently split reductions).

This is issue #10's equivalence run for NCCL (one process per GPU); on CPU with gloo it is what the tests check
(tests/test_equivalence_bench.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from types import SimpleNamespace
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

TOL = {"fp32": 1e-5, "bf16": 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def methods() -> Dict[str, Callable]:
    """name -> make(model) -> optimizer (a ``ds.wrap``ped one or a dist_stab optimizer)."""
    import dist_stab as ds
    from dist_stab.optim import SCALE, SPAM, AdamW, StableSPAM

    def adamw(model, transform):
        return ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), transform)

    return {
        "GlobalClip + AdamW": lambda m: adamw(m, ds.GlobalClip(m.named_parameters(), max_norm=0.5)),
        "AdaGC + AdamW": lambda m: adamw(m, ds.AdaGC(m.named_parameters(), warmup_steps=2, max_norm=0.5,
                                                     lambda_rel=1.01)),
        "ZClip + AdamW": lambda m: adamw(m, ds.ZClip(m.named_parameters(), warmup_steps=2)),
        "GradientStabilizer folded + dist_stab AdamW": lambda m: ds.wrap(
            AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), ds.GradientStabilizer(m.named_parameters()), fold=True),
        "SCALE": lambda m: SCALE(m, lr=1e-2, weight_decay=0.1),
        "StableSPAM": lambda m: StableSPAM(m.named_parameters(), lr=1e-2, gamma1=0.85, gamma2=0.99, theta=0.99,
                                           reset_interval=3),
        "SPAM": lambda m: SPAM(m.named_parameters(), lr=1e-2, threshold=5, reset_interval=3, warmup_steps=2),
    }


def _shard_like(p, full):
    """``full`` as a gradient for ``p``: a DTensor with ``p``'s placements cut locally, or a copy."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return full.clone()
    shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = full[tuple(slice(o, o + n) for o, n in zip(off, shape))].clone().contiguous()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _full(p) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def _grads(ref, step: int, device) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, p in enumerate(ref.parameters()):
        g = torch.randn(p.shape, generator=gen) * (0.05 + 0.1 * (i % 3))
        if step % 3 == 2:
            g.view(-1)[i % g.numel()] *= 30.0  # a spike for the clipping rules to act on
        out.append(g.to(device=device, dtype=p.dtype))
    return out


def run_case(mode: str, dtype: str, name: str, make: Callable, device, args) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    from dist_stab.train.model import build_model, model_args
    from dist_stab.train.parallelize import parallelize

    torch.manual_seed(0)
    model = build_model(model_args(args.size, vocab_size=args.vocab, max_seq_len=64), device=device)
    model = model.to(DTYPES[dtype])
    ref = copy.deepcopy(model)
    tp = dist.get_world_size() if mode == "tp" else args.tp  # tp: all ranks; fsdp_tp: --tp of them
    parallelize(model, SimpleNamespace(mode=mode, dp_replicate=args.dp_replicate, tp=tp,
                                       reshard_after_forward=True), device)
    opt, ref_opt = make(model), make(ref)
    counts = 0
    for step in range(args.steps):
        grads = _grads(ref, step, device)
        for p, q, g in zip(model.parameters(), ref.parameters(), grads):
            p.grad, q.grad = _shard_like(p, g), g.clone()
        ref_opt.step()
        with CommDebugMode() as cm:
            opt.step()
        counts = int(cm.get_total_counts())
    err = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        a, b = _full(p).double(), q.detach().double()
        if b.numel():
            err = max(err, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
    return {"mode": mode, "dtype": dtype, "method": name, "max_rel_err": err, "collectives_last_step": counts,
            "ok": err <= TOL[dtype]}


def measure(args) -> dict:
    """Run in an initialised process group (every rank returns the same rows)."""
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for name, make in methods().items():
                if args.methods and name not in args.methods:
                    continue
                try:
                    rows.append(run_case(mode, dtype, name, make, device, args))
                except Exception as exc:  # noqa: BLE001 - a row that says what failed; the run goes on
                    rows.append({"mode": mode, "dtype": dtype, "method": name, "ok": False,
                                 "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    info = {"world": dist.get_world_size(), "backend": dist.get_backend(), "size": args.size, "steps": args.steps,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "tol": TOL}
    return {"info": info, "rows": rows}


def format_report(res: dict) -> str:
    i = res["info"]
    out = [f"# sharding invariance, {i['world']} x {i['device']} ({i['backend']}), LLaMA {i['size']}, "
           f"{i['steps']} steps, max relative error of the full parameters vs one process", "",
           "| mode | dtype | method | max rel err | collectives (last step) | ok |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            out.append(f"| {r['mode']} | {r['dtype']} | {r['method']} | {r['error']} | - | no |")
        else:
            out.append(f"| {r['mode']} | {r['dtype']} | {r['method']} | {r['max_rel_err']:.2e} | "
                       f"{r['collectives_last_step']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="fsdp,hsdp,tp,fsdp_tp")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default="", help="comma-separated names (default: all)")
    ap.add_argument("--size", default="tiny-test")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--tp", type=int, default=2, help="fsdp_tp: the TP degree (mode tp uses every rank)")
    ap.add_argument("--dp-replicate", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        res = measure(args)
        if dist.get_rank() == 0:
            print(format_report(res))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=1)
    finally:
        dist.destroy_process_group()
    if not all(r["ok"] for r in res["rows"]):
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
