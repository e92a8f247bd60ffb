"""dist_stab.bench.plots draws what the benchmark JSON holds: on the committed docs/ JSON and on a synthetic set."""
import json
import shutil
from pathlib import Path

import pytest

from dist_stab.bench import plots

DOCS = Path(__file__).resolve().parents[1] / "docs"
NAMES = ("bench_clip_1b_fp32.json", "bench_clip_fold_1b.json", "bench_clip_many.json", "bench_clip_many_noptr.json",
         "bench_clip_many_persistent.json",
         "bench_optim_1b_fp32.json", "bench_memory.json")


def test_plots_of_the_committed_benchmarks(tmp_path):
    pytest.importorskip("matplotlib")
    for name in NAMES:
        shutil.copy(DOCS / name, tmp_path / name)
    written = plots.main(["--docs", str(tmp_path)])
    assert sorted(p.name for p in written) == ["bench_clip.png", "bench_memory.png", "bench_optim.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in written)
    # the series are the JSON's numbers
    clip = json.loads((DOCS / "bench_clip_1b_fp32.json").read_text())["results"]["1b"]
    assert dict(plots.clip_series(tmp_path)["1b"]) == {k: r["ratio_vs_torch_clip"] for k, r in clip.items()}


def test_series_from_synthetic_json_and_missing_files(tmp_path):
    many = {"info": {"device": "X"}, "results": {
        str(n): {m: {"ms": n / 1000 * (i + 1)} for i, m in enumerate(
            ("torch clip_grad_norm_", "AdaGC (steady, none clipped)", "GradientStabilizer"))} for n in (10, 1000, 100)}}
    (tmp_path / "bench_clip_many.json").write_text(json.dumps(many))
    s = plots.clip_series(tmp_path)
    assert set(s) == {"many"}  # no 1B or fold JSON: those panels are left out
    assert s["many"]["AdaGC (steady, none clipped)"] == [(10, 0.02), (100, 0.2), (1000, 2.0)]
    assert plots.optim_series(tmp_path) is None and plots.memory_series(tmp_path) is None
    mem = {"1B": {"AdamW_bf16_GB": 8.0, "SCALE_bf16_GB": 2.8, "StableSPAM_bf16_GB": 8.0}, "note": "x"}
    (tmp_path / "bench_memory.json").write_text(json.dumps(mem))
    assert plots.memory_series(tmp_path) == [("1B", 8.0, 2.8, 8.0)]
