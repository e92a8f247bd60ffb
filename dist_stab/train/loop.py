"""The training loop: one readable step, metrics as JSONL, validation, checkpoints, comm report.

Per optimizer step::

    for each micro batch:  loss = CE(model(x), y) / accum ; loss.backward()   (DDP: no_sync but last)
    optimizer.step()       # dist_stab.wrap: the transform clips the grads in place, then AdamW
    optimizer.zero_grad()

Statistics stay device tensors; the host reads them only every ``log.every`` steps (one
all-reduce of the buffered losses, one ``.tolist()``), when it writes one JSONL line per step,
TensorBoard scalars (rank 0, ``<run_dir>/tb``) and, on a TTY, a tqdm progress bar.

``parallel.mode: deepspeed``: the model and optimizer go into a DeepSpeed ZeRO engine through
``dist_stab.deepspeed.initialize`` (the transform runs inside ZeRO's ``step()``); per micro batch
``engine.backward(loss); engine.step()``. DeepSpeed skips non-finite steps itself (the bridge rolls
the transform state back); the spike monitor only reports. Checkpoints are DeepSpeed's.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dist_stab
from dist_stab.comm import comm_log
from dist_stab.skip import reason_names

from . import checkpoint, data as data_mod, report
from .config import Config
from .model import build_model, model_args, num_params
from .parallelize import deepspeed_config, parallelize
from .registry import build_optimizer, build_transforms


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine to ``peak * min_ratio`` at ``total``."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_distributed(device_pref: str):
    """Start the process group if launched by torchrun (RANK/WORLD_SIZE set); pick the device."""
    from dist_stab.launch_env import init_from_env
    init_from_env()  # mpirun / srun: OMPI_* / PMI_* / SLURM_* -> RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        kw = {"timeout": timedelta(seconds=int(os.environ.get("DIST_STAB_TIMEOUT", 300)))}
        if use_cuda:
            kw["device_id"] = device  # binds the NCCL communicator to this GPU (no "guessing device ID")
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return device


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class Trainer:
    def __init__(self, cfg: Config, log_fn=None):
        self.cfg = cfg
        self.device = init_distributed(cfg.train.device)
        self.rank, self.world = _rank(), _world()
        self.is_main = self.rank == 0
        self._print = log_fn or (lambda s: print(s, flush=True))
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        t = cfg.transform.name
        stem = Path(cfg.config_path).stem if cfg.config_path else "run"
        self.name = cfg.log.name or f"{stem}-{cfg.optim.name}-{t}"  # runs of other optimizers never share a folder
        self.run_dir = Path(cfg.log.run_dir or Path("runs") / self.name)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

        # ---- data
        self.data = data_mod.prepare(cfg.data, log=self.log)
        self.train_batches = data_mod.Batches(self.data.train, cfg.data.seq_len, cfg.train.seed)
        self.val_batches = data_mod.Batches(self.data.val, cfg.data.seq_len, cfg.train.seed)

        # ---- model: same init on every rank (seeded), then sharded
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        self.args = model_args(m.size, self.data.vocab_size, cfg.data.seq_len, dim=m.dim, n_layers=m.n_layers,
                               n_heads=m.n_heads, ffn_dim=m.ffn_dim, rope_theta=m.rope_theta,
                               norm_eps=m.norm_eps, init_std=m.init_std)
        meta = cfg.train.meta_init and cfg.parallel.mode in ("fsdp", "hsdp", "tp", "fsdp_tp")
        self.model = build_model(self.args, device="meta" if meta else self.device)
        self.n_params = num_params(self.model)  # before ZeRO-3 partitions the parameters
        self.par = parallelize(self.model, cfg.parallel, self.device)
        if meta:
            self.model.to_empty(device=self.device)
            self.model.init_weights()
        self.fwd = self.par.wrapper or self.model

        # ---- batch split
        tb = cfg.train
        per_step = tb.micro_batch_size * self.par.dp_size
        if tb.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size={tb.global_batch_size} is not a multiple of "
                             f"micro_batch_size x dp ranks = {tb.micro_batch_size} x {self.par.dp_size}")
        self.accum = tb.global_batch_size // per_step
        self.tokens_per_step = tb.global_batch_size * cfg.data.seq_len

        # ---- optimizer and transforms
        self.inner_opt = build_optimizer(cfg.optim, self.model, total_steps=cfg.train.steps)
        sp = cfg.spikes
        self.monitor = dist_stab.SpikeMonitor(window=sp.window, sigma=sp.sigma, min_history=sp.min_history)
        ac = cfg.train.autocast
        use_bf16 = ac == "bf16" or (ac == "auto" and self.device.type == "cuda")
        self.engine = None
        if self.par.mode == "deepspeed":
            self._init_deepspeed(bf16=use_bf16)
        else:
            # keep_grads: the same gradient objects every step, so the transforms reuse their preparation
            # (a few C-level passes); persistent_grads would also skip those but cannot see a gradient
            # dropped in the middle (the freeze idiom p.requires_grad_(False); p.grad = None)
            self.transforms = build_transforms(cfg.transform, self.model)
            self.stat_tag = self.transforms[0].tag if self.transforms else "GradNorm"
            self.skip = dist_stab.SkipStep(nonfinite=sp.skip_nonfinite, loss_z=sp.skip_loss_z,
                                           grad_z=sp.skip_grad_z, mode=sp.skip_mode)
            self.opt = dist_stab.wrap(self.inner_opt, *self.transforms, skip=self.skip, monitor=self.monitor)
            self.stateful = [*self.transforms, self.monitor, self.skip]  # saved with the checkpoint
            self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
            self.autocast_dtype = "bf16" if use_bf16 else "fp32"

        self.step = 0
        self.loaded_checkpoint = None
        if cfg.checkpoint.load or cfg.checkpoint.resume:
            latest = checkpoint.latest_deepspeed if self.engine is not None else checkpoint.latest
            path = Path(cfg.checkpoint.load) if cfg.checkpoint.load else latest(self.ckpt_dir)
            if path is not None and self.engine is not None:
                self.step = checkpoint.load_deepspeed(path, self.engine, self.stateful)
            elif path is not None:
                self.step = checkpoint.load(path, self.model, self.inner_opt, self.stateful,
                                            expect={"optimizer": cfg.optim.name, "transform": cfg.transform.name})
            if path is not None:
                self.loaded_checkpoint = str(path)
                self.log(f"resumed from {path} at step {self.step}")
        self.tally = report.CommTally()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main and self.loaded_checkpoint is None and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run; a resumed one appends (readers keep the last line per step)
        self.history: List[dict] = []
        self.tb = self._tensorboard() if self.is_main else None
        self._spike_counts = [0, 0]  # loss, grad-norm spikes so far (TensorBoard)

    def _init_deepspeed(self, bf16: bool) -> None:
        """ZeRO engine over the world: the registry's optimizer, the transform through dist_stab's bridge."""
        cfg = self.cfg
        import deepspeed
        import deepspeed.ops
        from dist_stab.deepspeed import initialize
        from dist_stab.transforms import GradNorm

        if self.device.type == "cpu":  # skip the 40 s JIT build of an op only inference uses (cpu-stack.md §2)
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        ds = deepspeed_config(cfg, self.par.dp_size, bf16=bf16)
        # the transform by name (its kwargs from transform.<name>); "none": the measure-only GradNorm, so the
        # grad norm is reported the same way (one batched all-reduce instead of DeepSpeed's per group)
        spec = [(cfg.transform.name, cfg.transform.kwargs)] if cfg.transform.name != "none" else [GradNorm]
        self.engine, _, _, _ = initialize(model=self.model, optimizer=self.inner_opt, config=ds, transforms=spec)
        hook = self.engine.dist_stab
        self.transforms = list(hook.transforms) if cfg.transform.name != "none" else []
        self.stat_tag = hook.transforms[0].tag
        self.fwd = self.engine
        self.skip = None  # DeepSpeed's own skip (non-finite norm); counted from engine.skipped_steps (a host int)
        self.ds_skipped_steps: List[int] = []
        self.stateful = [self.monitor]  # the transforms' state travels in DeepSpeed's client_state
        self.autocast = nullcontext()  # DeepSpeed bf16 keeps bf16 params itself
        self.autocast_dtype = "bf16 (DeepSpeed)" if (ds.get("bf16") or {}).get("enabled") else "fp32"
        self.ds_stage = int(ds["zero_optimization"]["stage"])

    def _tensorboard(self):
        want = self.cfg.log.tensorboard
        if want is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            if want:
                raise ImportError("log.tensorboard=true needs the tensorboard package (pip install -e .[train])") \
                    from exc
            self.log("warning: tensorboard is not installed; no TensorBoard scalars (pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def _skipped(self) -> int:
        """Skips so far, for the log line, TensorBoard and the summary (all at log steps).

        The device count is copied to the host once per log step and reused by every caller until
        the next step: no read per logged step, none between log steps."""
        if self.engine is not None:
            return len(self.ds_skipped_steps)  # a host list DeepSpeed's skips are appended to: no sync
        seen = getattr(self, "_skipped_seen", None)
        if seen is None or seen[0] != self.step:
            seen = self._skipped_seen = (self.step, int(self.skip.skipped))  # host-sync-ok: once per log step
        return seen[1]

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.is_main:
            if getattr(self, "bar", None) is not None:
                self.bar.write(msg)  # above the bar
            else:
                self._print(msg)

    def _write(self, rec: dict) -> None:
        self.history.append(rec)
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        # TP ranks hold equal values, so the world mean is the data-parallel mean
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world
        return t

    def loss_fn(self, x, y) -> torch.Tensor:
        with self.autocast:
            logits = self.fwd(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        tot = torch.zeros((), device=self.device)
        n = 0
        for x, y in self.val_batches.eval_batches(self.cfg.eval.batches, self.cfg.train.global_batch_size,
                                                   self.par.dp_rank, self.par.dp_size):
            tot += self.loss_fn(x.to(self.device), y.to(self.device))
            n += 1
        self.model.train()
        return float(self._mean_over_ranks(tot / max(n, 1)))  # host sync: eval steps only

    # ------------------------------------------------------------------ step
    def train_step(self, step: int) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        lr = lr_at(step, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr_ratio)
        if self.engine is not None:
            return self._train_step_deepspeed(step, lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.train_batches.train_batch(step, micro, self.par.dp_rank, self.par.dp_size,
                                                  cfg.train.micro_batch_size, cfg.train.global_batch_size)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.par.no_sync(self.fwd, last_micro=micro == self.accum - 1):
                loss = self.loss_fn(x, y) / self.accum
                loss.backward()
            loss_sum += loss.detach()
        if cfg.train.inject_nan_at == step and self.rank == 0:  # fault injection (tests, demos)
            p = next(p for p in self.model.parameters() if p.grad is not None)
            g = p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.grad
            if g.numel():
                g.view(-1)[0] = float("nan")
        if cfg.train.inject_spike_every and step % cfg.train.inject_spike_every == 0:  # stress test, all ranks
            torch._foreach_mul_([p.grad for p in self.model.parameters() if p.grad is not None],
                                cfg.train.inject_spike_scale)
        n_before = len(comm_log.records)
        self.opt.step(loss=loss_sum)
        calls, nbytes = self.tally.add_step([r for r in comm_log.records[n_before:] if r.tag != "SpikeMonitor"])
        comm_log.clear()
        self.opt.zero_grad(set_to_none=not cfg.train.keep_grads)
        out = {"loss": loss_sum, "lr": lr, "comm_calls": calls, "comm_bytes": nbytes}
        st = self.opt.last_stats[self.stat_tag]
        out.update(grad_norm=st["global_norm"], num_nonfinite=st["num_nonfinite"])
        if self.transforms:
            out["num_clipped"] = st["num_clipped"]
        sp = self.opt.last_stats["spikes"]
        out.update(loss_spike=sp["loss_spike"], grad_spike=sp["grad_norm_spike"], skipped=sp["skip"],
                   skip_reason=sp["skip_reason"])  # bitmask over dist_stab.skip.REASONS
        return out

    def _train_step_deepspeed(self, step: int, lr: float) -> Dict[str, torch.Tensor]:
        cfg, eng = self.cfg, self.engine
        for g in self.inner_opt.param_groups:  # ZeRO keeps the torch optimizer's group dicts (no DS scheduler)
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        n_before, skipped_before = len(comm_log.records), eng.skipped_steps
        for micro in range(self.accum):
            x, y = self.train_batches.train_batch(step, micro, self.par.dp_rank, self.par.dp_size,
                                                  cfg.train.micro_batch_size, cfg.train.global_batch_size)
            loss = self.loss_fn(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            if cfg.train.inject_nan_at == step and self.rank == 0 and micro == 0:  # fault injection
                loss = loss * float("nan")
            eng.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            eng.step()  # a no-op but at the accumulation boundary: ZeRO's step, with the transform inside
            loss_sum += loss.detach() / self.accum
        st = eng.dist_stab.last_stats[self.stat_tag]
        sp = self.monitor.update(loss=loss_sum, grad_norm=st["global_norm"])  # report only: DeepSpeed skips
        calls, nbytes = self.tally.add_step([r for r in comm_log.records[n_before:] if r.tag != "SpikeMonitor"])
        comm_log.clear()
        skipped = eng.skipped_steps - skipped_before  # a host int DeepSpeed keeps: no sync
        if skipped:
            self.ds_skipped_steps.append(step)
        out = {"loss": loss_sum, "lr": lr, "comm_calls": calls, "comm_bytes": nbytes,
               "grad_norm": st["global_norm"], "num_nonfinite": st["num_nonfinite"],
               "loss_spike": sp["loss_spike"], "grad_spike": sp["grad_norm_spike"],
               "skipped": torch.tensor(skipped), "skip_reason": torch.tensor(1 if skipped else 0)}  # DS: overflow
        if self.transforms:
            out["num_clipped"] = st["num_clipped"]
        return out

    def _flush(self, pending: List[tuple], t_interval: float) -> Optional[dict]:
        """The only regular host sync: reduce the buffered losses, read the stats, write JSONL."""
        if not pending:
            return None
        losses = self._mean_over_ranks(torch.stack([p[1]["loss"] for p in pending])).tolist()
        keys = [k for k in ("grad_norm", "num_clipped", "num_nonfinite", "loss_spike", "grad_spike", "skipped",
                            "skip_reason")
                if k in pending[0][1]]
        stats = {k: torch.stack([p[1][k].float() for p in pending]).tolist() for k in keys}
        tok_s = self.tokens_per_step * len(pending) / max(t_interval, 1e-9)
        rec = None
        for i, (step, o, dt) in enumerate(pending):
            rec = {"step": step, "loss": losses[i], "lr": o["lr"], "tokens": step * self.tokens_per_step,
                   "step_time_s": dt, "tokens_per_s": self.tokens_per_step / max(dt, 1e-9),
                   "comm_calls": o["comm_calls"], "comm_bytes": o["comm_bytes"]}
            for k in keys:
                rec[k] = stats[k][i] if k == "grad_norm" else int(stats[k][i])
            self._write(rec)
            self._tb_step(rec, tok_s if i == len(pending) - 1 else None)
            if rec.get("skipped"):
                why = "+".join(reason_names(rec.get("skip_reason", 0))) or "reason not recorded"
                if self.engine is not None:
                    why = "non-finite gradient (DeepSpeed's overflow check)"
                self.log(f"step {step:>5d} | SKIPPED ({why}): parameters and all optimizer/transform state "
                         f"left unchanged")
            if rec.get("loss_spike") or rec.get("grad_spike"):
                self.log(f"step {step:>5d} | spike: loss {'yes' if rec.get('loss_spike') else 'no'}, "
                         f"grad norm {'yes' if rec.get('grad_spike') else 'no'} (> {self.cfg.spikes.sigma:g} std "
                         f"above the trailing {self.cfg.spikes.window}-step window)")
        rec = dict(rec, tokens_per_s_interval=tok_s)
        gn = f"{rec['grad_norm']:.3f}" if "grad_norm" in rec else "-"
        clip = f"{rec['num_clipped']:>3d}/{len(self.transforms[0].fqns)}" if "num_clipped" in rec else "-"
        n_spk = sum(int(stats.get("loss_spike", [0] * len(pending))[i]) for i in range(len(pending)))
        if self.bar is not None:  # a TTY: the bar replaces the periodic line
            self.bar.update(rec["step"] - self.bar.n)
            self.bar.set_postfix_str(f"loss {rec['loss']:.4f} | {tok_s:,.0f} tok/s | grad norm {gn} | "
                                     f"skips {self._skipped()}")
            return rec
        self.log(f"step {rec['step']:>5d}/{self.cfg.train.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                 f"grad norm {gn} | clipped {clip} | loss spikes {n_spk} | skipped {self._skipped()} | "
                 f"{tok_s:,.0f} tok/s | {1000 * t_interval / len(pending):.0f} ms/step")
        return rec

    def _tb_step(self, rec: dict, tok_s_interval: Optional[float]) -> None:
        """TensorBoard scalars of one step (rank 0, written at log steps from the values read there)."""
        self._spike_counts[0] += int(rec.get("loss_spike", 0))
        self._spike_counts[1] += int(rec.get("grad_spike", 0))
        if self.tb is None:
            return
        s = rec["step"]
        for k in ("loss", "lr", "grad_norm", "num_clipped", "tokens_per_s"):
            if k in rec:
                self.tb.add_scalar(f"train/{k}", rec[k], s)
        if tok_s_interval is not None:
            self.tb.add_scalar("train/tokens_per_s_interval", tok_s_interval, s)
        self.tb.add_scalar("spikes/loss_spikes", self._spike_counts[0], s)
        self.tb.add_scalar("spikes/grad_norm_spikes", self._spike_counts[1], s)
        self.tb.add_scalar("spikes/skipped", self._skipped(), s)

    def _reshard(self) -> None:
        """FSDP2 leaves the last block gathered after a forward (reshard_after_forward=False there)."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover
            return
        for mod in self.model.modules():
            if isinstance(mod, FSDPModule):
                mod.reshard()

    # ------------------------------------------------------------------ run
    def fit(self) -> dict:
        cfg = self.cfg
        n_params = self.n_params
        self.log(f"model {cfg.model.size}: {n_params / 1e6:.2f}M params (dim {self.args.dim}, {self.args.n_layers} "
                 f"layers, vocab {self.args.vocab_size}, seq {self.args.max_seq_len}) | parallel {self.par.mode} "
                 f"on {self.world} {self.device.type} process(es), dp={self.par.dp_size} | {self.autocast_dtype}")
        self.log(f"optimizer {cfg.optim.name} lr {cfg.optim.lr} | transform {cfg.transform.name} "
                 f"{cfg.transform.kwargs or ''} | batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens "
                 f"(micro {cfg.train.micro_batch_size}, accum {self.accum}) | run dir {self.run_dir}")
        pending: List[tuple] = []
        t_start = t_last = time.perf_counter()
        start_step = self.step
        val = None
        end = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
        self.bar = None
        if self.is_main and cfg.log.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=end, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)
        for step in range(self.step + 1, end + 1):
            t0 = time.perf_counter()
            out = self.train_step(step)
            pending.append((step, out, time.perf_counter() - t0))
            self.step = step
            is_last = step == end
            if step % cfg.log.every == 0 or is_last or step == start_step + 1:  # first step: the starting loss
                now = time.perf_counter()
                self._flush(pending, now - t_last)
                pending, t_last = [], now
            if cfg.eval.every and (step % cfg.eval.every == 0 or is_last):
                val = self.evaluate()
                self.log(f"step {step:>5d} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.1f}")
                self._write({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
                if self.tb is not None:
                    self.tb.add_scalar("val/loss", val, step)
                    self.tb.add_scalar("val/ppl", math.exp(min(val, 50)), step)
                t_last = time.perf_counter()  # keep eval time out of tokens/s
            ck = cfg.checkpoint
            if (ck.every and step % ck.every == 0) or (ck.at_end and is_last):
                self._reshard()
                if self.engine is not None:
                    p = checkpoint.save_deepspeed(self.engine, self.ckpt_dir, step, self.stateful, ck.keep,
                                                  extra={"config": cfg.to_dict()})
                else:
                    p = checkpoint.save(self.ckpt_dir, step, self.model, self.inner_opt, self.stateful, ck.keep,
                                        extra={"config": cfg.to_dict()})
                self.log(f"saved checkpoint {p}")
                t_last = time.perf_counter()
        wall = time.perf_counter() - t_start
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
        steps_run = end - start_step
        self._reshard()
        if self.engine is not None:  # DeepSpeed's own clipping: one norm all-reduce per param group / sub-group
            zopt = self.engine.optimizer
            n = len(zopt.fp32_partitioned_groups_flat if self.ds_stage == 3 else zopt.optimizer.param_groups)
            refs = [{"method": "DeepSpeed gradient_clipping (global)", "calls_per_step": n, "bytes_per_step": 4 * n,
                     "note": f"one per ZeRO-{self.ds_stage} param group / sub-group"}]
        else:
            refs = report.reference_costs(list(self.model.parameters()))
        rows = self.tally.per_step()
        calls, nbytes = self.tally.totals_per_step()
        mode = f"deepspeed ZeRO-{self.ds_stage}" if self.engine is not None else self.par.mode
        table = report.format_report(rows, refs, title=f"communication report [{cfg.transform.name}, "
                                                        f"{mode} x{self.world}]", world=self.world,
                                     n_tensors=len(self.transforms[0].fqns) if self.transforms else None)
        self.log(table)
        train_losses = [r["loss"] for r in self.history if "loss" in r]
        summary = {
            "summary": True, "name": self.name, "transform": cfg.transform.name, "parallel": self.par.mode,
            "world_size": self.world, "steps": cfg.train.steps, "last_step": end, "steps_run": steps_run, "params": n_params,
            "first_loss": train_losses[0] if train_losses else None,
            "final_loss": train_losses[-1] if train_losses else None,
            "final_val_loss": val, "wall_s": wall,
            "tokens_per_s": self.tokens_per_step * steps_run / max(wall, 1e-9),
            "total_clipped": sum(r.get("num_clipped", 0) for r in self.history if "loss" in r),
            "loss_spikes": sum(r.get("loss_spike", 0) for r in self.history if "loss" in r),
            "grad_spikes": sum(r.get("grad_spike", 0) for r in self.history if "loss" in r),
            **{k: float(v) for k, v in self.monitor.scores().items()},
            "skipped": self._skipped(),
            "skipped_steps": self.ds_skipped_steps if self.engine is not None else self.skip.skipped_steps(),
            "skip_reasons": ([[k, ["nonfinite_grad"]] for k in self.ds_skipped_steps] if self.engine is not None
                             else [[k, why] for k, why in self.skip.skipped_steps_with_reasons()]),
            "comm_calls_per_step": calls, "comm_bytes_per_step": nbytes,
            "comm": rows, "comm_reference": refs, "resumed_from": self.loaded_checkpoint,
        }
        self._write(summary)
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def run(cfg: Config) -> dict:
    return Trainer(cfg).fit()
