"""SCALE's cached step (items and ScalePlan reused while the gradients are the same objects) against the
eager path: an LR scheduler, new gradient objects, a parameter without a gradient for a step,
load_state_dict in the middle; the Triton row kernel and 1-D AdamW run in Triton's interpreter."""
import copy
import os

import pytest
import torch

from dist_stab.optim import SCALE

pytest.importorskip("dist_stab.kernels.scale_rows")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

SHAPES = [("model.embed_tokens.weight", (20, 8)), ("model.layers.0.input_layernorm.weight", (8,)),
          ("model.layers.0.self_attn.q_proj.weight", (8, 8)), ("model.layers.0.mlp.up_proj.weight", (12, 8)),
          ("model.layers.0.mlp.down_proj.weight", (8, 12)), ("model.norm.weight", (8,)), ("lm_head.weight", (20, 8))]


def run(triton, monkeypatch, steps=6, new_grads=(), drop=None, reload_at=None):
    """Params after ``steps`` (lr halved each step by LambdaLR); ``new_grads``: steps whose grads are new
    objects (else copied into the same ones); ``drop = (step, name)``: that param has no grad at that step;
    ``reload_at``: load_state_dict of the state saved one step earlier."""
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1" if triton else "0")
    gen = torch.Generator().manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in SHAPES]
    opt = SCALE(named, lr=1e-2, weight_decay=0.1, adam_lr=3e-2, last_layer="lm_head.weight", fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    saved = None
    for step in range(steps):
        for n, p in named:
            g = torch.randn(p.shape, generator=gen)
            if drop == (step, n):
                p.grad = None
            elif p.grad is None or step in new_grads:
                p.grad = g
            else:
                p.grad.copy_(g)
        if reload_at is not None and step == reload_at - 1:
            saved = copy.deepcopy(opt.state_dict())
        if reload_at is not None and step == reload_at:
            opt.load_state_dict(saved)
        opt.step()
        sched.step()
    return [p.detach().clone() for _, p in named], opt


def check(monkeypatch, **kw):
    got, opt = run(True, monkeypatch, **kw)
    ref, _ = run(False, monkeypatch, **kw)
    for (name, _), a, b in zip(SHAPES, got, ref):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-6, (name, err)
    return opt


@pytest.fixture
def launches(monkeypatch):
    """Launches of the row kernel and of the 1-D AdamW kernel."""
    from dist_stab.kernels import scale_rows

    calls = {"rows": 0, "adamw": 0}
    real_rows, real_adamw = scale_rows._launch, scale_rows._adamw_kernel

    def rows(*args, **kw):
        calls["rows"] += 1
        return real_rows(*args, **kw)

    class Adamw:
        def __getitem__(self, grid):
            calls["adamw"] += 1
            return real_adamw[grid]

    monkeypatch.setattr(scale_rows, "_launch", rows)
    monkeypatch.setattr(scale_rows, "_adamw_kernel", Adamw())
    return calls


def test_persistent_grads_build_once(monkeypatch, launches):
    """Same grad objects every step: items and plan built once; the scheduler's lr is followed."""
    opt = check(monkeypatch)
    assert opt.cache_builds == 1
    assert launches["adamw"] == 6 and launches["rows"] > 0


def test_new_grad_objects(monkeypatch, launches):
    """New gradient objects of the same dtypes, shapes and strides: the plan is kept (built once)."""
    opt = check(monkeypatch, new_grads=(2, 4))
    assert opt.cache_builds == 1


def test_param_without_grad_for_a_step(monkeypatch, launches):
    """lm_head and a norm gain lose their grad at step 2 (plan rebuilt without them, then with them)."""
    check(monkeypatch, drop=(2, "lm_head.weight"))
    opt = check(monkeypatch, drop=(3, "model.norm.weight"))
    assert opt.cache_builds == 3  # first, without the gain, with it again (a new grad object)


def test_load_state_dict_in_the_middle(monkeypatch, launches):
    opt = check(monkeypatch, reload_at=3)
    assert opt.cache_builds == 2


def test_storage_moved(monkeypatch, launches):
    """``p.data = ...`` moves a parameter: the cached views would be stale, so the plan is built again."""
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    p = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.warns(UserWarning, match="no last layer"):
        opt = SCALE([("w", p)], lr=1e-2)
    p.grad = torch.randn(6, 4)
    opt.step()
    p.data = torch.zeros(6, 4)
    opt.step()
    assert opt.cache_builds == 2
    assert p.abs().sum() > 0
