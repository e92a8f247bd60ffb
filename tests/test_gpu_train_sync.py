"""Host syncs of the reference trainer's step.

GPU-only (marked ``gpu``, skipped without CUDA): every method of ``bench.train_speed`` trains under
``torch.cuda.set_sync_debug_mode("error")`` between log steps, so any host sync in the step raises.
On CPU: the trainer reads its skip count from the device once per log step, and what it logs is unchanged.
"""
import json

import numpy as np
import pytest
import torch

from dist_stab.train import data as D

needs_corpus = pytest.mark.skipif(not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists(),
                                  reason=f"corpus not found in {D.default_data_dir()}")


def _cfg(tmp_path, *sets):
    from dist_stab.train.config import load_config

    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512", "data.seq_len=32",
                              "data.max_train_chars=200000", "model.size=tiny-test", "parallel.mode=none",
                              "train.global_batch_size=2", "train.micro_batch_size=2", "eval.every=0",
                              "log.tensorboard=false", f"log.run_dir={tmp_path / 'run'}", *sets])


class _Board:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        pass


@needs_corpus
def test_trainer_reads_the_skip_count_once_per_log_step(tmp_path, monkeypatch):
    """A NaN at step 4 is skipped and logged as before; the device skip count is read once per log step
    (log line, TensorBoard for every step of the flush, summary), not once per logged step."""
    from dist_stab.train.loop import Trainer

    lines = []
    tr = Trainer(_cfg(tmp_path, "train.steps=6", "train.inject_nan_at=4", "log.every=2", "transform.name=adagc",
                      "transform.adagc.warmup_steps=2"), log_fn=lines.append)
    tr.tb = _Board()  # TensorBoard on: _tb_step asks for the count at every step of a flush
    reads = []
    int_of = torch.Tensor.__int__

    def counting_int(t):
        if t is tr.skip.skipped:
            reads.append(tr.step)
        return int_of(t)

    monkeypatch.setattr(torch.Tensor, "__int__", counting_int)
    summary = tr.fit()
    monkeypatch.undo()
    assert reads == [1, 2, 4, 6]  # log steps: the first step, then every 2; the summary reuses step 6's read
    assert summary["skipped"] == 1 and summary["skipped_steps"] == [4]
    assert any("step     4 | SKIPPED" in x for x in lines), lines
    logged = [x for x in lines if "| skipped " in x]
    assert [x.split("| skipped ")[1].split(" ")[0] for x in logged] == ["0", "0", "1", "1"]
    board = [(s, v) for tag, v, s in tr.tb.scalars if tag == "spikes/skipped"]
    assert board == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]  # the count at each flush, for its steps
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if not r.get("summary")]
    assert [r["skipped"] for r in recs] == [0, 0, 0, 1, 0, 0]
    assert [r["num_nonfinite"] for r in recs] == [0, 0, 0, 1, 0, 0]
    assert np.isfinite(summary["final_loss"])


def _gpu_methods():
    from dist_stab.bench.train_speed import METHODS
    return list(METHODS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_corpus
@pytest.mark.parametrize("method", _gpu_methods())
def test_no_host_sync_between_log_steps_in_the_trainer(tmp_path, method):
    """fit() on the GPU with sync-debug "error" from the second log step on (steps 5-7, 9-11 and 13-15 run under
    it; the flushes, which read the statistics, and the summary run without): any sync in a step raises here."""
    from dist_stab.bench.train_speed import METHODS
    from dist_stab.train.loop import Trainer

    optim, transform = METHODS[method]
    tr = Trainer(_cfg(tmp_path, "train.steps=16", "log.every=4", f"optim.name={optim}", "train.device=cuda",
                      f"transform.name={transform}", "transform.adagc.warmup_steps=2",
                      "transform.zclip.warmup_steps=2", "schedule.warmup_steps=100"), log_fn=lambda s: None)
    flush = tr._flush

    def flush_without_debug(pending, t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return flush(pending, t)
        finally:
            if 4 <= tr.step < 16:  # state built, compiled, transforms past their warm-up: steady steps from here
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")

    tr._flush = flush_without_debug
    try:
        summary = tr.fit()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["last_step"] == 16 and np.isfinite(summary["final_loss"]) and summary["skipped"] == 0
