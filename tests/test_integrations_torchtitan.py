"""dist_stab in torchtitan 0.3.0 (dist_stab.integrations.torchtitan), against the real package.

torchtitan's full Trainer cannot run here: FlexAttention has no CPU backward and its data loader needs
``datasets`` (not installed: torchtitan's pins clash with transformers'). So its components are driven as its
trainer drives them, on gloo ranks: the Llama-3 debug model (2 layers) built on meta and parallelised by
``parallelize_llama`` (FSDP2), the inner attention swapped for causal SDPA (the only change to the model),
torchtitan's ``clip_grad_norm_`` with ``training.max_norm`` as ``use_dist_stab`` leaves it, the optimizer
container, its LR scheduler container and its ``CheckpointManager`` (DCP). References: the same model trained by
a plain loop with ``ds.wrap`` around the same dist_stab optimizer.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("torchtitan", reason="torchtitan is installed by the 'integrations' extra (tests/run.sh)")

from dist_launcher import run_dist  # noqa: E402

SEQ, BATCH, STEPS, SAVE_AT = 16, 4, 4, 2


def _batches(n=STEPS, vocab=2048):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(n)]


def _build(seed=0):
    """torchtitan's debug Llama (2 layers) through its own parallelize_fn (FSDP2 on every rank)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchtitan.distributed.parallel_dims as pdm
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import distribute_tensor
    from torchtitan.models.llama3 import model_registry

    pdm.device_type = "cpu"  # torchtitan assumes CUDA when it finds no accelerator

    class CausalSDPA(torch.nn.Module):  # FlexAttention has no CPU backward
        def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **_):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=scale, enable_gqa=enable_gqa)
            return o.transpose(1, 2)

    spec = model_registry("debugmodel", attn_backend="flex")
    spec.model.layers = spec.model.layers[:2]
    par = ParallelismConfig(data_parallel_shard_degree=-1, spmd_backend="partial_dtensor")
    dims = ParallelDims.from_config(par, dist.get_world_size())
    with torch.device("meta"):
        model = spec.model.build()
    model = spec.parallelize_fn(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"), parallelism=par,
                                compile_config=CompileConfig(), ac_config=None, dump_folder="")
    for block in model.layers.values():
        block.attention.inner_attention = CausalSDPA()
    for m in model.modules():  # parallelize_llama sets the divide factor to 1 (losses are normalised by the global
        if isinstance(m, FSDPModule):  # token count): PREMUL_SUM(1), which gloo lacks; the same sum as SUM
            m.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)  # buffers (RoPE); parameters: below, the same on any world size
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            full = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=g) * 0.05
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
    return model


def _local(batch, rank, ws):
    per = batch.shape[0] // ws
    return batch[rank * per:(rank + 1) * per]


def _loss(model, tokens, ws):
    """torchtitan's normalisation: each rank's token sum over the global token count (gradients are summed)."""
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / ws


def _full(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _config(optimizer, transforms, skip=None, monitor=None):
    from types import SimpleNamespace

    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import TrainingConfig

    from dist_stab.integrations.torchtitan import use_dist_stab
    cfg = SimpleNamespace(optimizer=default_adamw(lr=1e-3), training=TrainingConfig())
    kw = {"SCALE": {"lr": 2e-2, "adam_lr": 1e-3}, "StableSPAM": {"lr": 1e-3}, "DistStabAdamW": {"lr": 1e-3}}[optimizer]
    use_dist_stab(cfg, optimizer=optimizer, optimizer_kwargs=kw, transforms=transforms, skip=skip, monitor=monitor)
    return cfg


def _recipe_config(name):
    """A config of launch/recipes/torchtitan_configs.py (the README's torchtitan recipe) as ``torchtitan.train``
    gets it: torchtitan's ConfigManager with --module / --config (the module found through PYTHONPATH)."""
    import sys

    from torchtitan.config import ConfigManager
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "recipes")
    if recipes not in sys.path:
        sys.path.insert(0, recipes)
    return ConfigManager().parse_args(["--module", "torchtitan_configs", "--config", name])


def _torchtitan_run(rank, ws, optimizer, transforms, folder, steps, load_step=None, save_step=None, recipe=None):
    """The trainer's order: zero_grad, forward/backward (loss given to observe_loss), clip_grad_norm_ with
    training.max_norm, optimizers.step, lr_schedulers.step; checkpoints through CheckpointManager. ``recipe``: the
    config of that name in launch/recipes/torchtitan_configs.py instead of ``_config``."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.distributed import utils as dist_utils

    cfg = _config(optimizer, transforms, skip={}, monitor={}) if recipe is None else _recipe_config(recipe)
    model = _build()
    opts = cfg.optimizer.build(model_parts=[model])
    scheds = _scheduler(opts)
    ckpt = CheckpointManager.Config(enable=True, folder="ckpt", interval=1, keep_latest_k=0,
                                    exclude_from_loading=["dataloader"]).build(
        dataloader=None, model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={}, sd_adapter=None,
        base_folder=folder)
    first = 0
    if load_step is not None:
        assert ckpt.load(step=load_step)
        first = load_step
    norms, seen = [], []
    for i, batch in enumerate(_batches()):
        if i < first or i >= steps:
            continue
        opts.zero_grad()
        loss = _loss(model, _local(batch, rank, ws), ws)
        loss.backward()
        opts.observe_loss(loss)
        norms.append(float(dist_utils.clip_grad_norm_(list(model.parameters()), cfg.training.max_norm,
                                                      foreach=True)))
        opts.step()
        scheds.step()
        seen.append(float(opts.last_stats["AdaGC"]["global_norm"]) if "AdaGC" in opts.last_stats else None)
        if save_step is not None and i + 1 == save_step:
            ckpt.save(curr_step=i + 1)
    ckpt.close()
    out = {"params": _full(model), "norms": norms, "seen": seen, "max_norm": cfg.training.max_norm,
           "lr": [g["lr"] for g in opts.optimizers[0].param_groups],
           "loss_z": float(opts.last_stats["spikes"]["loss"])}
    return out


def _scheduler(optimizers):
    from torchtitan.components.optimizer import LRSchedulersContainer
    return LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5, min_lr_factor=0.1).build(
        optimizers=optimizers, training_steps=STEPS)


def _plain_run(rank, ws, optimizer, steps):
    """dist_stab's own loop on the same model: ds.wrap(optimizer built from named parameters, AdaGC, SkipStep,
    SpikeMonitor), step(loss=...), torchtitan's LR schedule (a LambdaLR on the wrapper)."""
    import dist_stab as ds
    from dist_stab import optim as dso
    model = _build()
    named = list(model.named_parameters())
    if optimizer == "SCALE":
        inner = dso.SCALE([{"params": [p for _, p in named], "param_names": [n for n, _ in named],
                            "lr": 2e-2, "adam_lr": 1e-3}])
    else:
        inner = {"StableSPAM": dso.StableSPAM, "DistStabAdamW": dso.AdamW}[optimizer](named, lr=1e-3)
    opt = ds.wrap(inner, ds.AdaGC(), skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
    sched = _scheduler([opt])
    for batch in _batches()[:steps]:
        opt.zero_grad()
        loss = _loss(model, _local(batch, rank, ws), ws)
        loss.backward()
        opt.step(loss=loss.detach())
        sched.step()
    return {"params": _full(model), "loss": float(opt.last_stats["spikes"]["loss"])}


def _tt_vs_plain(rank, ws, optimizer, folder):
    tt = _torchtitan_run(rank, ws, optimizer, ["AdaGC"], folder, steps=STEPS, save_step=SAVE_AT)
    plain = _plain_run(rank, ws, optimizer, steps=STEPS)
    return tt, plain


def _resume(rank, ws, optimizer, folder):
    return _torchtitan_run(rank, ws, optimizer, ["AdaGC"], folder, steps=STEPS, load_step=SAVE_AT)


@pytest.mark.parametrize("optimizer", ["SCALE", "StableSPAM"])
def test_container_fsdp2_equals_plain_loop_and_resumes_on_one_rank(optimizer, tmp_path):
    """2 FSDP2 ranks: torchtitan's container (+ scheduler, clip_grad_norm_ at max_norm=inf, CheckpointManager
    save at step 2) equals the plain ds.wrap loop bit for bit; AdaGC sees the raw norm torchtitan measured
    (> 1: not clipped before); the loss reaches the monitor. Then 1 rank loads step 2 and finishes: equal to the
    uninterrupted 2-rank run (another world size: a float-rounding tolerance)."""
    out = run_dist(_tt_vs_plain, 2, optimizer, str(tmp_path), timeout=500)
    tt, plain = out[0]
    assert tt["max_norm"] == float("inf")
    assert len(tt["norms"]) == STEPS
    for measured, seen in zip(tt["norms"], tt["seen"]):
        assert seen == pytest.approx(measured, rel=1e-5)
    assert max(tt["norms"]) > 1.0  # the raw norm: torchtitan's default max_norm=1.0 would have clipped it
    assert tt["loss_z"] == pytest.approx(plain["loss"], rel=1e-6)  # the step's loss reached the monitor
    for n, p in plain["params"].items():
        torch.testing.assert_close(tt["params"][n], p, rtol=0, atol=0, msg=n)
    resumed = run_dist(_resume, 1, optimizer, str(tmp_path), timeout=300)[0]
    assert resumed["lr"] == pytest.approx(tt["lr"], rel=1e-12)  # the scheduler resumed too
    for n, p in tt["params"].items():
        torch.testing.assert_close(resumed["params"][n], p, rtol=1e-4, atol=1e-6, msg=n)


def _recipe_vs_plain(rank, ws, folder):
    tt = _torchtitan_run(rank, ws, "SCALE", ["AdaGC"], folder, steps=STEPS, recipe="llama3_8b_scale_adagc")
    return tt, _plain_run(rank, ws, "SCALE", steps=STEPS)


def test_recipe_configs_parse_and_train(tmp_path):
    """The README's torchtitan recipe (launch/recipes/torchtitan_configs.py) as torchtitan.train reads it: both
    configs parse through torchtitan's ConfigManager (--module / --config), switched to dist_stab with torchtitan's
    clip_grad_norm_ only measuring; llama3_8b_scale_adagc's optimizer, built by torchtitan's container on its debug
    model (FSDP2, 2 gloo ranks), trains equal to the plain ds.wrap loop bit for bit."""
    from dist_stab.integrations.torchtitan import DistStabOptimizersContainer
    from dist_stab.integrations.torchtitan_trainer import DistStabTrainer
    adamw = _recipe_config("llama3_8b_adagc")
    assert isinstance(adamw, DistStabTrainer.Config)  # torchtitan.train builds the trainer that feeds the loss
    assert isinstance(adamw.optimizer, DistStabOptimizersContainer.Config) and adamw.training.max_norm == float("inf")
    assert [g.optimizer_name for g in adamw.optimizer.param_groups] == ["AdamW"] and adamw.optimizer.transforms == ["AdaGC"]
    scale = _recipe_config("llama3_8b_scale_adagc")
    assert [g.optimizer_name for g in scale.optimizer.param_groups] == ["SCALE"] and scale.training.max_norm == float("inf")
    tt, plain = run_dist(_recipe_vs_plain, 2, str(tmp_path), timeout=500)[0]
    assert tt["max_norm"] == float("inf") and max(tt["norms"]) > 1.0
    assert tt["seen"] == pytest.approx(tt["norms"], rel=1e-5)  # AdaGC saw the raw norm torchtitan measured
    for n, p in plain["params"].items():
        torch.testing.assert_close(tt["params"][n], p, rtol=0, atol=0, msg=n)


def _trainer_fwd_bwd(rank, ws):
    """DistStabTrainer.forward_backward_step as torchtitan's train_step calls it (once per micro-batch), on an
    instance holding what that method reads (the full Trainer's __init__ needs a GPU here): the parsed recipe's
    optimizer container on the debug model, torchtitan's ParallelDims; forward/backward by a fwd_bwd_fn."""
    import torch.distributed as dist
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims

    from dist_stab.integrations.torchtitan_trainer import DistStabTrainer
    cfg = _recipe_config("llama3_8b_scale_adagc")
    model = _build()
    trainer = object.__new__(DistStabTrainer)
    trainer.model_parts = [model]
    trainer.parallel_dims = ParallelDims.from_config(ParallelismConfig(data_parallel_shard_degree=-1),
                                                     dist.get_world_size())
    trainer.optimizers = cfg.optimizer.build(model_parts=[model])
    trainer.post_dataloading_process = lambda input_dict, labels: (input_dict["input"], labels, {})
    trainer.fwd_bwd_fn = lambda inputs, labels, tokens, extra: _micro_loss(model, inputs, labels, tokens)
    losses = []
    for batch in _batches(2):
        micro = _local(batch, rank, ws)
        for half in (micro[:1], micro[1:]):  # 2 micro-batches: their losses add up to the step's
            loss = trainer.forward_backward_step(input_dict={"input": half[:, :-1]}, labels=half[:, 1:],
                                                 global_valid_tokens=torch.tensor(float(micro[:, 1:].numel() * ws)))
            losses.append(float(loss))
        trainer.optimizers.step()
        trainer.optimizers.zero_grad()
        losses.append(float(trainer.optimizers.last_stats["spikes"]["loss"]))
    return type(cfg).__qualname__, type(cfg)._owner is DistStabTrainer, losses


def _micro_loss(model, inputs, labels, global_tokens):
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
    loss = loss / global_tokens
    loss.backward()
    return loss


def test_trainer_hands_the_loss_to_the_monitor():
    """use_dist_stab on torchtitan's Trainer.Config returns a DistStabTrainer config (what torchtitan.train then
    builds); its forward_backward_step gives each micro-batch's loss to the container, so the monitor sees the step's
    loss: the sum over micro-batches and ranks (each rank's loss is its token sum over the global token count)."""
    out = run_dist(_trainer_fwd_bwd, 2, timeout=300)
    for name, owner, losses in out:
        assert name == "DistStabTrainer.Config" and owner
    for step in range(2):
        per_rank = [sum(r[2][3 * step:3 * step + 2]) for r in out]
        seen = out[0][2][3 * step + 2]
        assert out[1][2][3 * step + 2] == seen
        assert seen == pytest.approx(sum(per_rank), rel=1e-6)


def _ckpt_layout(rank, ws, folder):
    from dist_stab.wrap_state import KEY
    cfg = _config("DistStabAdamW", ["GradientStabilizer"])
    model = _build()
    opts = cfg.optimizer.build(model_parts=[model])
    sd = opts.state_dict()
    return sorted(k for k in sd if k.endswith("." + KEY)), [n for n, _ in model.named_parameters()]


def test_dist_stab_state_stored_once_per_optimizer(tmp_path):
    """torchtitan flattens group keys per parameter; dist_stab's blob is kept under the first parameter only."""
    keys, names = run_dist(_ckpt_layout, 1, str(tmp_path))[0]
    assert keys == [f"param_groups.{names[0]}.dist_stab"]


def test_use_dist_stab_is_the_one_clipping_owner():
    from types import SimpleNamespace

    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import TrainingConfig

    from dist_stab.integrations.torchtitan import DistStabOptimizersContainer, use_dist_stab
    cfg = SimpleNamespace(optimizer=default_adamw(lr=1e-3), training=TrainingConfig())
    assert cfg.training.max_norm == 1.0
    use_dist_stab(cfg, transforms=["GradientStabilizer"])  # keeps the AdamW groups, adds the transform
    assert cfg.training.max_norm == float("inf")
    assert isinstance(cfg.optimizer, DistStabOptimizersContainer.Config)
    assert [g.optimizer_name for g in cfg.optimizer.param_groups] == ["AdamW"]
    cfg2 = SimpleNamespace(optimizer=default_adamw(lr=1e-3), training=TrainingConfig())
    use_dist_stab(cfg2, optimizer="SCALE", optimizer_kwargs={"lr": 1e-2})  # no transform: clipping stays
    assert cfg2.training.max_norm == 1.0
    with pytest.raises(ValueError, match="'lr'"):
        use_dist_stab(cfg2, optimizer="SCALE", optimizer_kwargs={})


def _two_optimizers(rank, ws):
    from torchtitan.components.optimizer import ParamGroupConfig

    from dist_stab.integrations.torchtitan import DistStabOptimizersContainer
    model = _build()
    groups = [ParamGroupConfig(pattern=r"norm", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
              ParamGroupConfig(pattern=r".*", optimizer_name="SPAM", optimizer_kwargs={"lr": 1e-3})]
    opts = DistStabOptimizersContainer.Config(param_groups=groups, transforms=["AdaGC"]).build(model_parts=[model])
    kinds = [type(o.optimizer).__name__ for o in opts.optimizers]
    try:
        DistStabOptimizersContainer.Config(param_groups=groups, skip={}).build(model_parts=[model])
    except ValueError as e:
        return kinds, str(e)
    return kinds, None


def test_mixed_optimizers_transforms_yes_skip_refused():
    kinds, err = run_dist(_two_optimizers, 1)[0]
    assert kinds == ["AdamW", "SPAM"]
    assert err is not None and "one optimizer" in err
