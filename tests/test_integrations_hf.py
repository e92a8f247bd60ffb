"""dist_stab in the Hugging Face Trainer and Accelerate (dist_stab.integrations.hf), against the real packages
(transformers 5.25.0, accelerate 1.16.0): tiny random GPT-2 / Llama configs, never a hub download. References:
the same model trained by dist_stab's own loop with the same wrapper on the same batches."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is installed by the 'integrations' extra (tests/run.sh)")
pytest.importorskip("accelerate", reason="accelerate is installed by the 'integrations' extra (tests/run.sh)")

import dist_stab as ds  # noqa: E402
from dist_stab import optim as dso  # noqa: E402

SEQ, MICRO, ACCUM, STEPS = 12, 2, 2, 4
VOCAB = 64


def _model(kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _data(n=STEPS * MICRO * ACCUM):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    # the first label is never a target (shifted away); -100 makes the Trainer's token count (num_items_in_batch)
    # that of the shifted targets, so its loss is the plain mean over targets
    return [{"input_ids": r, "labels": torch.cat([torch.tensor([-100]), r[1:]])} for r in ids]


def _optimizer(name, model):
    """The inner optimizer as DistStabTrainer builds it: the Trainer's decay / no-decay groups, with names (and, for
    SCALE, the model)."""
    from transformers import Trainer
    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if (n in decay) == d], "param_names": [n for n, _ in named
                                                                                    if (n in decay) == d],
               "weight_decay": 0.0} for d in (True, False)]
    if name == "SCALE":  # module=: GPT-2's Conv1D weights are [in, out], normalised per output unit (column)
        return dso.SCALE(groups, lr=2e-2, adam_lr=1e-3, module=model)
    return torch.optim.AdamW(groups, lr=1e-3)


def _transforms(name):
    return {"SCALE": [ds.AdaGC(warmup_steps=2)], "AdamW": [ds.GradientStabilizer()]}[name]


def _plain_loop(kind, opt_name, steps=STEPS):
    """dist_stab's loop: each optimizer step sees the MICRO*ACCUM rows at once (the mean over all tokens, which
    is what the Trainer's accumulated, token-normalised micro-batch losses add up to)."""
    model = _model(kind)
    opt = ds.wrap(_optimizer(opt_name, model), *_transforms(opt_name), skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
    rows = _data()
    losses, norms = [], []
    for s in range(steps):
        batch = rows[s * MICRO * ACCUM:(s + 1) * MICRO * ACCUM]
        ids = torch.stack([r["input_ids"] for r in batch])
        loss = model(input_ids=ids, labels=torch.stack([r["labels"] for r in batch])).loss
        loss.backward()
        opt.step(loss=loss.detach())
        opt.zero_grad()
        losses.append(float(loss.detach()))
        norms.append(float(opt.last_stats[type(opt.transforms[0]).__name__]["global_norm"]))
    return model, losses, norms


def _trainer(kind, opt_name, out, steps=STEPS, save_steps=None, max_grad_norm=1.0, refuse=False):
    from torch.utils.data import SequentialSampler
    from transformers import TrainingArguments

    from dist_stab.integrations.hf import DistStabTrainer

    class Sequential(DistStabTrainer):  # the plain loop's batch order (the Trainer shuffles by default)
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM, max_steps=steps,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=max_grad_norm,
        logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        optim="adamw_torch")
    model = _model(kind)
    cls_kw = (dso.SCALE, {"lr": 2e-2, "adam_lr": 1e-3}) if opt_name == "SCALE" else None
    return Sequential(model=model, args=args, train_dataset=_data(), optimizer_cls_and_kwargs=cls_kw,
                      transforms=_transforms(opt_name), skip=ds.SkipStep(), monitor=ds.SpikeMonitor(),
                      refuse_clipping=refuse)


@pytest.mark.parametrize("kind,opt_name", [("gpt2", "SCALE"), ("llama", "AdamW")])
def test_trainer_equals_plain_loop(kind, opt_name, tmp_path):
    """Trainer (gradient accumulation 2, default max_grad_norm=1.0 turned off with a warning) equals the plain
    loop; the transforms saw the raw norm once per optimizer step; the loss reached the monitor; the logs carry
    last_stats."""
    ref_model, ref_losses, ref_norms = _plain_loop(kind, opt_name)
    trainer = _trainer(kind, opt_name, tmp_path)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0"):
        trainer.train()
    assert trainer.args.max_grad_norm == 0.0
    wrapper = trainer.optimizer.optimizer  # Accelerate's AcceleratedOptimizer around the wrapper
    assert isinstance(wrapper, ds.WrappedOptimizer)
    assert wrapper.monitor.state["steps"].item() == STEPS  # one transform/monitor step per optimizer step
    assert max(ref_norms) > 1.0  # clipping to 1.0 first would have shown a norm <= 1
    tag = type(wrapper.transforms[0]).__name__
    logs = [h for h in trainer.state.log_history if f"dist_stab/{tag}/global_norm" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    for h, n, l in zip(logs, ref_norms, ref_losses):
        assert h[f"dist_stab/{tag}/global_norm"] == pytest.approx(n, rel=1e-4)
        assert h["dist_stab/loss"] == pytest.approx(l, rel=1e-5)  # the summed micro-batch losses = step loss
        assert h["loss"] == pytest.approx(l, rel=1e-5)
    assert "dist_stab/skipped" in logs[-1] and "dist_stab/score/loss_spike_score" in logs[-1]
    # float rounding only: the Trainer sums two micro-batch gradients, the loop takes one batch; SCALE's
    # per-column normalisation of the embedding over few present tokens turns it into ~5e-6 absolute
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=n)


def test_trainer_step_not_taken_leaves_no_loss_behind(tmp_path):
    """A step the optimizer does not take (an fp16 GradScaler overflow calls no optimizer.step: simulated on the
    wrapper) must not add its micro-batch losses to the next step's: the monitor sees each taken step's own loss."""
    trainer = _trainer("llama", "AdamW", tmp_path)
    trainer.create_optimizer()
    wrapper, real_step, calls = trainer.optimizer, trainer.optimizer.step, []

    def step(*a, **k):
        calls.append(1)
        return None if len(calls) == 2 else real_step(*a, **k)  # step 2: the scaler found inf/nan
    wrapper.step = step
    with pytest.warns(UserWarning, match="max_grad_norm=1.0"):
        trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "dist_stab/loss" in h}
    assert len(calls) == STEPS and wrapper.monitor.state["steps"].item() == STEPS - 1
    assert logs[3]["dist_stab/loss"] == pytest.approx(logs[3]["loss"], rel=1e-5)  # not steps 2 + 3


def test_trainer_refuses_clipping_when_asked(tmp_path):
    trainer = _trainer("gpt2", "SCALE", tmp_path, steps=1, refuse=True)
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        trainer.train()


def test_trainer_keeps_clipping_without_transforms(tmp_path):
    from transformers import TrainingArguments

    from dist_stab.integrations.hf import DistStabTrainer
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = DistStabTrainer(model=_model("gpt2"), args=args, train_dataset=_data(4), monitor=ds.SpikeMonitor())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no clipping warning: there is no transform
        trainer.train()
    assert trainer.args.max_grad_norm == 1.0


def test_trainer_resume_is_bit_exact(tmp_path):
    """Checkpoint at step 2 by the Trainer (torch.save of the wrapper's state dict), resume in a new Trainer:
    the same parameters, monitor and AdaGC state as the uninterrupted run, bit for bit."""
    full = _trainer("gpt2", "SCALE", tmp_path / "a", save_steps=2)
    full.train()
    resumed = _trainer("gpt2", "SCALE", tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (n, p), (_, q) in zip(resumed.model.named_parameters(), full.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    wa, wb = full.optimizer.optimizer, resumed.optimizer.optimizer
    for k, v in wa.monitor.state.items():
        torch.testing.assert_close(wb.monitor.state[k], v, rtol=0, atol=0, msg=k)
    _assert_same(wa.transforms[0].state_dict(), wb.transforms[0].state_dict())


def _assert_same(a, b, path="AdaGC"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=path)
    else:
        assert a == b, path


def test_accelerate_gradient_accumulation_equals_plain_loop():
    """Plain Accelerate: prepare(model, ds.wrap(...)), accumulate(): the wrapper steps once per ACCUM micro-batches
    on the accumulated gradients (equal to the plain loop on the whole batch); observe_loss feeds the monitor."""
    from accelerate import Accelerator
    ref_model, ref_losses, ref_norms = _plain_loop("llama", "AdamW")
    acc = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = _model("llama")
    opt = ds.wrap(_optimizer("AdamW", model), *_transforms("AdamW"), skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
    model, popt = acc.prepare(model, opt)
    rows = _data()
    seen = []
    for i in range(STEPS * ACCUM):
        mb = rows[i * MICRO:(i + 1) * MICRO]
        ids, labels = torch.stack([r["input_ids"] for r in mb]), torch.stack([r["labels"] for r in mb])
        with acc.accumulate(model):
            loss = model(input_ids=ids, labels=labels).loss
            acc.backward(loss)
            opt.observe_loss(loss)  # every micro-batch: the step sees their mean
            popt.step()
            popt.zero_grad()
            if acc.sync_gradients:
                seen.append((float(opt.last_stats["GradientStabilizer"]["global_norm"]),
                             float(opt.last_stats["spikes"]["loss"])))
    assert opt.monitor.state["steps"].item() == STEPS
    for (norm, loss), n, l in zip(seen, ref_norms, ref_losses):
        assert norm == pytest.approx(n, rel=1e-4) and loss == pytest.approx(l, rel=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_importing_dist_stab_imports_no_framework():
    import subprocess
    import sys
    code = ("import sys, dist_stab, dist_stab.integrations; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'lightning', 'torchtitan') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_accelerate_save_state_load_state_resume_is_bit_exact(tmp_path):
    """Accelerate's own checkpointing (save_state/load_state: optimizer.state_dict() through torch.save) restores the
    wrapper: a run resumed after 2 steps equals the uninterrupted 4-step run bit for bit, dist_stab state included."""
    from accelerate import Accelerator
    rows = _data()

    def build():
        acc = Accelerator(cpu=True)
        model = _model("llama")
        opt = ds.wrap(_optimizer("AdamW", model), *_transforms("AdamW"), skip=ds.SkipStep(),
                      monitor=ds.SpikeMonitor(min_history=2))
        pmodel, popt = acc.prepare(model, opt)
        return acc, pmodel, popt, opt

    def steps(acc, model, popt, opt, start, n):
        for i in range(start, start + n):
            mb = rows[i * MICRO:(i + 1) * MICRO]
            ids, labels = torch.stack([r["input_ids"] for r in mb]), torch.stack([r["labels"] for r in mb])
            loss = model(input_ids=ids, labels=labels).loss
            acc.backward(loss)
            opt.observe_loss(loss.detach())
            popt.step()
            popt.zero_grad()

    acc, model, popt, opt = build()
    steps(acc, model, popt, opt, 0, 2)
    acc.save_state(str(tmp_path / "state"))
    steps(acc, model, popt, opt, 2, 2)
    acc2, model2, popt2, opt2 = build()
    acc2.load_state(str(tmp_path / "state"))
    steps(acc2, model2, popt2, opt2, 2, 2)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    for k, v in opt.transforms[0].state.items():
        assert torch.equal(v, opt2.transforms[0].state[k]), k
    for k, v in opt.monitor.state.items():
        assert torch.equal(v, opt2.monitor.state[k]), k
    assert int(opt2.monitor.state["loss_count"]) == 4
