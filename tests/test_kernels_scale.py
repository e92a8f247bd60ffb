"""SCALE's Triton row kernels (dist_stab.kernels.scale_rows) against the eager path.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA;
DIST_STAB_TRITON_CPU=1 routes CPU tensors to them); the CUDA variant runs them compiled.
"""
import os

import numpy as np
import pytest
import torch

from dist_stab.optim import SCALE

scale_rows = pytest.importorskip("dist_stab.kernels.scale_rows")

#: Triton's interpreter runs the kernels on CPU only where conftest (no CUDA) set TRITON_INTERPRET=1.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

NAN_STEP, NAN_ROW = 1, 3  # a NaN in row NAN_ROW of q_proj and of lm_head at step NAN_STEP


def llama_shapes(d, ff, vocab, layers=1):
    out = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,))] + [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        out += [(p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (ff, d)),
                (p + "mlp.up_proj.weight", (ff, d)), (p + "mlp.down_proj.weight", (d, ff))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def run_scale(shapes, dtype, device, fused, steps=3):
    """Params and lm_head momentum after ``steps`` steps; (before, after) of the NaN rows at NAN_STEP."""
    gen = torch.Generator().manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype))) for n, s in shapes]
    opt = SCALE(named, lr=1e-2, weight_decay=0.1, adam_lr=3e-2, last_layer="lm_head.weight", fused=fused)
    ps = dict(named)
    q, head = ps["model.layers.0.self_attn.q_proj.weight"], ps["lm_head.weight"]
    nan_rows = None
    for step in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
        if step == NAN_STEP:
            q.grad[NAN_ROW, 1] = float("nan")
            head.grad[NAN_ROW, 0] = float("nan")
            before = [t[NAN_ROW].clone() for t in (q, head, opt.state[head]["momentum"])]
        opt.step()
        if step == NAN_STEP:
            nan_rows = (before, [t[NAN_ROW].clone() for t in (q, head, opt.state[head]["momentum"])])
    return [p.detach().clone() for _, p in named], opt.state[head]["momentum"].clone(), nan_rows


def assert_close(a, b, dtype):
    if dtype == torch.float32:
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-6, err
    else:  # one bf16 ulp of the operands: cancellation in p*decay - lr*u*inv can expose it
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=2 ** -8 * b.float().abs().max().item())


@pytest.fixture
def bf16_rne(monkeypatch):
    """Triton 3.6's interpreter truncates fp32 -> bf16; compiled Triton and torch round to nearest even."""
    import triton.language as tl
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return real(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch as (C, last, chunked): the Triton path cannot pass by falling back."""
    calls = []
    real = scale_rows._launch

    def spy(*args, **kw):
        calls.append((args[8], kw["last"], args[9][2] > 1))
        return real(*args, **kw)

    monkeypatch.setattr(scale_rows, "_launch", spy)
    return calls


def check_against_eager(shapes, dtype, device, launches, monkeypatch, want_loop):
    """Triton (fused on CUDA; interpreter on CPU) vs eager SCALE over 3 steps, NaN rows skipped."""
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    got, got_m, nan_rows = run_scale(shapes, dtype, device, fused=device == "cuda")
    assert {last for _, last, _ in launches} == {False, True}, launches  # matrices and the lm_head
    assert any(loop for *_, loop in launches) == want_loop, launches
    n = len(launches)
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "0")
    ref, ref_m, _ = run_scale(shapes, dtype, device, fused=False)
    assert len(launches) == n  # the reference really is the eager path
    for (name, _), a, b in zip(shapes, got, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, dtype)
    assert_close(got_m, ref_m, dtype)
    before, after = nan_rows
    for x, y in zip(before, after):  # q row, lm_head row and its momentum: untouched
        assert torch.equal(x, y)


F32, BF16 = torch.float32, torch.bfloat16


@interpreted
@pytest.mark.parametrize("layout,dtype", [("rows", F32), ("rows", BF16), ("chunks", F32), ("chunks", BF16),
                                          ("row-chunks", F32)])
def test_scale_rows_match_eager_interpreted(layout, dtype, launches, bf16_rne, monkeypatch):
    """d 24, ff 37 (odd row length). rows: several whole rows per program; chunks: MAX_BLOCK 32, rows of
    37 walked in two chunks, rows of 24 not; row-chunks: the same with one row per program."""
    if layout != "rows":
        monkeypatch.setattr(scale_rows, "MAX_BLOCK", 32)
    if layout == "row-chunks":
        monkeypatch.setattr(scale_rows, "MIN_TILE", 1)
    check_against_eager(llama_shapes(d=24, ff=37, vocab=50), dtype, "cpu", launches, monkeypatch,
                        want_loop=layout != "rows")


def one_matrix_step(p, g, monkeypatch, triton):
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1" if triton else "0")
    p = torch.nn.Parameter(p.clone())
    p.grad = g
    with pytest.warns(UserWarning, match="no last layer"):
        opt = SCALE([("w", p)], lr=1e-2, weight_decay=0.1, fused=False)
    opt.step()
    return p.detach()


@interpreted
def test_layouts_the_kernel_does_not_take(launches, monkeypatch):
    """fp64 steps and non-contiguous params keep the torch path; a non-contiguous grad is copied."""
    monkeypatch.setenv("DIST_STAB_TRITON_CPU", "1")
    run_scale(llama_shapes(d=8, ff=12, vocab=10), torch.float64, "cpu", fused=False, steps=1)
    assert launches == []
    p, g = torch.randn(5, 6), torch.randn(6, 5).t()
    for param, calls in ((p.t().contiguous().t(), 0), (p, 1)):
        got = one_matrix_step(param, g, monkeypatch, triton=True)
        assert len(launches) == calls
        launches.clear()
        assert_close(got, one_matrix_step(param, g, monkeypatch, triton=False), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("shape_set", ["1b-rows", "odd", "chunks"])
def test_scale_rows_match_eager_cuda(dtype, shape_set, launches, monkeypatch):
    """Compiled kernels. 1b-rows: LLaMA-1B row lengths 2048/5632 (one row per program, vector loads);
    odd: rows of 40/37, several per program; chunks: rows of 688 walked in chunks of 256."""
    shapes = {"1b-rows": dict(d=2048, ff=5632, vocab=512), "odd": dict(d=40, ff=37, vocab=300),
              "chunks": dict(d=256, ff=688, vocab=1000)}[shape_set]
    if shape_set == "chunks":
        monkeypatch.setattr(scale_rows, "MAX_BLOCK", 256)
    check_against_eager(llama_shapes(**shapes), dtype, "cuda", launches, monkeypatch, want_loop=shape_set == "chunks")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scale_rows_step_does_not_sync_cuda(launches):
    """After the first step (plans built), a step of matrices and the lm_head makes no host sync."""
    gen = torch.Generator().manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen).cuda()))
             for n, s in llama_shapes(d=256, ff=688, vocab=1000) if len(s) == 2 and "embed" not in n]
    opt = SCALE(named, lr=1e-2, last_layer="lm_head.weight")
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    n = len(launches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(launches) == 2 * n > 0
