"""Late binding, presence as data and zero-safe state, on one process (issue 16).

References: ``reference.py`` (the papers' equations plus the documented presence rule: a missing,
zero or non-finite gradient neither seeds nor advances state), or the same run without the event
under test (a dry step, a skipped step) where the rule says the event must leave no trace.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import dist_stab as ds
from dist_stab.transforms.base import StaleBindingError
from reference import RefAdaGC, RefGradientStabilizer

TOL = 1e-6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def batch(step, mult=1.0):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(16, 8, generator=g) * mult, torch.randn(16, 4, generator=g)


def loss_of(model, step, mult=1.0):
    x, y = batch(step, mult)
    return (model(x) - y).square().mean()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close(a, b, tol=TOL):
    for n in a:
        d = float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-30))
        assert d <= tol, (n, d)


def train(make, steps, model=None, before_step=None, losses=None):
    model = model or Net()
    opt = make(model)
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(model, step) * (losses(step) if losses else 1.0)
        loss.backward()
        if before_step is not None:
            before_step(model, step)
        opt.step(loss=loss.detach()) if isinstance(opt, ds.WrappedOptimizer) else opt.step()
    return model, opt


# ----------------------------------------------------------------------------------------- late binding
def test_add_param_group_is_followed():
    """A transform with no parameters covers whatever the optimizer updates, groups added later included."""
    def late(m):
        w = ds.wrap(torch.optim.SGD(m.a.parameters(), lr=0.1), ds.AdaGC(warmup_steps=2, max_norm=0.3))
        w.add_param_group({"params": list(m.b.parameters()), "lr": 0.05})
        return w

    def early(m):
        opt = torch.optim.SGD([{"params": list(m.a.parameters())}, {"params": list(m.b.parameters()), "lr": 0.05}],
                              lr=0.1)
        return ds.wrap(opt, ds.AdaGC(m, warmup_steps=2, max_norm=0.3))
    m1, w1 = train(late, 6)
    m2, w2 = train(early, 6)
    assert len(w1.transforms[0].shards) == 4
    assert_close(params_of(m1), params_of(m2), 0)
    assert torch.equal(w1.transforms[0].state["gamma"], w2.transforms[0].state["gamma"])


def test_head_attached_to_the_module_later_is_covered():
    model = Net()
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=0.1), ds.AdaGC(model, warmup_steps=0))
    train(lambda m: w, 2, model=model)
    model.c = nn.Linear(4, 4)
    w.add_param_group({"params": list(model.c.parameters())})
    model.c(torch.randn(3, 4)).sum().backward()
    w.step()
    assert w.transforms[0].fqns[-2:] == ["c.weight", "c.bias"]
    assert bool(w.last_stats["AdaGC"]["active"][-1])


def test_consumed_generator():
    """The optimizer consumed model.parameters(): the transform got nothing and takes the optimizer's."""
    def consumed(m):
        params = m.parameters()
        opt = torch.optim.SGD(params, lr=0.1)
        return ds.wrap(opt, ds.GradientStabilizer(params))

    m1, w1 = train(consumed, 5)
    m2, w2 = train(lambda m: ds.wrap(torch.optim.SGD(m.parameters(), lr=0.1), ds.GradientStabilizer(m)), 5)
    assert len(w1.transforms[0].shards) == 4
    assert_close(params_of(m1), params_of(m2), 0)
    with pytest.raises(StaleBindingError, match="consumed"):
        ds.AdaGC(iter([])).step()


def test_wrap_refuses_parameters_the_optimizer_does_not_update():
    model = Net()
    with pytest.raises(ValueError, match=r"does not update: \['b.bias', 'b.weight'\]"):
        ds.wrap(torch.optim.SGD(model.a.parameters(), lr=0.1), ds.AdaGC(model.named_parameters()))
    model.b.requires_grad_(False)  # frozen parameters outside the optimizer are fine (nothing trains them)
    ds.wrap(torch.optim.SGD(model.a.parameters(), lr=0.1), ds.AdaGC(model.named_parameters()))


def test_frozen_at_build_then_unfrozen():
    """b.weight frozen for 3 steps (no gradient: inactive), then trained: equal to the reference."""
    ref_model = Net()
    names = [n for n, _ in ref_model.named_parameters()]
    ref = RefAdaGC(4, warmup_steps=2, max_norm=0.3)
    for step in range(7):
        ref_model.zero_grad(set_to_none=True)
        loss_of(ref_model, step).backward()
        grads = [None if (n == "b.weight" and step < 3) else p.grad for n, p in ref_model.named_parameters()]
        ref.step(grads)
        with torch.no_grad():
            for p, g in zip(ref_model.parameters(), grads):
                if g is not None:
                    p -= 0.1 * g
    model = Net()
    model.b.weight.requires_grad_(False)
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=0.1), ds.AdaGC(model, warmup_steps=2, max_norm=0.3))
    for step in range(7):
        if step == 3:
            model.b.weight.requires_grad_(True)
        w.zero_grad()
        loss_of(model, step).backward()
        w.step()
    assert_close(params_of(model), dict(zip(names, [p.detach() for p in ref_model.parameters()])))
    gamma = w.transforms[0].state["gamma"]
    assert torch.allclose(gamma, torch.tensor(ref.gamma, dtype=torch.float32), rtol=1e-6)


def test_standalone_stale_binding_raises_and_bind_fixes_it():
    model = Net()
    t = ds.AdaGC(model, warmup_steps=1)
    loss_of(model, 0).backward()
    t.step()
    model.zero_grad(set_to_none=True)
    for m in model.modules():  # what fully_shard / to_empty do: new parameter objects, same names
        for n, p in list(m.named_parameters(recurse=False)):
            setattr(m, n, nn.Parameter(p.detach().clone()))
    loss_of(model, 1).backward()
    with pytest.raises(StaleBindingError, match=r"t.bind\(model\)|transform.bind\(model\)"):
        t.step()
    gamma = t.state["gamma"].clone()
    t.bind(model)
    assert torch.equal(t.state["gamma"], gamma)  # state moved with the names
    st = t.step()
    assert int(st["num_active"]) == 4


# ----------------------------------------------------------------------------------------- zero and empty steps
TRANSFORMS = {
    "adagc": lambda m: ds.AdaGC(m, warmup_steps=2, max_norm=0.3),
    "gradient_stabilizer": lambda m: ds.GradientStabilizer(m),
    "zclip": lambda m: ds.ZClip(m, warmup_steps=2),
    "global_clip": lambda m: ds.GlobalClip(m, max_norm=0.3),
}


def _all_state(t):
    sd = t.state_dict()
    sd.pop("num_steps")
    return sd


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dry", ["zeros", "none"])
def test_dry_step_leaves_no_trace(name, dry):
    """A zero-gradient step (DCP's / torchtitan's state initialisation) or a step with no gradient at all,
    before the first real step and in the middle of warm-up, changes no state; the run equals one without it."""
    def make(m):
        return ds.wrap(torch.optim.SGD(m.parameters(), lr=0.1), TRANSFORMS[name](m),
                       monitor=ds.SpikeMonitor(window=8, min_history=2))

    def run(with_dry):
        model = Net()
        w = make(model)
        fresh = _all_state(w.transforms[0])
        for step in range(6):
            if with_dry and step in (0, 1):
                for p in model.parameters():
                    p.grad = torch.zeros_like(p) if dry == "zeros" else None
                before = copy.deepcopy(_all_state(w.transforms[0]))
                mon = {k: v.clone() for k, v in w.monitor.state.items()}
                w.step()
                after = _all_state(w.transforms[0])
                assert str(after) == str(before)
                if step == 0:
                    assert str(after) == str(fresh)
                assert torch.equal(w.monitor.state["grad_norm_count"], mon["grad_norm_count"])
                assert torch.equal(w.monitor.state["grad_norm_buf"], mon["grad_norm_buf"])
            w.zero_grad()
            loss_of(model, step).backward()
            w.step(loss=torch.tensor(1.0))
        return model, w

    m1, w1 = run(True)
    m2, w2 = run(False)
    assert_close(params_of(m1), params_of(m2), 0)
    assert str(_all_state(w1.transforms[0])) == str(_all_state(w2.transforms[0]))


def test_adagc_zero_gradient_in_warmup_does_not_zero_gamma():
    """One all-zero gradient of one tensor during warm-up (an MoE expert without tokens): gamma is not
    seeded with 0 and that tensor is clipped normally afterwards; equal to the reference."""
    model, ref_model = Net(), Net()
    t = ds.AdaGC(model, warmup_steps=3, max_norm=0.5)
    ref = RefAdaGC(4, warmup_steps=3, max_norm=0.5)
    for step in range(8):
        for m in (model, ref_model):
            m.zero_grad(set_to_none=True)
            loss_of(m, step, mult=(20.0 if step == 6 else 1.0)).backward()
            if step == 1:
                m.a.weight.grad.zero_()
        t.step()
        ref.step([p.grad for p in ref_model.parameters()])
        for m in (model, ref_model):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
    assert float(t.state["gamma"][0]) > 0 and int(t.state["count"][0]) == 3
    assert torch.allclose(t.state["gamma"], torch.tensor(ref.gamma, dtype=torch.float32), rtol=1e-6)
    assert_close(params_of(model), params_of(ref_model))


def test_gradient_stabilizer_inactive_tensor_matches_reference():
    model, ref_model = Net(), Net()
    t = ds.GradientStabilizer(model)
    ref = RefGradientStabilizer(4)
    for step in range(5):
        for m in (model, ref_model):
            m.zero_grad(set_to_none=True)
            loss_of(m, step).backward()
            if step % 2:
                m.b.bias.grad = None
        st = t.step()
        ref.step([p.grad for p in ref_model.parameters()])
        assert bool(st["active"][3]) == (step % 2 == 0)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            if q.grad is not None:
                assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)
    assert torch.allclose(t.state["m"], torch.tensor(ref.m, dtype=torch.float32), rtol=1e-6)
    assert t.state["k"].tolist() == [5.0, 5.0, 5.0, 3.0]


# ----------------------------------------------------------------------------------------- skip and spike policy
@pytest.mark.parametrize("series", ["grad", "loss"])
def test_skipped_spike_then_smaller_spike_is_also_skipped(series):
    """A skipped x1000 spike stays out of the monitor's window, so a x30 spike two steps later still
    scores far above the threshold and is skipped too."""
    big, small = 1000.0, 30.0

    def spike(step):
        return big if step == 20 else small if step == 22 else 1.0
    kw = {"grad_z": 6.0} if series == "grad" else {"loss_z": 6.0}

    def make(m):
        return ds.wrap(torch.optim.SGD(m.parameters(), lr=0.01), ds.GlobalClip(m, max_norm=1e9),
                       skip=ds.SkipStep(**kw), monitor=ds.SpikeMonitor(window=50, min_history=5))
    model, w = train(make, 25, losses=spike)
    expected = "grad_spike" if series == "grad" else "loss_spike"
    assert [s for s, r in w.skip.skipped_steps_with_reasons() if expected in r] == [21, 23]
    assert int(w.monitor.state[("grad_norm" if series == "grad" else "loss") + "_count"]) == 23


def test_skip_step_alone_skips_a_nonfinite_loss():
    model = Net()
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=0.1), ds.AdaGC(model, warmup_steps=1), skip=ds.SkipStep())
    loss_of(model, 0).backward()
    before, state = params_of(model), _all_state(w.transforms[0])
    w.step(loss=torch.tensor(float("nan")))
    assert int(w.skip.skipped) == 1
    assert w.skip.skipped_steps_with_reasons() == [(1, ["nonfinite_loss"])]
    assert int(w.last_stats["spikes"]["skip_reason"]) == 2
    assert_close(params_of(model), before, 0)
    assert str(_all_state(w.transforms[0])) == str(state)
    w.step(loss=torch.tensor(1.0))
    assert int(w.skip.skipped) == 1


@pytest.mark.parametrize("name", ["adagc", "gradient_stabilizer", "zclip"])
def test_skipped_step_leaves_every_state_as_if_it_had_not_happened(name):
    def make(m):
        return ds.wrap(torch.optim.SGD(m.parameters(), lr=0.1), TRANSFORMS[name](m), skip=ds.SkipStep(),
                       monitor=ds.SpikeMonitor(window=8, min_history=2))

    def run(bad):
        model = Net()
        w = make(model)
        for step in range(6):
            w.zero_grad()
            loss_of(model, step).backward()
            if step == 1 and bad:
                model.a.weight.grad[0, 0] = float("nan")
            if step == 1 and not bad:
                continue
            w.step(loss=torch.tensor(1.0 + step))
        return model, w
    m1, w1 = run(True)
    m2, w2 = run(False)
    assert int(w1.skip.skipped) == 1
    assert_close(params_of(m1), params_of(m2), 0)
    assert str(_all_state(w1.transforms[0])) == str(_all_state(w2.transforms[0]))
    for k in ("loss_buf", "loss_count", "grad_norm_buf", "grad_norm_count"):
        assert torch.equal(w1.monitor.state[k], w2.monitor.state[k]), k


def test_no_gradient_anywhere_under_wrap_is_a_no_op():
    model = Net()
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=0.1), ds.AdaGC(model), monitor=ds.SpikeMonitor())
    st0 = _all_state(w.transforms[0])
    w.step()
    assert str(_all_state(w.transforms[0])) == str(st0)
    assert int(w.last_stats["AdaGC"]["num_active"]) == 0
    assert not bool(w.last_stats["spikes"]["grad_norm_present"])
    assert int(w.monitor.state["grad_norm_count"]) == 0 and int(w.monitor.state["loss_count"]) == 0


def test_many_steps_changing_active_set_build_nothing_new():
    """MoE-like: the set of tensors with a gradient changes every step; nothing is cached per subset."""
    experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    t = ds.AdaGC(experts, warmup_steps=2)
    layouts, sizes = set(), []
    ref = RefAdaGC(12, warmup_steps=2)
    ref_experts = copy.deepcopy(experts)
    for step in range(10):
        active = [e for e in range(6) if (step + e) % 3 != 0]
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        for mods in (experts, ref_experts):
            mods.zero_grad(set_to_none=True)
            sum(mods[e](x).square().mean() for e in active).backward()
        t.step()
        layouts.add(id(t._layout))
        sizes.append({k: len(v) for k, v in vars(t).items() if isinstance(v, (dict, list, set))})
        ref.step([p.grad for p in ref_experts.parameters()])
        for p, q in zip(experts.parameters(), ref_experts.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)
    assert len(layouts) == 1
    assert all(s == sizes[1] for s in sizes[1:])  # no per-subset cache: nothing grows
    g = torch.tensor([math.inf if x is None else x for x in ref.gamma], dtype=torch.float32)
    assert torch.allclose(t.state["gamma"], g, rtol=1e-6)
