"""One rank of the mpirun test (tests/test_launch_env.py): no torch variables, only Open MPI's.

    mpirun --allow-run-as-root -np 2 python tests/mpi_worker.py

Maps OMPI_COMM_WORLD_* to RANK/WORLD_SIZE/LOCAL_RANK with dist_stab.launch_env.init_from_env
(rank 0 broadcasts a free MASTER_PORT with mpi4py), starts gloo, all-reduces rank+1 and prints
one JSON line per rank.
"""
import json
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ, "the test must start without torch's variables"

from dist_stab.launch_env import init_from_env  # noqa: E402

rank, world, local_rank = init_from_env()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(json.dumps({"rank": rank, "world": world, "local_rank": local_rank, "dist_rank": dist.get_rank(),
                  "dist_world": dist.get_world_size(), "sum": t.item(), "master_addr": os.environ["MASTER_ADDR"],
                  "master_port": os.environ["MASTER_PORT"]}), flush=True)
dist.destroy_process_group()
os._exit(0)  # as the trainer ends: MPI must already be finalised, or mpirun reports an error
