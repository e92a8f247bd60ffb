"""Sharding invariance and collective counts of SCALE, StableSPAM, SPAM on gloo ranks.

2 ranks (one spawn): FSDP2, TP, flat fragments, DCP. 4 ranks (one spawn per layout): FSDP2 with uneven
and empty shards, FSDP x TP 2x2 (incl. an empty piece of a 2-D-mesh DTensor).

Every rank runs the optimizer on a plain, unsharded copy (the single-process result) and on
the sharded model (FSDP2 ``fully_shard``, TP colwise/rowwise incl. a vocab-parallel embedding,
and ZeRO-style flat fragments through the functional cores), from the same full gradients,
then compares full parameters.
"""
from __future__ import annotations

import copy
import math

import pytest
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
            by_group = {}
            for (tag, op, group), (n, _) in comm_log.summary().items():
                counts[op] = counts.get(op, 0) + n
                by_group[(op, group)] = by_group.get((op, group), 0) + n
            counts["by_group"] = by_group
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


# ----------------------------------------------------------------------------- 4 ranks: FSDP2 and FSDP x TP 2x2
class FsdpTpNet(TpNet):
    """TpNet plus a colwise ``e`` [2, 8] (+ bias 2): TP gives each tp rank 1 row, FSDP then splits that
    row over dp as 1/0, so the dp=1 ranks (2 and 3) hold an empty piece of a [2, 8]-on-(dp, tp) DTensor."""

    def __init__(self, n_row=2):
        super().__init__(n_row)
        self.e = nn.Linear(8, 2, bias=True)
        for p in self.e.parameters():
            nn.init.normal_(p, std=0.5)


def _placements(p):
    """((placement type, shard dim), ...) per mesh dim and the mesh dim names of a DTensor parameter."""
    pls = tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in getattr(p, "placements", ()))
    mesh = getattr(p, "device_mesh", None)
    return pls, (tuple(mesh.mesh_dim_names or ()) if mesh is not None else ())


def _case4(name, make, shard):
    """One optimizer on a fresh model: unsharded reference vs ``shard(model)``, on every rank."""
    from dist_stab.optim._base import local_tensor

    torch.manual_seed(0)
    base = make()
    ref = copy.deepcopy(base)
    grads = _grads([p.shape for p in base.parameters()], STEPS)
    _, ref_opt = _run(name, ref, grads)
    shard(base)
    counts, opt = _run(name, base, grads)
    state_err, state_kinds = _compare_state(base, opt, ref, ref_opt)
    scalars = {}  # StableSPAM's per-tensor statistics, as held by this rank (compared bit for bit)
    for n, p in base.named_parameters():
        st = opt.state[p]
        if "m_max" in st:
            scalars[n] = torch.stack([local_tensor(st[k]).detach().clone() for k in ("m_max", "m_norm", "v_norm")])
    return dict(err=_compare(base, ref), counts=counts, state_err=state_err, state_kinds=state_kinds,
                scalars=scalars, placements={n: _placements(p) for n, p in base.named_parameters()},
                local_shapes={n: tuple(local_tensor(p).shape) for n, p in base.named_parameters()})


NAMES4 = ("SCALE", "SCALE-noemb", "StableSPAM", "SPAM")


def _dist_main4(rank, world, layout):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        make, shard = FsdpNet, lambda m: fully_shard(m, mesh=mesh)
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        plan = {"embed_tokens": RowwiseParallel(input_layouts=Replicate()), "up": ColwiseParallel(),
                "lm_head": ColwiseParallel(), "e": ColwiseParallel(),
                "downs.0": RowwiseParallel(), "downs.1": RowwiseParallel()}

        def make():
            return FsdpTpNet(2)

        def shard(m):
            parallelize_module(m, mesh["tp"], plan)
            fully_shard(m, mesh=mesh["dp"])

    out = {name: _case4(name, make, shard) for name in NAMES4}
    out["groups"] = {"dp": dist.get_process_group_ranks(mesh.get_group("dp"))}
    if layout != "fsdp":
        out["groups"]["tp"] = dist.get_process_group_ranks(mesh.get_group("tp"))
    return out


def _check4(res, expect):
    """Parameters and state vs the 1-process run on every rank, StableSPAM scalars bit-identical across
    ranks, and per rank the last step's collectives: {(op, group role): calls} == ``expect[name]``."""
    r0 = res[0]
    summary = {}
    for name in NAMES4:
        errs = [r[name]["err"] for r in res]
        serrs = [r[name]["state_err"] for r in res]
        summary[name] = (max(errs), max(serrs), r0[name]["counts"])
        print(f"{name}: max param err {max(errs):.2e}, max state err {max(serrs):.2e}, "
              f"last-step collectives rank0 {r0[name]['counts']}")
        assert max(errs) <= 1e-6, (name, errs)
        assert max(serrs) <= 1e-5, (name, serrs)
        for r in res[1:]:  # per-tensor statistics: the same bits on every rank
            assert r[name]["scalars"].keys() == r0[name]["scalars"].keys()
            for n, v in r0[name]["scalars"].items():
                assert torch.equal(r[name]["scalars"][n], v), (name, n, v, r[name]["scalars"][n])
        for rank, r in enumerate(res):
            c = r[name]["counts"]
            role = {f"{k}{v}": k for k, v in r["groups"].items()}  # group name -> role, this rank's groups
            got = {(op, role.get(g, g)): n for (op, g), n in c["by_group"].items()}
            assert got == expect[name], (name, rank, c)
            n = sum(expect[name].values())
            assert c.get("sum", 0) + c.get("max", 0) == n, (name, rank, c)
            assert c["dist.all_reduce"] == n and c["CommDebugMode"] == n, (name, rank, c)
    assert r0["StableSPAM"]["scalars"] and ("exp_avg", "DTensor", True) in r0["StableSPAM"]["state_kinds"]
    assert ("momentum", "DTensor", True) in r0["SCALE"]["state_kinds"]
    return summary


@pytest.mark.dist
def test_fsdp2_four_ranks_uneven_with_empty_shards():
    from dist_launcher import run_dist

    res = run_dist(_dist_main4, 4, "fsdp", timeout=300)
    # FsdpNet on 4 ranks (dim 0 in chunks of ceil(n/4)): embed_tokens/lm_head 11 rows -> 3,3,3,2;
    # a.weight/a.bias/na 5 -> 2,2,1,0 (rank 3 empty); c [1, 8] -> 1,0,0,0 (ranks 1-3 empty); b [8, 5] -> 2 each.
    shapes = [r["SCALE"]["local_shapes"] for r in res]
    assert [s["a.weight"][0] for s in shapes] == [2, 2, 1, 0]
    assert [s["c.weight"][0] for s in shapes] == [1, 0, 0, 0]
    assert [s["embed_tokens.weight"][0] for s in shapes] == [3, 3, 3, 2]
    assert all(pl == ((("Shard", 0),), ("dp",)) for pl in res[0]["SCALE"]["placements"].values())
    # Expected collectives per step, from the placements (every tensor Shard(0) over the one dp group):
    # SCALE: matrices and lm_head keep dim 0 (one scale per row) = the sharded dim -> local; the embedding
    #   keeps dim 1 and sums over the vocab = the sharded dim -> its per-column partial sums need the dp
    #   group: 1 SUM. Without the embedding rule (SCALE-noemb) nothing needs completing: 0.
    # StableSPAM: per-tensor max|g| and clipped sum of squares over all shards of every tensor; one
    #   group for all tensors: 1 MAX + 1 SUM. SPAM: element-wise: 0.
    expect = {"SCALE": {("sum", "dp"): 1}, "SCALE-noemb": {},
              "StableSPAM": {("max", "dp"): 1, ("sum", "dp"): 1}, "SPAM": {}}
    _check4(res, expect)


@pytest.mark.dist
def test_fsdp_x_tp_2x2():
    from dist_launcher import run_dist

    res = run_dist(_dist_main4, 4, "fsdp_tp", timeout=300)
    # mesh [[0, 1], [2, 3]]: dp groups {0,2},{1,3}, tp groups {0,1},{2,3}; each rank is in one of each.
    assert [r["groups"] for r in res] == [{"dp": [0, 2], "tp": [0, 1]}, {"dp": [1, 3], "tp": [0, 1]},
                                          {"dp": [0, 2], "tp": [2, 3]}, {"dp": [1, 3], "tp": [2, 3]}]
    pl = res[0]["SCALE"]["placements"]
    dims = {n: tuple(d for _, d in p) for n, (p, mesh_names) in pl.items()}
    # TP first, then FSDP on dp: (dp placement, tp placement); dp shards dim 0 (_StridedShard when tp
    # also shards dim 0). Parameters TP leaves alone (norm.weight) live on the 1-D dp mesh only.
    for n in ("embed_tokens.weight", "up.weight", "up.bias", "lm_head.weight", "e.weight", "e.bias"):
        assert dims[n] == (0, 0) and pl[n][1] == ("dp", "tp"), (n, pl[n])
    for n in ("downs.0.weight", "downs.1.weight"):
        assert dims[n] == (0, 1) and pl[n][1] == ("dp", "tp"), (n, pl[n])
    assert dims["norm.weight"] == (0,) and pl["norm.weight"][1] == ("dp",), pl["norm.weight"]
    # e [2, 8]: tp 1 row each, then dp 1/0: ranks 2 and 3 (dp index 1) hold empty pieces; embed 10 rows -> 3/2
    assert [r["SCALE"]["local_shapes"]["e.weight"] for r in res] == [(1, 8), (1, 8), (0, 8), (0, 8)]
    assert [r["SCALE"]["local_shapes"]["embed_tokens.weight"][0] for r in res] == [3, 3, 2, 2]
    # Expected collectives per step, from those placements:
    # SCALE: a statistic is completed over the groups that shard a dim it sums over.
    #   up / lm_head / e (rows split over dp and tp; per-row norms) -> local;
    #   downs.* (rows over dp, columns over tp; per-row norms sum over columns) -> tp;
    #   embed_tokens (vocab split over dp and tp; per-column norms sum over the vocab) -> dp and tp;
    #   biases / norm gain -> AdamW, element-wise. So 1 SUM on the dp group + 1 SUM on the tp group,
    #   packed for all tensors (2 rowwise layers, still 1 per group).
    # SCALE-noemb: the embedding becomes a per-row matrix (local) -> only downs.*: 1 SUM on tp.
    # StableSPAM: whole-tensor max|g| and sum of squares over every group that shards a tensor: the TP'd
    #   tensors over dp and tp, norm.weight over dp -> 1 MAX + 1 SUM on each of the two groups.
    # SPAM: element-wise -> 0.
    expect = {"SCALE": {("sum", "dp"): 1, ("sum", "tp"): 1}, "SCALE-noemb": {("sum", "tp"): 1},
              "StableSPAM": {("max", "dp"): 1, ("sum", "dp"): 1, ("max", "tp"): 1, ("sum", "tp"): 1},
              "SPAM": {}}
    _check4(res, expect)
