"""The multi-tensor (``torch._foreach_*``) paths of SPAM and StableSPAM against their per-tensor loops."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dist_stab.optim import SPAM, StableSPAM
from test_optim_single import TinyLM, make_grads

STEPS = 24


def _rel(a, b):
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    return (d.max() / b.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0


def _inject_bad(grads, params, bad_tensor=False):
    """A NaN entry (element-wise) and, with ``bad_tensor``, inf entries in another tensor, on a few steps."""
    for s, gs in enumerate(grads):
        if s % 6 == 4:
            gs[1].view(-1)[0] = math.nan
            gs[-1].view(-1)[s % gs[-1].numel()] = math.inf
        if bad_tensor and s % 7 == 5:
            gs[2].view(-1)[1] = -math.inf
    return grads


def _run_pair(cls, dtype, kw, bad_tensor=False, extra=None):
    torch.manual_seed(0)
    m = TinyLM().to(dtype)
    ref_m = copy.deepcopy(m)
    params, ref_params = list(m.parameters()), list(ref_m.parameters())
    grads = _inject_bad(make_grads(params, STEPS, seed=3, dtype=dtype), params, bad_tensor)
    if extra is not None:  # e.g. an empty parameter
        params.append(torch.nn.Parameter(extra.clone()))
        ref_params.append(torch.nn.Parameter(extra.clone()))
        for gs in grads:
            gs.append(torch.zeros_like(extra))
    init = [p.detach().clone() for p in params]
    a = cls(params, foreach=True, fused=False, **kw)
    b = cls(ref_params, foreach=False, fused=False, **kw)
    for gs in grads:
        for p, q, g in zip(params, ref_params, gs):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, init))
    return a, b, params, ref_params


def _check(a, b, params, ref_params, tol):
    for p, q in zip(params, ref_params):
        assert torch.isfinite(p).all()
        if p.dtype == torch.bfloat16:  # within one bf16 ulp
            ulp = torch.finfo(torch.bfloat16).eps * q.detach().float().abs().clamp_min(1e-30)
            assert ((p.detach().float() - q.detach().float()).abs() <= ulp).all()
        else:
            assert _rel(p.detach(), q.detach()) <= tol
        for k, v in a.state[p].items():
            w = b.state[q][k]
            if p.dtype == torch.bfloat16:
                ulp = torch.finfo(torch.bfloat16).eps * w.float().abs().clamp_min(1e-30)
                assert ((v.float() - w.float()).abs() <= ulp).all(), k
            else:
                assert _rel(v, w) <= tol, k


SPAM_KW = dict(lr=1e-2, threshold=3, reset_interval=9, warmup_steps=3, grad_accu_steps=2, weight_decay=0.1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, None)])
def test_spam_foreach_matches_loop(dtype, tol):
    a, b, ps, qs = _run_pair(SPAM, dtype, SPAM_KW)
    _check(a, b, ps, qs, tol)


def test_spam_foreach_fp32_bitwise():
    a, b, ps, qs = _run_pair(SPAM, torch.float32, SPAM_KW)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_spam_foreach_with_an_empty_parameter_and_bad_entries_is_bitwise():
    """An empty piece (an FSDP shard can be one) next to tensors with NaN/inf entries: the CPU path's per-tensor
    all-finite flags skip the empty one and keep the element-wise select for the others."""
    a, b, ps, qs = _run_pair(SPAM, torch.float32, SPAM_KW, bad_tensor=True, extra=torch.zeros(0))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_spam_foreach_clipping_and_reset_covered():
    """Clipping is active after the accumulation steps and the reset fires within the run."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    a = SPAM([p], foreach=True, **SPAM_KW)
    b = SPAM([q], foreach=False, **SPAM_KW)
    gen = torch.Generator().manual_seed(1)
    for s in range(STEPS):
        g = torch.randn(50, generator=gen, dtype=torch.float64)
        if s % 4 == 3:
            g[s % 50] *= 1e4  # a spike that the threshold clips
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        assert _rel(p.detach(), q.detach()) <= 1e-12
    assert a.param_groups[0]["total_step"] == STEPS > SPAM_KW["reset_interval"]


def test_spam_mixed_dtypes_foreach():
    torch.manual_seed(0)
    vals = [torch.randn(7, 5), torch.randn(11, dtype=torch.float64), torch.randn(4, 3).bfloat16()]
    ps = [torch.nn.Parameter(v.clone()) for v in vals]
    qs = [torch.nn.Parameter(v.clone()) for v in vals]
    a, b = SPAM(ps, foreach=True, **SPAM_KW), SPAM(qs, foreach=False, **SPAM_KW)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(torch, name)

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(torch, name, spy)
    return calls


@pytest.mark.parametrize("foreach,expect", [(None, True), (True, True), (False, False)])
def test_spam_foreach_selection(monkeypatch, foreach, expect):
    calls = _spy(monkeypatch, "_foreach_div")
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = SPAM([p], foreach=foreach) if foreach is not None else SPAM([p])
    p.grad = torch.randn(6, 4)
    opt.step()
    assert bool(calls) == expect


SS_KW = dict(lr=1e-2, reset_interval=7, total_steps=15, weight_decay=0.1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_stable_spam_foreach_matches_loop(dtype, tol):
    a, b, ps, qs = _run_pair(StableSPAM, dtype, SS_KW, bad_tensor=True, extra=torch.zeros(0, dtype=dtype))
    _check(a, b, ps, qs, tol)
    assert torch.equal(a.last_active, b.last_active)
    assert a.param_groups[0]["step"] == STEPS


def test_stable_spam_foreach_skips_bad_tensor():
    """A tensor with a non-finite gradient is skipped (no weight decay) on both paths, bitwise in fp32."""
    torch.manual_seed(0)
    vals = [torch.randn(5, 3), torch.randn(4), torch.zeros(0)]
    ps = [torch.nn.Parameter(v.clone()) for v in vals]
    qs = [torch.nn.Parameter(v.clone()) for v in vals]
    a, b = StableSPAM(ps, foreach=True, **SS_KW), StableSPAM(qs, foreach=False, **SS_KW)
    for s in range(STEPS):
        before = ps[1].detach().clone()
        for i, (p, q) in enumerate(zip(ps, qs)):
            g = torch.randn(p.shape)
            if i == 1 and s == 6:
                g[2] = math.nan
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        if s == 6:
            assert torch.equal(ps[1], before) and not bool(a.last_active[1])
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)


@pytest.mark.parametrize("foreach,expect", [(None, True), (True, True), (False, False)])
def test_stable_spam_foreach_selection(monkeypatch, foreach, expect):
    calls = _spy(monkeypatch, "_foreach_div")
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = StableSPAM([p], foreach=foreach) if foreach is not None else StableSPAM([p])
    p.grad = torch.randn(6, 4)
    opt.step()
    assert bool(calls) == expect
