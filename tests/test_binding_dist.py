"""Late binding and presence as data on 2 gloo ranks (issue 16): FSDP2 built after the wrapper with an
Accelerate-style swap, rank-divergent presence (a clear error on every rank, no hang), MoE-like experts
whose active set changes every step, and a loss passed on some ranks only.
"""
import time

import pytest
import torch
import torch.nn as nn

import dist_stab as ds
from dist_launcher import run_dist
from reference import RefAdaGC, RefGradientStabilizer
from test_transforms_dist import CollectiveCounter, build_model, full_params, loss_fn, parallelize

pytestmark = pytest.mark.dist
TOL = 1e-6


def _shard(model, world):
    return parallelize(model, "fsdp", world)


# ----------------------------------------------------------------------------- wrap before fully_shard
def _swap_worker(rank, world, order):
    from torch.distributed.tensor import DTensor
    model = build_model()
    if order == "after":
        _shard(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = ds.wrap(opt, ds.AdaGC(model, warmup_steps=2, max_norm=0.5), skip=ds.SkipStep(),
                monitor=ds.SpikeMonitor(window=8, min_history=2))
    if order == "before":  # what Accelerate's prepare / the HF Trainer do under FSDP2
        names = {id(p): n for n, p in model.named_parameters()}
        old = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
        _shard(model, world)
        new = dict(model.named_parameters())
        for g, ns in zip(opt.param_groups, old):
            g["params"] = [new[n] for n in ns]
    for step in range(6):
        w.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        w.step(loss=loss.detach())
    assert all(isinstance(s.param, DTensor) for s in w.transforms[0].shards)
    return {"params": full_params(model), "gamma": w.transforms[0].state["gamma"].clone(),
            "norm": w.last_stats["AdaGC"]["global_norm"].clone()}


def test_wrap_built_before_fully_shard_equals_built_after():
    before = run_dist(_swap_worker, 2, "before")
    after = run_dist(_swap_worker, 2, "after")
    for b, a in zip(before, after):
        assert float(b["norm"]) > 0
        assert torch.equal(b["gamma"], a["gamma"])
        for n in a["params"]:
            assert torch.equal(b["params"][n], a["params"][n]), n


# ----------------------------------------------------------------------------- rank-divergent presence
def _divergent_worker(rank, world):
    from dist_stab.transforms.base import PresenceError
    model = _shard(build_model(), world)
    t = ds.AdaGC(model, warmup_steps=1)
    names = t.fqns
    drops = [[], ["w2.weight"], ["w1.weight"] if rank == 0 else ["w2.weight"]]  # steps 0, 1 seen, then divergent
    for step, drop in enumerate(drops):
        model.zero_grad(set_to_none=True)
        loss_fn(model, step).backward()
        for n, p in model.named_parameters():
            if n in drop:
                p.grad = None
        start = time.monotonic()
        try:
            st = t.step()
        except PresenceError as e:
            return {"step": step, "error": str(e), "seconds": time.monotonic() - start, "names": names}
        if step == 1:
            assert not bool(st["active"][names.index("w2.weight")])  # absent on every rank: inactive
    return {"step": None}


def test_rank_divergent_presence_raises_on_every_rank():
    res = run_dist(_divergent_worker, 2, timeout=120)
    for r in res:
        assert r["step"] == 2, r
        assert r["seconds"] < 10
        assert "has a gradient on 1 of the 2 ranks" in r["error"]
    assert res[0]["error"] == res[1]["error"]
    assert "'w1.weight'" in res[0]["error"] and "2 parameter(s)" in res[0]["error"]


# ----------------------------------------------------------------------------- MoE-like experts
class MoE(nn.Module):
    """A shared layer and 4 experts; step s routes to a subset that changes every step (expert e is used
    when (s + e) % 3 != 0), the same on every rank, like a router whose choice was all-reduced."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(8, 6)
        self.experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x, step):
        h = torch.tanh(self.shared(x))
        return sum(self.experts[e](h) for e in range(4) if (step + e) % 3 != 0)


def _moe_loss(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 6, generator=g)
    return (model(x, step) - y).square().mean()  # the same batch on every rank: FSDP2's mean equals it


def _moe_worker(rank, world, name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = MoE()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    for m in (model.shared, *model.experts):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    t = {"adagc": ds.AdaGC(model, warmup_steps=2, max_norm=0.3), "gs": ds.GradientStabilizer(model)}[name]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counts, layouts = [], set()
    for step in range(9):
        opt.zero_grad(set_to_none=True)
        _moe_loss(model, step).backward()
        ds.comm_log.clear()
        with CollectiveCounter() as cc:
            t.step()
        counts.append((len(cc.calls), len(ds.comm_log.records)))
        layouts.add(id(t._layout))
        opt.step()
    return {"params": full_params(model), "counts": counts, "layouts": len(layouts),
            "state": {k: v.clone() for k, v in t.state.items()}}


def _moe_reference(name):
    model = MoE()
    params = list(model.parameters())
    ref = RefAdaGC(len(params), warmup_steps=2, max_norm=0.3) if name == "adagc" else RefGradientStabilizer(len(params))
    for step in range(9):
        model.zero_grad(set_to_none=True)
        _moe_loss(model, step).backward()
        ref.step([p.grad for p in params])  # an expert without tokens has no gradient: inactive
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.1 * p.grad
    return {n: p.detach().clone() for n, p in model.named_parameters()}, ref


@pytest.mark.parametrize("name", ["adagc", "gs"])
def test_moe_changing_active_experts_equal_single_process_reference(name):
    res = run_dist(_moe_worker, 2, name)
    ref_params, ref = _moe_reference(name)
    for r in res:
        assert r["layouts"] == 1
        assert len(set(r["counts"][1:])) == 1 and r["counts"][1] == (1, 1)  # one all-reduce per step, always
        for n, v in ref_params.items():
            d = float((r["params"][n] - v).abs().max() / v.abs().max())
            assert d <= TOL, (n, d)
    assert all(torch.equal(res[0]["state"][k], res[1]["state"][k]) for k in res[0]["state"])
    if name == "adagc":
        assert torch.allclose(res[0]["state"]["gamma"], torch.tensor(ref.gamma, dtype=torch.float32), rtol=1e-5)
    else:
        assert res[0]["state"]["k"].tolist() == [float(k) for k in ref.k]


# ----------------------------------------------------------------------------- loss on some ranks only
def _loss_worker(rank, world):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=0.1), ds.GlobalClip(model, max_norm=10.0),
                skip=ds.SkipStep(), monitor=ds.SpikeMonitor(window=4, min_history=2))
    out = []
    for step, losses in enumerate([(2.0, None), (2.0, 4.0), (None, None), (None, float("nan"))]):
        w.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        loss = losses[rank]
        start = time.monotonic()
        w.step(loss=None if loss is None else torch.tensor(loss))
        sp = w.last_stats["spikes"]
        out.append((float(sp["loss"]), bool(sp["loss_present"]), bool(sp["skip"]), time.monotonic() - start))
    return {"out": out, "count": int(w.monitor.state["loss_count"])}


def test_loss_on_some_ranks_only_neither_hangs_nor_lies():
    res = run_dist(_loss_worker, 2, timeout=120)
    for r in res:
        (l0, p0, s0, _), (l1, p1, s1, _), (_, p2, s2, _), (l3, p3, s3, _) = r["out"]
        assert (l0, p0, s0) == (2.0, True, False)  # rank 0's loss only
        assert (l1, p1, s1) == (3.0, True, False)  # the mean of the two
        assert (p2, s2) == (False, False)  # no loss anywhere: not observed
        assert p3 and s3 and l3 != l3  # a NaN loss on one rank: skipped on both
        assert r["count"] == 2
        assert all(o[3] < 10 for o in r["out"])


# ----------------------------------------------------------------------------- the freeze idiom with kept grads
def _freeze_worker(rank, world, keep):
    model = _shard(build_model(), world)
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=0.05), ds.AdaGC(model, warmup_steps=2, max_norm=0.5))
    frozen_at = None
    for step in range(6):
        w.zero_grad(set_to_none=not keep)
        if step == 3:  # the standard idiom, mid-run
            model.w2.weight.requires_grad_(False)
            model.w2.weight.grad = None
            frozen_at = full_params(model)["w2.weight"]
        loss_fn(model, step).backward()
        w.step()
    st = w.last_stats["AdaGC"]
    return {"params": full_params(model), "frozen_at": frozen_at,
            "active": dict(zip(w.transforms[0].fqns, st["active"].tolist()))}


def test_freeze_idiom_with_kept_grads_under_fsdp2():
    kept = run_dist(_freeze_worker, 2, True)
    fresh = run_dist(_freeze_worker, 2, False)
    for k, f in zip(kept, fresh):
        assert k["active"]["w2.weight"] is False and k["active"]["w1.weight"] is True
        assert torch.equal(k["params"]["w2.weight"], k["frozen_at"])
        for n in f["params"]:
            assert torch.equal(k["params"][n], f["params"][n]), n
