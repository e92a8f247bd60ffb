"""Sharding invariance and collective counts of SCALE, StableSPAM, SPAM on 2 gloo ranks (one spawn).

Every rank runs the optimizer on a plain, unsharded copy (the single-process result) and on
the sharded model (FSDP2 ``fully_shard``, TP colwise/rowwise incl. a vocab-parallel embedding,
and ZeRO-style flat fragments through the functional cores), from the same full gradients,
then compares full parameters.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

STEPS = 5


class FsdpNet(nn.Module):
    """Uneven shards over 2 ranks: vocab 11 (6/5), Linear out 5 (3/2), a [1, 8] matrix (1/0: rank 1 empty)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.a = nn.Linear(8, 5, bias=True)
        self.na = nn.RMSNorm(5)
        self.b = nn.Linear(5, 8, bias=False)
        self.c = nn.Linear(8, 1, bias=False)
        self.norm = nn.RMSNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=0.5)


class TpNet(nn.Module):
    def __init__(self, n_row=1):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.up = nn.Linear(8, 6, bias=True)
        self.downs = nn.ModuleList([nn.Linear(6 if i == 0 else 8, 8, bias=False) for i in range(n_row)])
        self.norm = nn.RMSNorm(8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=0.5)


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        gs = []
        for i, shp in enumerate(shapes):
            g = torch.randn(shp, generator=gen) * (0.1 + 0.3 * (i % 4))
            if s % 3 == 1:
                g.view(-1)[(s * 5 + i) % g.numel()] *= 50.0
            gs.append(g)
        out.append(gs)
    return out


def _shard_like(p, full):
    """A DTensor gradient with ``p``'s placements whose local piece is cut from ``full`` (no communication)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return full.clone()
    shape, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    idx = tuple(slice(o, o + n) for o, n in zip(off, shape))
    local = full[idx].clone().contiguous()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _full(p):
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _make_opt(name, model, params=None):
    from dist_stab.optim import SCALE, SPAM, StableSPAM

    params = model.parameters() if params is None else params
    if name == "SCALE":
        return SCALE(model, lr=3e-3, weight_decay=0.1, adam_lr=1e-2)
    if name == "SCALE-noemb":  # the embedding treated as a plain matrix: nothing to complete under Shard(0)
        return SCALE(model, lr=3e-3, embeddings=[])
    if name == "StableSPAM":
        return StableSPAM(params, lr=3e-3, gamma1=0.85, gamma2=0.99, theta=0.99, reset_interval=3, weight_decay=0.1)
    return SPAM(params, lr=3e-3, threshold=5, reset_interval=3, warmup_steps=2, grad_accu_steps=1, weight_decay=0.1)


def _run(name, model, grads, count_last=True):
    """Run the optimizer; return the collectives issued during the last step."""
    from torch.distributed.tensor.debug import CommDebugMode

    from dist_stab import comm_log

    opt = _make_opt(name, model)
    params = list(model.parameters())
    counts, torch_total = {}, 0
    for s, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = _shard_like(p, g)
        last = s == len(grads) - 1
        comm_log.clear()
        calls = []
        orig = dist.all_reduce

        def counting(t, *a, **k):
            calls.append(t.numel())
            return orig(t, *a, **k)

        dist.all_reduce = counting
        try:
            with CommDebugMode() as cm:
                opt.step()
        finally:
            dist.all_reduce = orig
        if last:
            for (tag, op, group), (n, _) in comm_log.summary().items():
                counts[op] = counts.get(op, 0) + n
            torch_total = cm.get_total_counts()
            counts["dist.all_reduce"] = len(calls)
    counts["CommDebugMode"] = torch_total
    return counts, opt


def _compare(model, ref_model):
    errs = []
    for (n, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        f = _full(p)
        errs.append(((f - r).abs().max() / r.abs().max()).item())
    return max(errs)


def _compare_state(model, opt, ref_model, ref_opt):
    """Max relative difference of every state tensor (DTensor moments gathered) vs the unsharded run."""
    from torch.distributed.tensor import DTensor

    err, kinds = 0.0, set()
    for p, r in zip(model.parameters(), ref_model.parameters()):
        for k, v in ref_opt.state[r].items():
            if not torch.is_tensor(v):
                assert opt.state[p][k] == v, k
                continue
            mine = opt.state[p][k]
            kinds.add((k, type(mine).__name__, isinstance(p, DTensor)))
            mine = mine.full_tensor() if isinstance(mine, DTensor) else mine
            denom = v.abs().max().clamp_min(1e-30)
            err = max(err, ((mine - v).abs().max() / denom).item())
    return err, sorted(kinds)


def _flat_check(rank, world):
    """ZeRO-style flat fragments through the functional cores vs the same cores on full tensors."""
    from dist_stab.optim import OptItem, scale_step, stable_spam_step
    from dist_stab.spec import GroupRef, ShardAxis, ShardSpec

    shapes = [(5, 7), (11, 8), (11, 8), (9,), (3, 4)]
    kinds = ["matrix", "embedding", "last", "adam", "matrix"]
    torch.manual_seed(1)
    full = [torch.randn(s) for s in shapes]
    numels = [math.prod(s) for s in shapes]
    total = sum(numels)
    chunk = -(-total // world)
    lo, hi = rank * chunk, min(total, (rank + 1) * chunk)
    grp = GroupRef.of("flat", dist.group.WORLD)
    hp_scale = dict(lr=3e-3, weight_decay=0.1, beta=0.9, eps=1e-8, adam_lr_ratio=2.0, adam_betas=(0.9, 0.999))
    hp_ss = dict(lr=3e-3, betas=(0.9, 0.999), gamma1=0.85, gamma2=0.99, theta=0.99, eps=1e-8, weight_decay=0.1,
                 total_steps=None, eta_min=0.5)
    grads = _grads(shapes, STEPS, seed=3)
    errs = {}
    for algo in ("SCALE", "StableSPAM"):
        ref_p = [f.clone() for f in full]
        ref_state = [dict() for _ in shapes]
        flat_p, items_spec, flat_state = [], [], []
        start = 0
        for i, (shp, n) in enumerate(zip(shapes, numels)):
            a, b = max(lo, start) - start, min(hi, start + n) - start
            a, b = (a, b) if a < b else (0, 0)  # every rank describes every tensor (maybe empty)
            spec = ShardSpec(fqn=f"t{i}", global_shape=shp, local_shape=(b - a,), flat_start=a,
                             axes=(ShardAxis(None, grp),))
            items_spec.append((spec, a, b))
            flat_p.append(full[i].reshape(-1)[a:b].clone())
            flat_state.append(dict())
            start += n
        for s, gs in enumerate(grads):
            ref_items, fl_items = [], []
            for i, g in enumerate(gs):
                spec, a, b = items_spec[i]
                rspec = ShardSpec(fqn=f"t{i}", global_shape=shapes[i], local_shape=shapes[i],
                                  offsets=(0,) * len(shapes[i]))
                for st, shape in ((ref_state[i], shapes[i]), (flat_state[i], (b - a,))):
                    if algo == "SCALE":
                        st.setdefault("momentum", torch.zeros(shape))
                        st.setdefault("exp_avg", torch.zeros(shape))
                        st.setdefault("exp_avg_sq", torch.zeros(shape))
                    else:
                        st.setdefault("exp_avg", torch.zeros(shape))
                        st.setdefault("exp_avg_sq", torch.zeros(shape))
                        for k in ("m_max", "m_norm", "v_norm"):
                            st.setdefault(k, torch.zeros(()))
                hp = hp_scale if algo == "SCALE" else hp_ss
                ref_items.append(OptItem(rspec, ref_p[i], g.clone(), ref_state[i], hp, kinds[i]))
                fl_items.append(OptItem(spec, flat_p[i], g.reshape(-1)[a:b].clone(), flat_state[i], hp, kinds[i]))
            if algo == "SCALE":
                scale_step(ref_items)
                scale_step(fl_items)
            else:
                stable_spam_step(ref_items, step=s + 1, moment_step=s + 1, reset=False)
                stable_spam_step(fl_items, step=s + 1, moment_step=s + 1, reset=False)
        # gather the flat pieces back
        err = 0.0
        for i in range(len(shapes)):
            spec, a, b = items_spec[i]
            buf = torch.zeros(numels[i])
            buf[a:b] = flat_p[i]
            dist.all_reduce(buf)  # each element owned by exactly one rank
            r = ref_p[i].reshape(-1)
            err = max(err, ((buf - r).abs().max() / r.abs().max()).item())
        errs[algo] = err
    return errs


def _dcp_reshard(rank, world, path, name, mesh):
    """FSDP2 optimizer state saved with torch.distributed.checkpoint, loaded into an unsharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = FsdpNet()
    ref = copy.deepcopy(base)
    grads = _grads([p.shape for p in base.parameters()], STEPS + 2)
    _, ref_opt = _run(name, ref, grads)
    fully_shard(base, mesh=mesh)
    _, opt = _run(name, base, grads[:STEPS])
    ckpt = f"{path}/{name}"
    dcp.save({"model": get_model_state_dict(base), "optim": get_optimizer_state_dict(base, opt)}, checkpoint_id=ckpt)
    dist.barrier()
    plain = FsdpNet()
    plain_opt = _make_opt(name, plain)
    sd = {"model": get_model_state_dict(plain), "optim": get_optimizer_state_dict(plain, plain_opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(plain, sd["model"])
    set_optimizer_state_dict(plain, plain_opt, sd["optim"])
    for gs in grads[STEPS:]:  # two more steps, unsharded, from the loaded state
        for p, g in zip(plain.parameters(), gs):
            p.grad = g.clone()
        plain_opt.step()
    return _compare(plain, ref)


def _dist_main(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.distributed.tensor import Replicate

    out = {}
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    # ---- FSDP2, uneven + empty shards, vocab-sharded embedding
    for name in ("SCALE", "SCALE-noemb", "StableSPAM", "SPAM"):
        torch.manual_seed(0)
        base = FsdpNet()
        ref = copy.deepcopy(base)
        grads = _grads([p.shape for p in base.parameters()], STEPS)
        _, ref_opt = _run(name, ref, grads)
        fully_shard(base, mesh=mesh)
        counts, opt = _run(name, base, grads)
        state_err, state_kinds = _compare_state(base, opt, ref, ref_opt)
        out[f"fsdp/{name}"] = dict(err=_compare(base, ref), counts=counts, state_err=state_err,
                                   state_kinds=state_kinds)
    # ---- TP: colwise + rowwise (Shard(1): SCALE completes rows) + vocab-parallel embedding; 1 vs 3 rowwise layers
    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    for n_row in (1, 3):
        for name in ("SCALE", "StableSPAM", "SPAM"):
            torch.manual_seed(0)
            base = TpNet(n_row)
            ref = copy.deepcopy(base)
            grads = _grads([p.shape for p in base.parameters()], STEPS)
            _, ref_opt = _run(name, ref, grads)
            plan = {"embed_tokens": RowwiseParallel(input_layouts=Replicate()), "up": ColwiseParallel(),
                    "lm_head": ColwiseParallel()}
            plan.update({f"downs.{i}": RowwiseParallel() for i in range(n_row)})
            parallelize_module(base, tp_mesh, plan)
            counts, opt = _run(name, base, grads)
            state_err, _ = _compare_state(base, opt, ref, ref_opt)
            placements = {n: tuple(str(x) for x in getattr(p, "placements", ())) for n, p in base.named_parameters()}
            out[f"tp{n_row}/{name}"] = dict(err=_compare(base, ref), counts=counts, placements=placements,
                                            state_err=state_err)
    # ---- flat fragments (DeepSpeed-style) through the functional cores
    out["flat"] = _flat_check(rank, world)
    # ---- DCP: FSDP2 state -> unsharded model, then continue
    out["dcp"] = {name: _dcp_reshard(rank, world, path, name, mesh) for name in ("SCALE", "StableSPAM", "SPAM")}
    return out


def test_sharding_invariance_and_collective_counts(tmp_path):
    from dist_launcher import run_dist

    res = run_dist(_dist_main, 2, str(tmp_path), timeout=400)
    r0 = res[0]
    for key, v in r0.items():
        print(key, v)
    for key in r0:
        if key in ("flat", "dcp"):
            continue
        assert r0[key]["err"] <= 1e-6, (key, r0[key]["err"])
        assert res[1][key]["err"] <= 1e-6
        assert r0[key]["state_err"] <= 1e-5, (key, r0[key]["state_err"])
    # element-wise state of DTensor parameters is a DTensor (placements of the parameter)
    assert ("exp_avg", "DTensor", True) in r0["fsdp/StableSPAM"]["state_kinds"]
    assert ("momentum", "DTensor", True) in r0["fsdp/SCALE"]["state_kinds"]
    assert all(e <= 1e-6 for e in r0["dcp"].values()), r0["dcp"]
    assert r0["flat"]["SCALE"] <= 1e-6 and r0["flat"]["StableSPAM"] <= 1e-6, r0["flat"]
    assert r0["tp1/SCALE"]["placements"]["downs.0.weight"] in (("S(1)",), ("Shard(dim=1)",))
    assert r0["tp1/SCALE"]["placements"]["embed_tokens.weight"] in (("S(0)",), ("Shard(dim=0)",))
    expect = {
        "fsdp/SCALE": {"sum": 1}, "fsdp/SCALE-noemb": {}, "fsdp/StableSPAM": {"max": 1, "sum": 1}, "fsdp/SPAM": {},
        "tp1/SCALE": {"sum": 1}, "tp3/SCALE": {"sum": 1}, "tp1/StableSPAM": {"max": 1, "sum": 1},
        "tp3/StableSPAM": {"max": 1, "sum": 1}, "tp1/SPAM": {}, "tp3/SPAM": {},
    }
    for key, want in expect.items():
        for rank_res in res:
            c = rank_res[key]["counts"]
            got = {k: c[k] for k in ("sum", "max") if c.get(k)}
            assert got == want, (key, c)
            n = sum(want.values())
            assert c["dist.all_reduce"] == n and c["CommDebugMode"] == n, (key, c)
