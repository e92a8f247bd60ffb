"""The demo's pieces: one-process fallback of multi-process configs, skip lines with their reason, the
communication report's footer per world size, and the run comparison whose sentences follow the numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_stab.train import data as D
from dist_stab.train.config import load_config, single_process_fallback
from dist_stab.train.report import compare_runs, conclusions, format_report, run_summary, load_run

REPO = Path(__file__).resolve().parents[1]
needs_corpus = pytest.mark.skipif(not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists(),
                                  reason="corpus ../shared/data/gutenberg-small.* not found")


# ----------------------------------------------------------------------------- one process, no launcher
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "hsdp", "tp", "fsdp_tp"])
def test_multi_process_mode_falls_back_to_none_without_a_launcher(mode):
    cfg = load_config("configs/tiny_cpu.yaml" if mode == "fsdp" else None, [f"parallel.mode={mode}"])
    note = single_process_fallback(cfg, env={})
    assert cfg.parallel.mode == "none" and f"parallel.mode={mode!r}" in note and "torchrun" in note


@pytest.mark.parametrize("env", [{"RANK": "0", "WORLD_SIZE": "1"},  # torchrun, even with one process
                                 {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
                                 {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}])
def test_launched_processes_keep_their_mode(env):
    cfg = load_config(None, ["parallel.mode=fsdp"])
    assert single_process_fallback(cfg, env=env) is None and cfg.parallel.mode == "fsdp"


@pytest.mark.parametrize("mode", ["none", "deepspeed"])
def test_single_process_modes_are_left_alone(mode):
    cfg = load_config(None, [f"parallel.mode={mode}"])
    assert single_process_fallback(cfg, env={}) is None and cfg.parallel.mode == mode


@needs_corpus
def test_cli_one_process_fsdp_config_skip_reason_and_footer(tmp_path):
    """``python -m dist_stab.train --config configs/tiny_cpu.yaml`` (mode fsdp) as one plain process: it runs
    (parallel none, with the note), a NaN step is printed as skipped with its reason, and the communication
    report's footer is the one-process one."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "dist_stab.train", "--config", "configs/tiny_cpu.yaml", "--set",
           f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512", "data.seq_len=32",
           "data.max_train_chars=200000", "model.size=tiny-test", "train.steps=4", "train.global_batch_size=4",
           "train.micro_batch_size=2", "train.inject_nan_at=3", "eval.every=0", "log.every=2",
           f"log.run_dir={run}", "log.tensorboard=false"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "note: parallel.mode='fsdp' needs several processes" in out
    assert "parallel none on 1 cpu process(es)" in out
    assert "step     3 | SKIPPED (nonfinite_grad)" in out
    assert "one process: nothing to reduce" in out and "loss all-reduce" not in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skip_reasons"] == [[3, ["nonfinite_grad"]]] and summary["world_size"] == 1
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skip_reason") for r in recs if "loss" in r and not r.get("summary")] == [0, 0, 1, 0]
    text = run_summary(load_run(run)) + "\n" + compare_runs([run])
    assert "steps skipped (whole step dropped on every rank): 3 (nonfinite_grad)" in text
    assert "no collectives" in text and "one process: nothing to reduce" in text


# ----------------------------------------------------------------------------- the communication report
ROW = {"tag": "GlobalClip", "op": "sum", "group": "dp_shard[0, 1]", "group_size": 2, "calls_per_step": 1.0}
REFS = [{"method": "torch clip_grad_norm_ (global)", "calls_per_step": 1, "bytes_per_step": 4, "note": "measured"},
        {"method": "naive per-tensor norms (.norm().full_tensor())", "calls_per_step": 57, "bytes_per_step": 228,
         "note": "measured, 57 DTensor params", "tensors": 57}]


@pytest.mark.parametrize("per_tensor", [1, 2])
def test_report_explains_rows_from_their_sizes(per_tensor):
    text = format_report([dict(ROW, bytes_per_step=57 * 4 * per_tensor)], REFS, world=2)
    flat = " ".join(text.split())
    assert f"{57 * per_tensor} values = {per_tensor} per tensor x 57 tensors x 4 B" in flat
    assert ("presence flag" in flat) == (per_tensor == 2)
    assert f"It sends {4 * per_tensor} B x tensors instead of torch's one 4-byte total" in flat
    assert "spike monitor's loss all-reduce (one 4-byte SUM per step over the 2 ranks)" in flat
    assert "one process" not in flat


def test_report_footer_on_one_process():
    flat = " ".join(format_report([], REFS[:1], world=1).split())
    assert "(none issued)" in flat and "one process: nothing to reduce" in flat
    assert "loss all-reduce" not in flat and "4-byte total" not in flat


# ----------------------------------------------------------------------------- comparing runs
def _write_run(d: Path, transform, losses, *, grad_spikes=(), skipped=(), val=None, every=25, nan_at=40,
               clipped=10, world=2):
    d.mkdir(parents=True)
    cfg = {"train": {"inject_spike_every": every, "inject_nan_at": nan_at, "inject_spike_scale": 1000.0},
           "transform": {"name": transform}, "optim": {"lr": 0.01}, "schedule": {"warmup_steps": 10},
           "spikes": {"sigma": 10.0, "window": 20}}
    (d / "config.json").write_text(json.dumps(cfg))
    lines = []
    for i, loss in enumerate(losses, 1):
        lr = 0.01 * min(i, 10) / 10
        lines.append({"step": i, "loss": loss, "lr": lr, "grad_norm": 1.0, "num_clipped": clipped,
                      "loss_spike": 0, "grad_spike": int(i in grad_spikes), "skipped": int(i in skipped),
                      "skip_reason": 1 if i in skipped else 0})
    lines.append({"step": len(losses), "val_loss": val if val is not None else losses[-1] + 0.3})
    lines.append({"summary": True, "name": f"demo-{transform}", "transform": transform, "world_size": world,
                  "tokens_per_s": 2000.0, "wall_s": 40.0, "comm_calls_per_step": 1.0, "comm_bytes_per_step": 456.0,
                  "comm": [dict(ROW, tag=transform, bytes_per_step=456.0)], "comm_reference": REFS,
                  "skipped": len(skipped)})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def _curve(n, end, jump_at=None, jump=0.0, wiggle=0.0):
    out = []
    for i in range(1, n + 1):
        x = 7.6 - (7.6 - end) * min(1.0, i / 30) + (wiggle if i % 2 else -wiggle)
        out.append(x + (jump if i == jump_at else 0.0))
    return out


def test_conclusions_are_computed_from_the_runs(tmp_path):
    a = _write_run(tmp_path / "a", "global_clip", _curve(80, 6.3, jump_at=10, jump=3.0, wiggle=0.02),
                   grad_spikes=(25, 50, 75), skipped=(40,), val=6.58)
    b = _write_run(tmp_path / "b", "adagc", _curve(80, 6.1, jump_at=65, jump=0.3, wiggle=0.03),
                   grad_spikes=(25, 50), skipped=(40,), val=6.40)
    text = " ".join(" ".join(conclusions([a, b])).split())
    assert "Lowest validation loss at step 80: AdaGC 6.400; then global clipping 6.580 (+0.180)." in text
    # tail: 0.2 apart, AdaGC's +0.3 at step 65 is one of the 20 steps (-0.015); wiggles +-0.01 (paired)
    assert "global clipping's train loss was +0.185 ± 0.016 against AdaGC's" in text and "consistent gap" in text
    # rises: 3.0 - 0.043 (the curve) - 0.04 (wiggle) = 2.92 at step 10; 0.3 + 0.06 = 0.36 at step 65
    assert "global clipping +2.92 at step 10 (lr 1.0e-02); AdaGC +0.36 at step 65" in text
    assert "Global clipping: 8x AdaGC's largest rise, at no injected spike or NaN" in text
    assert "as the LR reached its peak (warm-up ends at step 10)" in text
    assert "grad-norm spikes: global clipping 3/3; AdaGC 2/3" in text
    assert "The NaN injected at step 40 was skipped in 2 of 2 runs (reason: nonfinite_grad)" in text
    assert "every method issued 1.00 all-reduce(s) per step, 456 B per step in all" in text
    assert "naive per-tensor norms (.norm().full_tensor()): 57 call(s), 228 B" in text
    # other numbers, other sentences: the winner, the gap and the unstable run follow the files
    c = _write_run(tmp_path / "c", "adagc", _curve(80, 6.5, jump_at=12, jump=4.0, wiggle=0.03),
                   grad_spikes=(25,), skipped=(), val=6.9, nan_at=None)
    text = " ".join(" ".join(conclusions([a, c])).split())
    assert "Lowest validation loss at step 80: global clipping 6.580; then AdaGC 6.900 (+0.320)." in text
    assert "AdaGC's train loss was +0.200" in text
    assert "AdaGC +3.90 at step 12" in text and "largest rise," not in text  # neither is 3x the other
    assert "skipped in 1 of 2 runs" in text
    # identical runs: no gap claimed
    d = _write_run(tmp_path / "d", "gradient_stabilizer", _curve(80, 6.3, jump_at=10, jump=3.0, wiggle=0.02),
                   grad_spikes=(25, 50, 75), skipped=(40,), val=6.58)
    text = " ".join(" ".join(conclusions([a, d])).split())
    assert "+0.000 ± 0.000" in text and "identical at every step" in text and "consistent gap" not in text
    # a gap smaller than the step-to-step noise of the differences: not claimed
    e = _write_run(tmp_path / "e", "adagc", _curve(80, 6.302, wiggle=-0.02), val=6.6)
    text = " ".join(" ".join(conclusions([a, e])).split())
    assert "AdaGC's train loss was +0.002 ± 0.009" in text and "this run does not separate them" in text


def test_run_summary_and_table(tmp_path):
    a = _write_run(tmp_path / "a", "global_clip", _curve(80, 6.3, jump_at=10, jump=3.0),
                   grad_spikes=(25, 50, 75), skipped=(40,), val=6.58)
    s = run_summary(load_run(a))
    assert "largest one-step rise of the train loss: +2.957 at step 10 (lr 1.00e-02)" in s
    assert "grad norm at steps 25, 50, 75; loss at steps none" in s
    assert "steps skipped (whole step dropped on every rank): 40 (nonfinite_grad)" in s
    assert "every gradient x1000 at steps 25, 50, 75; a NaN in one gradient element at step 40" in s
    table = compare_runs([a])
    row = next(ln for ln in table.splitlines() if ln.startswith("demo-global_clip "))
    cols = row.split()
    assert cols[1:5] == ["7.557", "6.300", "6.300", "6.580"] and cols[5:7] == ["+2.96", "@10"]
    assert cols[7:11] == ["0", "3", "1", "800"]
    assert "global_clip sum over dp_shard[0, 1]: 1.00/step, 456 B/step" in table
    assert "spike monitor's loss all-reduce" in " ".join(table.split())


def test_report_for_deepspeed_uses_the_trainers_tensor_count():
    refs = [{"method": "DeepSpeed gradient_clipping (global)", "calls_per_step": 2, "bytes_per_step": 8,
             "note": "one per ZeRO-2 param group / sub-group"}]
    row = dict(ROW, tag="AdaGC", group="zero_dp[0, 1]", bytes_per_step=168.0)
    flat = " ".join(format_report([row], refs, world=2, n_tensors=21).split())
    assert "42 values = 2 per tensor x 21 tensors x 4 B" in flat and "AdaGC clips or rescales" in flat
    assert "DeepSpeed gradient_clipping: its own global norm" in flat and "CommDebugMode" not in flat
    # without a tensor count the row is described by its size only
    flat = " ".join(format_report([row], refs, world=2).split())
    assert "42 values (x 4 B)" in flat and "per tensor" not in flat
