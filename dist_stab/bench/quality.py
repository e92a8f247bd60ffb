"""Training quality and stability of every method on real text, side by side.

    DIST_STAB_DATA=.carry python -m dist_stab.bench.quality --config configs/llama_20m_gpu.yaml --jobs 8 \\
        --time-limit 450 --out docs/quality_gpu
    python -m dist_stab.bench.quality --config configs/tiny_cpu.yaml --out docs/quality_cpu \\
        --lrs 3e-3,1e-2,3e-2 --spike-lr 3e-3 --spike-every 25

Runs the reference trainer (one process per run, ``--jobs`` at a time on the one device) for AdamW, AdamW +
global clipping, + AdaGC, + GradientStabilizer, Stable-SPAM, SPAM and SCALE: at each LR of ``--lrs`` (one
sweep common to all methods) and once at ``--spike-lr`` (default: the middle LR) with injected gradient
spikes (all gradients x ``--spike-scale`` every ``--spike-every`` steps). Same seed, data and token budget
for every run; 10 % linear warm-up, cosine to 10 %. Runs start in priority order (middle LR, spike runs,
highest LR, the rest), so a time limit cuts the least informative ones.

Before the runs: the token cache is built once (no two runs race on it), then one process times every
method alone for ``--speed-steps`` steps (tokens/s without sharing the device). With ``--time-limit``, the
steps per run are then cut (from ``--steps`` / the config's) so that all runs fit the time left at those
rates. Spikes come every ``steps // 8 + 1`` steps unless set: 7 spikes, none in the last eighth. A run
"diverged" when a training loss is not finite or its final training loss (mean of the last 10 steps) is
above its first.
``OUT.json``, ``OUT.md`` (tables) and ``OUT.png`` (validation curves, LR sweep, spike runs) are rewritten
after every finished run; at the time limit (or SIGTERM) the running runs are stopped and kept as partial.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "AdamW": ["optim.name=adamw", "transform.name=none"],
    "AdamW+GlobalClip": ["optim.name=adamw", "transform.name=global_clip"],
    "AdamW+AdaGC": ["optim.name=adamw", "transform.name=adagc"],
    "AdamW+GradientStabilizer": ["optim.name=adamw", "transform.name=gradient_stabilizer"],
    "StableSPAM": ["optim.name=stable_spam", "transform.name=none"],
    "SPAM": ["optim.name=spam", "transform.name=none"],
    "SCALE": ["optim.name=scale", "transform.name=none"],
}
SPEED_WARMUP = 5  # untimed steps before the timed ones (allocator, cuBLAS and Triton warm-up)
OVERHEAD = 1.2  # a run's device time over its train steps at the rate alone: validation ~8 %, sharing ~12 %
STARTUP_S = 30.0  # seconds kept free for the first runs' start-up and the last ones' tail; no start after that


# ---------------------------------------------------------------------------------------------- workers
def _device_info(device) -> dict:
    import torch
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def _train_worker(config: str, sets: list) -> None:
    """One training run; adds ``device.json`` (device, torch, peak allocated memory) to its run dir."""
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    trainer = Trainer(load_config(config, sets))
    trainer.fit()
    (trainer.run_dir / "device.json").write_text(json.dumps(_device_info(trainer.device)))


def _speed_worker(config: str, sets: list, methods: list, steps: int, out: str) -> None:
    """Every method alone: SPEED_WARMUP steps, then ``steps`` timed steps between device syncs."""
    import gc

    import torch
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    res = {}
    for name in methods:
        try:
            res[name] = _time_steps(Trainer(load_config(config, METHODS[name] + sets + [
                f"log.run_dir={Path(out).parent / name}"])), steps)
        except Exception as exc:  # a broken method must not cost the others their measurement
            res[name] = {"error": repr(exc)[-500:]}
        _write_json(out, res)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _time_steps(tr, steps: int) -> dict:
    """Tokens/s over ``steps`` train steps after SPEED_WARMUP ones, with the device and peak memory."""
    import torch
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    for step in range(1, SPEED_WARMUP + 1):
        tr.train_step(step)
    sync()
    t0 = time.perf_counter()
    for step in range(SPEED_WARMUP + 1, SPEED_WARMUP + steps + 1):
        tr.train_step(step)
    sync()
    return dict(_device_info(tr.device), tokens_per_s=tr.tokens_per_step * steps / (time.perf_counter() - t0))


def _worker(argv: list) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["_train", "_speed"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--methods", default="")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.kind == "_train":
        _train_worker(a.config, a.set)
    else:
        _speed_worker(a.config, a.set, a.methods.split(","), a.steps, a.out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as python -m dist_stab.train: no interpreter teardown (cpu-stack.md §1a)


# ---------------------------------------------------------------------------------------------- the plan
def plan_runs(methods: list, lrs: list, spike_lr: float) -> list:
    """Runs in priority order: the spike LR, the spike runs, then the other LRs from the highest down."""
    rest = sorted((lr for lr in lrs if lr != spike_lr), reverse=True)
    levels = [(spike_lr, False), (spike_lr, True)] + [(lr, False) for lr in rest]
    return [{"key": run_key(m, lr, spike), "method": m, "lr": lr, "spike": spike}
            for lr, spike in levels for m in methods]


def run_key(method: str, lr: float, spike: bool) -> str:
    return f"{method}|{'spike' if spike else 'lr'}={lr:g}"


def set_steps(meta: dict, args, steps: int) -> None:
    """Steps per run and what follows from them: 10 % warm-up, validation and spike intervals."""
    meta.update(steps=steps, warmup_steps=max(1, steps // 10), eval_every=args.eval_every or max(1, steps // 10),
                spike_every=args.spike_every or steps // 8 + 1)


def fit_steps(plan: list, speed: dict, tokens_per_step: int, seconds: float, max_steps: int) -> int:
    """Most steps (<= ``max_steps``) for which the whole plan fits ``seconds`` of one device at the rates
    measured alone (a method not measured counts at the slowest rate)."""
    rates = {k: v["tokens_per_s"] for k, v in speed.items() if "tokens_per_s" in v}
    if not rates:
        return max_steps
    slowest = min(rates.values())
    step_s = OVERHEAD * sum(tokens_per_step / rates.get(r["method"], slowest) for r in plan)
    return max(1, min(max_steps, int(seconds / step_s)))


def common_sets(args, meta: dict) -> list:
    """Trainer overrides shared by every run (after the method's, before the run's own)."""
    return ["parallel.mode=none", f"train.device={args.device}", f"train.steps={meta['steps']}",
            f"train.global_batch_size={meta['batch']}", f"train.micro_batch_size={meta['micro_batch']}",
            f"schedule.warmup_steps={meta['warmup_steps']}", f"eval.every={meta['eval_every']}",
            f"train.num_threads={max(1, (os.cpu_count() or 1) // meta['jobs'])}", "log.tensorboard=false",
            "log.progress_bar=false", "checkpoint.resume=false", "checkpoint.every=0", "checkpoint.at_end=false",
            *args.set]


def run_sets(run: dict, meta: dict, common: list, runs_dir: str) -> list:
    sets = METHODS[run["method"]] + common + [f"optim.lr={run['lr']}",
                                              f"log.run_dir={Path(runs_dir) / run_dir_name(run)}"]
    if run["spike"]:
        sets += [f"train.inject_spike_every={meta['spike_every']}",
                 f"train.inject_spike_scale={meta['spike_scale']}"]
    return sets


def run_dir_name(run: dict) -> str:
    return run["key"].replace("|", "_").replace("+", "-")


# ---------------------------------------------------------------------------------------------- results
def read_jsonl(path: Path) -> list:
    """Records of a metrics file; a line cut by a kill is dropped."""
    recs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


def collect(run: dict, run_dir: Path, status: str, wall: float) -> dict:
    """One run's result from its run dir; works on a partial (killed) run."""
    recs = read_jsonl(run_dir / "metrics.jsonl")
    train = [[r["step"], round(r["loss"], 5)] for r in recs if "loss" in r and not r.get("summary")]
    val = [[r["step"], round(r["val_loss"], 5)] for r in recs if "val_loss" in r]
    summ = next((r for r in recs if r.get("summary")), {})
    dev_path = run_dir / "device.json"
    res = dict(run, status=status, wall_s=round(wall, 1), train=train, val=val,
               steps_done=train[-1][0] if train else 0, tokens_per_s=summ.get("tokens_per_s"),
               clipped=summ.get("total_clipped"), loss_spikes=summ.get("loss_spikes"), skipped=summ.get("skipped"),
               **(json.loads(dev_path.read_text()) if dev_path.exists() else {}))
    if train:
        losses = [x[1] for x in train]
        final = sum(losses[-10:]) / len(losses[-10:])
        res.update(first_loss=losses[0], final_loss=final,
                   diverged=not all(math.isfinite(x) for x in losses) or not final <= losses[0])
    if val:
        res.update(final_val_loss=val[-1][1], final_val_ppl=math.exp(min(val[-1][1], 50)))
    if status == "error":
        log = run_dir / "log.txt"
        res["error"] = log.read_text()[-1500:] if log.exists() else ""
    return res


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # a kill mid-write leaves the previous file


# ---------------------------------------------------------------------------------------------- runner
class Study:
    """Runs the plan ``jobs`` at a time and rewrites the outputs after every finished run."""

    def __init__(self, args, meta: dict):
        self.args, self.meta = args, meta
        self.plan = plan_runs(meta["methods"], meta["lrs"], meta["spike_lr"])
        self.results: dict = {}
        self.speed: dict = {}
        self.running: dict = {}  # key -> (run, Popen, t0)
        self.deadline = meta["t0"] + args.time_limit if args.time_limit else math.inf

    def fit(self) -> None:
        """Cut the steps per run to the time left, at the rates measured alone."""
        m = self.meta
        if self.speed and self.deadline < math.inf:
            seconds = self.deadline - time.time() - STARTUP_S
            set_steps(m, self.args, fit_steps(self.plan, self.speed, m["batch"] * m["seq_len"], seconds,
                                              m["max_steps"]))

    def note_device(self, info: dict) -> None:
        if "device" in info and "device" not in self.meta:
            self.meta.update(device=info["device"], torch=info["torch"])

    def write(self) -> None:
        self.meta["wall_s"] = round(time.time() - self.meta["t0"], 1)
        _write_json(self.args.out + ".json", {"meta": self.meta, "speed": self.speed, "results": self.results})
        Path(self.args.out + ".md").write_text(format_md(self.meta, self.speed, self.results))
        plot(self.args.out + ".png", self.meta, self.results)

    def _spawn(self, argv: list, log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            return subprocess.Popen([sys.executable, "-m", "dist_stab.bench.quality", *argv], stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def _stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def run_speed(self) -> None:
        a = self.args
        out = Path(a.runs_dir) / "speed" / "speed.json"
        proc = self._spawn(["_speed", "--config", a.config, "--steps", str(a.speed_steps), "--methods",
                            ",".join(self.meta["methods"]), "--out", str(out), "--set", *common_sets(a, self.meta),
                            f"optim.lr={self.meta['spike_lr']}", "eval.every=0"], out.parent / "log.txt")
        try:
            proc.wait(timeout=max(1.0, min(a.timeout, (self.deadline - time.time()) / 4)))  # a quarter at most
        except subprocess.TimeoutExpired:
            pass
        finally:
            self._stop(proc)
        self.speed = json.loads(out.read_text()) if out.exists() else {}

    def _start(self, run: dict) -> None:
        d = Path(self.args.runs_dir) / run_dir_name(run)
        sets = run_sets(run, self.meta, common_sets(self.args, self.meta), self.args.runs_dir)
        proc = self._spawn(["_train", "--config", self.args.config, "--set", *sets], d / "log.txt")
        self.running[run["key"]] = (run, proc, time.time())

    def _finish(self, key: str, status: str) -> None:
        run, proc, t0 = self.running.pop(key)
        self._stop(proc)
        self.results[key] = collect(run, Path(self.args.runs_dir) / run_dir_name(run), status, time.time() - t0)
        r = self.results[key]
        self.note_device(r)
        print(f"[{time.time() - self.meta['t0']:6.0f}s] {key}: {status}, step {r['steps_done']}, "
              f"val {r.get('final_val_loss')}, diverged {r.get('diverged')}", flush=True)
        self.write()

    def _poll(self) -> None:
        now = time.time()
        for key, (run, proc, t0) in list(self.running.items()):
            rc = proc.poll()
            if rc is not None:
                self._finish(key, "ok" if rc == 0 else "error")
            elif now - t0 > self.args.timeout or now > self.deadline:
                self._finish(key, "timeout")

    def run_all(self) -> None:
        queue = list(self.plan)
        try:
            while queue or self.running:
                while queue and len(self.running) < self.args.jobs and time.time() < self.deadline - STARTUP_S:
                    self._start(queue.pop(0))
                if not self.running:
                    break
                time.sleep(0.5)
                self._poll()
        finally:
            for key in list(self.running):
                self._finish(key, "timeout")
            self.meta["not_started"] = [r["key"] for r in queue]
            self.write()


def _on_sigterm(signum, frame):
    raise SystemExit(f"signal {signum}: stopping the runs, writing partial results")


# ---------------------------------------------------------------------------------------------- report
def _cell(r, steps: int) -> str:
    if r is None:
        return "–"
    stopped = f"{r['status']} @{r['steps_done']}" if r["status"] != "ok" and r["steps_done"] < steps else ""
    if "final_val_loss" not in r:
        return stopped or r["status"]
    s = f"{r['final_val_loss']:.3f} ({r['final_val_ppl']:,.1f}) {stopped}".rstrip()
    return f"**div** {s}" if r.get("diverged") else s


def _cut(meta: dict) -> str:
    if meta["steps"] == meta["max_steps"]:
        return ""
    return f" (cut from {meta['max_steps']} so that all runs fit --time-limit {meta['time_limit']:g} s)"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def format_md(meta: dict, speed: dict, results: dict) -> str:
    lrs, slr, names = meta["lrs"], meta["spike_lr"], meta["methods"]
    spike_col = f"spikes x{meta['spike_scale']:g} every {meta['spike_every']} (lr {slr:g})"
    lines = [
        f"# Training quality and stability on real text: {len(names)} methods", "",
        f"Device: {meta.get('device', '?')}; torch {meta.get('torch', '?')}; {meta['date']}; "
        f"{meta['jobs']} runs at a time; study wall time {meta['wall_s']:.0f} s.", "",
        f"Command: `{meta['command']}`", "",
        f"Model: `{meta['config']}`, LLaMA {meta['size']} ({meta['params'] / 1e6:.1f} M parameters, vocab "
        f"{meta['vocab']}, seq {meta['seq_len']}), corpus `{meta['corpus']}`, {meta['precision']}, one process per "
        f"run. Every run: {meta['steps']} steps{_cut(meta)} x {meta['batch']} x {meta['seq_len']} = "
        f"{meta['steps'] * meta['batch'] * meta['seq_len']:,} tokens, same seed and batches, "
        f"{meta['warmup_steps']} warm-up steps, cosine to 10 %, validation every {meta['eval_every']} steps. "
        f"One LR sweep for all methods ({', '.join(f'{x:g}' for x in lrs)}): the papers' 60M recipes use 1e-3 "
        f"for AdamW, Stable-SPAM, SPAM and SCALE alike.", "",
        "## Final validation loss (perplexity)", "",
        "'**div**': a training loss not finite or the final one (mean of the last 10 steps) above the first; "
        "'timeout @N': stopped at step N (the last validation shown); '–': not run.", "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + f" | {spike_col} |",
        "|---" * (len(lrs) + 2) + "|"]
    for n in names:
        runs = [(lr, False) for lr in lrs] + [(slr, True)]
        cells = [_cell(results.get(run_key(n, lr, spike)), meta["steps"]) for lr, spike in runs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", f"## Injected spikes (lr {slr:g})", "",
              "| method | val loss without | with spikes | difference | max train loss after the first spike | "
              "diverged |", "|---|---|---|---|---|---|"]
    for n in names:
        a, b = results.get(run_key(n, slr, False)) or {}, results.get(run_key(n, slr, True)) or {}
        after = [loss for step, loss in b.get("train", []) if step > meta["spike_every"]]
        va, vb = a.get("final_val_loss"), b.get("final_val_loss")
        lines.append(f"| {n} | {_num(va, '.3f')} | {_num(vb, '.3f')} | "
                     f"{_num(vb - va if va is not None and vb is not None else None, '+.3f')} | "
                     f"{_num(max(after) if after else None, '.3f')} | {b.get('diverged', '–')} |")
    lines += ["", "## Memory and speed", "",
              f"Peak GPU memory: `torch.cuda.max_memory_allocated` of the run at lr {slr:g}. Tokens/s alone: "
              f"{meta['speed_steps']} steps after {SPEED_WARMUP} warm-up steps, each method alone on the device; "
              f"in the study: the run at lr {slr:g} sharing the device with up to {meta['jobs'] - 1} others "
              "(validation time included).", "",
              "| method | peak memory (MiB) | tokens/s alone | tokens/s in the study |", "|---|---|---|---|"]
    for n in names:
        r, s = results.get(run_key(n, slr, False)) or {}, speed.get(n) or {}
        peak = r.get("peak_mem_bytes") or s.get("peak_mem_bytes")
        lines.append(f"| {n} | {_num(peak / 2**20 if peak else None, ',.0f')} | "
                     f"{_num(s.get('tokens_per_s'), ',.0f')} | {_num(r.get('tokens_per_s'), ',.0f')} |")
    if meta.get("not_started"):
        lines += ["", f"Not started (time limit): {', '.join(meta['not_started'])}."]
    errors = [k for k, r in results.items() if r["status"] == "error"] + [
        f"{k} (alone)" for k, v in speed.items() if "error" in v]
    if errors:
        lines += ["", f"Failed (the error is in the JSON): {', '.join(errors)}."]
    return "\n".join(lines) + "\n"


def plot(path: str, meta: dict, results: dict) -> None:
    """Validation curves at the spike LR with and without spikes, the LR sweep (complete runs), the spike runs'
    training loss."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return
    lrs, slr = meta["lrs"], meta["spike_lr"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, n in enumerate(meta["methods"]):
        col = f"C{i}"
        for spike, ls in ((False, "-"), (True, "--")):
            r = results.get(run_key(n, slr, spike))
            if r and r["val"]:
                a.plot(*zip(*r["val"]), ls, color=col, label=n if not spike else None)
        sweep = [results.get(run_key(n, lr, False)) or {} for lr in lrs]
        pts = [(r["lr"], r["final_val_loss"], r["diverged"]) for r in sweep  # complete runs only
               if r.get("steps_done", 0) >= meta["steps"] and math.isfinite(r.get("final_val_loss", math.nan))]
        if pts:
            b.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=col, label=n)
            for x, y, div in pts:
                b.plot(x, y, "x" if div else "o", color=col, ms=9 if div else 5)
        r = results.get(run_key(n, slr, True))
        if r and r["train"]:
            c.plot(*zip(*r["train"]), color=col, lw=0.8, label=n)
    a.set(xlabel="step", ylabel="validation loss", title=f"lr {slr:g}: solid no spikes, dashed spikes")
    b.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss", title="LR sweep (x: diverged)")
    c.set(yscale="log", xlabel="step", ylabel="training loss",
          title=f"gradient x{meta['spike_scale']:g} every {meta['spike_every']} steps (lr {slr:g})")
    for axis in (c.yaxis.set_major_formatter, c.yaxis.set_minor_formatter):
        axis(FuncFormatter(lambda y, _: f"{y:g}"))
    for step in range(meta["spike_every"], meta["steps"] + 1, meta["spike_every"]):
        c.axvline(step, color="0.85", lw=0.6, zorder=0)
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    if b.get_legend_handles_labels()[0]:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def prepare_meta(args, argv: list, t0: float) -> dict:
    """Build the token cache once (before any run) and describe the study."""
    from dist_stab.train import data
    from dist_stab.train.config import load_config
    from dist_stab.train.model import expected_num_params, model_args

    cfg = load_config(args.config, args.set)
    tok = data.prepare(cfg.data)
    m, t = cfg.model, cfg.train
    margs = model_args(m.size, tok.vocab_size, cfg.data.seq_len, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
                       ffn_dim=m.ffn_dim)
    lrs = [float(x) for x in args.lrs.split(",")]
    cuda = args.device == "cuda" or (args.device == "auto" and _cuda_available())
    batch = args.batch or t.global_batch_size
    meta = {"command": "python -m dist_stab.bench.quality " + shlex.join(argv), "config": args.config,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "t0": t0, "size": m.size, "params": expected_num_params(margs), "vocab": tok.vocab_size,
            "seq_len": cfg.data.seq_len, "corpus": cfg.data.corpus, "train_tokens": int(len(tok.train)),
            "precision": "bf16 autocast" if t.autocast == "bf16" or (t.autocast == "auto" and cuda) else "fp32",
            "max_steps": args.steps or t.steps, "batch": batch,
            "micro_batch": args.micro_batch or min(t.micro_batch_size, batch), "lrs": lrs,
            "spike_lr": args.spike_lr or lrs[len(lrs) // 2], "spike_scale": args.spike_scale,
            "methods": args.methods.split(","), "jobs": args.jobs, "speed_steps": args.speed_steps,
            "time_limit": args.time_limit, "python": sys.version.split()[0]}
    set_steps(meta, args, meta["max_steps"])
    return meta


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def parse_args(argv: list):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/llama_20m_gpu.yaml")
    ap.add_argument("--out", default="docs/quality_gpu", help="writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="LR sweep, common to all methods")
    ap.add_argument("--spike-lr", type=float, default=None, help="LR of the spike runs (default: the middle LR)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run, at most (default: the config's)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the config's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: min(config's, --batch)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: steps // 10")
    ap.add_argument("--spike-every", type=int, default=None, help="default: steps // 8 + 1")
    ap.add_argument("--spike-scale", type=float, default=1000.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (processes sharing the device)")
    ap.add_argument("--speed-steps", type=int, default=30, help="timed steps per method alone (0: skip)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--runs-dir", default="runs/quality")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole study: fits the steps, then stops what still runs")
    ap.add_argument("--set", nargs="*", default=[], help="extra trainer overrides for every run")
    args = ap.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
    return args


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_train", "_speed"):
        return _worker(argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = prepare_meta(args, argv, time.time())
    print(f"token cache ready ({time.time() - meta['t0']:.0f} s): {meta['train_tokens']:,} train tokens, "
          f"vocab {meta['vocab']}, {meta['params'] / 1e6:.1f} M params", flush=True)
    study = Study(args, meta)
    if args.speed_steps:
        study.run_speed()
        for info in study.speed.values():
            study.note_device(info)
        study.fit()
        print(f"[{time.time() - meta['t0']:6.0f}s] alone: " + ", ".join(
            f"{k} {v.get('tokens_per_s', 0):,.0f} tok/s" for k, v in study.speed.items()) +
            f"; {meta['steps']} steps per run", flush=True)
    study.run_all()
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
