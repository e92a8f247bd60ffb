"""dist_stab under FSDP2 through Accelerate and through the HF Trainer, 2 gloo ranks on CPU, against the real packages
(transformers 5.25.0, accelerate 1.16.0; tiny random configs, never a hub download).

Accelerate 1.16.0 does not select FSDP on CPU: ``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` only inside
``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU,
MULTI_NEURON]`` (accelerate/state.py), so ``Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(
fsdp_version=2))`` on 2 gloo ranks is ``MULTI_CPU``, drops the plugin without a word and wraps the model in DDP
(``test_accelerate_cpu_drops_the_fsdp_plugin`` pins this, so it fails the day Accelerate changes it). The closest
thing it can do here: the same Accelerator with its state set to FSDP afterwards (``_force_fsdp2``: two attributes),
so that ``prepare`` runs Accelerate's real FSDP2 path (``_prepare_fsdp2``: the optimizer's parameters swapped for
placeholders, ``fsdp2_prepare_model`` = ``fully_shard`` per decoder layer and the root, then
``fsdp2_switch_optimizer_parameters``), and the Trainer its FSDP2 branches (``is_fsdp_enabled``, optimizer built
before ``prepare``, Accelerate's FSDP optimizer/model checkpointing). Everything after is unpatched.

References: the single-process plain loop of tests/test_integrations_hf.py (the same wrapper, each optimizer step
on the same 4 rows as the 2 ranks together).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is installed by the 'integrations' extra (tests/run.sh)")
pytest.importorskip("accelerate", reason="accelerate is installed by the 'integrations' extra (tests/run.sh)")

from dist_launcher import run_dist  # noqa: E402
from test_integrations_hf import MICRO, STEPS, _data, _model, _optimizer, _plain_loop, _transforms  # noqa: E402

pytestmark = pytest.mark.dist
WORLD = 2
TOL = {"AdamW": 1e-6, "SCALE": 1.5e-5}  # Trainer: max|diff| / max|ref| per tensor; measured 5.2e-7 and 7.6e-6 (SCALE's lr 2e-2)
# plain Accelerate, GPT-2 + SCALE: step 1 equal bitwise, norms then 9e-8, 1e-7, 1.7e-6 off, losses <= 1.1e-7; rounding that
# SCALE's lr 2e-2 and AdamW on the 1-D params grow to 5.5e-5 in h.0's c_attn key columns after 4 steps (a single process
# with accumulation 2 instead of one batch: 7.6e-6). A lost embedding / lm_head / Conv1D fact moves the step-2 norm by 33 %.
TOL_ACCELERATE = {"AdamW": 1e-6, "SCALE": 1e-4}
NORM_TOL = {"AdamW": 1e-6, "SCALE": 1e-5}
LAYER = {"llama": "LlamaDecoderLayer", "gpt2": "GPT2Block"}


def _force_fsdp2(accelerator, plugin):
    """Accelerate's state as it is on GPUs with an FSDP2 plugin (module docstring: why CPU needs this)."""
    from accelerate.utils import DistributedType
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _assert_params_close(params, ref, tol):
    """max|diff| / max|ref| per tensor within tol."""
    for n, q in ref.items():
        a = params[n]
        if n.endswith("c_attn.bias"):  # GPT-2's key bias: softmax ignores it, its gradient is rounding noise
            torch.testing.assert_close(a[32:64], q[32:64], rtol=0, atol=1e-6, msg=n)  # that AdamW amplifies
            a, q = torch.cat([a[:32], a[64:]]), torch.cat([q[:32], q[64:]])
        err = float((a - q).abs().max() / q.abs().max())
        assert err <= tol, (n, err)


def _full(model):
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- plain Accelerate
def _accelerate_worker(rank, world, kind, opt_name):
    import dist_stab as ds
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from test_transforms_dist import CollectiveCounter
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=[LAYER[kind]], reshard_after_forward=True)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    unforced = (str(acc.state.distributed_type), getattr(acc.state, "fsdp_plugin", None) is not None)
    _force_fsdp2(acc, plugin)
    model = _model(kind)
    opt = ds.wrap(_optimizer(opt_name, model), *_transforms(opt_name), skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
    model, popt = acc.prepare(model, opt)
    tname = type(opt.transforms[0]).__name__
    rows = _data()
    per_step = []
    for s in range(STEPS):  # rank r takes rows [2r, 2r+2) of the step's 4: the plain loop's batch, split
        mb = rows[s * MICRO * world + rank * MICRO:s * MICRO * world + (rank + 1) * MICRO]
        ids, labels = torch.stack([r["input_ids"] for r in mb]), torch.stack([r["labels"] for r in mb])
        loss = model(input_ids=ids, labels=labels).loss
        acc.backward(loss)
        opt.observe_loss(loss.detach())
        ds.comm_log.clear()
        with CollectiveCounter() as cc:
            popt.step()
        per_step.append({"calls": len(cc.calls), "which": cc.calls, "dt": cc.dtensor_comms, "tags": sorted(r.tag for r in ds.comm_log.records),
                         "norm": float(opt.last_stats[tname]["global_norm"]),
                         "loss": float(opt.last_stats["spikes"]["loss"])})
        popt.zero_grad()
    return {"unforced": unforced, "model": type(model).__name__, "inner_is_wrapper": popt.optimizer is opt,
            "kinds": sorted({s.kind for s in opt.transforms[0].shards}), "steps": per_step,
            "monitor_steps": int(opt.monitor.state["steps"]), "params": _full(model)}


@pytest.mark.parametrize("kind,opt_name", [("llama", "AdamW"), ("gpt2", "SCALE")])
def test_accelerate_fsdp2_two_ranks_equals_plain_loop(kind, opt_name):
    """prepare(model, ds.wrap(optimizer, transform)) under Accelerate's FSDP2 path on 2 ranks: the transform binds
    to the DTensor parameters Accelerate swapped in, issues one collective per step (and the monitor's loss one;
    nothing else: no DTensor op communicates), and trains equal to the plain loop on the same global batch.
    Llama + AdamW + GradientStabilizer; GPT-2 + SCALE (built before the swap, with ``module=``) + AdaGC, where SCALE
    adds its one SUM for the Conv1D weights (``[in, out]``, normalised per output unit = per column, a reduction over
    the dim FSDP2 shards)."""
    ref_model, ref_losses, ref_norms = _plain_loop(kind, opt_name)
    res = run_dist(_accelerate_worker, WORLD, kind, opt_name, timeout=180)
    ref = {n: p.detach() for n, p in ref_model.named_parameters()}
    tname = {"AdamW": "GradientStabilizer", "SCALE": "AdaGC"}[opt_name]
    scale_sums = [("all_reduce", "RedOpType.SUM")] if opt_name == "SCALE" else []
    for r in res:
        assert r["unforced"] == ("DistributedType.MULTI_CPU", False)  # see the module docstring
        assert r["model"].startswith("FSDP") and r["inner_is_wrapper"]
        assert r["kinds"] == ["dtensor"]
        assert r["monitor_steps"] == STEPS
        for i, (st, n, l) in enumerate(zip(r["steps"], ref_norms, ref_losses)):
            assert st["tags"] == sorted([tname, "SpikeMonitor"] + ["SCALE"] * bool(scale_sums)), st  # one SUM each
            # nothing else communicates (no DTensor op), but the first step, where the transform (and SCALE) bind late
            # to the swapped-in parameters, also checks once that both ranks pack the same layout (a MAX, reducer.py)
            extra = [("all_reduce", "RedOpType.MAX")] * (1 + len(scale_sums)) if i == 0 else []
            assert sorted(c[:2] for c in st["which"]) == sorted(
                [("all_reduce", "RedOpType.SUM")] * 2 + scale_sums + extra), st["which"]
            assert st["norm"] == pytest.approx(n, rel=NORM_TOL[opt_name])
            assert st["loss"] == pytest.approx(l, rel=1e-6)
        _assert_params_close(r["params"], ref, TOL_ACCELERATE[opt_name])


# ----------------------------------------------------------------------------- HF Trainer
def _fsdp_trainer(kind, opt_name, out, save_steps=None, steps=STEPS, state_dict_type=None):
    """DistStabTrainer with fsdp="full_shard", fsdp_config={"fsdp_version": 2, ...}: per device 1 row, accumulation 2,
    2 ranks (each optimizer step on 4 rows: with Accelerate's batch sharding, rows 0-3 for the first step, as the
    plain loop)."""
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    import dist_stab as ds
    from dist_stab import optim as dso
    from dist_stab.integrations.hf import DistStabTrainer

    class FSDP2OnCPU(DistStabTrainer):
        def _get_train_sampler(self, train_dataset=None):  # the plain loop's order
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.utils import FullyShardedDataParallelPlugin
            _force_fsdp2(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch",
        fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": [LAYER[kind]],
                                        "reshard_after_forward": True,
                                        **({"state_dict_type": state_dict_type} if state_dict_type else {})})
    cls_kw = (dso.SCALE, {"lr": 2e-2, "adam_lr": 1e-3}) if opt_name == "SCALE" else None
    return FSDP2OnCPU(model=_model(kind), args=args, train_dataset=_data(), optimizer_cls_and_kwargs=cls_kw,
                      transforms=_transforms(opt_name), skip=ds.SkipStep(), monitor=ds.SpikeMonitor())


def _trainer_worker(rank, world, kind, opt_name, out):
    import warnings
    trainer = _fsdp_trainer(kind, opt_name, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    wrapper = trainer.optimizer.optimizer
    tag = type(wrapper.transforms[0]).__name__
    logs = [h for h in trainer.state.log_history if f"dist_stab/{tag}/global_norm" in h]
    return {"model": type(trainer.model_wrapped).__name__, "kinds": sorted({s.kind for s in wrapper.transforms[0].shards}),
            "max_grad_norm": trainer.args.max_grad_norm, "warned": any("max_grad_norm=1.0" in str(w.message)
                                                                     for w in caught),
            "monitor_steps": int(wrapper.monitor.state["steps"]),
            "norms": [h[f"dist_stab/{tag}/global_norm"] for h in logs], "losses": [h["dist_stab/loss"] for h in logs],
            "trainer_losses": [h["loss"] for h in logs], "steps": [h["step"] for h in logs],
            "params": _full(trainer.model)}


@pytest.mark.parametrize("kind,opt_name", [("llama", "AdamW"), ("gpt2", "SCALE")])
def test_trainer_fsdp2_two_ranks_equals_plain_loop(kind, opt_name, tmp_path):
    """DistStabTrainer (and its callback) under the Trainer's FSDP2 path on 2 ranks, accumulation 2: the wrapper
    follows Accelerate's swap to the DTensors, max_grad_norm is turned off with a warning, the transform sees the raw
    norm once per optimizer step, the loss reaches the monitor, and training equals the plain loop. GPT-2 + SCALE:
    SCALE, built before the swap, keeps its embedding / lm_head / Conv1D facts (the optimizers re-key them by position
    when the parameter objects change; without it the second step's norm was 1.777 instead of 1.337)."""
    ref_model, ref_losses, ref_norms = _plain_loop(kind, opt_name)
    res = run_dist(_trainer_worker, WORLD, kind, opt_name, str(tmp_path), timeout=180)
    ref = {n: p.detach() for n, p in ref_model.named_parameters()}
    for r in res:
        assert r["model"].startswith("FSDP") and r["kinds"] == ["dtensor"]
        assert r["max_grad_norm"] == 0.0 and r["warned"]  # the callback: one clipping owner
        assert r["monitor_steps"] == STEPS and r["steps"] == list(range(1, STEPS + 1))
        assert max(ref_norms) > 1.0  # clipping to 1.0 first would have shown a norm <= 1
        assert r["norms"] == pytest.approx(ref_norms, rel=1e-6)
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-6) and r["trainer_losses"] == r["losses"]
        _assert_params_close(r["params"], ref, TOL[opt_name])


# ----------------------------------------------------------------------------- HF Trainer: checkpoint and resume
def _materialize(obj):
    """A state dict with DTensors as full tensors (a collective: every rank walks the same structure), cloned."""
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _resume_worker(rank, world, kind, opt_name, out):
    import os

    def snapshot(trainer):
        wrapper = trainer.optimizer.optimizer
        return {"params": _full(trainer.model), "global_step": trainer.state.global_step,
                "transform": _materialize(wrapper.transforms[0].state_dict()),
                "monitor": _materialize(wrapper.monitor.state_dict()),
                "skip": _materialize(wrapper.skip.state_dict())}

    full = _fsdp_trainer(kind, opt_name, os.path.join(out, "a"), save_steps=2, state_dict_type="SHARDED_STATE_DICT")
    full.train()
    ckpt = os.path.join(out, "a", "checkpoint-2")
    saved = sorted(os.listdir(ckpt))
    resumed = _fsdp_trainer(kind, opt_name, os.path.join(out, "b"), state_dict_type="SHARDED_STATE_DICT")
    resumed.train(resume_from_checkpoint=ckpt)
    return {"full": snapshot(full), "resumed": snapshot(resumed), "saved": saved,
            "resumed_model": type(resumed.model_wrapped).__name__}


@pytest.mark.parametrize("kind,opt_name", [("gpt2", "SCALE"), ("llama", "AdamW")])
def test_trainer_fsdp2_two_ranks_resume_is_bit_exact(kind, opt_name, tmp_path):
    """The Trainer's FSDP2 path saves a checkpoint at step 2 (the optimizer through Accelerate's
    torch.distributed.checkpoint path, dist_stab's state as the opaque bytes group key), a second Trainer resumes
    from it: its final parameters, transform (AdaGC / GradientStabilizer), monitor and skip state equal the
    uninterrupted 4-step run's bit for bit (same ranks, same reduction order, same arithmetic). SHARDED_STATE_DICT:
    the default FULL_STATE_DICT model save fails on CPU inside safetensors ("Attempted to access the data pointer on
    an invalid python storage"), before the optimizer is touched."""
    from test_integrations_hf import _assert_same
    res = run_dist(_resume_worker, WORLD, kind, opt_name, str(tmp_path), timeout=300)
    for r in res:
        assert r["resumed_model"].startswith("FSDP")
        assert any(s.startswith("optimizer") for s in r["saved"]), r["saved"]  # Accelerate's FSDP optimizer save
        a, b = r["full"], r["resumed"]
        assert a["global_step"] == b["global_step"] == STEPS
        assert a["params"].keys() == b["params"].keys()
        for n, p in a["params"].items():
            torch.testing.assert_close(b["params"][n], p, rtol=0, atol=0, msg=n)
        assert int(b["monitor"]["state"]["steps"]) == STEPS  # the monitor's history came back: not 2 fresh steps
        for part in ("transform", "monitor", "skip"):
            _assert_same(a[part], b[part], part)
