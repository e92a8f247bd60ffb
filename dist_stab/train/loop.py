"""The training loop: one readable step, metrics as JSONL, validation, checkpoints, comm report.

Per optimizer step::

    for each micro batch:  loss = CE(model(x), y) / accum ; loss.backward()   (DDP: no_sync but last)
    optimizer.step()       # dist_stab.wrap: the transform clips the grads in place, then AdamW
    optimizer.zero_grad()

Statistics stay device tensors; the host reads them only every ``log.every`` steps (one
all-reduce of the buffered losses, one ``.tolist()``), when it writes one JSONL line per step.
"""
from __future__ import annotations

import json
import math
import os
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

from . import checkpoint, data as data_mod, report
from .config import Config
from .model import build_model, model_args, num_params
from .parallelize import parallelize
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
        self.name = cfg.log.name or f"{stem}-{t}"
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
        self.transforms = build_transforms(cfg.transform, self.model)
        sp = cfg.spikes
        self.monitor = dist_stab.SpikeMonitor(window=sp.window, sigma=sp.sigma, min_history=sp.min_history)
        self.skip = dist_stab.SkipStep(nonfinite=sp.skip_nonfinite, loss_z=sp.skip_loss_z, grad_z=sp.skip_grad_z,
                                       mode=sp.skip_mode)
        self.opt = dist_stab.wrap(self.inner_opt, *self.transforms, skip=self.skip, monitor=self.monitor)
        self.stateful = [*self.transforms, self.monitor, self.skip]  # saved with the checkpoint
        ac = cfg.train.autocast
        use_bf16 = ac == "bf16" or (ac == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.autocast_dtype = "bf16" if use_bf16 else "fp32"

        self.step = 0
        self.loaded_checkpoint = None
        if cfg.checkpoint.load or cfg.checkpoint.resume:
            path = Path(cfg.checkpoint.load) if cfg.checkpoint.load else checkpoint.latest(self.ckpt_dir)
            if path is not None:
                self.step = checkpoint.load(path, self.model, self.inner_opt, self.stateful)
                self.loaded_checkpoint = str(path)
                self.log(f"resumed from {path} at step {self.step}")
        self.tally = report.CommTally()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main and self.loaded_checkpoint is None and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run; a resumed one appends (readers keep the last line per step)
        self.history: List[dict] = []

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if self.is_main:
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
        n_before = len(comm_log.records)
        self.opt.step(loss=loss_sum)
        calls, nbytes = self.tally.add_step([r for r in comm_log.records[n_before:] if r.tag != "SpikeMonitor"])
        comm_log.clear()
        self.opt.zero_grad(set_to_none=True)
        out = {"loss": loss_sum, "lr": lr, "comm_calls": calls, "comm_bytes": nbytes}
        st = self.opt.last_stats[self.transforms[0].tag if self.transforms else "GradNorm"]
        out.update(grad_norm=st["global_norm"], num_nonfinite=st["num_nonfinite"])
        if self.transforms:
            out["num_clipped"] = st["num_clipped"]
        sp = self.opt.last_stats["spikes"]
        out.update(loss_spike=sp["loss_spike"], grad_spike=sp["grad_norm_spike"], skipped=sp["skip"])
        return out

    def _flush(self, pending: List[tuple], t_interval: float) -> Optional[dict]:
        """The only regular host sync: reduce the buffered losses, read the stats, write JSONL."""
        if not pending:
            return None
        losses = self._mean_over_ranks(torch.stack([p[1]["loss"] for p in pending])).tolist()
        keys = [k for k in ("grad_norm", "num_clipped", "num_nonfinite", "loss_spike", "grad_spike", "skipped")
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
            if rec.get("skipped"):
                self.log(f"step {step:>5d} | SKIPPED (non-finite gradient or loss, or a spike beyond the skip "
                         f"threshold): parameters and all optimizer/transform state left unchanged")
            if rec.get("loss_spike") or rec.get("grad_spike"):
                self.log(f"step {step:>5d} | spike: loss {'yes' if rec.get('loss_spike') else 'no'}, "
                         f"grad norm {'yes' if rec.get('grad_spike') else 'no'} (> {self.cfg.spikes.sigma:g} std "
                         f"above the trailing {self.cfg.spikes.window}-step window)")
        rec = dict(rec, tokens_per_s_interval=tok_s)
        gn = f"{rec['grad_norm']:.3f}" if "grad_norm" in rec else "-"
        clip = f"{rec['num_clipped']:>3d}/{len(self.transforms[0].fqns)}" if "num_clipped" in rec else "-"
        n_spk = sum(int(stats.get("loss_spike", [0] * len(pending))[i]) for i in range(len(pending)))
        self.log(f"step {rec['step']:>5d}/{self.cfg.train.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                 f"grad norm {gn} | clipped {clip} | loss spikes {n_spk} | skipped {int(self.skip.skipped)} | "
                 f"{tok_s:,.0f} tok/s | {1000 * t_interval / len(pending):.0f} ms/step")
        return rec

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
        n_params = num_params(self.model)
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
                t_last = time.perf_counter()  # keep eval time out of tokens/s
            ck = cfg.checkpoint
            if (ck.every and step % ck.every == 0) or (ck.at_end and is_last):
                self._reshard()
                p = checkpoint.save(self.ckpt_dir, step, self.model, self.inner_opt, self.stateful, ck.keep,
                                    extra={"config": cfg.to_dict()})
                self.log(f"saved checkpoint {p}")
                t_last = time.perf_counter()
        wall = time.perf_counter() - t_start
        steps_run = end - start_step
        self._reshard()
        refs = report.reference_costs(list(self.model.parameters()))
        rows = self.tally.per_step()
        calls, nbytes = self.tally.totals_per_step()
        table = report.format_report(rows, refs, title=f"communication report [{cfg.transform.name}, "
                                                        f"{self.par.mode} x{self.world}]")
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
            "skipped": int(self.skip.skipped), "skipped_steps": self.skip.skipped_steps(),
            "comm_calls_per_step": calls, "comm_bytes_per_step": nbytes,
            "comm": rows, "comm_reference": refs, "resumed_from": self.loaded_checkpoint,
        }
        self._write(summary)
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def run(cfg: Config) -> dict:
    return Trainer(cfg).fit()
