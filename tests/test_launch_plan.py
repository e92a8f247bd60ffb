"""7B cluster configs: each builds the trainer's model on the meta device, is planned for the world size it
states, and fits in 80 GB per GPU; an obviously too small layout does not (so the check can fail)."""
import json
from pathlib import Path

import pytest

from dist_stab import memory_plan as MP
from dist_stab.train.config import load_config
from dist_stab.train.model import expected_num_params

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("7b_*.yaml"))
DS_JSON = REPO / "configs" / "ds_zero3_7b.json"
N7B = 6_738_415_616  # LLaMA-7B with vocab 32000: 6.48B blocks + 2 x 32000 x 4096 + final norm


def stated_world(path: Path) -> int:
    args = MP.header_args(str(path))
    assert "--world-size" in args, f"{path.name}: no '# memory_plan: --world-size N' line"
    return int(args[args.index("--world-size") + 1])


def test_there_are_fsdp_hsdp_and_tp_layouts_for_32_to_256_gpus():
    modes = {load_config(str(p)).parallel.mode: stated_world(p) for p in CONFIGS}
    assert {"fsdp", "hsdp", "fsdp_tp"} <= set(modes), modes
    assert all(32 <= w <= 256 for w in modes.values()), modes
    assert DS_JSON.exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_on_meta_and_fits_at_its_world_size(path):
    cfg = load_config(str(path))
    deepspeed = cfg.parallel.mode == "deepspeed"  # builds whole per GPU, then ZeRO-3 partitions (no meta init)
    assert cfg.model.size == "7B" and (cfg.train.meta_init or deepspeed)
    model, args = MP.build_meta_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_num_params(args) == N7B
    world = stated_world(path)
    plan = MP.plan(cfg, world, name=path.name)
    print(plan.table())
    assert plan.fits, plan.table()
    # the batch divides: global batch = micro x dp x accumulation
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * plan.layout.dp_size) == 0
    # every optimizer the package offers fits as well (SCALE keeps far less state)
    for name in ("stable_spam", "spam", "scale"):
        other = MP.plan(load_config(str(path), [f"optim.name={name}"]), world)
        assert other.fits, other.table()
    if deepspeed:
        assert plan.layout.mode == "zero3" and plan.precision == "bf16"  # from configs/ds_zero3_7b.json
        return  # DeepSpeed skips steps itself: no skip-step snapshot
    # the device-side skip ("restore") keeps a copy of params + AdamW state: counted, and still fits
    restore = MP.plan(load_config(str(path), ["spikes.skip_mode=restore"]), world)
    snap = restore.items["skip-step snapshot (spikes.skip_mode: restore)"]
    assert snap == plan.items["weights (fp32)"] + plan.items["optimizer state (adamw)"] and restore.fits


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_value_is_commented(path):
    for ln in path.read_text().splitlines():
        body = ln.split("#")[0].rstrip()
        if body and not body.endswith(":"):  # a key with a value (section headers need none)
            assert "#" in ln, f"{path.name}: no comment on {ln!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_sharded_pieces_add_up_to_the_model(path):
    """Weights per GPU x GPUs holding distinct pieces = the model (up to FSDP2's dim-0 padding)."""
    cfg = load_config(str(path))
    world = stated_world(path)
    plan = MP.plan(cfg, world)
    L = plan.layout
    wkey = next(k for k in plan.items if k.startswith("weights"))
    w = plan.items[wkey] / (2 if "bf16" in wkey else 4)
    model, _ = MP.build_meta_model(cfg)
    if L.mode == "fsdp_tp":  # TP weights split t ways, the rest replicated over the TP group
        tp_part = sum(p.numel() for n, p in model.named_parameters() if MP._tp_dim(n) is not None)
        full = tp_part + L.tp_size * (N7B - tp_part)
        assert w * L.world_size == pytest.approx(full, rel=2e-3)
    else:  # fsdp, zero3: one copy over the world; hsdp: one copy per shard group
        assert w * L.shard_size == pytest.approx(N7B, rel=2e-3)
    okey = next(k for k in plan.items if k.startswith("optimizer state (adamw"))
    assert plan.items[okey] == pytest.approx((8 + (4 if "master" in okey else 0)) * w)  # AdamW (+ fp32 master)


def test_scale_state_is_lm_head_momentum_plus_adamw_on_1d_params():
    cfg = load_config(str(REPO / "configs" / "7b_fsdp.yaml"), ["optim.name=scale"])
    plan = MP.plan(cfg, 1, name="scale", micro_batch=1)  # mode fsdp on 1 GPU: nothing sharded
    V, h, L = 32000, 4096, 32
    one_d = (2 * L + 1) * h  # RMSNorm weights
    assert plan.items["optimizer state (scale)"] == 4 * V * h + 8 * one_d


def test_activation_budget_formula():
    """amp, no checkpointing: N (26 h + (8 h + 8 f) / t) per layer; logits N V 14 (module docstring)."""
    cfg = load_config(str(REPO / "configs" / "7b_fsdp.yaml"))
    _, a = MP.build_meta_model(cfg)
    N = 2 * 2048
    out = MP.activation_bytes(a, "amp", 2, 2048, tp=4)
    layers = next(v for k, v in out.items() if k.startswith("activations"))
    assert layers == 32 * N * (26 * 4096 + (8 * 4096 + 8 * 11008) / 4)
    assert out["final norm + logits + loss"] == N * 4096 * 10 + N * 32000 * 14
    ac = MP.activation_bytes(a, "amp", 2, 2048, activation_checkpointing=True)
    ac_layers = next(v for k, v in ac.items() if k.startswith("activations"))
    assert ac_layers == 32 * N * 4096 * 4 + N * (26 * 4096 + 8 * 4096 + 8 * 11008)
    # measured on an H100 (module docstring): 1.336 GB per layer at N = 4096 incl. 0.405 GB bf16 weights
    per_layer = MP.activation_bytes(a, "amp", 2, 2048)
    block_linear = 4 * 4096 ** 2 + 3 * 4096 * 11008
    measured = 1.3364e9
    predicted = next(v for k, v in per_layer.items() if k.startswith("activations")) / 32 + 2 * block_linear
    assert predicted == pytest.approx(measured, rel=0.03)


def test_too_small_layouts_do_not_fit():
    cfg = load_config(str(REPO / "configs" / "7b_fsdp.yaml"), ["parallel.mode=none"])
    one = MP.plan(cfg, 1)  # 7B AdamW on one GPU: 16 B/param = 108 GB before activations
    assert not one.fits and one.total > 150e9, one.table()
    eight = MP.plan(load_config(str(REPO / "configs" / "7b_fsdp.yaml"), ["parallel.mode=ddp"]), 8)
    assert not eight.fits  # DDP replicates everything: more GPUs do not help
    # activation checkpointing is what makes a long micro-batch fit
    big = load_config(str(REPO / "configs" / "7b_fsdp.yaml"), ["train.micro_batch_size=8"])
    assert not MP.plan(big, 32).fits
    assert MP.plan(big, 32, activation_checkpointing=True).fits


def test_cli_prints_a_table_and_exit_status_says_whether_it_fits(capsys):
    assert MP.main(["--config", str(REPO / "configs" / "7b_fsdp.yaml")]) == 0
    out = capsys.readouterr().out
    assert "world 32" in out and "FITS" in out and "optimizer state (adamw)" in out
    assert MP.main(["--config", str(REPO / "configs" / "7b_fsdp.yaml"), "--world-size", "1",
                    "--set", "parallel.mode=none"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert MP.main(["--config", str(REPO / "configs" / "7b_fsdp.yaml"), "--world-size", "32,64,128,256"]) == 0
    assert capsys.readouterr().out.count("FITS") == 4


def test_deepspeed_zero3_json_fits_on_64_gpus():
    ds = json.loads(DS_JSON.read_text())
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and ds["bf16"]["enabled"]
    assert not ds.get("gradient_clipping"), "dist_stab's transforms clip; DeepSpeed's own clip must stay off"
    cfg = load_config(str(REPO / "configs" / "7b_fsdp.yaml"))
    # 2 x 16 x 64 GPUs = the trainer configs' global batch
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 64 == cfg.train.global_batch_size
    for world in (32, 64):
        plan = MP.plan(cfg, world, deepspeed=ds)
        print(plan.table())
        assert plan.layout.mode == "zero3" and plan.precision == "bf16" and plan.fits, plan.table()
        # ZeRO paper: 2 + 2 + 12 bytes per parameter, partitioned over the world
        state = sum(v for k, v in plan.items.items() if k.startswith(("weights", "grads", "optimizer")))
        assert state == pytest.approx(16 * N7B / world, rel=1e-3)


def test_deepspeed_accepts_the_json():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    c = DeepSpeedConfig(str(DS_JSON))  # world size 1 here: batch = micro x accumulation
    assert c.zero_optimization_stage == 3 and c.bfloat16_config.enabled
    assert c.train_micro_batch_size_per_gpu == 2 and c.gradient_accumulation_steps == 16
    assert c.zero_config.reduce_bucket_size == 4096 ** 2
