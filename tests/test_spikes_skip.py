"""Spike statistics, the skip-step policy and DCP checkpoint/resume across world sizes."""
import copy
import math
import os
import tempfile

import numpy as np
import pytest
import torch

import dist_stab as ds
from dist_launcher import run_dist
from test_transforms_dist import Net, build_model, full_params, loss_fn, parallelize, rel


# ---------------------------------------------------------------- spike score
def hand_count(xs, window, sigma, min_history):
    """Independent reference: trailing window that excludes x_t, unbiased std, one-sided."""
    flags = []
    for t, x in enumerate(xs):
        hist = [v for v in xs[max(0, t - window):t]]
        if len(hist) < min_history:
            flags.append(False)
            continue
        m, s = np.mean(hist), np.std(hist, ddof=1)
        flags.append(bool(x > m + sigma * s))
    return flags


def test_spike_score_equals_hand_count():
    rng = np.random.default_rng(0)
    xs = list(3.0 + 0.01 * rng.standard_normal(400) - np.linspace(0, 0.5, 400))
    planted = [60, 200, 330]  # more than a window apart: an earlier spike inflates the window's std
    for t in planted:
        xs[t] += 1.0
    mon = ds.SpikeMonitor(window=100, sigma=10.0, min_history=20, reduce_loss=False)
    flags = [bool(mon.update(loss=torch.tensor(x))["loss_spike"]) for x in xs]
    ref = hand_count(xs, 100, 10.0, 20)
    assert flags == ref
    # exactly the planted spikes are found
    assert [t for t, f in enumerate(flags) if f] == planted
    score = float(mon.scores()["loss_spike_score"])
    assert score == pytest.approx(100.0 * len(planted) / len(xs))


def test_spike_monitor_ignores_nonfinite_and_checks_args():
    mon = ds.SpikeMonitor(window=10, sigma=3.0, min_history=3, reduce_loss=False)
    for x in [1.0, 1.1, 0.9, float("nan"), 1.0]:
        out = mon.update(loss=torch.tensor(x))
    assert int(mon.state["loss_count"]) == 4 and torch.isfinite(mon.state["loss_buf"]).all()
    for kw, name in [(dict(window=1), "window"), (dict(sigma=0), "sigma"), (dict(min_history=1), "min_history")]:
        with pytest.raises(ValueError, match=name):
            ds.SpikeMonitor(**kw)


# ---------------------------------------------------------------- skip step, one process
def _train(opt_factory, steps, inject=None, drop=(), model_seed=0, loss_mult=None):
    torch.manual_seed(model_seed)
    model = Net()
    opt = opt_factory(model)
    for step in range(steps):
        if step in drop:
            continue
        opt.zero_grad()
        loss = loss_fn(model, step) * (loss_mult(step) if loss_mult else 1.0)
        loss.backward()
        if inject is not None and step == inject[0]:
            model.w1.weight.grad[0, 0] = inject[1]
        opt.step(loss=loss.detach())
    return model, opt


def _adamw_adagc(skip_kw, opt_cls=torch.optim.AdamW):
    def make(model):
        return ds.wrap(opt_cls(model.parameters(), lr=1e-2), ds.AdaGC(model.named_parameters(), warmup_steps=1),
                       skip=ds.SkipStep(**skip_kw))
    return make


@pytest.mark.parametrize("mode", ["restore", "host_sync"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skipped_step_equals_step_never_taken(mode, bad):
    m1, o1 = _train(_adamw_adagc(dict(mode=mode)), 7, inject=(4, bad))
    m2, o2 = _train(_adamw_adagc(dict(mode=mode)), 7, drop=(4,))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(o1.transforms[0].state["gamma"], o2.transforms[0].state["gamma"])
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for k in o1.state[p1]:
            assert torch.equal(o1.state[p1][k], o2.state[p2][k]), k
    assert int(o1.skip.skipped) == 1 and o1.skip.skipped_steps() == [5]  # 1-based call number
    assert o1.skip.skipped_steps_with_reasons() == [(5, ["nonfinite_grad"])]
    assert int(o2.skip.skipped) == 0


@pytest.mark.parametrize("name", ["StableSPAM", "SPAM", "SCALE"])
def test_skip_with_package_optimizers_equals_step_never_taken(name):
    from dist_stab import optim

    def make(model):
        inner = optim.SCALE(model, lr=1e-2) if name == "SCALE" else getattr(optim, name)(model.named_parameters(), lr=1e-2)
        return ds.wrap(inner, ds.AdaGC(model.named_parameters(), warmup_steps=1), skip=ds.SkipStep())
    m1, o1 = _train(make, 7, inject=(4, float("nan")))
    m2, o2 = _train(make, 7, drop=(4,))
    assert int(o1.skip.skipped) == 1
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert [g.get("step") for g in o1.param_groups] == [g.get("step") for g in o2.param_groups]


def test_loss_spike_skip_and_grad_spike_skip():
    spike = lambda s: 1e3 if s == 30 else 1.0  # noqa: E731
    m, o = _train(_adamw_adagc(dict(loss_z=6.0)), 35, loss_mult=spike)
    assert int(o.skip.skipped) == 1 and o.skip.skipped_steps() == [31]
    assert o.skip.skipped_steps_with_reasons() == [(31, ["loss_spike"])]
    assert all(torch.isfinite(p).all() for p in m.parameters())
    m, o = _train(_adamw_adagc(dict(grad_z=6.0)), 35, inject=(30, 1e6))
    assert o.skip.skipped_steps_with_reasons() == [(31, ["grad_spike"])]
    m_ref, _ = _train(_adamw_adagc(dict(grad_z=6.0)), 35, drop=(30,))
    for a, b in zip(m.parameters(), m_ref.parameters()):
        assert torch.equal(a, b)


def test_skip_without_transforms_uses_a_norm_probe():
    def make(model):
        return ds.wrap(torch.optim.SGD(model.parameters(), lr=0.1), skip=ds.SkipStep())
    m1, o1 = _train(make, 5, inject=(2, float("nan")))
    m2, _ = _train(make, 5, drop=(2,))
    assert int(o1.skip.skipped) == 1
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_skip_policy_bad_arguments():
    with pytest.raises(ValueError, match="loss_z"):
        ds.SkipStep(loss_z=-1)
    with pytest.raises(ValueError, match="mode"):
        ds.SkipStep(mode="later")


# ---------------------------------------------------------------- multi-process
def _inject_worker(rank, world, bad):
    model = parallelize(build_model(), "fsdp", world)
    opt = ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2),
                  ds.AdaGC(model.named_parameters(), warmup_steps=2), ds.GradientStabilizer(model.named_parameters()),
                  skip=ds.SkipStep(grad_z=6.0 if bad == "spike" else None), monitor=ds.SpikeMonitor(min_history=10))
    skips = []
    for step in range(16):
        opt.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        if step == 12 and rank == 1:  # one tensor, one rank
            g = model.w2.weight.grad._local_tensor
            if bad == "spike":
                g.mul_(1e6)
            else:
                g[0, 0] = float(bad)
        opt.step(loss=loss.detach())
        skips.append(bool(opt.last_stats["spikes"]["skip"]))
    states = [t.state for t in opt.transforms]
    finite = all(torch.isfinite(v).all() for st in states for v in st.values()) and all(
        torch.isfinite(v._local_tensor if hasattr(v, "_local_tensor") else v).all()
        for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"skips": skips, "skipped": int(opt.skip.skipped), "finite": finite, "params": full_params(model),
            "gamma": states[0]["gamma"].clone(), "monitor": {k: v.clone() for k, v in opt.monitor.state.items()}}


@pytest.mark.dist
@pytest.mark.parametrize("bad", ["nan", "inf", "spike"])
def test_injected_bad_gradient_on_one_rank_is_skipped_everywhere(bad):
    res = run_dist(_inject_worker, 2, bad)
    for r in res:
        assert r["skipped"] == 1 and r["skips"][12] and sum(r["skips"]) == 1
        assert r["finite"]
        assert all(torch.isfinite(p).all() for p in r["params"].values())
    assert torch.equal(res[0]["gamma"], res[1]["gamma"])
    for k, v in res[0]["monitor"].items():  # spike statistics identical on every rank, bit for bit
        assert torch.equal(v, res[1]["monitor"][k]), k
    assert int(res[0]["monitor"]["loss_count"]) == 15  # the skipped step's loss stays out of the window
    for n in res[0]["params"]:
        assert torch.equal(res[0]["params"][n], res[1]["params"][n])


# ---------------------------------------------------------------- DCP checkpoint across world sizes
def _make_opt(model):
    return ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2),
                   ds.AdaGC(model.named_parameters(), warmup_steps=2), ds.ZClip(model.named_parameters(), warmup_steps=2),
                   skip=ds.SkipStep(), monitor=ds.SpikeMonitor(window=8, min_history=2))


def _ckpt_worker(rank, world, path, phase):
    from dist_stab import checkpoint
    layout = "fsdp" if world > 1 else "single"
    model = parallelize(build_model(), layout, world)
    opt = _make_opt(model)
    start = 0
    if phase == "resume":
        extra = checkpoint.load(path, model, opt, extra={"step": torch.zeros((), dtype=torch.int64)})
        start = int(extra["step"])
    for step in range(start, start + 4):
        opt.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        opt.step(loss=loss.detach())
    if phase == "save":
        checkpoint.save(path, model, opt, extra={"step": torch.tensor(start + 4)})
    return {"params": full_params(model), "gamma": opt.transforms[0].state["gamma"].clone(),
            "zmean": opt.transforms[1].zstate["mean"].clone(), "monitor": opt.monitor.state["loss_buf"].clone()}


def _straight_worker(rank, world):
    model = parallelize(build_model(), "fsdp", world)
    opt = _make_opt(model)
    for step in range(8):
        opt.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        opt.step(loss=loss.detach())
    return {"params": full_params(model), "gamma": opt.transforms[0].state["gamma"].clone(),
            "zmean": opt.transforms[1].zstate["mean"].clone(), "monitor": opt.monitor.state["loss_buf"].clone()}


@pytest.mark.dist
@pytest.mark.parametrize("save_world,load_world", [(4, 2), (2, 4)])
def test_dcp_checkpoint_resumes_on_another_world_size(save_world, load_world):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        run_dist(_ckpt_worker, save_world, path, "save")
        resumed = run_dist(_ckpt_worker, load_world, path, "resume")
    straight = run_dist(_straight_worker, 2)[0]
    for r in resumed:
        for n, p in straight["params"].items():
            assert rel(r["params"][n], p) < 1e-6, n
        for k in ("gamma", "zmean", "monitor"):
            assert rel(r[k], straight[k]) < 1e-6, k
