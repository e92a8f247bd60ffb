"""The wrapper as a torch optimizer (issue 17): torch's state-dict format, every state-dict path (own
load_state_dict, torch.distributed.checkpoint's helpers flattened or not, across world sizes), the resume
rule, atomic loads, the earlier format, copies and hooks.
"""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import dist_stab as ds
from dist_stab import wrap_state
from dist_stab.optim import AdamW as DsAdamW
from dist_launcher import run_dist
from test_binding_single import Net


def loss_of(model, step):
    g = torch.Generator().manual_seed(10 + step)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    return (model(x) - y).square().mean() * (50.0 if step == 5 else 1.0)


def make(model, kind="torch"):
    if kind == "torch":
        inner = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
        return ds.wrap(inner, ds.AdaGC(model, warmup_steps=2, max_norm=0.5), skip=ds.SkipStep(grad_z=3.0),
                       monitor=ds.SpikeMonitor(window=8, min_history=2))
    inner = DsAdamW(model.parameters(), lr=1e-2)
    return ds.wrap(inner, ds.GradientStabilizer(model), skip=ds.SkipStep())


def run(model, w, steps, start=0):
    for step in range(start, start + steps):
        w.zero_grad()
        loss = loss_of(model, step)
        loss.backward()
        if step == 2:
            model.a.weight.grad[0, 0] = float("nan")  # a skipped step
        w.step(loss=loss.detach())


def snapshot(model, w):
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"t.{k}": v.clone() for k, v in w.transforms[0].state.items()})
    if w.monitor is not None:
        out.update({f"m.{k}": v.clone() for k, v in w.monitor.state.items()})
    out["skipped"] = w.skip.skipped.clone()
    return out


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["torch", "ds_adamw"])
def test_state_dict_is_torchs_format_and_round_trips(kind):
    model = Net()
    w = make(model, kind)
    run(model, w, 4)
    sd = w.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert all(isinstance(k, int) for k in sd["state"])
    blob = sd["param_groups"][0][wrap_state.KEY]
    assert isinstance(blob, bytes) and wrap_state.decode(blob)["format"] == wrap_state.FORMAT
    if kind == "torch":
        assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # what HF Trainer / Lightning do
    run(model, w, 4, start=4)
    model2 = Net()
    w2 = make(model2, kind)
    model2.load_state_dict({n: p for n, p in snapshot_params_after(4, kind).items()})
    w2.load_state_dict(sd)
    run(model2, w2, 4, start=4)
    assert_equal(snapshot(model, w), snapshot(model2, w2))


def snapshot_params_after(steps, kind):
    model = Net()
    w = make(model, kind)
    run(model, w, steps)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_earlier_format_still_loads():
    model = Net()
    w = make(model)
    run(model, w, 4)
    old = {"optimizer": w.optimizer.state_dict(), "transforms": [t.state_dict() for t in w.transforms],
           "monitor": w.monitor.state_dict(), "skip": w.skip.state_dict()}
    old = copy.deepcopy(old)  # torch's state dicts reference the live state tensors
    old["optimizer"]["param_groups"][0].pop(wrap_state.KEY)
    model2 = Net()
    model2.load_state_dict(model.state_dict())
    w2 = make(model2)
    w2.load_state_dict(old)
    run(model, w, 3, start=4)
    run(model2, w2, 3, start=4)
    assert_equal(snapshot(model, w), snapshot(model2, w2))


def test_resume_rule_adding_and_dropping_components():
    """Saved without a monitor, loaded with one (and the reverse): loads, with a warning; the new component
    starts fresh, the transforms' and optimizer's state are restored."""
    model = Net()
    w = ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), ds.AdaGC(model, warmup_steps=2))
    run(model, w, 3)
    sd = w.state_dict()
    w2 = make(Net())
    with pytest.warns(RuntimeWarning, match="monitor starts fresh.*skip starts fresh"):
        w2.load_state_dict(sd)
    assert torch.equal(w2.transforms[0].state["gamma"], w.transforms[0].state["gamma"])
    assert int(w2.monitor.state["steps"]) == 0
    w3 = ds.wrap(torch.optim.AdamW(Net().parameters(), lr=1e-2))
    with pytest.warns(RuntimeWarning, match="saved AdaGC state dropped"):
        w3.load_state_dict(w2.state_dict())
    w4 = ds.wrap(torch.optim.AdamW(Net().parameters(), lr=1e-2), ds.AdaGC(), ds.GradientStabilizer())
    with pytest.warns(RuntimeWarning, match="GradientStabilizer starts fresh"):
        w4.load_state_dict(sd)


def test_failed_load_leaves_everything_as_it_was():
    model = Net()
    w = make(model)
    run(model, w, 3)
    before = snapshot(model, w)
    inner_before = copy.deepcopy(w.optimizer.state_dict())
    other = Net()
    bad_monitor = ds.wrap(torch.optim.AdamW(other.named_parameters(), lr=1e-2), ds.AdaGC(other, warmup_steps=2),
                          skip=ds.SkipStep(), monitor=ds.SpikeMonitor(window=16, min_history=2))
    run(other, bad_monitor, 2)
    with pytest.raises(ValueError, match="window"):
        w.load_state_dict(bad_monitor.state_dict())
    assert_equal(snapshot(model, w), before)
    assert str(w.optimizer.state_dict()) == str(inner_before)
    one_group = ds.wrap(torch.optim.AdamW([{"params": list(other.a.parameters())},
                                           {"params": list(other.b.parameters())}], lr=1e-2), ds.AdaGC(other))
    with pytest.raises(ValueError):
        w.load_state_dict(one_group.state_dict())  # the inner optimizer refuses: nothing of ours changed either
    assert_equal(snapshot(model, w), before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("kind", ["torch", "ds_adamw"])
def test_copies_step_bit_identically(how, kind):
    model = Net()
    w = make(model, kind)
    run(model, w, 3)
    if how == "deepcopy":
        model2, w2 = copy.deepcopy((model, w))
    elif how == "pickle":
        model2, w2 = pickle.loads(pickle.dumps((model, w)))
    else:
        buf = io.BytesIO()
        torch.save((model, w), buf)
        buf.seek(0)
        model2, w2 = torch.load(buf, weights_only=False)
    run(model, w, 4, start=3)
    run(model2, w2, 4, start=3)
    assert_equal(snapshot(model, w), snapshot(model2, w2))
    assert all(p is not q for p, q in zip(model.parameters(), model2.parameters()))


def test_hooks_fire_once_in_torchs_order():
    model = Net()
    w = make(model)
    calls = []
    w.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    w.register_step_post_hook(lambda o, a, k: calls.append("post"))
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre"))
    h2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append("gpost"))
    w.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["param_groups"][0]["marker"] = 1
        return sd
    w.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        assert sd["param_groups"][0].pop("marker") == 1
        return sd
    w.register_load_state_dict_pre_hook(load_pre)
    w.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", int(o.transforms[0].num_steps))))
    try:
        run(model, w, 1)
        assert calls == ["gpre", "pre", "post", "gpost"]
        calls.clear()
        sd = w.state_dict()
        assert calls == ["sd_pre", "sd_post"]
        calls.clear()
        w.load_state_dict(sd)
        assert calls == ["load_pre", ("load_post", 1)]  # our state is in place when post hooks run
    finally:
        h1.remove()
        h2.remove()


def test_lr_scheduler_on_the_wrapper():
    model = Net()
    w = make(model)
    sched = torch.optim.lr_scheduler.StepLR(w, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for step in range(4):
            run(model, w, 1, start=step)
            sched.step()
    assert w.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


# ------------------------------------------------------------------------------------- DCP across world sizes
def _dcp_worker(rank, world, phase, path, flat):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from test_transforms_dist import build_model, full_params, loss_fn, parallelize

    model = parallelize(build_model(), "fsdp", world) if world > 1 else build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = ds.wrap(opt, ds.AdaGC(model, warmup_steps=2, max_norm=0.5), skip=ds.SkipStep(grad_z=3.0),
                monitor=ds.SpikeMonitor(window=8, min_history=2))
    opts = StateDictOptions(flatten_optimizer_state_dict=flat)

    def train(steps):
        for step in steps:
            w.zero_grad()
            loss = loss_fn(model, step)
            loss.backward()
            w.step(loss=loss.detach())
    if phase == "save":
        train(range(4))
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, w, options=opts)},
                 checkpoint_id=path)
    else:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, w, options=opts)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, w, sd["optim"], options=opts)
    train(range(4, 8))
    return {"params": full_params(model), "gamma": w.transforms[0].state["gamma"].clone(),
            "monitor": {k: v.clone() for k, v in w.monitor.state.items()}, "skipped": int(w.skip.skipped),
            "skip_steps": w.skip.steps}


@pytest.mark.dist
@pytest.mark.parametrize("flat,worlds", [(False, (2, 1)), (True, (2, 1)), (True, (4, 2))])
def test_dcp_helpers_resume_on_another_world_size(tmp_path, flat, worlds):
    path = str(tmp_path / "ckpt")
    saved = run_dist(_dcp_worker, worlds[0], "save", path, flat)[0]
    loaded = run_dist(_dcp_worker, worlds[1], "load", path, flat)[0]
    assert saved["skipped"] >= 1 and loaded["skipped"] == saved["skipped"]
    assert loaded["skip_steps"] == saved["skip_steps"] == 8
    assert torch.allclose(loaded["gamma"], saved["gamma"], rtol=1e-6)
    for k in saved["monitor"]:
        assert torch.allclose(loaded["monitor"][k].double(), saved["monitor"][k].double(), rtol=1e-6), k
    for n, v in saved["params"].items():
        assert float((loaded["params"][n] - v).abs().max()) <= 1e-6 * float(v.abs().max()), n


def test_dist_stab_checkpoint_helpers_and_the_earlier_dcp_format(tmp_path):
    """dist_stab.checkpoint.save/load round trip, and a checkpoint of the earlier format (dist_stab's state under
    a top-level "dist_stab" key, written here as that code wrote it) loads into the wrapper."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dist_stab import checkpoint
    from dist_stab.checkpoint import _legacy_template

    model = Net()
    w = make(model)
    run(model, w, 4)
    checkpoint.save(str(tmp_path / "new"), model, w)
    msd, osd = get_state_dict(model, w.optimizer)
    for g in osd["param_groups"]:
        g.pop(wrap_state.KEY, None)
    dcp.save({"model": msd, "optim": osd, "dist_stab": _legacy_template(w), "extra": {}},
             checkpoint_id=str(tmp_path / "old"))
    run(model, w, 3, start=4)
    for name in ("new", "old"):
        model2 = Net()
        w2 = make(model2)
        checkpoint.load(str(tmp_path / name), model2, w2)
        run(model2, w2, 3, start=4)
        assert_equal(snapshot(model, w), snapshot(model2, w2))


def test_state_saved_under_ddp_names_loads_into_the_plain_model():
    """A checkpoint whose transform state is keyed "module.a.weight" (DDP) loads into the plain model."""
    model = Net()
    w = make(model)
    run(model, w, 4)
    payload = wrap_state.payload_of(w)
    for t in payload["transforms"].values():
        t["per_tensor"] = {"module." + k: v for k, v in t["per_tensor"].items()}
    sd = copy.deepcopy(w.state_dict())
    sd["param_groups"][0][wrap_state.KEY] = wrap_state.encode(payload)
    w2 = make(Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing starts fresh
        w2.load_state_dict(sd)
    assert torch.equal(w2.transforms[0].state["gamma"], w.transforms[0].state["gamma"])
    assert torch.equal(w2.transforms[0].state["count"], w.transforms[0].state["count"])


def test_observe_loss_feeds_a_bare_step():
    model = Net()
    w = make(model)
    loss_of(model, 0).backward()
    w.observe_loss(torch.tensor(float("nan")))
    w.step()  # as HF Trainer / Accelerate call it
    assert w.skip.skipped_steps_with_reasons() == [(1, ["nonfinite_loss"])]
    w.zero_grad()
    loss_of(model, 1).backward()
    w.step()  # the observed loss was used once
    assert not bool(w.last_stats["spikes"]["loss_present"])


def test_observe_loss_combines_the_micro_batches_of_a_step():
    """Gradient accumulation: every micro-batch's loss is observed; the step sees their mean (un-scaled losses,
    Accelerate's) or sum (losses already divided by the accumulation count, the HF Trainer's), then starts over."""
    model = Net()
    w = make(model)
    for losses, reduce, expect in (([1.0, 3.0, 8.0], "mean", 4.0), ([0.5, 0.25], "sum", 0.75), ([2.0], "mean", 2.0)):
        loss_of(model, 0).backward()
        for x in losses:
            w.observe_loss(torch.tensor(x), reduce=reduce)
        w.step()
        w.zero_grad()
        assert float(w.last_stats["spikes"]["loss"]) == expect
    w.observe_loss(torch.tensor(5.0))
    loss_of(model, 0).backward()
    w.step(loss=torch.tensor(7.0))  # a loss given to step wins; the observed one is dropped
    assert float(w.last_stats["spikes"]["loss"]) == 7.0
    w.zero_grad()
    loss_of(model, 0).backward()
    w.step()
    assert not bool(w.last_stats["spikes"]["loss_present"])
    w.observe_loss(torch.tensor(3.0))
    w.observe_loss(None)  # dropped: a step the framework did not take
    loss_of(model, 0).backward()
    w.step()
    assert not bool(w.last_stats["spikes"]["loss_present"])
    w.observe_loss(torch.tensor(1.0))
    with pytest.raises(ValueError, match="reduce='sum' after reduce='mean'"):
        w.observe_loss(torch.tensor(1.0), reduce="sum")
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        w.observe_loss(torch.tensor(1.0), reduce="max")


@pytest.mark.parametrize("preclipped", [True, False])
def test_warns_once_when_the_gradients_arrive_clipped(preclipped):
    """A framework's global clip before the step (here torch's clip_grad_norm_ to 0.05, below every raw norm of
    this run) makes the norm the transforms see constant: warned once; the raw gradients never warn."""
    model = Net()
    w = ds.wrap(torch.optim.SGD(model.parameters(), lr=1e-3), ds.AdaGC(model))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(12):
            w.zero_grad()
            loss_of(model, step).backward()
            if preclipped:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            w.step()
    hits = [r for r in rec if "consecutive steps" in str(r.message)]
    assert len(hits) == (1 if preclipped else 0)
    if preclipped:
        assert "0.05" in str(hits[0].message) and "AdaGC" in str(hits[0].message)
