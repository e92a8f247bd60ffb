"""StableSPAM's Triton kernels (``dist_stab.kernels.stable_spam_kernels``) against the eager path.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` from conftest.py, plus
``DIST_STAB_TRITON_CPU=1`` here) with a 64-element chunk, so tensors span several full and masked
chunks; the CUDA variant runs the compiled kernels with the default chunk.
"""
import copy
import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf/inf

from dist_stab.kernels import stable_spam_kernels as ssk  # noqa: E402
from dist_stab.optim import StableSPAM, stable_spam  # noqa: E402

SHAPES = [(9, 11), (40,), (0, 4), (3,), (), (5, 7)]
NAN_AT = (5, 2)    # (param index, step): a NaN gradient, the tensor is skipped
SPIKE_AT = (0, 4)  # an element x1000: AdaClip rescales it
KW = dict(lr=1e-2, gamma1=0.85, gamma2=0.99, theta=0.9, reset_interval=3, total_steps=4, weight_decay=0.1)
STEPS = 4
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CUDA machine: Triton compiles for the GPU; the CUDA variants run instead")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the three kernel entry points."""
    counts = {}
    for name in ("maxabs", "clipped_sumsq", "adam_update"):
        fn = getattr(ssk, name)

        def spy(*a, _fn=fn, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*a)
        monkeypatch.setattr(ssk, name, spy)
    return counts


def _grads(step, params, device):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (i + 1)
        if (i, step) == SPIKE_AT:
            g.view(-1)[7] = 1000.0
        if (i, step) == NAN_AT:
            g.view(-1)[3] = float("nan")
        out.append(g.to(device=device, dtype=p.dtype))
    return out


def _run(shapes, dtypes, device, fused, reload_at=None):
    """Parameters, states and active masks after each step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dt))
              for s, dt in zip(shapes, dtypes)]
    odd = torch.empty(params[1].numel() + 1, dtype=params[1].dtype, device=device)[1:]
    params[1] = torch.nn.Parameter(odd.copy_(params[1].detach()))  # not 16-byte aligned: a launch of its own
    opt = StableSPAM(params, fused=fused, **KW)
    trace = []
    for step in range(1, STEPS + 1):
        for p, g in zip(params, _grads(step, params, device)):
            p.grad = g
        opt.step()
        if step == reload_at:  # new state tensors: the kernels' pointer tables must be rebuilt
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        st = [opt.state[p] for p in params]
        trace.append(dict(p=[p.detach().float().cpu().clone() for p in params],
                          **{k: [s[k].float().cpu().clone() for s in st]
                             for k in ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm")},
                          active=opt.last_active.cpu().clone()))
    return trace, opt, params


def _compare(a, b, dtypes):
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert torch.equal(x["active"], y["active"]), (step, x["active"], y["active"])
        for k in ("p", "exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm"):
            for i, (u, v) in enumerate(zip(x[k], y[k])):
                # fp32: 1e-6 relative; bf16: one rounding step of the stored value
                tol = 1e-6 if (k in ("m_max", "m_norm", "v_norm") or dtypes[i] == torch.float32) else 2 ** -7
                scale = v.abs().max().item() if v.numel() else 0.0
                err = (u - v).abs().max().item() if v.numel() else 0.0
                assert err <= tol * max(scale, 1e-30), (step, k, i, err, scale)


def _check(monkeypatch, calls, dtypes, reload_at=None):
    ref, _, _ = _run(SHAPES, dtypes, "cpu", False, reload_at=reload_at)
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    got, opt, params = _run(SHAPES, dtypes, "cpu", True, reload_at=reload_at)
    assert calls == {"maxabs": STEPS, "clipped_sumsq": STEPS, "adam_update": STEPS}, calls
    _compare(got, ref, dtypes)
    return ref, opt, params


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ssk, "BLOCK", 32)
    monkeypatch.setattr(ssk, "ITERS", 2)
    monkeypatch.setattr(ssk, "SEG_BLOCK", 1)  # the segment reductions loop too
    monkeypatch.setattr(ssk, "SCALAR_BLOCK", 4)


@interpreted
def test_fp32_matches_eager(monkeypatch, calls, small_chunks):
    ref, opt, params = _check(monkeypatch, calls, [torch.float32] * len(SHAPES))
    i, step = SPIKE_AT
    assert 1000.0 > opt.state[params[i]]["m_max"].item() / (1 - KW["theta"] ** step)  # the spike was clipped
    assert not ref[NAN_AT[1] - 1]["active"][NAN_AT[0]] and ref[NAN_AT[1] - 1]["active"][0]
    assert not ref[0]["active"][2]  # the empty tensor: zero norm, no Adam step
    (_, plan), = [v for key, v in opt._layouts.items() if key[0] == "triton"]
    assert sorted(aligned for _, _, aligned in plan.launches) == [False, True]  # params[1] sits at an odd offset


@interpreted
def test_bf16_and_mixed_dtypes_match_eager(monkeypatch, calls, small_chunks):
    """bf16 params/moments (compute fp32) next to fp32 ones: one element-wise launch per dtype."""
    _check(monkeypatch, calls, [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16,
                                torch.bfloat16])


@interpreted
def test_state_reload_rebuilds_pointer_tables(monkeypatch, calls, small_chunks):
    """New state tensors (and new gradients every step): new pointer tables, the chunk tables are kept."""
    built = {"make_plan": 0, "_tables": 0}
    for name in built:
        def spy(*a, _fn=getattr(ssk, name), _name=name):
            built[_name] += 1
            return _fn(*a)
        monkeypatch.setattr(ssk, name, spy)
    _check(monkeypatch, calls, [torch.float32] * len(SHAPES), reload_at=2)
    assert built["make_plan"] >= 2 and built["_tables"] == 1, built


def test_non_contiguous_param_falls_back(monkeypatch, calls):
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    for k in (stable_spam.K_ADAM, stable_spam.K_CLIPPED_SUMSQ):  # the fallback's kernels, eagerly (no compile)
        monkeypatch.setattr(k, "_broken", True)
    outs = []
    for fused in (True, False):
        p = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).t())
        opt = StableSPAM([p], fused=fused)
        p.grad = torch.ones_like(p)
        opt.step()
        outs.append(p.detach().clone())
    assert not calls and torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_eager(calls, dtype):
    """Compiled kernels, default chunk; one tensor spans several full chunks and a masked one."""
    shapes, dtypes = SHAPES[:-1] + [(300, 257)], [dtype] * len(SHAPES)
    ref, _, _ = _run(shapes, dtypes, "cuda", False)
    got, _, _ = _run(shapes, dtypes, "cuda", True)
    assert calls == {"maxabs": STEPS, "clipped_sumsq": STEPS, "adam_update": STEPS}, calls
    _compare(got, ref, dtypes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync(calls):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    grads = [_grads(step, params, "cuda") for step in range(1, STEPS + 1)]
    opt = StableSPAM(params, fused=True, **KW)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls["adam_update"] == STEPS
