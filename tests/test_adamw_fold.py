"""dist_stab.optim.AdamW (per-tensor gradient factors) and wrap()'s folding of the last transform into it.

References: torch.optim.AdamW (foreach=False) on the same gradients, pre-multiplied by the factors; the
same transform applied in place before torch's AdamW (wrap without folding). The Triton path runs in
Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without CUDA) with 64-element chunks.
"""
import copy
import os

import pytest
import torch
from torch import nn

import dist_stab as ds
from dist_stab.optim import AdamW

SHAPES = [(9, 11), (40,), (0, 4), (3,), (5, 7)]
STEPS = 4
NO_GRAD_AT = (3, 2)  # (param index, step): this parameter has no gradient (its own step count lags)


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [None if (i, step) == NO_GRAD_AT else (torch.randn(p.shape, generator=gen) * (i + 1)).to(p.dtype)
            for i, p in enumerate(params)]


def _factors(step):
    return torch.tensor([0.5, 2.0, 3.0, 0.25, 1.0]) * (1 + 0.1 * step)


def _groups(params, kw=None):
    kw = kw or {}
    return [dict(params=params[:2], lr=1e-2, weight_decay=0.1, **kw), dict(params=params[2:], lr=3e-2, weight_decay=0.0, **kw)]


def _run(make_opt, dtype=torch.float32, factors=True, prescale=False):
    params = _params(dtype)
    opt = make_opt(_groups(params))
    for step in range(1, STEPS + 1):
        f = _factors(step) if factors else None
        grads = _grads(step, params)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if g is None else (g * f[i] if prescale and f is not None else g)
        if prescale or f is None:
            opt.step()
        else:
            opt.step(grad_factors=f)
    return params, opt


def _max_rel(a, b):
    return max(((x.detach().double() - y.detach().double()).abs().max() / y.detach().double().abs().max().clamp(min=1e-30)).item()
               if y.numel() else 0.0 for x, y in zip(a, b))


def test_matches_torch_adamw_without_factors():
    ref, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False), factors=False)
    got, opt = _run(lambda g: AdamW(g), factors=False)
    assert _max_rel(got, ref) <= 1e-6
    assert opt.state[got[3]]["step"] == STEPS - 1 and opt.state[got[0]]["step"] == STEPS  # counted per parameter


def test_cpu_foreach_path_is_torch_foreach_adamw_bitwise():
    """On CPU the step counts are read for free: the same foreach ops and scalars as torch's foreach AdamW."""
    ref, _ = _run(lambda g: torch.optim.AdamW(g, foreach=True), factors=False)
    got, _ = _run(lambda g: AdamW(g, fused=False), factors=False)
    assert _max_rel(got, ref) == 0.0


def test_grad_factors_equal_prescaled_gradients_and_leave_grads_alone():
    ref, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False), prescale=True)
    got, _ = _run(lambda g: AdamW(g))
    assert _max_rel(got, ref) <= 1e-6
    assert torch.equal(got[0].grad, _grads(STEPS, got)[0])  # .grad is not written


def test_fp64_and_bad_input():
    ref, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False), dtype=torch.float64, prescale=True)
    got, opt = _run(lambda g: AdamW(g), dtype=torch.float64)
    assert _max_rel(got, ref) <= 1e-12
    with pytest.raises(ValueError, match="5 entries"):
        opt.step(grad_factors=torch.ones(4))
    with pytest.raises(ValueError, match="float"):
        opt.step(grad_factors=torch.ones(5, dtype=torch.long))
    c = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    c.grad = torch.ones_like(c)
    with pytest.raises(TypeError, match="complex"):
        AdamW([c]).step()
    p = [nn.Parameter(torch.zeros(2))]
    for kw in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=0.0), dict(weight_decay=float("nan"))):
        with pytest.raises(ValueError):
            AdamW(p, **kw)


def test_state_dict_resume():
    full, _ = _run(lambda g: AdamW(g))
    params = _params()
    opt = AdamW(_groups(params))
    for step in range(1, STEPS + 1):
        if step == 3:  # checkpoint, then continue in a new optimizer over new parameter objects
            sd, saved = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
            params = [nn.Parameter(s) for s in saved]
            opt = AdamW(_groups(params))
            opt.load_state_dict(sd)
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step(grad_factors=_factors(step))
    assert _max_rel(params, full) == 0.0


# ----------------------------------------------------------------------------- Triton kernel (interpreter)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CUDA machine: tests/test_gpu_kernels.py runs the compiled kernel")


@pytest.fixture
def triton_cpu(monkeypatch):
    pytest.importorskip("triton")
    from dist_stab.kernels import stable_spam_kernels as ssk

    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    monkeypatch.setattr(ssk, "BLOCK", 32)
    monkeypatch.setattr(ssk, "ITERS", 2)
    launches = []
    orig = ssk.adam_elementwise
    monkeypatch.setattr(ssk, "adam_elementwise", lambda *a: (launches.append(1), orig(*a))[1])
    return launches


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_foreach(triton_cpu, dtype):
    ref, _ = _run(lambda g: AdamW(g, fused=False), dtype=dtype)
    got, _ = _run(lambda g: AdamW(g, fused=True), dtype=dtype)
    assert len(triton_cpu) == STEPS
    # fp32: rounding only; bf16: the kernel computes in fp32 and rounds once, foreach computes in bf16
    assert _max_rel(got, ref) <= (1e-6 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        ref_t, _ = _run(lambda g: torch.optim.AdamW(g, foreach=False), prescale=True)
        assert _max_rel(got, ref_t) <= 1e-6


# ----------------------------------------------------------------------------- wrap(): folding
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _train(make_opt, make_transform, fold=None, steps=6, nan_at=None, skip=None):
    model = Net()
    wrapped = ds.wrap(make_opt(model), make_transform(model), fold=fold, skip=skip)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    raw = None
    for step in range(steps):
        wrapped.zero_grad()
        model(x * (1 + step)).pow(2).mean().backward()
        if step == nan_at:
            model.a.weight.grad[0, 0] = float("nan")
        raw = [p.grad.clone() for p in model.parameters()]
        wrapped.step()
    return model, wrapped, raw


TRANSFORMS = {
    "GradientStabilizer": lambda m: ds.GradientStabilizer(m),
    "AdaGC": lambda m: ds.AdaGC(m, warmup_steps=2, max_norm=0.5, lambda_rel=1.01),
    "GlobalClip": lambda m: ds.GlobalClip(m, max_norm=0.1),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_fold_equals_in_place_transform(name):
    ref, ref_w, _ = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False), TRANSFORMS[name])
    got, got_w, raw = _train(lambda m: AdamW(m.parameters(), lr=1e-2), TRANSFORMS[name])
    assert got_w.folded and not ref_w.folded
    assert _max_rel(list(got.parameters()), list(ref.parameters())) <= 1e-6
    assert all(torch.equal(p.grad, r) for p, r in zip(got.parameters(), raw))  # grads left as they came
    factors = got_w.last_stats[got_w.transforms[0].tag]["factors"]
    assert not torch.all(factors == 1)  # the transform did act on this run


def test_fold_false_and_fold_true_errors():
    _, w, raw = _train(lambda m: AdamW(m.parameters(), lr=1e-2), TRANSFORMS["GradientStabilizer"], fold=False, steps=1)
    assert not w.folded
    model = Net()
    with pytest.raises(ValueError, match="does not take grad_factors"):
        ds.wrap(torch.optim.AdamW(model.parameters()), ds.GradientStabilizer(model), fold=True)
    for fold in (True, None, False):  # a transform covering a param the optimizer lacks is refused, by name
        with pytest.raises(ValueError, match=r"does not update: \['b.weight'"):
            ds.wrap(AdamW(model.a.parameters()), ds.GradientStabilizer(model), fold=fold)
    with pytest.raises(ValueError, match="does not scale"):
        ds.wrap(AdamW(model.parameters()), ds.GradNorm(model), fold=True)


def test_fold_two_transforms_and_partial_coverage():
    """AdaGC then GradientStabilizer: only the last folds; an optimizer param outside the transform gets factor 1."""
    def both(m):
        return ds.AdaGC(m, warmup_steps=1, max_norm=0.5), ds.GradientStabilizer(m.b)

    def run(make_opt):
        model = Net()
        t1, t2 = both(model)
        w = ds.wrap(make_opt(model), t1, t2)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for step in range(4):
            w.zero_grad()
            model(x * (1 + step)).pow(2).mean().backward()
            w.step()
        return model, w

    ref, rw = run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False))
    got, gw = run(lambda m: AdamW(m.parameters(), lr=1e-2))
    assert gw.folded and gw.transforms[0].apply_factors and gw.transforms[1].apply_factors  # wrap() mutates none
    assert _max_rel(list(got.parameters()), list(ref.parameters())) <= 1e-6


def test_transform_reused_after_folding_wrap_scales_gradients():
    """wrap() folds by calling step(apply=False); the transform used alone afterwards still scales."""
    model = Net()
    gs = ds.GradientStabilizer(model)
    w = ds.wrap(AdamW(model.parameters(), lr=1e-2), gs)
    assert w.folded
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    w.step()
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), raw))  # folded: grads untouched
    st = gs.step()  # alone, on the same gradients: scaled by its factors
    for p, r, f in zip(model.parameters(), raw, st["factors"]):
        assert float(f) != 1.0 and torch.allclose(p.grad, r * f, rtol=1e-6, atol=0)


def test_fold_with_skip_step():
    """A NaN gradient: SkipStep skips the whole step (params unchanged), folded or not."""
    skip = lambda: ds.SkipStep()  # noqa: E731
    ref, _, _ = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False),
                       TRANSFORMS["GradientStabilizer"], nan_at=3, skip=skip())
    got, w, _ = _train(lambda m: AdamW(m.parameters(), lr=1e-2), TRANSFORMS["GradientStabilizer"], nan_at=3,
                       skip=skip())
    assert w.folded and int(w.skip.skipped) == 1
    assert _max_rel(list(got.parameters()), list(ref.parameters())) <= 1e-6
    assert all(torch.isfinite(p).all() for p in got.parameters())


# ----------------------------------------------------------------------------- 2 gloo ranks: FSDP2 and TP (also
# with grads kept across steps and persistent_grads: the DTensor grads are then read once)
def _dist_fold(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dist_stab import comm_log

    out = {}
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for layout in ("fsdp", "tp", "fsdp-persistent", "tp-persistent"):
        persistent = layout.endswith("persistent")  # grads kept across steps, the transform holds them
        ref = Net()
        ref_w = ds.wrap(torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False), ds.GradientStabilizer(ref))
        model = Net()
        mesh = init_device_mesh("cpu", (world,))
        if layout.startswith("fsdp"):
            fully_shard(model, mesh=mesh)
        else:
            parallelize_module(model, mesh, {"a": ColwiseParallel(), "b": RowwiseParallel()})
        w = ds.wrap(AdamW(model.parameters(), lr=1e-2), ds.GradientStabilizer(model, persistent_grads=persistent))
        reads = []
        orig = w.transforms[0]._read
        w.transforms[0]._read = lambda: (reads.append(1), orig())[1]
        for step in range(4):
            for m, o in ((ref, ref_w), (model, w)):
                o.zero_grad(set_to_none=not (persistent and o is w))
                m(x * (1 + step)).pow(2).mean().backward()
                comm_log.clear()
                o.step()
        counts = {k: n for k, (n, _) in comm_log.summary().items()}
        full = [p.full_tensor() for p in model.parameters()]
        out[layout] = dict(err=_max_rel(full, list(ref.parameters())), folded=w.folded, counts=counts,
                           full_reads=len(reads))
    return out


def test_fold_sharded_fsdp2_and_tp():
    from dist_launcher import run_dist

    res = run_dist(_dist_fold, 2, timeout=300)
    for r in res:
        for layout, v in r.items():
            assert v["folded"], layout
            assert v["err"] <= 1e-6, (layout, v)
            assert list(v["counts"].values()) == [1] and all(k[1] == "sum" for k in v["counts"]), (layout, v)
            assert v["full_reads"] == (1 if layout.endswith("persistent") else 4), (layout, v)


# ----------------------------------------------------------------------------- skipping without a host sync
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=interpreted)])
def test_step_factor_zero_skips_everything(fused, monkeypatch):
    """step_factor=0: parameters, moments and step counts unchanged; the run equals one without that step."""
    if fused:
        pytest.importorskip("triton")
        monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    params, ref = _params(), _params()
    opt, ref_opt = AdamW(_groups(params), fused=fused), AdamW(_groups(ref), fused=fused)
    for step in range(1, STEPS + 1):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        skip = step == 2
        before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])
        opt.step(grad_factors=_factors(step), step_factor=torch.tensor(0.0 if skip else 1.0))
        if skip:
            assert all(torch.equal(a, p) for a, p in zip(before[0], params))
            after = opt.state_dict()["state"]
            assert all(torch.equal(before[1][i][k], after[i][k]) for i in after for k in after[i])
            continue
        for p, g in zip(ref, _grads(step, ref)):
            p.grad = g
        ref_opt.step(grad_factors=_factors(step))
    assert _max_rel(params, ref) <= 1e-6
    assert int(opt.state[params[0]]["step"]) == STEPS - 1


def test_skip_step_uses_step_factor_and_keeps_torch_adamw_state_keys():
    """SkipStep drives AdamW through step_factor (no snapshot, no host decision), and the state dict has torch
    AdamW's keys and step dtype, so a torch AdamW checkpoint loads."""
    calls = []
    _, w, _ = _train(lambda m: AdamW(m.parameters(), lr=1e-2), TRANSFORMS["GradientStabilizer"], nan_at=3,
                     skip=ds.SkipStep(), steps=5)
    assert not w.skip._snap  # the restore mode's snapshot was never needed
    sd = w.optimizer.state_dict()["state"][0]
    assert set(sd) == {"step", "exp_avg", "exp_avg_sq"} and sd["step"].dtype == torch.float32 and int(sd["step"]) == 4
    model = Net()
    t = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    t.step()
    o = AdamW(model.parameters(), lr=1e-2)
    o.load_state_dict(t.state_dict())
    o.step(step_factor=torch.tensor(1.0))
    calls.append(int(o.state[model.a.weight]["step"]))
    assert calls == [2]
