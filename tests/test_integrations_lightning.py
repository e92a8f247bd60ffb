"""dist_stab in Lightning 2.6.6 (dist_stab.integrations.lightning): the configure_optimizers recipe (scheduler on
the wrapper) trains equal to the plain loop, the closure's loss reaches the monitor, gradient_clip_val is refused
next to a transform, and fit(ckpt_path=...) continues exactly as the uninterrupted run (one batch per epoch: see
_one_batch_loader)."""
from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning", reason="lightning is installed by the 'integrations' extra (tests/run.sh)")

import dist_stab as ds  # noqa: E402
from dist_stab import optim as dso  # noqa: E402

STEPS, BATCH, DIM, PER_EPOCH = 6, 8, 16, 3  # 2 epochs of 3 batches: the checkpoint at step 3 ends an epoch


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PER_EPOCH * BATCH, DIM, generator=g)
    return x, x @ torch.randn(DIM, 1, generator=g) + 0.1 * torch.randn(PER_EPOCH * BATCH, 1, generator=g)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _make_opt(net):
    opt = ds.wrap(dso.StableSPAM(list(net.named_parameters()), lr=1e-2), ds.AdaGC(warmup_steps=2),
                  skip=ds.SkipStep(), monitor=ds.SpikeMonitor())
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):  # the README recipe: the scheduler is built on the wrapper
        opt, sched = _make_opt(self.net)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader():
    x, y = _data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _trainer(tmp_path, steps=STEPS, clip=None, devices=1, **kw):
    from dist_stab.integrations.lightning import DistStabCallback
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, gradient_clip_val=clip,
                     callbacks=[DistStabCallback()], log_every_n_steps=1, default_root_dir=str(tmp_path), **kw)


def _plain(steps=STEPS):
    net = _net()
    opt, sched = _make_opt(net)
    x, y = _data()
    losses = []
    for s in range(steps):
        b = s % PER_EPOCH
        xb, yb = x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH]
        loss = torch.nn.functional.mse_loss(net(xb), yb)
        loss.backward()
        opt.step(loss=loss.detach())
        opt.zero_grad()
        sched.step()
        losses.append(float(loss.detach()))
    return net, opt, losses


def test_recipe_equals_plain_loop(tmp_path):
    ref, ref_opt, losses = _plain()
    module = Module()
    trainer = _trainer(tmp_path)
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, ds.WrappedOptimizer)
    assert float(opt.last_stats["spikes"]["loss"]) == pytest.approx(losses[-1], rel=1e-6)  # the closure's loss
    assert opt.monitor.state["steps"].item() == STEPS
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])  # scheduler on the wrapper
    assert trainer.callback_metrics["dist_stab/AdaGC/global_norm"].item() == pytest.approx(
        float(ref_opt.last_stats["AdaGC"]["global_norm"]), rel=1e-6)  # last_stats logged by the callback
    assert "dist_stab/AdaGC/num_clipped" in trainer.callback_metrics and "dist_stab/skipped" in trainer.callback_metrics
    for (n, p), (_, q) in zip(module.net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


class DDPModule(Module):
    def train_dataloader(self):
        """Each rank takes every other row of the plain loop's batch (a sampler built in the rank, unshuffled:
        Lightning's own distributed sampler reshuffles), half the batch size per rank."""
        x, y = _data()
        data = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=BATCH // 2, sampler=sampler)


def test_ddp_two_processes_equals_plain_loop(tmp_path):
    """Lightning's own DDP (strategy="ddp_spawn", 2 CPU processes, gloo): DDP averages the two half-batches'
    gradients, so the recipe equals the single-process plain loop up to rounding; the monitor's loss is the ranks'
    mean (the whole batch's loss); the transform's norm the whole batch's."""
    ref, ref_opt, losses = _plain()
    module = DDPModule()
    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    trainer.fit(module)  # the spawned ranks' weights and logged metrics come back to this process
    m = trainer.callback_metrics
    assert m["dist_stab/loss"].item() == pytest.approx(losses[-1], rel=1e-5)
    assert m["dist_stab/AdaGC/global_norm"].item() == pytest.approx(float(ref_opt.last_stats["AdaGC"]["global_norm"]),
                                                                    rel=1e-5)
    for (n, p), (_, q) in zip(module.net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_gradient_clip_val_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_val=1.0"):
        _trainer(tmp_path, clip=1.0).fit(Module(), _loader())


def _one_batch_loader():
    """One batch per epoch: Lightning restarts a plain DataLoader's epoch on resume (with torch's own AdamW too, a
    resumed fit ends 3e-3 away from the uninterrupted one here: its data loop, not the optimizer), so with a single
    batch the data a resumed run sees cannot differ and only the optimizer's restored state decides the result."""
    x, y = _data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:BATCH], y[:BATCH]), batch_size=BATCH)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    """Lightning's own checkpoint (optimizer.state_dict() inside its .ckpt, load_state_dict on resume) restores the
    wrapper exactly: AdaGC's warm-up (2 steps) and the LR schedule span the checkpoint at step 3."""
    full = Module()
    _trainer(tmp_path / "full").fit(full, _one_batch_loader())
    first = Module()
    t1 = _trainer(tmp_path / "a", steps=3)
    t1.fit(first, _one_batch_loader())
    ckpt = tmp_path / "a" / "step3.ckpt"
    t1.save_checkpoint(str(ckpt))
    second = Module()
    t2 = _trainer(tmp_path / "b")
    t2.fit(second, _one_batch_loader(), ckpt_path=str(ckpt))
    assert t2.global_step == STEPS
    opt = t2.optimizers[0]
    assert int(opt.monitor.state["steps"]) == STEPS and float(opt.transforms[0].state["count"][0]) == 2
    for (n, p), (_, q) in zip(second.net.named_parameters(), full.net.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    fresh = Module()  # sensitivity: the same 3 steps from a fresh optimizer (state not restored) end elsewhere
    fresh.load_state_dict(first.state_dict())
    _trainer(tmp_path / "c", steps=3).fit(fresh, _one_batch_loader())
    assert max(float((p - q).abs().max()) for p, q in zip(fresh.parameters(), full.parameters())) > 1e-4
