"""Run a test function on N gloo/CPU processes and return each rank's result.

``run_dist(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
process group on a free loopback port, calls ``fn(rank, world_size, *args)`` and returns the
list of return values (rank order). An exception in any rank is re-raised here with the
child's traceback; a hang ends after ``timeout`` seconds.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # plain bytes: no shared-memory handles that die with this process
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - shutting down; the result is already queued
            print(f"[rank {rank}] destroy_process_group: {exc}", flush=True)
        queue.close()
        queue.join_thread()  # flush the result before the hard exit below
    os._exit(0)  # avoids the DCP/FSDP2 interpreter-exit abort seen on CPU (cpu-stack.md §1a)


def run_dist(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks may now hang in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
