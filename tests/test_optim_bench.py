"""The optimizer benchmark runs end to end on CPU with tiny shapes and writes its JSON."""
from __future__ import annotations

import json

from dist_stab.bench.optim import llama_shapes, main, roofline_bytes


def test_bench_cpu_tiny(tmp_path):
    out = tmp_path / "bench.json"
    info = main(["--device", "cpu", "--shapes", "tiny", "--warmup", "1", "--iters", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"AdamW", "SCALE", "StableSPAM", "SPAM"}
    for r in saved["results"].values():
        assert r["median_ms"] > 0 and r["roofline_ms"] > 0 and r["ratio_vs_adamw"] > 0
    assert saved["results"]["AdamW"]["ratio_vs_adamw"] == 1.0
    assert info["n_params"] == saved["n_params"]


def test_llama_1b_shapes_and_roofline_bytes():
    shapes = llama_shapes(d=2048, layers=16, ff=5632, vocab=32000)
    n = sum(__import__("math").prod(s) for _, s in shapes)
    assert 0.94e9 < n < 0.96e9
    # SCALE moves 4 words per matrix element, AdamW 7
    assert roofline_bytes("SCALE", shapes, 4) < 0.6 * roofline_bytes("AdamW", shapes, 4)
