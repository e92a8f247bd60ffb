"""dist_stab.bench.host runs (in a subprocess: it stubs the Triton launches for the whole process) and prints one
row per tensor count, for the default and the persistent_grads mode."""
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("extra", [[], ["--persistent-grads"], ["--path", "fallback"]])
def test_host_bench_prints_its_table(extra):
    if "--path" not in extra:
        pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-m", "dist_stab.bench.host", "--counts", "20,200", "--iters", "2",
                          "--shape", "2,2", *extra], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [ln for ln in out.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["20", "200"], out
    assert ("persistent_grads" in out.splitlines()[0]) == ("--persistent-grads" in extra)
    cells = [float(x) for r in rows for x in re.findall(r"(\d+\.\d+) \(", r)]
    n_cols = 4 if "fallback" in extra else 3  # AdaGC, GradientStabilizer, GlobalClip (+ torch foreach)
    assert len(cells) == 2 * n_cols and all(c >= 0 for c in cells)
