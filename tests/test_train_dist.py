"""Reference trainer end to end on gloo/CPU: FSDP2 (torchrun CLI), DDP and TP equal one process;
checkpoint -> resume (same and different world size) continues the uninterrupted run; metrics JSONL,
communication report and plot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_launcher import run_dist
from dist_stab.train import data as D

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[1]
needs_corpus = pytest.mark.skipif(not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists(),
                                  reason="corpus ../shared/data/gutenberg-small.* not found")
STEPS = 6


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Tokenizer + token files of a small slice, built once here (not raced by the workers)."""
    d = tmp_path_factory.mktemp("data_cache")
    from types import SimpleNamespace
    D.prepare(SimpleNamespace(corpus="gutenberg-small", dir=None, cache_dir=str(d), vocab_size=512, seq_len=32,
                              max_train_chars=200_000), log=lambda s: None)
    return d


def base(cache_dir, run_dir, *extra):
    return [f"data.cache_dir={cache_dir}", "data.vocab_size=512", "data.seq_len=32", "data.max_train_chars=200000",
            "model.size=tiny-test", f"train.steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2",
            "optim.lr=3e-3", "schedule.warmup_steps=2", "transform.name=adagc", "transform.adagc.warmup_steps=2",
            "eval.every=3", "eval.batches=1", "log.every=2", f"log.run_dir={run_dir}", *extra]


def _train(rank, world, overrides):
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    tr = Trainer(load_config(None, overrides), log_fn=lambda s: None)
    summary = tr.fit()
    return {"losses": {r["step"]: r["loss"] for r in tr.history if "loss" in r and "summary" not in r},
            "val": {r["step"]: r["val_loss"] for r in tr.history if "val_loss" in r}, "summary": summary}


def _read_losses(run_dir):
    recs = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and not r.get("summary")}, recs


def _close(a, b, steps, tol=1e-5):
    for s in steps:
        assert abs(a[s] - b[s]) <= tol, f"step {s}: {a[s]} vs {b[s]}"


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    """One process (gloo world of 1, no parallelism): the run every layout must reproduce."""
    run = tmp_path_factory.mktemp("ref")
    out = run_dist(_train, 1, base(cache_dir, run, "parallel.mode=none"))[0]
    assert sorted(out["losses"]) == list(range(1, STEPS + 1))
    return out


@needs_corpus
def test_fsdp2_torchrun_matches_single_process_and_resumes_on_one(cache_dir, reference, tmp_path):
    run = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dist_stab.train", "--set", *base(cache_dir, run, "parallel.mode=fsdp", "checkpoint.every=3",
                                                   "checkpoint.keep=0")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "communication report" in p.stdout and "loss" in p.stdout
    losses, recs = _read_losses(run)
    _close(losses, reference["losses"], range(1, STEPS + 1))
    # the JSONL: one line per step with the metrics, validation lines, a summary with the comm report
    steps = [r for r in recs if "loss" in r and not r.get("summary")]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        for k in ("loss", "lr", "grad_norm", "num_clipped", "num_nonfinite", "tokens_per_s", "step_time_s",
                  "comm_calls", "comm_bytes"):
            assert k in r, k
        assert r["comm_calls"] == 1  # AdaGC exact: one SUM over the FSDP group per step
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    summary = recs[-1]
    assert summary["summary"] and summary["world_size"] == 2 and summary["parallel"] == "fsdp"
    [row] = summary["comm"]
    assert row["tag"] == "AdaGC" and row["op"] == "sum" and row["calls_per_step"] == 1
    assert row["group"].startswith("dp_shard") and row["group_size"] == 2
    num_tensors = 2 * 9 + 3  # tiny-test: 2 blocks x 9 tensors + embeddings, final norm, lm_head
    assert row["bytes_per_step"] == 8 * num_tensors  # (sum of squares, presence) per tensor, fp32
    refs = {r["method"]: r for r in summary["comm_reference"]}
    assert refs["naive per-tensor norms (.norm().full_tensor())"]["calls_per_step"] == num_tensors
    assert summary["params"] == reference["summary"]["params"] > 0
    # resume the 2-process FSDP2 checkpoint of step 3 on ONE process: steps 4..6 as uninterrupted
    ckpt = run / "checkpoints" / "step_0000003"
    assert (ckpt / "trainer.pt").exists() and (run / "checkpoints" / "latest").read_text() == "step_0000006"
    out = run_dist(_train, 1, base(cache_dir, tmp_path / "resumed", "parallel.mode=none",
                                   f"checkpoint.load={ckpt}"))[0]
    assert sorted(out["losses"]) == [4, 5, 6] and out["summary"]["resumed_from"] == str(ckpt)
    _close(out["losses"], reference["losses"], [4, 5, 6])
    # plot and comparison of the two runs
    pytest.importorskip("matplotlib")
    from dist_stab.plot import plot_runs
    from dist_stab.train.report import compare_runs
    png = plot_runs([run, tmp_path / "resumed"], tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "AdaGC sum over dp_shard" in compare_runs([run])


@needs_corpus
def test_interrupted_run_resumes_bit_exact(cache_dir, reference, tmp_path):
    run = tmp_path / "run"
    args = base(cache_dir, run, "parallel.mode=none", "checkpoint.every=3")
    first = run_dist(_train, 1, args + ["train.stop_after=3"])[0]
    assert sorted(first["losses"]) == [1, 2, 3]
    second = run_dist(_train, 1, args)[0]  # checkpoint.resume (default) picks up step 3 from the run dir
    assert sorted(second["losses"]) == [4, 5, 6]
    for s in range(1, STEPS + 1):
        got = first["losses"].get(s, second["losses"].get(s))
        assert got == reference["losses"][s], f"step {s}"  # one process: bit-exact
    assert second["val"][6] == reference["val"][6]
    losses, _ = _read_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))  # the resumed run appends to the same JSONL


@needs_corpus
@pytest.mark.parametrize("mode", ["ddp", "tp"])
def test_ddp_and_tp_match_single_process(cache_dir, reference, tmp_path, mode):
    outs = run_dist(_train, 2, base(cache_dir, tmp_path / mode, f"parallel.mode={mode}", "parallel.tp=2"))
    for out in outs:
        _close(out["losses"], reference["losses"], range(1, STEPS + 1))
    comm = outs[0]["summary"]["comm"]
    if mode == "ddp":
        assert comm == []  # grads are already all-reduced: AdaGC needs no collective
    else:
        # TP: sharded tensors complete over the tp group; norms/embeddings are replicated plain tensors
        assert [(c["tag"], c["op"], c["calls_per_step"]) for c in comm] == [("AdaGC", "sum", 1)]
        assert comm[0]["group"].startswith("tp")


@needs_corpus
@pytest.mark.parametrize("mode,extra", [("hsdp", ["parallel.dp_replicate=2", "train.micro_batch_size=1"]),
                                        ("fsdp_tp", ["parallel.tp=2"])])
def test_hsdp_and_fsdp_tp_on_four_ranks_match_single_process(cache_dir, reference, tmp_path, mode, extra):
    outs = run_dist(_train, 4, base(cache_dir, tmp_path / mode, f"parallel.mode={mode}", *extra))
    for out in outs:
        _close(out["losses"], reference["losses"], range(1, STEPS + 1))
    groups = sorted(c["group"].split("[")[0] for c in outs[0]["summary"]["comm"])
    # HSDP: only the shard dim completes a statistic; FSDP x TP: the dp_shard and tp groups
    assert groups == (["dp_shard"] if mode == "hsdp" else ["dp_shard", "tp"])
