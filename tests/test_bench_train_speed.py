"""bench.train_speed: the trainer's tokens/s per method, end to end on a tiny CPU configuration, and the
profiler's phase split on a synthetic trace (the GPU columns, which CPU runs do not produce)."""
import json
import statistics

import pytest

from dist_stab.bench import train_speed as TS
from dist_stab.train import data as D

needs_corpus = pytest.mark.skipif(not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists(),
                                  reason=f"corpus not found in {D.default_data_dir()}")


@needs_corpus
def test_train_speed_end_to_end_on_cpu(tmp_path, capsys):
    out_json, out_png = tmp_path / "ts.json", tmp_path / "ts.png"
    repeats, steps = 2, 2
    res = TS.main(["--configs", "configs/tiny_cpu.yaml", "--set", "model.size=tiny-test",
                   "--set", "data.max_train_chars=200000", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                   "--global-batch", "2", "--seq-len", "32", "--vocab", "512", "--warmup", "2",
                   "--steps", str(steps), "--repeats", str(repeats), "--profile-steps", "1",
                   "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(res))
    assert out_png.stat().st_size > 0
    assert res["command"].startswith("python -m dist_stab.bench.train_speed --configs configs/tiny_cpu.yaml")
    assert res["device"] and res["baseline"] == TS.BASELINE
    entry = res["sizes"]["tiny-test"]
    info, rows = entry["info"], entry["methods"]
    assert info["tokens_per_step"] == 2 * 32 and info["repeats"] == repeats and info["timed_steps"] == steps
    assert list(rows) == list(TS.METHODS)
    base = rows[TS.BASELINE]["tokens_per_s"]
    for m, r in rows.items():
        tps = r["tokens_per_s"]
        assert len(tps) == repeats and all(t > 0 for t in tps)
        assert r["tokens_per_s_min"] <= r["tokens_per_s_median"] <= r["tokens_per_s_max"]
        assert r["tokens_per_s_median"] == pytest.approx(statistics.median(tps))
        # ratios are per repeat (the same round robin pass), against the baseline of that pass
        assert r["ratio_vs_baseline"] == pytest.approx([a / b for a, b in zip(tps, base)])
        assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
        # step time and tokens/s describe the same runs
        t_step = r["step_ms_median"] / 1e3
        assert info["tokens_per_step"] / max(tps) <= t_step * (1 + 1e-9)
        assert t_step <= info["tokens_per_step"] / min(tps) * (1 + 1e-9)
        assert r["compiled_graphs_in_timed_steps"] >= 0
        assert "peak_mem_GB" not in r and "syncs_per_step" not in r  # CUDA only
        assert m in printed
    assert rows[TS.BASELINE]["ratio_vs_baseline"] == [1.0] * repeats
    # profiles: the slowest method and the baseline; the exclusive host times add up to the annotated step
    slowest = min(rows, key=lambda m: rows[m]["tokens_per_s_median"])
    assert [p["method"] for p in entry["profiles"]] == list(dict.fromkeys([slowest, TS.BASELINE]))
    for p in entry["profiles"]:
        assert set(p["host_ms"]) == set(TS.PHASES) and all(v >= 0 for v in p["host_ms"].values())
        assert p["host_ms"]["forward+backward"] > 0 and p["host_ms"]["optimizer step"] > 0
        assert sum(p["host_ms"].values()) == pytest.approx(p["host_step_ms"], rel=1e-6)
        assert 0 < p["host_step_ms"] <= p["wall_step_ms_profiled"]
        assert "gpu_busy_ms" not in p
        assert f"profile of {p['method']}" in printed


def _x(name, cat, ts, dur, **args):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args}


def test_phase_split_of_a_trace():
    """Kernels are charged to the annotation their launch lies in; the GPU's idle time before a kernel
    (the host gap) to the same phase; busy + idle add up to the GPU window."""
    ann = [("ds:train_step", 0, 100), ("ds:wrap.step", 60, 40), ("ds:transform", 60, 10),
           ("ds:skip.step_optimizer", 75, 25), ("ds:optimizer", 76, 23), ("Optimizer.step#X.step", 76, 23)]
    ev = [_x(n, "user_annotation", ts, d) for n, ts, d in ann]
    ev += [_x("cudaLaunchKernel", "cuda_runtime", ts, 1, correlation=c) for c, ts in ((1, 10), (2, 65), (3, 80))]
    ev += [_x("gemm", "kernel", 20, 30, correlation=1), _x("norm", "kernel", 70, 10, correlation=2),
           _x("adam", "kernel", 90, 30, correlation=3), _x("early", "kernel", -50, 5, correlation=9)]
    s = TS.phase_split({"traceEvents": ev}, n_steps=1)
    ms = lambda us: us / 1e3  # noqa: E731
    assert s["host_ms"] == pytest.approx({"forward+backward": ms(60), "transform": ms(10), "skip/monitor": ms(5),
                                          "skip restore": ms(2), "optimizer step": ms(23)})
    assert s["host_step_ms"] == pytest.approx(ms(100))
    assert s["gpu_busy_ms"] == pytest.approx({"forward+backward": ms(30), "transform": ms(10), "skip/monitor": 0,
                                              "skip restore": 0, "optimizer step": ms(30)})
    assert s["gpu_idle_before_ms"] == pytest.approx({"forward+backward": 0, "transform": ms(20), "skip/monitor": 0,
                                                     "skip restore": 0, "optimizer step": ms(10)})
    assert s["gpu_window_ms"] == pytest.approx(ms(100)) and s["host_gaps_ms"] == pytest.approx(ms(30))
    assert s["top_kernels_ms"]["optimizer step"] == [["adam", pytest.approx(ms(30))]]
    two = TS.phase_split({"traceEvents": ev}, n_steps=2)
    assert two["gpu_window_ms"] == pytest.approx(s["gpu_window_ms"] / 2)
