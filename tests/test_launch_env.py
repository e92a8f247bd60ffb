"""dist_stab.launch_env: MPI / SLURM variables -> torch's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT,
from fake environments, and for real under Open MPI's mpirun (2 CPU processes, gloo all_reduce; also the
trainer through launch/mpirun.sh)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_stab import launch_env as LE

REPO = Path(__file__).resolve().parents[1]
INSTALL = ("Open MPI and mpi4py are needed for this test: apt-get update && DEBIAN_FRONTEND=noninteractive "
           "apt-get install -y --no-install-recommends libopenmpi-dev openmpi-bin; "
           ".venv/bin/python -m pip install mpi4py==4.1.2")
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def ompi(rank, size, local, lsize):
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local), "OMPI_COMM_WORLD_LOCAL_SIZE": str(lsize)}


def slurm_step(procid, ntasks, localid, per_node="8(x4)", nodes="gpu[007-010]", job="1234567"):
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_STEP_NODELIST": nodes, "SLURM_JOB_NODELIST": nodes, "SLURM_JOB_ID": job}


def test_open_mpi_one_node():
    r = LE.resolve(ompi(1, 2, 1, 2))
    assert (r.source, r.rank, r.world_size, r.local_rank) == ("ompi", 1, 2, 1)
    assert r.updates == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(LE.DEFAULT_PORT)}
    assert not r.need_addr and r.need_port  # rank 0 replaces the default port with a free one (mpi4py)


def test_open_mpi_several_nodes_needs_rank0_host():
    r = LE.resolve(ompi(13, 32, 5, 8))
    assert (r.rank, r.world_size, r.local_rank) == (13, 32, 5)
    assert r.need_addr and "MASTER_ADDR" not in r.updates
    env = ompi(13, 32, 5, 8)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # no mpi4py broadcast: must be told
        LE.init_from_env(env, use_mpi4py=False)
    env["MASTER_ADDR"] = "node001"
    assert LE.init_from_env(env, use_mpi4py=False) == (13, 32, 5)
    assert env["MASTER_ADDR"] == "node001" and env["RANK"] == "13" and env["MASTER_PORT"] == "29500"


def test_slurm_step_multi_node():
    env = slurm_step(12, 32, 4)
    assert LE.init_from_env(env) == (12, 32, 4)
    assert env["MASTER_ADDR"] == "gpu007"
    assert env["MASTER_PORT"] == str(20000 + 1234567 % 10000)  # the same on every task of the job
    assert env["WORLD_SIZE"] == "32" and env["LOCAL_RANK"] == "4" and env["LOCAL_WORLD_SIZE"] == "8"


def test_slurm_batch_script_alone_is_not_a_launch():
    """In an sbatch script (no srun step) SLURM_NTASKS=16, SLURM_PROCID=0: a plain python must not wait for 15 peers."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "5",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    assert LE.detect(env) == "none"
    assert LE.init_from_env(env) == (0, 1, 0) and "RANK" not in env
    env["DIST_STAB_LAUNCHER"] = "slurm"  # forced
    assert LE.resolve(env).world_size == 16


def test_mpirun_inside_slurm_uses_mpi_ranks():
    env = {**slurm_step(0, 2, 0), **ompi(3, 4, 1, 2)}  # mpirun in an allocation: SLURM_PROCID is 0 everywhere
    r = LE.resolve(env)
    assert (r.source, r.rank, r.world_size, r.local_rank) == ("ompi", 3, 4, 1)


def test_mpich_mvapich_and_torchrun():
    r = LE.resolve({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (r.source, r.rank, r.world_size, r.local_rank) == ("pmi", 3, 4, 1)
    assert "MASTER_ADDR" not in r.updates and "MASTER_PORT" not in r.updates  # set ones are kept
    r = LE.resolve({"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "3", "MV2_COMM_WORLD_LOCAL_RANK": "2",
                    "MV2_COMM_WORLD_LOCAL_SIZE": "3"})
    assert (r.source, r.rank, r.updates["MASTER_ADDR"]) == ("mvapich", 2, "127.0.0.1")
    tr = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "a",
          "MASTER_PORT": "29400", **ompi(0, 1, 0, 1)}
    r = LE.resolve(tr)
    assert (r.source, r.rank, r.world_size, r.local_rank, r.updates) == ("torch", 5, 8, 1, {})
    nothing = {}
    assert LE.init_from_env(nothing) == (0, 1, 0) and nothing == {}


def test_bad_values_raise():
    with pytest.raises(ValueError, match="outside"):
        LE.resolve(ompi(4, 4, 0, 4))
    with pytest.raises(ValueError, match="not an integer"):
        LE.resolve({"PMI_RANK": "x", "PMI_SIZE": "2"})
    with pytest.raises(ValueError, match="DIST_STAB_LAUNCHER"):
        LE.resolve({"DIST_STAB_LAUNCHER": "pbs"})


@pytest.mark.parametrize("nodelist,first", [("node[003-005,9],cpu1", "node003"), ("a,b", "a"), ("gpu12", "gpu12"),
                                            ("x[1-2]", "x1"), ("rack1-n[10,12]", "rack1-n10")])
def test_first_host(nodelist, first):
    assert LE.first_host(nodelist) == first


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _mpirun():
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.fail("mpirun not found. " + INSTALL)
    if subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode:
        pytest.fail("mpi4py is not importable. " + INSTALL)
    return exe


@pytest.mark.dist
def _json_objects(text: str) -> list:
    """Every JSON object in ``text``: mpirun forwards the ranks' stdout, and two lines can end up on one."""
    dec, out, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            obj, i = dec.raw_decode(text, i)
            out.append(obj)
        except ValueError:
            i += 1
        i = text.find("{", i)
    return out


def test_mpirun_two_processes_gloo_all_reduce():
    exe = _mpirun()
    p = subprocess.run([exe, "--allow-run-as-root", "-np", "2", sys.executable, str(REPO / "tests" / "mpi_worker.py")],
                       env=_clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr  # non-zero also if a rank left without MPI_Finalize
    rows = sorted(_json_objects(p.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], p.stdout + p.stderr
    for r in rows:
        assert r["world"] == r["dist_world"] == 2 and r["dist_rank"] == r["rank"] == r["local_rank"]
        assert r["sum"] == 3.0 and r["master_addr"] == "127.0.0.1"
    assert rows[0]["master_port"] == rows[1]["master_port"]  # rank 0's free port, broadcast with mpi4py


@pytest.mark.dist
def test_launch_mpirun_sh_trains_two_steps(tmp_path):
    """launch/mpirun.sh -> python -m dist_stab.launch_env -m dist_stab.train on 2 CPU processes (FSDP2, gloo)."""
    from dist_stab.train import data as D

    if not (D.default_data_dir() / "gutenberg-small.train.txt.xz").exists():
        pytest.skip("corpus ../shared/data/gutenberg-small.* not found")
    _mpirun()
    from types import SimpleNamespace
    cache = tmp_path / "cache"
    D.prepare(SimpleNamespace(corpus="gutenberg-small", dir=None, cache_dir=str(cache), vocab_size=512, seq_len=32,
                              max_train_chars=200_000), log=lambda s: None)  # built once here, not raced by ranks
    run = tmp_path / "run"
    env = dict(_clean_env(), NP="2", PYTHON=sys.executable, DIST_STAB_TIMEOUT="120")
    p = subprocess.run(["bash", "launch/mpirun.sh", "configs/tiny_cpu.yaml", "--set",
                        f"data.cache_dir={cache}", "data.vocab_size=512", "data.seq_len=32",
                        "data.max_train_chars=200000", "model.size=tiny-test", "train.steps=2",
                        "train.global_batch_size=4", "train.micro_batch_size=2", "eval.every=0", "log.every=1",
                        f"log.run_dir={run}"], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("step") for r in recs if "loss" in r} >= {1, 2}
    summary = [r for r in recs if r.get("summary")]
    assert summary and summary[-1]["world_size"] == 2, recs[-1]  # one 2-rank job, not two 1-rank ones
