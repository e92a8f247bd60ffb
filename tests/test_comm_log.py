"""dist_stab.comm_log: bounded (a ring of the newest records, exact per-key totals) and printable."""
import pytest
import torch
import torch.nn as nn

import dist_stab as ds
from dist_launcher import run_dist
from dist_stab.comm import CommLog, CommRecord


def _rec(tag="AdaGC", op="sum", group="dp_shard", size=2, numel=57):
    return CommRecord(tag, op, group, size, numel, 4 * numel)


def test_ring_keeps_the_newest_and_totals_stay_exact():
    log = CommLog(maxlen=4)
    for i in range(10):
        log.add(_rec(numel=i + 1))
    log.add(_rec(tag="StableSPAM", op="max", numel=3))
    assert len(log) == 4 and len(log.records) == 4
    assert [r.numel for r in log.records] == [8, 9, 10, 3]  # oldest first
    assert log.added == 11 and log.dropped == 7
    s = log.summary()
    assert s[("AdaGC", "sum", "dp_shard")] == (10, 4 * sum(range(1, 11)))  # dropped records still counted
    assert s[("StableSPAM", "max", "dp_shard")] == (1, 12)
    log.clear()
    assert log.records == [] and log.summary() == {} and log.added == 0 and log.dropped == 0


def test_disabled_records_nothing_and_bad_maxlen_raises():
    log = CommLog(maxlen=2)
    log.enabled = False
    log.add(_rec())
    assert log.added == 0 and log.summary() == {}
    with pytest.raises(ValueError, match="maxlen"):
        CommLog(maxlen=0)
    log.enabled = True
    for _ in range(3):
        log.add(_rec())
    log.maxlen = 1  # shrinking keeps the newest
    assert len(log) == 1 and log.added == 3 and log.dropped == 2


def test_print_is_a_table():
    log = CommLog(maxlen=8)
    assert "0 collective(s)" in str(log)
    for _ in range(3):
        log.add(_rec(numel=57))
    log.add(_rec(tag="StableSPAM", op="max", group="tp", size=4, numel=10))
    text = str(log)
    assert text == repr(log)
    lines = text.splitlines()
    assert "4 collective(s)" in lines[0] and "ring of 8" in lines[0]
    assert lines[1].split() == ["tag", "op", "group", "size", "calls", "bytes"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert rows["AdaGC"][1:5] == ["sum", "dp_shard", "2", "3"] and " ".join(rows["AdaGC"][5:]) == "684 B"
    assert rows["StableSPAM"][1:5] == ["max", "tp", "4", "1"] and " ".join(rows["StableSPAM"][5:]) == "40 B"
    assert "object at 0x" not in repr(ds.comm_log)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(8, 16)
        self.w2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


def _user_loop(rank, world, steps, maxlen):
    """A user's loop that never clears comm_log: the log stays at maxlen, the totals count every step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Net()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    fully_shard(model.w1, mesh=mesh)
    fully_shard(model.w2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ds.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), ds.AdaGC(model.named_parameters()))
    ds.comm_log.clear()
    ds.comm_log.maxlen = maxlen
    try:
        sizes = []
        for step in range(steps):
            torch.manual_seed(step)
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sizes.append(len(ds.comm_log))
        return {"sizes": sizes, "added": ds.comm_log.added, "dropped": ds.comm_log.dropped,
                "summary": ds.comm_log.summary(), "text": str(ds.comm_log)}
    finally:
        ds.comm_log.maxlen = ds.comm.DEFAULT_MAXLEN


@pytest.mark.dist
def test_uncleared_log_in_a_user_loop_is_bounded():
    steps, maxlen = 25, 6
    for out in run_dist(_user_loop, 2, steps, maxlen):
        assert max(out["sizes"]) == maxlen and out["sizes"][-1] == maxlen
        per_step = out["added"] // steps
        assert per_step >= 1 and out["added"] == per_step * steps  # the same collectives every step
        assert out["dropped"] == out["added"] - maxlen
        calls = {k: v[0] for k, v in out["summary"].items()}
        assert sum(calls.values()) == out["added"] and all(k[0] == "AdaGC" for k in calls)
        assert "AdaGC" in out["text"] and f"{out['added']} collective(s)" in out["text"]
