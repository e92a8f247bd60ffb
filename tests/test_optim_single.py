"""Single-process checks of SCALE, StableSPAM and SPAM against plain references and pytorch-optimizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dist_stab.optim import SCALE, SPAM, StableSPAM, find_last_layer, segments
from dist_stab.optim._base import dim_sumsq_vector
from dist_stab.spec import ShardSpec
from dist_stab.stats import local_dim_sumsq
from optim_reference import RefSCALE, RefSPAM, RefStableSPAM

STEPS = 20


class Block(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.up_proj = nn.Linear(d, ff, bias=True)
        self.down_proj = nn.Linear(ff, d, bias=False)


class TinyLM(nn.Module):
    """LLaMA-like parameter set: embedding, blocks with norms and matrices, final norm, untied lm_head."""

    def __init__(self, vocab=37, d=12, ff=20, layers=2, tied=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, ff) for _ in range(layers)])
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        for p in self.parameters():  # norm gains away from 1 so weight decay and updates show
            nn.init.normal_(p, std=0.5)


def make_grads(params, steps, seed=0, spikes=True, dtype=None):
    """Per-step gradients with per-tensor scales and occasional 100x spikes (AdaClip / SPAM clipping)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        gs = []
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (0.1 + 0.3 * (i % 4))
            if spikes and s % 5 == 3:
                g.view(-1)[(s * 7 + i) % g.numel()] *= 100.0
            gs.append(g.to(dtype or p.dtype))
        out.append(gs)
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_ours(opt, params, grads, sched=None):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if sched is not None:
            sched.step()


def model_pair(dtype, **kw):
    torch.manual_seed(0)
    m = TinyLM(**kw).to(dtype)
    return m, copy.deepcopy(m)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_scale_matches_reference(dtype, tol):
    m, ref_m = model_pair(dtype)
    opt = SCALE(m, lr=3e-3, beta=0.9, weight_decay=0.1, adam_lr=2e-2)
    kinds = [opt.kind_of(p) for p in m.parameters()]
    assert kinds.count("last") == 1 and kinds.count("embedding") == 1 and "adam" in kinds
    assert opt.kind_of(m.lm_head.weight) == "last" and opt.kind_of(m.embed_tokens.weight) == "embedding"
    params, ref_params = list(m.parameters()), list(ref_m.parameters())
    ref = RefSCALE(ref_params, kinds, lr=3e-3, beta=0.9, weight_decay=0.1, adam_lr=2e-2)
    grads = make_grads(params, STEPS)
    run_ours(opt, params, grads)
    for gs in grads:
        ref.step(gs)
    err = max(rel_err(a, b) for a, b in zip(params, ref_params))
    print(f"SCALE {dtype} max rel err {err:.2e}")
    assert err <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_stable_spam_matches_references(dtype, tol):
    from pytorch_optimizer import StableSPAM as PoStableSPAM

    m, ref_m = model_pair(dtype)
    po_m = copy.deepcopy(m)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), gamma1=0.85, gamma2=0.99, theta=0.99, eps=1e-8, weight_decay=0.05)
    opt = StableSPAM(m.parameters(), reset_interval=7, **kw)
    ref = RefStableSPAM(list(ref_m.parameters()), reset_interval=7, **kw)
    po = PoStableSPAM(po_m.parameters(), update_proj_gap=7, **kw)  # its cosine factor is off-curve: no total_steps
    params = list(m.parameters())
    grads = make_grads(params, STEPS)
    run_ours(opt, params, grads)
    for gs in grads:
        ref.step(gs)
        for p, g in zip(po_m.parameters(), gs):
            p.grad = g.clone()
        po.step()
    err_ref = max(rel_err(a, b) for a, b in zip(params, ref_m.parameters()))
    err_po = max(rel_err(a, b) for a, b in zip(params, po_m.parameters()))
    err_po_m = max(rel_err(opt.state[a]["exp_avg"], po.state[b]["exp_avg"]) for a, b in zip(params, po_m.parameters()))
    print(f"StableSPAM {dtype} max rel err vs ref {err_ref:.2e}, vs pytorch-optimizer {err_po:.2e} (m {err_po_m:.2e})")
    assert err_ref <= tol and err_po <= tol and err_po_m <= 10 * tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_stable_spam_cosine_decay_matches_reference(dtype, tol):
    m, ref_m = model_pair(dtype)
    kw = dict(lr=3e-3, gamma1=0.85, gamma2=0.999, reset_interval=6, total_steps=12, eta_min=0.5, weight_decay=0.1)
    opt = StableSPAM(m.parameters(), **kw)
    ref = RefStableSPAM(list(ref_m.parameters()), **kw)
    params = list(m.parameters())
    grads = make_grads(params, STEPS)
    run_ours(opt, params, grads)
    for gs in grads:
        ref.step(gs)
    err = max(rel_err(a, b) for a, b in zip(params, ref_m.parameters()))
    print(f"StableSPAM cosine {dtype} max rel err vs ref {err:.2e}")
    assert err <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_spam_matches_references(dtype, tol):
    from pytorch_optimizer import SPAM as PoSPAM

    m, ref_m = model_pair(dtype)
    po_m = copy.deepcopy(m)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    sp = dict(threshold=3, reset_interval=6, grad_accu_steps=2)
    opt = SPAM(m.parameters(), warmup_steps=3, **sp, **kw)
    ref = RefSPAM(list(ref_m.parameters()), warmup_steps=3, **sp, **kw)
    po = PoSPAM(po_m.parameters(), warmup_epoch=3, threshold=3, update_proj_gap=6, grad_accu_steps=2, **kw)
    params = list(m.parameters())
    grads = make_grads(params, STEPS)
    run_ours(opt, params, grads)
    for gs in grads:
        ref.step(gs)
        for p, g in zip(po_m.parameters(), gs):
            p.grad = g.clone()
        po.step()
    err_ref = max(rel_err(a, b) for a, b in zip(params, ref_m.parameters()))
    err_po = max(rel_err(a, b) for a, b in zip(params, po_m.parameters()))
    print(f"SPAM {dtype} max rel err vs ref {err_ref:.2e}, vs pytorch-optimizer {err_po:.2e}")
    assert err_ref <= tol and err_po <= tol


def test_scale_param_groups_and_scheduler():
    m, ref_m = model_pair(torch.float32)
    mats = [p for p in m.parameters() if p.dim() == 2]
    vecs = [p for p in m.parameters() if p.dim() < 2]
    opt = SCALE([{"params": mats, "lr": 2e-3}, {"params": vecs, "lr": 4e-3, "adam_lr": 1e-2}],
                last_layer=m.lm_head.weight, embeddings=[m.embed_tokens.weight], lr=1e-3, adam_lr=5e-3)
    assert opt.param_groups[1]["adam_lr_ratio"] == pytest.approx(2.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8 ** s)
    kinds = [opt.kind_of(p) for p in mats]
    rmats = [p for p in ref_m.parameters() if p.dim() == 2]
    rvecs = [p for p in ref_m.parameters() if p.dim() < 2]
    r1 = RefSCALE(rmats, kinds, lr=2e-3)
    r2 = RefSCALE(rvecs, ["adam"] * len(rvecs), lr=4e-3, adam_lr=1e-2)
    grads = make_grads(mats + vecs, 8)
    run_ours(opt, mats + vecs, grads, sched)
    for s, gs in enumerate(grads):
        r1.step(gs[:len(mats)], lr=2e-3 * 0.8 ** s)
        r2.step(gs[len(mats):], lr=4e-3 * 0.8 ** s)
    err = max(rel_err(a, b) for a, b in zip(mats + vecs, rmats + rvecs))
    assert err <= 1e-6, err


def test_spam_and_stable_spam_param_groups_and_scheduler():
    for cls, ref_cls in ((StableSPAM, RefStableSPAM), (SPAM, RefSPAM)):
        m, ref_m = model_pair(torch.float64)
        params, rparams = list(m.parameters()), list(ref_m.parameters())
        opt = cls([{"params": params[:5]}, {"params": params[5:], "lr": 3e-3}], lr=1e-3, reset_interval=6)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        r1, r2 = ref_cls(rparams[:5], lr=1e-3, reset_interval=6), ref_cls(rparams[5:], lr=3e-3, reset_interval=6)
        grads = make_grads(params, 10)
        run_ours(opt, params, grads, sched)
        for s, gs in enumerate(grads):
            r1.step(gs[:5], lr=1e-3 * 0.5 ** (s // 3))
            r2.step(gs[5:], lr=3e-3 * 0.5 ** (s // 3))
        err = max(rel_err(a, b) for a, b in zip(params, rparams))
        assert err <= 1e-12, (cls.__name__, err)


# ----------------------------------------------------------------------------- bad input
def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [{k: (v.clone() if torch.is_tensor(v) else v)
                                                    for k, v in opt.state[p].items()} for p in params]


def test_nonfinite_gradients_do_not_corrupt_state():
    torch.manual_seed(0)
    for cls in (SCALE, StableSPAM, SPAM):
        m = TinyLM()
        opt = SCALE(m, weight_decay=0.1) if cls is SCALE else cls(m.parameters(), weight_decay=0.1)
        params = list(m.parameters())
        grads = make_grads(params, 4, spikes=False)
        run_ours(opt, params, grads[:2])
        before_p, before_s = _snapshot(opt, params)
        bad = {0: math.nan, 1: math.inf, len(params) - 1: -math.inf}  # embedding, a norm, lm_head
        gs = [g.clone() for g in grads[2]]
        for i, val in bad.items():
            gs[i].view(-1)[3] = val
        run_ours(opt, params, [gs])
        for i, p in enumerate(params):
            assert torch.isfinite(p).all(), (cls.__name__, i)
            for k, v in opt.state[p].items():
                if torch.is_tensor(v):
                    assert torch.isfinite(v).all(), (cls.__name__, i, k)
        emb, lm = params[0], params[-1]
        if cls is StableSPAM:  # whole tensors skipped, others updated
            for i in bad:
                assert torch.equal(params[i], before_p[i])
                for k, v in before_s[i].items():
                    assert torch.equal(opt.state[params[i]][k], v), k
            assert not torch.equal(params[2], before_p[2])
        elif cls is SCALE:  # the embedding column 3 and lm_head row 0 are skipped, the rest moves
            assert torch.equal(emb[:, 3], before_p[0][:, 3]) and not torch.equal(emb[:, 4], before_p[0][:, 4])
            assert torch.equal(lm[0], before_p[-1][0]) and not torch.equal(lm[1], before_p[-1][1])
            mom = opt.state[lm]["momentum"]
            assert torch.equal(mom[0], before_s[-1]["momentum"][0]) and not torch.equal(mom[1], before_s[-1]["momentum"][1])
            assert params[1].view(-1)[3] == before_p[1].view(-1)[3] and params[1].view(-1)[2] != before_p[1].view(-1)[2]
        else:  # SPAM: element-wise skip
            for i in bad:
                assert params[i].view(-1)[3] == before_p[i].view(-1)[3]
                assert params[i].view(-1)[2] != before_p[i].view(-1)[2]
                assert opt.state[params[i]]["exp_avg"].view(-1)[3] == before_s[i]["exp_avg"].view(-1)[3]
        run_ours(opt, params, grads[3:])  # and training goes on
        assert all(torch.isfinite(p).all() for p in params)


def test_stable_spam_zero_grad_is_skipped_like_pytorch_optimizer():
    from pytorch_optimizer import StableSPAM as PoStableSPAM

    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt, po = StableSPAM([p], weight_decay=0.1), PoStableSPAM([q], weight_decay=0.1)
    for g in (torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64),
              torch.randn(4, 3, dtype=torch.float64)):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        po.step()
    assert rel_err(p, q) < 1e-12


# ----------------------------------------------------------------------------- hyperparameters, model
@pytest.mark.parametrize("cls,kwargs,name", [
    (SCALE, dict(lr=-1.0), "lr"), (SCALE, dict(beta=1.0), "beta"), (SCALE, dict(weight_decay=-0.1), "weight_decay"),
    (SCALE, dict(adam_lr=math.nan), "adam_lr"), (SCALE, dict(adam_betas=(0.9, 1.5)), "adam_betas"),
    (SCALE, dict(eps=0.0), "eps"), (SCALE, dict(lr=0.0, adam_lr=1e-2), "adam_lr"),
    (SCALE, dict(tied_embeddings="x"), "tied_embeddings"),
    (StableSPAM, dict(betas=(1.0, 0.9)), "betas"), (StableSPAM, dict(gamma1=1.2), "gamma1"),
    (StableSPAM, dict(gamma2=-0.1), "gamma2"), (StableSPAM, dict(theta=1.0), "theta"),
    (StableSPAM, dict(reset_interval=-1), "reset_interval"), (StableSPAM, dict(total_steps=0), "total_steps"),
    (StableSPAM, dict(eta_min=1.5), "eta_min"), (StableSPAM, dict(eps=-1.0), "eps"),
    (SPAM, dict(lr=math.inf), "lr"), (SPAM, dict(threshold=-1), "threshold"),
    (SPAM, dict(reset_interval=2.5), "reset_interval"), (SPAM, dict(warmup_steps=-1), "warmup_steps"),
    (SPAM, dict(grad_accu_steps=-2), "grad_accu_steps"), (SPAM, dict(weight_decay=-1), "weight_decay"),
])
def test_bad_hyperparameters(cls, kwargs, name):
    m = TinyLM()
    with pytest.raises(ValueError, match=name):
        cls(m, **kwargs) if cls is SCALE else cls(m.parameters(), **kwargs)


def test_tied_embeddings_and_last_layer_detection():
    m = TinyLM(tied=True)
    with pytest.raises(ValueError, match="tied"):
        SCALE(m)
    opt = SCALE(m, tied_embeddings="last")
    assert opt.kind_of(m.lm_head.weight) == "last"
    opt = SCALE(m, tied_embeddings="embedding")
    assert opt.kind_of(m.lm_head.weight) == "embedding"
    m = TinyLM()
    assert find_last_layer(m) is m.lm_head
    assert SCALE(m, last_layer="lm_head").kind_of(m.lm_head.weight) == "last"
    assert SCALE(m.named_parameters()).kind_of(m.lm_head.weight) == "last"  # by name
    assert SCALE(list(m.named_parameters()), last_layer="lm_head.weight").kind_of(m.embed_tokens.weight) == "embedding"
    with pytest.raises(ValueError, match="names no parameter"):
        SCALE(m, last_layer="nope")
    with pytest.warns(UserWarning, match="no last layer"):
        SCALE([("w", torch.nn.Parameter(torch.zeros(3, 3)))])
    with pytest.raises(ValueError, match="no name"):  # unnamed, no module: refused (tests/test_scale_models.py)
        SCALE([torch.nn.Parameter(torch.zeros(3, 3))])


def test_flat_segments_match_local_dim_sumsq():
    torch.manual_seed(0)
    full = torch.randn(5, 7, dtype=torch.float64)
    for keep in (0, 1):
        for a, b in ((0, 35), (3, 5), (3, 20), (7, 21), (9, 34), (14, 14)):
            spec = ShardSpec(fqn="w", global_shape=(5, 7), local_shape=(b - a,), flat_start=a)
            piece = full.view(-1)[a:b]
            segs = segments(spec, keep)
            assert sum(s.hi - s.lo for s in segs) == b - a and len(segs) <= 3
            ours = dim_sumsq_vector(piece, spec, keep, segs)
            # independent oracle: the piece placed in an otherwise zero full tensor
            padded = torch.zeros_like(full).view(-1)
            padded[a:b] = piece
            ref = padded.view(5, 7).square().sum(dim=1 - keep)
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
            torch.testing.assert_close(local_dim_sumsq(piece, spec, keep), ref, rtol=1e-12, atol=0)


def test_state_dict_round_trip():
    for cls in (SCALE, StableSPAM, SPAM):
        m, m2 = model_pair(torch.float32)
        mk = (lambda mod: SCALE(mod)) if cls is SCALE else (lambda mod: cls(mod.parameters(), reset_interval=4))
        opt, opt2 = mk(m), mk(m2)
        params, params2 = list(m.parameters()), list(m2.parameters())
        grads = make_grads(params, 6)
        run_ours(opt, params, grads[:3])
        run_ours(opt2, params2, grads[:3])
        sd = copy.deepcopy(opt.state_dict())
        opt3 = mk(m2)
        opt3.load_state_dict(sd)
        run_ours(opt, params, grads[3:])
        run_ours(opt3, params2, grads[3:])
        assert max(rel_err(a, b) for a, b in zip(params, params2)) == 0.0, cls.__name__
        if cls is StableSPAM:
            assert opt3.state[params2[0]]["m_max"].dtype == torch.float32
