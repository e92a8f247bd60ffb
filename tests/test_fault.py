"""Fault test: one rank's process is SIGKILLed in the middle of a 2-process run; like an elastic
agent, the test then stops the surviving rank and restarts the job, which resumes from the last
DCP checkpoint and must end with the same parameters and state, bit for bit, as a run that
never failed."""
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from dist_launcher import free_port

HERE = os.path.dirname(__file__)


def launch(d, world=2, max_restarts=1, extra=()):
    """Start ``world`` ranks; if any dies, kill the others and restart all (up to max_restarts)."""
    logs = []
    for attempt in range(max_restarts + 1):
        port = free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT=str(attempt),
                       PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
            procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "fault_worker.py"), "--dir", d, *extra],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p in procs:
            out, _ = p.communicate(timeout=120)
            logs.append(f"--- attempt {attempt} rank {procs.index(p)} rc={p.returncode}\n{out[-3000:]}")
        if not failed and all(p.returncode == 0 for p in procs):
            return attempt, "\n".join(logs)
    raise AssertionError("job failed after restarts:\n" + "\n".join(logs))


@pytest.mark.dist
def test_killed_rank_resumes_bit_exact():
    with tempfile.TemporaryDirectory() as clean, tempfile.TemporaryDirectory() as faulty:
        attempts_a, log_a = launch(clean)
        attempts_b, log_b = launch(faulty, extra=("--kill-at", "7"))
        assert attempts_a == 0 and "resumed" not in log_a
        assert attempts_b == 1 and "rc=-9" in log_b, log_b  # rank 1 was killed by SIGKILL
        assert "resumed from step_6 at step 6" in log_b, log_b
        ra, rb = (torch.load(os.path.join(d, "final.pt")) for d in (clean, faulty))
    for n in ra["params"]:
        assert torch.equal(ra["params"][n], rb["params"][n]), n
    assert torch.equal(ra["gamma"], rb["gamma"])
