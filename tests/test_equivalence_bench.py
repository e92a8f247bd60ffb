"""dist_stab.bench.equivalence on 2 gloo ranks: every method on FSDP2 and TP equals one process (fp32), with the
expected collective counts, and a method that changes with the mesh by design (AdaGC shard_local) is caught."""
import pytest

from dist_launcher import run_dist

pytestmark = pytest.mark.dist


def _worker(rank, world):
    import dist_stab as ds
    from dist_stab.bench import equivalence as eq

    args = eq.parse(["--modes", "fsdp,tp", "--dtypes", "fp32", "--steps", "3"])
    res = eq.measure(args)

    def shard_local(m):  # per-shard norms: not the single-process algorithm (the negative control)
        import torch
        return ds.wrap(torch.optim.AdamW(m.parameters(), lr=1e-2),
                       ds.AdaGC(m.named_parameters(), warmup_steps=0, lambda_rel=1.01, mode="shard_local"))

    import torch
    device = torch.device("cpu")
    res["control"] = eq.run_case("fsdp", "fp32", "AdaGC shard_local", shard_local, device, args)
    res["report"] = eq.format_report(res)
    return res


def test_equivalence_bench_two_ranks():
    res = run_dist(_worker, 2, timeout=400)[0]
    rows = res["rows"]
    assert len(rows) == 2 * 7 and all("error" not in r for r in rows), res["report"]
    assert all(r["ok"] and r["max_rel_err"] <= 1e-5 for r in rows), res["report"]
    counts = {(r["mode"], r["method"]): r["collectives_last_step"] for r in rows}
    for mode in ("fsdp", "tp"):
        assert counts[(mode, "GlobalClip + AdamW")] == 1 and counts[(mode, "AdaGC + AdamW")] == 1
        assert counts[(mode, "StableSPAM")] == 2 and counts[(mode, "SPAM")] == 0
    c = res["control"]
    assert not c["ok"] and c["max_rel_err"] > 1e-4 and c["collectives_last_step"] == 0, c
