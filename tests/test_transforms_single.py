"""Single-process checks of the gradient transforms against independent references."""
import copy
import math

import pytest
import torch
import zclip

import dist_stab as ds
from reference import RefAdaGC, RefGradientStabilizer, ref_global_clip


def make_params(seed=0, with_odd=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (4, 3, 5), (7, 16)]
    if with_odd:
        shapes.append(())  # 0-d
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads_for_step(params, step, seed=1, spike_at=()):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    scale = 50.0 if step in spike_at else 1.0
    # per-tensor scales vary so that some tensors get clipped and others not
    return [torch.randn(p.shape, generator=g) * scale * (0.5 + i) for i, p in enumerate(params)]


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def test_global_clip_equals_torch_clip_grad_norm():
    ps, ref = make_params(), make_params()
    for step in range(3):
        for p, q, g in zip(ps, ref, grads_for_step(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        out = ds.GlobalClip([("p%d" % i, p) for i, p in enumerate(ps)], max_norm=2.0).step()
        total = torch.nn.utils.clip_grad_norm_(ref, 2.0)
        assert rel_err(out["global_norm"], total) < 1e-6
        for p, q in zip(ps, ref):
            assert rel_err(p.grad, q.grad) < 1e-6


@pytest.mark.parametrize("mode", ["exact", "shard_local"])
def test_adagc_matches_reference(mode):
    ps = make_params()
    named = [("p%d" % i, p) for i, p in enumerate(ps)]
    t = ds.AdaGC(named, lambda_rel=1.04, beta=0.99, warmup_steps=3, max_norm=5.0, mode=mode)
    ref = RefAdaGC(len(ps), 1.04, 0.99, 3, 5.0)
    worst, clipped = 0.0, 0
    for step in range(12):
        gs = grads_for_step(ps, step, spike_at=(6, 9))
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        rgs = [g.clone().double() for g in gs]
        out = t.step()
        ref_f = ref.step(rgs)
        for p, rg in zip(ps, rgs):
            worst = max(worst, rel_err(p.grad, rg))
        worst = max(worst, rel_err(out["factors"], ref_f))
        worst = max(worst, rel_err(t.state["gamma"], ref.gamma))
        clipped += int(out["num_clipped"])
    assert worst < 1e-6, worst
    assert clipped > 0  # the spikes were really clipped after warm-up


def test_gradient_stabilizer_matches_reference():
    ps = make_params()
    t = ds.GradientStabilizer([("p%d" % i, p) for i, p in enumerate(ps)])
    ref = RefGradientStabilizer(len(ps))
    worst = 0.0
    for step in range(10):
        gs = grads_for_step(ps, step, spike_at=(5,))
        if step == 3:
            gs[1].zero_()  # zero norm: left alone, not advanced
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        rgs = [g.clone().double() for g in gs]
        t.step()
        ref.step(rgs)
        for p, rg in zip(ps, rgs):
            worst = max(worst, rel_err(p.grad, rg))
        worst = max(worst, rel_err(t.state["m"], ref.m), rel_err(t.state["v"], ref.v))
        assert t.state["k"].tolist() == [float(k) for k in ref.k]
    assert worst < 1e-6, worst


@pytest.mark.parametrize("kw", [dict(), dict(max_grad_norm=3.0), dict(clip_option="mean"), dict(mode="percentile")])
def test_zclip_matches_zclip_package(kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref_model = copy.deepcopy(model)
    z = ds.ZClip(model.named_parameters(), warmup_steps=4, **kw)
    ref = zclip.ZClip(warmup_steps=4, max_grad_norm=kw.get("max_grad_norm"),
                      mode=kw.get("mode", "zscore"), clip_option=kw.get("clip_option", "adaptive_scaling"))
    worst, spikes = 0.0, 0
    for step in range(14):
        g = torch.Generator().manual_seed(step)
        scale = 30.0 if step in (7, 11) else 1.0
        for p, q in zip(model.parameters(), ref_model.parameters()):
            gr = torch.randn(p.shape, generator=g) * scale
            p.grad, q.grad = gr.clone(), gr.clone()
        out = z.step()
        total = ref.step(ref_model)
        spikes += int(out["spike"])
        worst = max(worst, rel_err(out["global_norm"], total))
        for p, q in zip(model.parameters(), ref_model.parameters()):
            worst = max(worst, rel_err(p.grad, q.grad))
        if ref.initialized:
            worst = max(worst, rel_err(z.zstate["mean"], ref.mean), rel_err(z.zstate["var"], ref.var))
    assert worst < 1e-5, worst  # the package computes in float64 on the host, we in fp32 on device
    assert spikes >= 1


def test_params_without_grad_are_skipped_and_keep_state():
    ps = make_params()
    t = ds.AdaGC([("p%d" % i, p) for i, p in enumerate(ps)], warmup_steps=1)
    for p, g in zip(ps, grads_for_step(ps, 0)):
        p.grad = g
    t.step()
    gamma_before = t.state["gamma"].clone()
    ps[2].grad = None
    for p, g in zip(ps, grads_for_step(ps, 1)):
        if p.grad is not None:
            p.grad = g
    out = t.step()
    assert t.state["gamma"][2] == gamma_before[2]
    assert out["norms"][2] == 0 and out["factors"][2] == 1
    assert not torch.equal(t.state["gamma"], gamma_before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_does_not_corrupt_state(bad):
    ps = make_params(with_odd=False)
    named = [("p%d" % i, p) for i, p in enumerate(ps)]
    ts = [ds.AdaGC(named, warmup_steps=2), ds.GradientStabilizer(named), ds.ZClip(named, warmup_steps=2),
          ds.GlobalClip(named, max_norm=1.0)]
    for step in range(5):
        for t in ts:
            for p, g in zip(ps, grads_for_step(ps, step)):
                p.grad = g
            if step in (1, 3):
                ps[0].grad[0, 0] = bad
            out = t.step()
            assert torch.isfinite(out["factors"]).all()
            assert int(out["num_nonfinite"]) == (1 if step in (1, 3) else 0)
            for v in t.state.values():
                assert torch.isfinite(v).all() or isinstance(t, ds.AdaGC)  # AdaGC's unseeded gamma is +inf
            if isinstance(t, ds.AdaGC):
                assert not torch.isnan(t.state["gamma"]).any()
            if isinstance(t, ds.ZClip):
                assert all(torch.isfinite(v).all() for v in t.zstate.values())
            for p in ps[1:]:
                assert torch.isfinite(p.grad).all()  # finite tensors stay finite
    adagc = ts[0]
    assert torch.isfinite(adagc.state["gamma"]).all()  # seeded from the finite warm-up step
    gs = ts[1]
    assert gs.state["k"][0] == 3 and gs.state["k"][1] == 5  # non-finite steps did not advance tensor 0


@pytest.mark.parametrize("cls,kw,name", [
    (ds.AdaGC, dict(lambda_rel=1.0), "lambda_rel"), (ds.AdaGC, dict(lambda_rel=0.5), "lambda_rel"),
    (ds.AdaGC, dict(beta=1.0), "beta"), (ds.AdaGC, dict(beta=0.0), "beta"),
    (ds.AdaGC, dict(max_norm=-1.0), "max_norm"), (ds.AdaGC, dict(warmup_steps=-1), "warmup_steps"),
    (ds.AdaGC, dict(eps=0.0), "eps"), (ds.AdaGC, dict(mode="local"), "mode"),
    (ds.GlobalClip, dict(max_norm=0.0), "max_norm"), (ds.GlobalClip, dict(max_norm=float("nan")), "max_norm"),
    (ds.GradientStabilizer, dict(gamma1=1.5), "gamma1"), (ds.GradientStabilizer, dict(gamma2=0.0), "gamma2"),
    (ds.GradientStabilizer, dict(eps=-1.0), "eps"),
    (ds.ZClip, dict(alpha=1.0), "alpha"), (ds.ZClip, dict(z_thresh=-2.0), "z_thresh"),
    (ds.ZClip, dict(warmup_steps=0), "warmup_steps"), (ds.ZClip, dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_bad_hyperparameters_raise_value_error_naming_the_argument(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls([("w", torch.nn.Parameter(torch.zeros(3)))], **kw)


def test_duplicate_names_and_tied_params():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        ds.AdaGC([("w", p), ("w", torch.nn.Parameter(torch.zeros(2)))])
    t = ds.AdaGC([("a", p), ("b", p)])  # the same tensor under two names is described once
    assert t.fqns == ["a"]


def test_wrap_behaves_like_an_optimizer_and_checkpoints_transform_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    model2 = copy.deepcopy(model)
    x = torch.randn(32, 8)

    def build(m):
        opt = ds.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2),
                      ds.AdaGC(m.named_parameters(), warmup_steps=2), ds.GradientStabilizer(m.named_parameters()))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return opt, sched

    def run(m, opt, sched, steps):
        for s in range(steps):
            opt.zero_grad()
            (m(x * (1 + s)).square().mean()).backward()
            opt.step()
            sched.step()

    opt, sched = build(model)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    run(model, opt, sched, 4)
    sd = copy.deepcopy(opt.state_dict())
    sched_sd = sched.state_dict()
    params_mid = copy.deepcopy(model.state_dict())
    run(model, opt, sched, 3)
    assert opt.param_groups[0]["lr"] < 1e-2  # the scheduler drives the wrapped optimizer
    # restore into fresh objects and continue: identical to the uninterrupted run
    model2.load_state_dict(params_mid)
    opt2, sched2 = build(model2)
    opt2.load_state_dict(sd)
    sched2.load_state_dict(sched_sd)
    assert opt2.transforms[0].num_steps == 4
    run(model2, opt2, sched2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.transforms[0].state["gamma"], opt2.transforms[0].state["gamma"])


def test_state_dict_is_keyed_by_fqn_and_checks_type():
    m = torch.nn.Linear(3, 2)
    t = ds.AdaGC(m.named_parameters())
    sd = t.state_dict()
    assert set(sd["per_tensor"]) == {"weight", "bias"}
    with pytest.raises(ValueError, match="AdaGC"):
        ds.GradientStabilizer(m.named_parameters()).load_state_dict(sd)
    with pytest.raises(KeyError):
        ds.AdaGC([("other", torch.nn.Parameter(torch.zeros(1)))]).load_state_dict(sd)
