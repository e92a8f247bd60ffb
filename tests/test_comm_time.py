"""dist_stab.bench.comm_time on 2 gloo ranks (CPU): the script's flow, its collective counts and the model column.
Its times mean nothing here; on GPUs the same code runs under torchrun with NCCL (issue #10)."""
import pytest

from dist_launcher import run_dist

pytestmark = pytest.mark.dist


def _worker(rank, world):
    from dist_stab.bench.comm_time import format_report, measure

    out = {layout: measure(layout, "tiny", iters=2) for layout in ("fsdp", "tp")}
    out["report"] = format_report(out["fsdp"])
    return out


def test_comm_time_counts_and_model_on_two_ranks():
    from dist_stab.bench.cost_model import allreduce_s

    res = run_dist(_worker, 2, timeout=300)
    for layout in ("fsdp", "tp"):
        a, b = res[0][layout], res[1][layout]
        assert a == b  # every number is MAX-reduced over ranks: one table for the job
        assert a["info"]["tensors"] == 21 and a["info"]["world"] == 2 and a["info"]["backend"] == "gloo"
        ars = [r for r in a["rows"] if r["kind"] == "all_reduce"]
        assert [(r["group"], r["ranks"], r["bytes"]) for r in ars] == [("world", 2, 4), ("world", 2, 168)]  # 21 tensors x (sum of squares, presence)
        assert all(r["model_ms"] == allreduce_s(2, r["bytes"], False) * 1e3 and r["ms"] > 0 for r in ars)
        clips = {r["method"]: r for r in a["rows"] if r["kind"] == "clip"}
        assert {k: v["collectives"] for k, v in clips.items()} == {
            "torch clip_grad_norm_": 1, "GlobalClip": 1, "AdaGC exact (steady)": 1, "AdaGC shard_local (steady)": 0,
            "GradientStabilizer (folded)": 1}, (layout, clips)
        assert all(v["ms"] > 0 for v in clips.values())
    assert "| AdaGC shard_local (steady) | 0 |" in res[0]["report"]
