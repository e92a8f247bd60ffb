"""The reference trainer with ``parallel.mode: deepspeed`` (ZeRO 1/2/3 on 2 gloo/CPU processes, fp32, AdaGC):
losses equal the 1-process non-DeepSpeed run of the same config, AdaGC's one SUM per step over the ZeRO group
is in the communication report, and a resume from a DeepSpeed checkpoint (same world size) continues the
uninterrupted run; SCALE (a dist_stab optimizer, through dist_stab's ZeRO bridge) on ZeRO-3 equals its
1-process run too, and so does dist_stab's AdamW on ZeRO-2. Also: TensorBoard scalars and the rank-0 progress bar (1 process), the DeepSpeed JSON's
batch keys checked against the trainer's, and ``configs/7b_zero3.yaml`` through the memory plan."""
import io
import json

import pytest

from dist_launcher import run_dist
from test_train_dist import STEPS, _close, _train, base, cache_dir, needs_corpus, reference  # noqa: F401

pytestmark = [pytest.mark.dist, pytest.mark.deepspeed]
pytest.importorskip("deepspeed")


def _ds_worker(rank, world, cache, tmp):
    """Every stage in one spawn (engine start-up dominates); stage 3 also checkpoints at step 3, then a fresh
    engine resumes from it; then SCALE on ZeRO-3."""
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    def train(stage, run, *extra):
        args = base(cache, f"{tmp}/{run}", "parallel.mode=deepspeed", f"parallel.zero_stage={stage}",
                    "log.tensorboard=false", *extra)
        tr = Trainer(load_config(None, args), log_fn=lambda s: None)
        summary = tr.fit()
        steps = [r for r in tr.history if "loss" in r and not r.get("summary")]
        return {"losses": {r["step"]: r["loss"] for r in steps}, "comm_calls": [r["comm_calls"] for r in steps],
                "summary": summary, "stage": tr.ds_stage}

    out = {s: train(s, f"zero{s}", *(["checkpoint.every=3", "checkpoint.keep=0"] if s == 3 else []))
           for s in (1, 2, 3)}
    out["resumed"] = train(3, "resumed", f"checkpoint.load={tmp}/zero3/checkpoints/step_0000003")
    out["scale"] = train(3, "scale", "optim.name=scale")
    out["ds_adamw"] = train(2, "ds_adamw", "optim.name=ds_adamw")  # dist_stab's AdamW as ZeRO's client optimizer
    return out


@needs_corpus
def test_zero_1_2_3_match_single_process_and_resume(cache_dir, reference, tmp_path):  # noqa: F811
    outs = run_dist(_ds_worker, 2, str(cache_dir), str(tmp_path), timeout=240)
    for stage in (1, 2, 3):
        for out in outs:
            got = out[stage]
            assert got["stage"] == stage and sorted(got["losses"]) == list(range(1, STEPS + 1))
            _close(got["losses"], reference["losses"], range(1, STEPS + 1))  # 1e-5
            assert got["comm_calls"] == [1] * STEPS  # AdaGC: one batched collective per step
            s = got["summary"]
            assert s["parallel"] == "deepspeed" and s["world_size"] == 2 and s["skipped"] == 0
            assert s["params"] == reference["summary"]["params"] > 0  # counted before ZeRO-3 partitions
            [row] = s["comm"]
            assert (row["tag"], row["op"], row["calls_per_step"]) == ("AdaGC", "sum", 1)
            assert row["group"].startswith("zero") and row["group_size"] == 2
            assert row["bytes_per_step"] == 8 * (2 * 9 + 3)  # (sum of squares, presence) per tensor of tiny-test
    for out in outs:  # resumed from the stage-3 checkpoint of step 3: steps 4..6 as uninterrupted
        r = out["resumed"]
        assert sorted(r["losses"]) == [4, 5, 6] and r["summary"]["resumed_from"].endswith("step_0000003")
        _close(r["losses"], out[3]["losses"], [4, 5, 6], tol=1e-6)
    adamw_ref = run_dist(_train, 1, base(cache_dir, tmp_path / "adamw_ref", "parallel.mode=none", "optim.name=ds_adamw"))
    for out in outs:
        _close(out["ds_adamw"]["losses"], adamw_ref[0]["losses"], range(1, STEPS + 1))
    scale_ref = run_dist(_train, 1, base(cache_dir, tmp_path / "scale_ref", "parallel.mode=none", "optim.name=scale"))
    for out in outs:
        _close(out["scale"]["losses"], scale_ref[0]["losses"], range(1, STEPS + 1))
        comm = {(c["tag"], c["op"]): c["calls_per_step"] for c in out["scale"]["summary"]["comm"]}
        assert comm == {("AdaGC", "sum"): 1, ("SCALE", "sum"): 1}


def test_json_batch_keys_must_agree_with_the_trainer(tmp_path):
    from dist_stab.train.config import load_config
    from dist_stab.train.parallelize import deepspeed_config

    cfg = load_config(None, ["parallel.mode=deepspeed", "parallel.deepspeed_config=configs/ds_zero3_7b.json",
                             "train.global_batch_size=2048", "train.micro_batch_size=2"])
    assert deepspeed_config(cfg, 64, bf16=True)["zero_optimization"]["stage"] == 3  # 2 x 16 x 64
    with pytest.raises(ValueError, match="gradient_accumulation_steps=16 .trainer: 32."):
        deepspeed_config(cfg, 32, bf16=True)
    built = deepspeed_config(load_config(None, ["parallel.zero_stage=1", "train.global_batch_size=8",
                                                "train.micro_batch_size=2"]), 2, bf16=False)
    assert built["zero_optimization"] == {"stage": 1} and built["gradient_accumulation_steps"] == 2
    assert built["gradient_clipping"] == 0 and not built["bf16"]["enabled"] and built["zero_allow_untested_optimizer"]


def test_7b_zero3_config_plans_from_its_json(capsys):
    from dist_stab import memory_plan as MP

    assert MP.main(["--config", "configs/7b_zero3.yaml"]) == 0
    out = capsys.readouterr().out
    assert "mode zero3 | world 64" in out and "bf16" in out and "FITS" in out


class _TTY(io.StringIO):
    def isatty(self):
        return True


@needs_corpus
def test_tensorboard_scalars_and_progress_bar(cache_dir, tmp_path, monkeypatch):  # noqa: F811
    """3 steps, one process: an events file under <run_dir>/tb with the loss of every step; on a TTY the bar
    (loss, tok/s, grad norm, skips) replaces the periodic line."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator
    from dist_stab.train.config import load_config
    from dist_stab.train.loop import Trainer

    tty = _TTY()
    monkeypatch.setattr("sys.stdout", tty)
    lines = []
    run = tmp_path / "tb_run"
    cfg = load_config(None, base(cache_dir, run, "parallel.mode=none", "train.steps=3", "log.every=1",
                                 "eval.every=3"))
    assert cfg.log.tensorboard is None  # default: on, since tensorboard is installed
    tr = Trainer(cfg, log_fn=lines.append)
    tr.fit()
    losses = {r["step"]: r["loss"] for r in tr.history if "loss" in r and not r.get("summary")}
    [events] = list((run / "tb").glob("events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for t in ("train/loss", "train/lr", "train/grad_norm", "train/num_clipped", "train/tokens_per_s", "val/loss",
              "spikes/loss_spikes", "spikes/skipped"):
        assert t in tags, (t, tags)
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(got) == [1, 2, 3] and all(abs(got[s] - losses[s]) < 1e-6 for s in got)
    bar = tty.getvalue()
    assert "3/3" in bar and "tok/s" in bar and "grad norm" in bar and "skips 0" in bar
    assert not any(ln.startswith("step ") and "| lr " in ln for ln in lines)  # no periodic line under the bar
    assert "val loss" in bar  # other messages go above the bar
    json.loads((run / "summary.json").read_text())
