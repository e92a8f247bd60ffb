"""torch.distributed's rendezvous variables from whatever started the process (MPI, SLURM, torchrun).

``torch.distributed.init_process_group()`` (``env://``) reads ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; trainers also read ``LOCAL_RANK``. torchrun and the
DeepSpeed launcher set them; ``mpirun`` and ``srun`` do not. :func:`init_from_env` fills them
in from the launcher's own variables, before ``init_process_group``::

    from dist_stab.launch_env import init_from_env
    rank, world, local_rank = init_from_env()      # no-op under torchrun / deepspeed / one process
    torch.distributed.init_process_group("nccl")   # or "gloo"

or, around a program that does not call it (``launch/mpirun.sh`` does this)::

    mpirun -np 16 python -m dist_stab.launch_env -m dist_stab.train --config configs/7b_fsdp.yaml

Sources, first match wins (a launcher nested in another one sets both sets of variables:
``mpirun`` inside an ``sbatch`` script sees ``SLURM_PROCID=0`` on every rank, so MPI wins):

==========  =============================================  ==============================  =====================
source      rank / world                                   local rank / local size         when
==========  =============================================  ==============================  =====================
torch       ``RANK`` / ``WORLD_SIZE``                      ``LOCAL_RANK``                  torchrun, deepspeed
ompi        ``OMPI_COMM_WORLD_RANK`` / ``_SIZE``           ``OMPI_COMM_WORLD_LOCAL_RANK``  Open MPI ``mpirun``
                                                           / ``_LOCAL_SIZE``
mvapich     ``MV2_COMM_WORLD_RANK`` / ``_SIZE``            ``MV2_COMM_WORLD_LOCAL_RANK``   MVAPICH2
                                                           / ``_LOCAL_SIZE``
pmi         ``PMI_RANK`` / ``PMI_SIZE``                    ``MPI_LOCALRANKID``             MPICH / Intel MPI
                                                           / ``MPI_LOCALNRANKS``           (Hydra)
slurm       ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS``    ``SLURM_LOCALID``               ``srun``, one task
            (else ``SLURM_NTASKS``)                        / ``SLURM_STEP_TASKS_PER_NODE`` per GPU
==========  =============================================  ==============================  =====================

SLURM counts only inside a job *step* (``SLURM_STEP_ID`` or ``SLURM_STEP_NUM_TASKS`` set, which
``srun`` does and the batch script itself does not): a plain ``python ...`` in an ``sbatch``
script sees ``SLURM_NTASKS=16, SLURM_PROCID=0`` and would otherwise wait for 15 peers that never
come. ``DIST_STAB_LAUNCHER=torch|ompi|mvapich|pmi|slurm|none`` forces a source.

``MASTER_ADDR`` (when not set):
  * one node (local size == world size): ``127.0.0.1``;
  * slurm: the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (``node[03-05,9]``
    expanded to ``node03``);
  * MPI: rank 0's host name (``socket.gethostname()``), sent to all ranks with mpi4py.

``MASTER_PORT`` (when not set): rank 0 binds port 0 to get a free port and sends it with mpi4py
(``MPI.COMM_WORLD.bcast``; one bcast carries address and port). Without mpi4py (or for slurm,
which does not need MPI) every rank computes the same default: ``29500`` (torchrun's), or
``20000 + SLURM_JOB_ID % 10000`` under SLURM so two jobs sharing a node do not collide.

Everything but the mpi4py broadcast is the pure function :func:`resolve` of an environment
mapping, which the tests drive with fake ``OMPI_*`` / ``SLURM_*`` dicts.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Dict, Mapping, MutableMapping, Optional, Sequence, Tuple

DEFAULT_PORT = 29500  # torchrun's default MASTER_PORT
SLURM_PORT_BASE = 20000  # SLURM: 20000 + job id % 10000, the same on every rank of a job
LOCALHOST = "127.0.0.1"

# source -> (rank, world, local rank, local world) variable names
_SOURCES: Dict[str, Tuple[str, str, str, str]] = {
    "ompi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mvapich": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_SIZE"),
    "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}
MPI_SOURCES = tuple(_SOURCES)
SOURCES = ("torch",) + MPI_SOURCES + ("slurm", "none")


@dataclass
class Resolved:
    """What :func:`resolve` found: the launcher, this process's place, and the variables to set."""

    source: str  # one of SOURCES
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    updates: Dict[str, str] = field(default_factory=dict)  # variables to export (only ones not already set)
    need_addr: bool = False  # MASTER_ADDR must come from rank 0 (mpi4py broadcast)
    need_port: bool = False  # MASTER_PORT should come from rank 0 (mpi4py broadcast), else ``updates`` has a default


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``, ``"a,b"`` -> ``"a"``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist)
    if not m or not (m.group(1) or m.group(3)):
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is kept as written ("003")
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _tasks_on_first_node(spec: str) -> int:
    """``SLURM_STEP_TASKS_PER_NODE`` such as ``"8(x4),4"`` -> 8 (tasks on the node of this task is
    not known from it, but every layout we launch is uniform)."""
    m = re.match(r"\s*(\d+)", spec)
    return int(m.group(1)) if m else 1


def detect(env: Mapping[str, str]) -> str:
    """The launcher that started this process (see the module docstring); ``"none"`` if none."""
    forced = env.get("DIST_STAB_LAUNCHER")
    if forced:
        if forced not in SOURCES:
            raise ValueError(f"DIST_STAB_LAUNCHER={forced!r}; expected one of {SOURCES}")
        return forced
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torch"
    for name, (r, w, _, _) in _SOURCES.items():
        if r in env and w in env:
            return name
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEP_NUM_TASKS" in env):
        return "slurm"
    return "none"


def resolve(env: Mapping[str, str], default_port: Optional[int] = None) -> Resolved:
    """Pure: map the launcher's variables in ``env`` to torch's. Nothing is read but ``env``.

    Variables already present in ``env`` are never overwritten (``updates`` holds only new ones).
    """
    source = detect(env)
    if source == "none":
        return Resolved("none", 0, 1, 0, 1)
    if source == "torch":
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        lsize = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    elif source == "slurm":
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        lsize = _tasks_on_first_node(spec) if spec else world
    else:
        r, w, lr, ls = _SOURCES[source]
        rank, world = _int(env, r), _int(env, w)
        local = _int(env, lr) if lr in env else 0
        lsize = _int(env, ls) if ls in env else world
    if not (0 <= rank < world):
        raise ValueError(f"{source}: rank {rank} is outside the world of {world}")

    ups: Dict[str, str] = {}
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local),
                        ("LOCAL_WORLD_SIZE", lsize)):
        if name not in env:
            ups[name] = str(value)
    need_addr = need_port = False
    if "MASTER_ADDR" not in env:
        if lsize >= world:
            ups["MASTER_ADDR"] = LOCALHOST
        elif source == "slurm":
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodes:
                raise ValueError("slurm: MASTER_ADDR unset and no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST")
            ups["MASTER_ADDR"] = first_host(nodes)
        elif source in MPI_SOURCES:
            need_addr = True
        else:  # torch launcher without MASTER_ADDR on several nodes: nothing to derive it from
            raise ValueError("RANK/WORLD_SIZE set on several nodes but MASTER_ADDR is not")
    if "MASTER_PORT" not in env:
        if default_port is not None:
            port = default_port
        elif source == "slurm" and "SLURM_JOB_ID" in env:
            port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % 10000
        else:
            port = DEFAULT_PORT
        ups["MASTER_PORT"] = str(port)
        need_port = source in MPI_SOURCES  # improved to a free port by rank 0 when mpi4py is there
    return Resolved(source, rank, world, local, lsize, ups, need_addr, need_port)


def free_port(host: str = "") -> int:
    """A TCP port free right now on ``host`` (the OS picks it; a small race until torch binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _mpi_broadcast(res: Resolved, finalize: Optional[bool] = None) -> Tuple[Optional[str], Optional[int]]:
    """Rank 0's (address, free port) on every rank via mpi4py; (None, None) without mpi4py.

    ``finalize``: call ``MPI_Finalize`` after the broadcast. None: only if this call initialised
    MPI (mpi4py not imported before). A process that initialised MPI and then leaves without
    finalising (the trainer ends with ``os._exit``) makes ``mpirun`` report an error and exit
    non-zero, so the default leaves MPI as it found it.
    """
    import sys

    was_loaded = "mpi4py.MPI" in sys.modules
    try:
        from mpi4py import MPI  # optional; importing it calls MPI_Init
    except ImportError:
        return None, None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != res.world_size:
        raise RuntimeError(f"mpi4py sees {comm.Get_size()} ranks, the environment says {res.world_size}")
    payload = None
    if comm.Get_rank() == 0:
        addr = res.updates.get("MASTER_ADDR") or socket.gethostname()
        payload = (addr, free_port())
    addr, port = comm.bcast(payload, root=0)
    if (not was_loaded if finalize is None else finalize) and not MPI.Is_finalized():
        MPI.Finalize()
    return addr, port


def init_from_env(environ: Optional[MutableMapping[str, str]] = None, use_mpi4py: bool = True,
                  finalize_mpi: Optional[bool] = None) -> Tuple[int, int, int]:
    """Export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` into ``environ`` (default ``os.environ``) where the launcher did not;
    return ``(rank, world_size, local_rank)``. Call it before ``init_process_group``.

    A no-op (returns ``(0, 1, 0)`` or torchrun's values) when nothing or torchrun launched us.
    Under MPI, rank 0 picks a free port (and, on several nodes, names its host) and broadcasts
    them with mpi4py; MPI is finalised again afterwards unless it was initialised before
    (``finalize_mpi`` overrides). Without mpi4py the port is :data:`DEFAULT_PORT` and several
    nodes need ``MASTER_ADDR`` set by the caller.
    """
    env = os.environ if environ is None else environ
    res = resolve(env)
    if res.need_addr or res.need_port:
        addr, port = _mpi_broadcast(res, finalize_mpi) if use_mpi4py else (None, None)
        if addr is not None:
            if res.need_addr:
                res.updates["MASTER_ADDR"] = addr
            if res.need_port:
                res.updates["MASTER_PORT"] = str(port)
        elif res.need_addr:
            raise RuntimeError(f"{res.source}: {res.world_size} ranks on several nodes and MASTER_ADDR is not set; "
                               "install mpi4py (rank 0 then broadcasts its host) or export MASTER_ADDR")
    env.update(res.updates)
    return res.rank, res.world_size, res.local_rank


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dist_stab.launch_env [--print] (-m MODULE | SCRIPT) [ARGS...]``: map the launcher's
    variables, then run MODULE / SCRIPT in this process (as ``python -m`` / ``python`` would)."""
    import runpy
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    show = bool(argv) and argv[0] == "--print"
    if show:
        argv = argv[1:]
    rank, world, local = init_from_env()
    if show or not argv:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        print(" ".join(f"{k}={os.environ.get(k, '')}" for k in keys), f"source={detect(os.environ)}", flush=True)
        if not argv:
            return 0
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("usage: python -m dist_stab.launch_env [--print] (-m MODULE | SCRIPT) [ARGS...]")
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    return 0


__all__ = ["DEFAULT_PORT", "Resolved", "detect", "first_host", "free_port", "init_from_env", "main", "resolve"]

if __name__ == "__main__":
    raise SystemExit(main())
