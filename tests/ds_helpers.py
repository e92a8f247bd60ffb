"""Shared pieces of the DeepSpeed tests: a tiny model whose rows straddle ZeRO partition
boundaries, its data, DeepSpeed configs, the single-process reference, and collective counters.

Shapes: embed = Embedding(9, 13) (117 elements, added to the input at a token derived from it;
SCALE normalises it per column), fc1 = Linear(13, 21) (weight 273), fc2 = Linear(21, 7) (147).
With two param groups (weights / biases) and 2 ranks, ZeRO-1/2 cut the weight group (537
elements, padded) inside fc1.weight (a row straddles the cut); ZeRO-3 cuts every tensor at
ceil(numel/2): embed.weight at 59 (row 4, col 7), fc1.weight at 137 (row 10, col 7),
fc2.weight at 74 (row 3, col 11), fc1.bias (21) with one padding element.
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

STEPS = 6
MICRO = 4  # rows per rank per step
LR = 1e-2
EPS = 1e-6


NUMELS = {"embed.weight": 117, "fc1.weight": 273, "fc1.bias": 21, "fc2.weight": 147, "fc2.bias": 7}
P = len(NUMELS)  # slots of a per-tensor statistic


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(9, 13)
        self.fc1 = torch.nn.Linear(13, 21)
        self.fc2 = torch.nn.Linear(21, 7)

    def forward(self, x):
        # a "token" per row, from the input (rounded to bf16 first, so fp32 and bf16 runs pick the same rows)
        tok = torch.remainder((x[:, 0].to(torch.bfloat16).float().abs() * 10).long(), 9)
        return self.fc2(torch.tanh(self.fc1(x + self.embed(tok))))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, world: int):
    """The global batch of ``step`` (world * MICRO rows); step 4 is a 30x gradient spike."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * MICRO, 13, generator=g)
    y = torch.randn(world * MICRO, 7, generator=g)
    if step == 4:
        y = y * 30.0
    return x, y


def param_groups(model):
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": 0.1}, {"params": b, "weight_decay": 0.0}]


def make_optimizer(model):
    return torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS, betas=(0.9, 0.99))


def ds_config(stage: int, bf16: bool = False, clip: float = 0.0, world: int = 2, ga: int = 1, **zero) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ga,
        "train_batch_size": MICRO * world * ga,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,
        "steps_per_print": 10 ** 9,
    }
    if stage == 3:
        cfg["zero_optimization"]["sub_group_size"] = 100  # several sub-groups
    if bf16:
        cfg["bf16"] = {"enabled": True}
    cfg["zero_optimization"].update(zero)
    return cfg


# transform factories used by both sides (DeepSpeed engine and single-process reference)
def adagc(params):
    from dist_stab import AdaGC
    return AdaGC(params, warmup_steps=2, max_norm=0.5, lambda_rel=1.02, beta=0.9)


def gstab(params):
    from dist_stab import GradientStabilizer
    return GradientStabilizer(params)


def gclip(params, max_norm=0.3):
    from dist_stab import GlobalClip
    return GlobalClip(params, max_norm=max_norm)


FACTORIES = {"AdaGC": adagc, "GradientStabilizer": gstab, "GlobalClip": gclip}


def reference(tname, steps: int = STEPS, world: int = 2, bf16_init: bool = False, skip=(), ga: int = 1):
    """Single process: plain model, the same transform on named_parameters, AdamW (steps in ``skip`` skipped)."""
    model = make_model()
    if bf16_init:  # DeepSpeed bf16 starts from the bf16-rounded weights
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    opt = make_optimizer(model)
    t = FACTORIES[tname](list(model.named_parameters())) if tname else None
    for s in range(steps):
        if s in skip:
            continue
        x, y = batch(s, world * ga)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t is not None:
            t.step()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def init_deepspeed():
    import deepspeed
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 40 s JIT build (cpu-stack.md §2)
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import logger
    import logging
    logger.setLevel(logging.WARNING)
    return deepspeed


def train(engine, rank: int, world: int, steps: int = STEPS, count_last: bool = True, start: int = 0,
          nan_steps=(), ga: int = 1):
    """Run ``steps`` steps; return torch-level collective counts seen inside the last ``engine.step()``.

    In ``nan_steps`` rank 1's input is NaN (every gradient becomes NaN after the reduction).
    """
    dtype = next(engine.module.parameters()).dtype
    counts = None
    for s in range(start, start + steps):
        xs, ys = batch(s, world * ga)
        for m in range(ga - 1):  # all but the last micro-batch (engine.step() is a no-op on them)
            sl = slice((m * world + rank) * MICRO, (m * world + rank + 1) * MICRO)
            engine.backward(torch.nn.functional.mse_loss(engine(xs[sl].to(dtype)).float(), ys[sl]))
            engine.step()
        m = ga - 1
        sl = slice((m * world + rank) * MICRO, (m * world + rank + 1) * MICRO)
        x, y = xs[sl], ys[sl]
        if s in nan_steps and rank == 1:
            x = torch.full_like(x, float("nan"))
        out = engine(x.to(dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y)
        engine.backward(loss)
        if count_last and s == start + steps - 1:
            from dist_stab import comm_log
            comm_log.clear()
            with count_collectives() as counts:
                engine.step()
            counts["comm_log"] = [(r.tag, r.op, r.group, r.numel) for r in comm_log.records]
        else:
            engine.step()
    return counts


@contextmanager
def count_collectives():
    """Count torch.distributed collectives (all_reduce by op, the others by name) in the block."""
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "reduce_scatter", "_all_gather_base", "_reduce_scatter_base", "reduce", "barrier"]
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    out = {"all_reduce": []}

    def wrap(name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if name == "all_reduce":
                t = kwargs.get("tensor", args[0] if args else None)
                op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
                out["all_reduce"].append((str(op).split(".")[-1], t.numel()))
            else:
                out[name] = out.get(name, 0) + 1
            return fn(*args, **kwargs)
        return inner

    for n, fn in saved.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield out
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


def local_pieces(hook):
    """{fqn: (flat_start, fp32 master piece)} of this rank, from the hook's ShardedParams."""
    return {s.fqn: (s.spec.flat_start, s.local_param().detach().float().clone()) for s in hook.partitions.shards}


def compare(pieces, ref, delta_from=None):
    """Max over params of max|piece - ref_slice| / max|ref| (or of the update, if ``delta_from``)."""
    worst = 0.0
    for fqn, (start, piece) in pieces.items():
        n = piece.numel()
        if n == 0:
            continue
        r = ref[fqn].reshape(-1)[start:start + n]
        if delta_from is not None:
            p0 = delta_from[fqn].reshape(-1)[start:start + n]
            num = ((piece - p0) - (r - p0)).abs().max().item()
            den = (r - p0).abs().max().item()
        else:
            num = (piece - r).abs().max().item()
            den = r.abs().max().item()
        worst = max(worst, num / max(den, 1e-30))
    return worst


def compare_update_norm(pieces, ref, p0):
    """||(p - p0) - (ref - p0)|| / ||ref - p0|| over all local pieces (bf16 runs: element-wise Adam
    updates of near-zero gradients can flip sign under bf16 rounding, so compare norm-wise)."""
    num = den = 0.0
    for fqn, (start, piece) in pieces.items():
        n = piece.numel()
        if n == 0:
            continue
        r = ref[fqn].reshape(-1)[start:start + n]
        q = p0[fqn].reshape(-1)[start:start + n]
        num += float(((piece - q) - (r - q)).square().sum())
        den += float((r - q).square().sum())
    return (num / max(den, 1e-30)) ** 0.5


def timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


# --------------------------------------------------------------------------- dist_stab optimizers
def named_groups(model):
    """The two param groups with (name, param) pairs, so the optimizer knows the FQNs."""
    w = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    b = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": 0.1}, {"params": b, "weight_decay": 0.0}]


def make_dist_optimizer(kind: str, model):
    from dist_stab.optim import SCALE, SPAM, StableSPAM
    if kind == "SCALE":
        return SCALE(named_groups(model), lr=1e-2, beta=0.9, adam_lr=2e-2, eps=1e-8, last_layer="fc2.weight")
    if kind == "SCALE_T":  # fc1.weight declared stored [in, out] (as GPT-2's Conv1D): normalised per column
        return SCALE(named_groups(model), lr=1e-2, beta=0.9, adam_lr=2e-2, eps=1e-8, last_layer="fc2.weight",
                     transposed=["fc1.weight"])
    if kind == "StableSPAM":
        return StableSPAM(named_groups(model), lr=1e-2, gamma1=0.7, gamma2=0.9, theta=0.999, reset_interval=4,
                          total_steps=10, eta_min=0.5, eps=1e-8)
    if kind == "SPAM":
        return SPAM(named_groups(model), lr=1e-2, threshold=5.0, reset_interval=4, warmup_steps=2,
                    grad_accu_steps=1, eps=1e-6)
    raise ValueError(kind)


def reference_optim(kind: str, tname=None, steps: int = STEPS, world: int = 2, bf16_init: bool = False, ga: int = 1):
    """Single process: plain model, optional transform, the dist_stab optimizer."""
    model = make_model()
    if bf16_init:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    opt = make_dist_optimizer(kind, model)
    t = FACTORIES[tname](list(model.named_parameters())) if tname else None
    for s in range(steps):
        x, y = batch(s, world * ga)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t is not None:
            t.step()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
