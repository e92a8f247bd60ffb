"""Reference trainer: model sizes, parameter counts and configs (no process group, meta device)."""
from pathlib import Path

import pytest
import torch

from dist_stab.train.config import load_config
from dist_stab.train.model import SIZES, build_model, expected_num_params, model_args, num_params

REPO = Path(__file__).resolve().parents[1]

# nominal size -> accepted range of the parameter count at vocab 32000 (GaLore's LLaMA configs)
NOMINAL = {"60M": (55e6, 62e6), "130M": (125e6, 140e6), "350M": (350e6, 380e6), "1B": (1.2e9, 1.4e9),
           "7B": (6.6e9, 6.8e9)}


@pytest.mark.parametrize("size", sorted(NOMINAL))
def test_param_counts_on_meta(size):
    a = model_args(size, vocab_size=32000, max_seq_len=256)
    m = build_model(a, device="meta")
    n = num_params(m)
    assert n == expected_num_params(a)
    lo, hi = NOMINAL[size]
    assert lo <= n <= hi, f"{size}: {n / 1e6:.1f}M params"
    # shapes as declared: untied lm_head, SwiGLU, square attention projections
    assert m.output.weight.shape == (32000, a.dim) and m.output.weight is not m.tok_embeddings.weight
    blk = m.layers["0"]
    assert blk.feed_forward.w1.weight.shape == (a.ffn_dim, a.dim)
    assert blk.feed_forward.w2.weight.shape == (a.dim, a.ffn_dim)
    assert blk.attention.wq.weight.shape == (a.dim, a.dim)
    assert len(m.layers) == a.n_layers


def test_dims_match_galore_table():
    assert SIZES["60M"] == (512, 8, 8, 1376)
    assert SIZES["130M"] == (768, 12, 12, 2048)
    assert SIZES["350M"] == (1024, 24, 16, 2736)
    assert SIZES["1B"] == (2048, 24, 32, 5461)
    assert SIZES["7B"] == (4096, 32, 32, 11008)


def test_forward_shape_and_causality():
    torch.manual_seed(0)
    a = model_args("tiny-test", vocab_size=97, max_seq_len=16)
    m = build_model(a)
    x = torch.randint(0, 97, (2, 16))
    y = m(x)
    assert y.shape == (2, 16, 97) and torch.isfinite(y).all()
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 97  # change the future only
    y2 = m(x2)
    torch.testing.assert_close(y[:, :10], y2[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, 10:], y2[:, 10:])


def test_meta_init_then_materialise():
    a = model_args("tiny-test", vocab_size=64, max_seq_len=8)
    m = build_model(a, device="meta")
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    torch.manual_seed(0)
    ref = build_model(a)
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(m.rope_cos, ref.rope_cos)
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(m(x), ref(x))


def test_model_has_no_distributed_imports():
    src = (REPO / "dist_stab" / "train" / "model.py").read_text()
    imports = [ln for ln in src.splitlines() if ln.lstrip().startswith(("import ", "from "))]
    assert imports and not any("distributed" in ln for ln in imports)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_load_and_build(path):
    cfg = load_config(str(path))  # unknown keys raise
    a = model_args(cfg.model.size, cfg.data.vocab_size, cfg.data.seq_len)
    m = build_model(a, device="meta")
    assert num_params(m) == expected_num_params(a)
    assert cfg.transform.name in ("global_clip", "adagc", "gradient_stabilizer", "zclip", "none")
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    # every default is commented: each non-blank, non-section line of the file carries a comment
    for line in path.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#") and not s.endswith(":") and ": {}" not in s:
            assert "#" in s, f"{path.name}: uncommented setting {s!r}"


def test_tiny_cpu_demo_size():
    cfg = load_config(str(REPO / "configs" / "tiny_cpu.yaml"))
    n = num_params(build_model(model_args(cfg.model.size, cfg.data.vocab_size, cfg.data.seq_len), device="meta"))
    assert 1e6 <= n <= 4e6
    assert cfg.parallel.mode == "fsdp" and cfg.data.seq_len == 128


def test_overrides_and_unknown_keys():
    cfg = load_config(None, ["optim.lr=1e-4", "transform.name=global_clip", "transform.global_clip.max_norm=0.5"])
    assert cfg.optim.lr == 1e-4 and cfg.transform.kwargs == {"max_norm": 0.5}
    with pytest.raises(KeyError, match="lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(KeyError, match="optimm"):
        load_config(None, ["optimm.lr=1"])


def test_lr_schedule():
    from dist_stab.train.loop import lr_at
    assert lr_at(5, 1.0, 10, 100, 0.1) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "stable_spam", "spam", "scale"])
def test_optimizer_registry_builds_and_steps(name):
    from dist_stab.train.config import OptimConfig
    from dist_stab.train.registry import build_optimizer

    if name in ("stable_spam", "spam", "scale"):
        pytest.importorskip("dist_stab.optim")
    torch.manual_seed(0)
    m = build_model(model_args("tiny-test", vocab_size=64, max_seq_len=8))
    opt = build_optimizer(OptimConfig(name=name, lr=1e-3), m, total_steps=10)
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.randint(0, 64, (2, 8))
    torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, m.parameters()))


def test_unknown_names_raise():
    from dist_stab.train.config import OptimConfig, TransformConfig
    from dist_stab.train.registry import build_optimizer, build_transforms

    m = build_model(model_args("tiny-test", vocab_size=64, max_seq_len=8), device="meta")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(OptimConfig(name="lion"), m)
    with pytest.raises(ValueError, match="unknown transform"):
        build_transforms(TransformConfig(name="clip_everything"), m)
