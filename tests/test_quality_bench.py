"""The quality study runner (dist_stab.bench.quality): concurrent runs on CPU, partial results, the plan."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_stab.bench import quality as Q
from dist_stab.train import data as D

REPO = Path(__file__).resolve().parents[1]
needs_corpus = pytest.mark.skipif(not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists(),
                                  reason=f"corpus not found in {D.default_data_dir()}")


@needs_corpus
def test_study_on_cpu_writes_tables_and_plot(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "dist_stab.bench.quality", "--config", "configs/tiny_cpu.yaml", "--device", "cpu",
           "--methods", "AdamW+AdaGC,SCALE", "--lrs", "3e-3", "--steps", "6", "--batch", "2", "--spike-every", "2",
           "--jobs", "4", "--speed-steps", "1", "--out", str(out), "--runs-dir", str(tmp_path / "runs"),
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512", "data.seq_len=32",
           "data.max_train_chars=200000", "model.size=tiny-test", "eval.batches=1"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((out.parent / "q.json").read_text())
    assert set(res["results"]) == {"AdamW+AdaGC|lr=0.003", "SCALE|lr=0.003", "AdamW+AdaGC|spike=0.003",
                                   "SCALE|spike=0.003"}
    for r in res["results"].values():
        assert r["status"] == "ok" and r["steps_done"] == 6 and len(r["train"]) == 6, r.get("error")
        assert r["final_val_loss"] > 0 and r["diverged"] in (True, False) and r["tokens_per_s"] > 0
    assert set(res["speed"]) == {"AdamW+AdaGC", "SCALE"} and res["meta"]["device"] == "cpu"
    md = (out.parent / "q.md").read_text()
    for name in ("AdamW+AdaGC", "SCALE"):
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) == 3  # sweep, spikes, cost
    assert "spikes x1000 every 2 (lr 0.003)" in md and "python -m dist_stab.bench.quality" in md
    assert (out.parent / "q.png").stat().st_size > 10_000


def test_partial_run_and_missing_runs_are_reported(tmp_path):
    run = {"key": "AdamW|lr=0.01", "method": "AdamW", "lr": 0.01, "spike": False}
    d = tmp_path / "run"
    d.mkdir()
    lines = [{"step": s, "loss": 8.0 - s / 10} for s in range(1, 21)] + [{"step": 20, "val_loss": 7.5}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 21, "lo')  # killed
    r = Q.collect(run, d, "timeout", 12.0)
    assert r["steps_done"] == 20 and r["final_val_loss"] == 7.5 and not r["diverged"]
    meta = {"lrs": [0.003, 0.01], "spike_lr": 0.01, "methods": ["AdamW", "SCALE"], "steps": 100, "max_steps": 100,
            "spike_every": 13, "spike_scale": 1000.0, "jobs": 4, "wall_s": 60, "date": "d", "command": "c",
            "config": "c.yaml", "size": "20M", "params": 23e6, "vocab": 16384, "seq_len": 256, "corpus": "g",
            "precision": "bf16 autocast", "batch": 64, "warmup_steps": 10, "eval_every": 10, "speed_steps": 20}
    md = Q.format_md(meta, {}, {run["key"]: r})
    assert "| AdamW | – | 7.500 (1,808.0) timeout @20 | – |" in md and "| SCALE | – | – | – |" in md
    Q.plot(str(tmp_path / "p.png"), meta, {run["key"]: r})
    assert (tmp_path / "p.png").exists()


def test_plan_order_and_fitted_steps():
    plan = Q.plan_runs(["AdamW", "SCALE"], [1e-3, 3e-3, 1e-2], 3e-3)
    assert [r["key"] for r in plan] == ["AdamW|lr=0.003", "SCALE|lr=0.003", "AdamW|spike=0.003", "SCALE|spike=0.003",
                                        "AdamW|lr=0.01", "SCALE|lr=0.01", "AdamW|lr=0.001", "SCALE|lr=0.001"]
    speed = {"AdamW": {"tokens_per_s": 1e6}, "SCALE": {"tokens_per_s": 5e5}}
    # OVERHEAD x 2 x 2 runs x (16384 / 1e6 + 16384 / 5e5) s per step of every run
    assert Q.fit_steps(plan, speed, 16384, 100.0, 1000) == int(100 / (Q.OVERHEAD * 4 * 16384 * 3e-6))
    assert Q.fit_steps(plan, speed, 16384, 1e6, 600) == 600
