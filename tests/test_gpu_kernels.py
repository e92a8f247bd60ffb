"""CUDA-only checks (run on the device machine: ``pytest tests/test_gpu_kernels.py``); on a machine
without CUDA these are reported as skipped, never as passed."""
import pytest
import torch

import dist_stab as ds
from dist_stab.kernels import scale_tensors_, sumsq_tensors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_tensors_matches_foreach_and_skips_factor_one(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(5000, 3), (1,), (4096,), (7, 9, 11), (0, 4), (123457,)]
    ts = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
    ts[1].fill_(float("nan"))  # factor 1 must leave it untouched (not even read and rewritten)
    factors = torch.tensor([0.5, 1.0, 1.0, 3.0, 0.25, 1e-3], device="cuda")
    ref = [(t.float() * f).to(dtype) for t, f in zip(ts, factors.tolist())]  # fp32 product, rounded once
    ref[1] = ts[1].clone()
    sumsq = sumsq_tensors(ts)
    expect = torch.stack([t.double().square().sum() for t in ts])
    assert torch.isnan(sumsq[1])
    keep = [0, 2, 3, 4, 5]
    assert torch.allclose(sumsq[keep].double(), expect[keep], rtol=1e-5), (sumsq, expect)
    assert sumsq[4] == 0  # empty tensor
    scale_tensors_(ts, factors)
    for a, b in zip(ts, ref):
        assert torch.equal(a, b) or (torch.isnan(a).all() and torch.isnan(b).all())


def test_transforms_on_cuda_equal_cpu():
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (3, 4, 5), (1000, 16)]
    for cls, kw in [(ds.AdaGC, dict(warmup_steps=2)), (ds.GradientStabilizer, {}), (ds.GlobalClip, dict(max_norm=0.1))]:
        outs = {}
        for dev in ("cpu", "cuda"):
            ps = [torch.nn.Parameter(torch.zeros(s, device=dev)) for s in shapes]
            t = cls([(f"p{i}", p) for i, p in enumerate(ps)], **kw)
            for step in range(6):
                g = torch.Generator().manual_seed(step)
                for i, p in enumerate(ps):
                    p.grad = (torch.randn(p.shape, generator=g) * (30.0 if step == 4 else 1.0) * (i + 1)).to(dev)
                t.step()
            outs[dev] = [p.grad.cpu() for p in ps]
        for a, b in zip(outs["cpu"], outs["cuda"]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), cls


def test_no_host_sync_in_transform_and_optimizer_steps():
    """The step's promise, enforced: any host sync raises under sync-debug mode "error"."""
    from dist_stab.optim import SPAM, SCALE, StableSPAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 32), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 64, bias=False)).cuda()

    def grads():
        model.zero_grad(set_to_none=False)
        model(torch.randint(0, 64, (4, 8), device="cuda")).float().square().mean().backward()

    transforms = [ds.GlobalClip(model.named_parameters()), ds.AdaGC(model.named_parameters(), warmup_steps=1),
                  ds.GradientStabilizer(model.named_parameters()), ds.ZClip(model.named_parameters(), warmup_steps=1)]
    for t in transforms:  # first steps build plans and layouts (allowed to sync once)
        grads()
        t.step()
        t.step()
    opts = [StableSPAM(model.named_parameters(), lr=1e-3, fused=False), SPAM(model.named_parameters(), lr=1e-3, fused=False),
            SCALE(model, lr=1e-3, fused=False)]
    for o in opts:
        grads()
        o.step()
    # fused=True: AdamW's step counters live on the GPU, so a skipped step is undone without a sync
    # (the foreach AdamW keeps them on the host: SkipStep then reads the decision, with a warning)
    wrapped = ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), ds.AdaGC(model.named_parameters(), warmup_steps=0),
                      skip=ds.SkipStep(grad_z=6.0), monitor=ds.SpikeMonitor(min_history=2))
    grads()
    wrapped.step(loss=torch.ones((), device="cuda"))
    from dist_stab.optim import AdamW
    # dist_stab AdamW with GradientStabilizer folded in, and a skip test: step counts on the GPU, step_factor
    folded = ds.wrap(AdamW(model.parameters(), lr=1e-3), ds.GradientStabilizer(model.named_parameters()),
                     skip=ds.SkipStep(grad_z=6.0), monitor=ds.SpikeMonitor(min_history=2))
    assert folded.folded
    grads()
    folded.step(loss=torch.ones((), device="cuda"))
    grads()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in transforms:
            t.step()
        for o in opts:
            o.step()
        wrapped.step(loss=torch.ones((), device="cuda"))
        folded.step(loss=torch.ones((), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_triton_matches_torch_fused_adamw_with_factors(dtype):
    """dist_stab AdamW (compiled Triton kernel, grad factors) = torch fused AdamW on pre-scaled grads;
    sizes across the 32768-element chunk, a piece at an odd offset (no vector loads)."""
    from dist_stab.optim import AdamW

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(300, 1000), (4096,), (0, 3), (65536 + 5,), (7, 9)]

    def params():
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i))
                                 .to(dtype)) for i, s in enumerate(shapes)]
        odd = torch.empty(ps[1].numel() + 1, device="cuda", dtype=dtype)[1:]
        ps[1] = torch.nn.Parameter(odd.copy_(ps[1].detach()))
        return ps

    ref, got = params(), params()
    o_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    o_got = AdamW(got, lr=1e-2, weight_decay=0.1)
    assert o_got._fused(torch.device("cuda"))
    for step in range(3):
        f = torch.rand(len(shapes), device="cuda", generator=gen) * 2
        for i, (a, b) in enumerate(zip(ref, got)):
            g = torch.randn(a.shape, device="cuda", generator=gen).to(dtype)
            a.grad, b.grad = (g.float() * f[i]).to(dtype), g
        o_ref.step()
        o_got.step(grad_factors=f)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: torch rounds g*f to bf16 first
    for a, b in zip(ref, got):
        if a.numel():
            assert ((a.float() - b.float()).abs().max() / a.float().abs().max()).item() <= tol


def test_restore_skip_with_host_step_counters_warns_and_skips():
    """torch AdamW (foreach) keeps its step counters on the host: SkipStep cannot undo them from a device
    decision, so it reads the decision (one warning) and a skipped step still leaves everything untouched."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).cuda()
    opt = ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True), ds.AdaGC(model.named_parameters()),
                  skip=ds.SkipStep())
    model(torch.randn(3, 8, device="cuda")).sum().backward()
    opt.step()  # creates the state
    before = [p.detach().clone() for p in model.parameters()]
    steps = [opt.optimizer.state[p]["step"].clone() for p in model.parameters()]
    model.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="keeps part of its state on the host"):
        opt.step()
    for p, b, s in zip(model.parameters(), before, steps):
        assert torch.equal(p.detach(), b)
        assert torch.equal(opt.optimizer.state[p]["step"], s)
    assert int(opt.skip.skipped) == 1


def test_kept_grads_moved_in_place_are_seen_on_cuda():
    """The address check: a grad moved under the same tensor object (.set_(), .data =, a view at an offset)
    rebuilds the tables and the step stays exact."""
    from dist_stab.kernels import TensorBatch

    ps = [torch.nn.Parameter(torch.randn(64, 33, device="cuda")) for _ in range(6)]
    for p in ps:
        p.grad = torch.randn_like(p)
    batch = TensorBatch([p.grad for p in ps])
    assert batch.same_storage([p.grad for p in ps])
    ps[2].grad.set_(ps[2].grad.clone())
    assert not batch.same_storage([p.grad for p in ps])
    batch = TensorBatch([p.grad for p in ps])
    ps[4].grad.data = torch.randn(70 * 33, device="cuda")[33 * 6:].view(64, 33)  # at an offset in new storage
    assert not batch.same_storage([p.grad for p in ps])
    kept = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p in kept:
        p.grad = torch.zeros_like(p)
    t = ds.GradientStabilizer([(f"p{i}", p) for i, p in enumerate(kept)])
    ref = ds.GradientStabilizer([(f"p{i}", p) for i, p in enumerate(fresh)])
    for step in range(4):
        raw = [torch.randn_like(p) for p in ps]
        for p, g in zip(kept, raw):
            p.grad.copy_(g)  # kept grads: the step reuses its tables...
        if step == 2:
            kept[3].grad.set_(raw[3].clone())  # ...unless one moved
        for p, g in zip(fresh, raw):
            p.grad = g.clone()  # new grad objects every step: no reuse
        t.step()
        ref.step()
        for a, b in zip(kept, fresh):
            assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0), step


@pytest.mark.parametrize("name", ["GradientStabilizer", "AdaGC"])
def test_folded_equals_in_place_on_cuda(name):
    """wrap(dist_stab AdamW (Triton), transform) folded = wrap(torch fused AdamW, transform) in place, fp32, 6 steps,
    two param groups (the optimizer's order differs from the transform's)."""
    from dist_stab.optim import AdamW

    def run(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 48), torch.nn.LayerNorm(48),
                                    torch.nn.Linear(48, 64, bias=False)).cuda()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        groups = [dict(params=other, weight_decay=0.0), dict(params=decay, weight_decay=0.1)]
        t = (ds.GradientStabilizer(model.named_parameters()) if name == "GradientStabilizer"
             else ds.AdaGC(model.named_parameters(), warmup_steps=2, max_norm=0.5, lambda_rel=1.01))
        w = ds.wrap(make_opt(groups), t)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for step in range(6):
            w.zero_grad()
            x = torch.randint(0, 64, (8, 16), device="cuda", generator=gen)
            model(x).float().square().mean().mul(1 + step).backward()
            w.step()
        return w.folded, [p.detach().clone() for p in model.parameters()]

    ref_folded, ref = run(lambda g: torch.optim.AdamW(g, lr=1e-2, fused=True))
    got_folded, got = run(lambda g: AdamW(g, lr=1e-2))
    assert got_folded and not ref_folded
    for a, b in zip(got, ref):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_changing_presence_and_preclip_check_do_not_sync_on_cuda():
    """Issue 16/17 on the GPU: an active set that changes every step (presence uploaded from pinned memory) and the
    pre-clip detector (read back through pinned memory at a later step) run under sync-debug "error"; the detector
    still warns, once, when the gradients arrive clipped."""
    import warnings
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(6)).cuda()
    w = ds.wrap(torch.optim.AdamW(experts.parameters(), lr=1e-3, fused=True), ds.AdaGC(experts, warmup_steps=1),
                skip=ds.SkipStep(), monitor=ds.SpikeMonitor(min_history=2))
    x = torch.randn(4, 16, device="cuda")

    def grads(step):
        w.zero_grad(set_to_none=True)
        sum(experts[e](x).square().mean() for e in range(6) if (step + e) % 3 != 0).backward()
        torch.nn.utils.clip_grad_norm_(experts.parameters(), 1e-3)  # a framework's clip, below every raw norm
    for step in range(3):  # first steps build layouts (allowed to sync once)
        grads(step)
        w.step(loss=torch.ones((), device="cuda"))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(3, 12):
            grads(step)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                w.step(loss=torch.ones((), device="cuda"))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert len([r for r in rec if "consecutive steps" in str(r.message)]) == 1
    assert int(w.skip.skipped) == 0
