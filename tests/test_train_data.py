"""Reference trainer data: offline byte-level BPE, cached token files, world-size independent batches."""
import json
import lzma
from types import SimpleNamespace

import numpy as np
import pytest

from dist_stab.train import data as D

DATA_DIR = D.default_data_dir()
needs_corpus = pytest.mark.skipif(not (DATA_DIR / "gutenberg-small.train.txt.xz").exists(),
                                  reason=f"corpus not found in {DATA_DIR}")


def _cfg(cache, **kw):
    base = dict(corpus="gutenberg-small", dir=None, cache_dir=str(cache), vocab_size=512, seq_len=32,
                max_train_chars=200_000)
    base.update(kw)
    return SimpleNamespace(**base)


@needs_corpus
def test_tokenizer_round_trip_and_cache(tmp_path):
    td = D.prepare(_cfg(tmp_path), log=lambda s: None)
    assert td.vocab_size == 512
    assert td.train.dtype == np.uint16 and len(td.train) > 10_000 and len(td.val) > 10_000
    assert int(td.train.max()) < td.vocab_size
    tok = td.tokenizer()
    # byte-level BPE is lossless: decoding the token file gives the text back
    text = D.read_text(DATA_DIR / "gutenberg-small.train.txt.xz", 200_000)
    head = text[:5000]
    ids = tok.encode(head).ids
    assert tok.decode(ids) == head
    n = len(ids) - 50  # the file is encoded in chunks; compare a prefix well inside the first chunk
    assert tok.decode(td.train[:n].tolist()) == tok.decode(ids[:n])
    assert "<|endoftext|>" in tok.get_vocab()
    # the cache is keyed by corpus and vocab; a second prepare reuses it without rebuilding
    mtime = (td.cache / "train.bin").stat().st_mtime_ns
    td2 = D.prepare(_cfg(tmp_path), log=lambda s: pytest.fail("rebuilt a cached tokenizer"))
    assert td2.cache == td.cache and (td.cache / "train.bin").stat().st_mtime_ns == mtime
    td3 = D.prepare(_cfg(tmp_path, vocab_size=600), log=lambda s: None)
    assert td3.cache != td.cache and td3.vocab_size == 600
    assert not list(td.cache.glob("*.tmp*"))


def test_missing_corpus_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dir"):
        D.prepare(_cfg(tmp_path, dir=str(tmp_path)), log=lambda s: None)


def test_batches_are_world_size_independent():
    tokens = np.arange(10_000, dtype=np.uint16)
    b = D.Batches(tokens, seq_len=16, seed=7)
    G, m = 8, 2
    # 1 rank, 4 micro steps  vs  2 ranks x 2 micro steps  vs  4 ranks x 1 micro step
    one = np.concatenate([b.train_batch(3, j, 0, 1, m, G)[0].numpy() for j in range(4)])
    two = np.concatenate([b.train_batch(3, j, r, 2, m, G)[0].numpy() for j in range(2) for r in range(2)])
    four = np.concatenate([b.train_batch(3, 0, r, 4, m, G)[0].numpy() for r in range(4)])
    assert np.array_equal(one, two) and np.array_equal(one, four)
    x, y = b.train_batch(3, 0, 0, 1, m, G)
    assert x.shape == (2, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())  # y is x shifted
    assert not np.array_equal(one, np.concatenate([b.train_batch(4, j, 0, 1, m, G)[0].numpy() for j in range(4)]))
    # validation windows: fixed, split over ranks
    v1 = np.concatenate([x.numpy() for x, _ in b.eval_batches(2, 4, 0, 1)])
    v2 = np.concatenate([x.numpy() for r in range(2) for x, _ in [list(b.eval_batches(2, 4, r, 2))[i] for i in range(2)]])
    assert v1.shape == (8, 16) and sorted(map(tuple, v1)) == sorted(map(tuple, v2))


def test_read_text_is_lzma(tmp_path):
    p = tmp_path / "x.train.txt.xz"
    with lzma.open(p, "wt", encoding="utf-8") as f:
        f.write("hello\n<|endoftext|>\nworld\n")
    assert D.read_text(p) == "hello\n<|endoftext|>\nworld\n"
    assert D.read_text(p, 5) == "hello"


@needs_corpus
@pytest.mark.parametrize("transform", ["none", "global_clip", "gradient_stabilizer", "zclip"])
def test_trainer_runs_every_transform_in_process(tmp_path, transform):
    """One process, no process group: every transform name trains 3 steps and logs its statistics."""
    import json
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512", "data.seq_len=32",
                             "data.max_train_chars=200000", "model.size=tiny-test", "parallel.mode=none",
                             "train.steps=3", "train.global_batch_size=2", "train.micro_batch_size=2",
                             "eval.every=0", "log.every=1", f"transform.name={transform}",
                             "transform.zclip.warmup_steps=1", f"log.run_dir={tmp_path / 'run'}"])
    summary = Trainer(cfg, log_fn=lambda s: None).fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and not r.get("summary")]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert all(np.isfinite(r["grad_norm"]) for r in steps)  # with no transform: measured by the skip policy's probe
    assert ("num_clipped" in steps[0]) == (transform != "none")
    assert all(r["skipped"] == 0 and r["loss_spike"] == 0 for r in steps)
    assert summary["comm"] == [] and summary["final_loss"] == steps[-1]["loss"]


def test_trainer_skips_an_injected_nan_step_and_reports_it(tmp_path):
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    lines = []
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512", "data.seq_len=32",
                             "data.max_train_chars=200000", "model.size=tiny-test", "parallel.mode=none",
                             "train.steps=6", "train.global_batch_size=2", "train.micro_batch_size=2",
                             "train.inject_nan_at=4", "eval.every=0", "log.every=2", "transform.name=adagc",
                             "transform.adagc.warmup_steps=2", f"log.run_dir={tmp_path / 'run'}"])
    summary = Trainer(cfg, log_fn=lines.append).fit()
    assert summary["skipped"] == 1 and summary["skipped_steps"] == [4]
    assert np.isfinite(summary["final_loss"])
    assert any("step     4 | SKIPPED" in x for x in lines), lines
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if not r.get("summary")]
    assert [r["skipped"] for r in recs if "skipped" in r] == [0, 0, 0, 1, 0, 0]
    assert [r["num_nonfinite"] for r in recs if "num_nonfinite" in r] == [0, 0, 0, 1, 0, 0]


@needs_corpus
def test_injected_gradient_spikes_and_quality_benchmark(tmp_path):
    """train.inject_spike_every multiplies the gradients (the transform sees the spike); bench.quality
    runs methods side by side and writes its tables."""
    import subprocess
    import sys

    common = [f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=512", "data.seq_len=32",
              "data.max_train_chars=200000", "model.size=tiny-test", "train.global_batch_size=2",
              "train.micro_batch_size=2", "schedule.warmup_steps=1"]
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "dist_stab.bench.quality", "--steps", "4", "--lrs", "1e-3",
                        "--spike-every", "2", "--spike-scale", "1000", "--methods", "AdamW+GlobalClip",
                        "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--set", *common],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out.with_suffix(".json")).read_text())["results"]
    plain, spiked = res["AdamW+GlobalClip|lr=0.001"], res["AdamW+GlobalClip|spike=0.001"]
    assert len(plain["train"]) == len(spiked["train"]) == 4  # [step, loss] pairs
    assert plain["train"][:2] == spiked["train"][:2]  # identical until the first injected spike (step 2)
    norms = [json.loads(x).get("grad_norm") for x in (tmp_path / "runs" / "AdamW-GlobalClip_spike=0.001" /
                                                       "metrics.jsonl").read_text().splitlines()]
    norms = [n for n in norms if n is not None]
    assert norms[1] > 100 * norms[0] and norms[3] > 100 * norms[2]  # steps 2 and 4 carry the x1000 spike
    assert "| AdamW+GlobalClip |" in out.with_suffix(".md").read_text()
