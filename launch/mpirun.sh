#!/usr/bin/env bash
# The trainer started by Open MPI's mpirun (for clusters that launch jobs through MPI): one process per GPU;
# dist_stab.launch_env maps OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK to RANK/WORLD_SIZE/LOCAL_RANK, and rank 0 sends
# its host name and a free port (MASTER_ADDR/MASTER_PORT) to all ranks with mpi4py before torch.distributed starts.
#
#   HOSTFILE=launch/hostfile.example NP=64 launch/mpirun.sh configs/7b_fsdp.yaml   # 8 nodes x 8 GPUs
#   NP=32 HOSTFILE=hosts launch/mpirun.sh configs/7b_fsdp.yaml --set optim.name=scale
#   NP=2 launch/mpirun.sh configs/tiny_cpu.yaml        # this machine: 2 CPU processes (gloo), no hostfile
#
# Needs: Open MPI (`apt-get install -y --no-install-recommends libopenmpi-dev openmpi-bin`), mpi4py in the Python
# environment (`pip install mpi4py==4.1.2`, built against that Open MPI), the package (`pip install -e .[train]`),
# the repository and the environment at the same path on every host, passwordless ssh between hosts (mpirun's
# default launcher; inside SLURM or PBS allocations mpirun uses the scheduler's launcher instead), NCCL on GPU.
# Hostfile format: "<host> slots=<GPUs>" (launch/hostfile.example). Running as root (containers) adds
# --allow-run-as-root; more processes than cores/slots on one machine needs OVERSUBSCRIBE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/mpirun.sh CONFIG.yaml [--set key=value ...]}
shift
NP=${NP:-2}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DIST_STAB_TIMEOUT=${DIST_STAB_TIMEOUT:-1800}

ARGS=(-np "$NP" --bind-to none)
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE" --map-by "ppr:$GPUS_PER_NODE:node")   # one rank per GPU, node by node
fi
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
[ -n "${OVERSUBSCRIBE:-}" ] && ARGS+=(--oversubscribe)
# -x exports a variable to every rank (also on remote hosts)
for v in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS NCCL_DEBUG \
         TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS DIST_STAB_TIMEOUT PATH LD_LIBRARY_PATH \
         DIST_STAB_DATA MASTER_ADDR MASTER_PORT PYTORCH_CUDA_ALLOC_CONF; do
  if [ -n "${!v:-}" ]; then ARGS+=(-x "$v"); fi
done

exec mpirun "${ARGS[@]}" "$PY" -m dist_stab.launch_env -m dist_stab.train --config "$CONFIG" "$@"
