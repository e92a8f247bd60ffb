#!/bin/bash
# LLaMA-7B pretraining on a SLURM cluster: srun starts one torchrun per node, torchrun starts one trainer
# process per GPU, and all of them meet in a c10d rendezvous hosted on the first node of the allocation.
#
#   sbatch launch/slurm_7b.sh                                        # configs/7b_fsdp.yaml, 4 nodes x 8 GPUs = 32
#   sbatch --nodes=32 launch/slurm_7b.sh configs/7b_hsdp.yaml        # 256 GPUs, HSDP (replicas = nodes)
#   sbatch --nodes=16 launch/slurm_7b.sh configs/7b_fsdp_tp.yaml     # 128 GPUs, TP 4 x FSDP 32
#   sbatch launch/slurm_7b.sh configs/7b_fsdp.yaml --set optim.name=stable_spam transform.name=none
#   RUN_ROOT=/lustre/me/runs sbatch --partition=gpu --account=proj launch/slurm_7b.sh   # site options
#
# Check the layout first: python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --world-size 32
#
# Needs:
#   * nodes with GPUS_PER_NODE (8) GPUs of 80 GB, NCCL, and a shared filesystem mounted at the same path on every
#     node holding this repository, the Python environment and RUN_ROOT;
#   * the package installed: `pip install -e .[train]` into $VENV (default: .venv of this repo), or the docker
#     image (docker/Dockerfile) through pyxis/enroot: CONTAINER_IMAGE=registry/dist_stab:0.1.0 sbatch ...;
#   * the corpus in data.dir of the config (or $DIST_STAB_DATA) and its BPE cache (data.cache_dir) on the shared
#     filesystem: rank 0 trains and caches the tokenizer on the first run, the others wait for it.
# Outputs: $RUN_ROOT/$RUN_NAME/ (metrics.jsonl, TensorBoard, config.json), checkpoints in $CKPT_DIR (sharded DCP),
#          the job log slurm-dist_stab-7b-<job>.out in the submit directory (appended to across requeues).
# Resume: the trainer loads the newest checkpoint in $CKPT_DIR (checkpoint.resume: true), so a requeued job, a
#         resubmitted one with the same RUN_NAME, and torchrun's own restarts after a failed worker
#         (--max-restarts) all continue from it. RUN_NAME defaults to the config's stem: resubmitting the same
#         config continues that run; set RUN_NAME=... for a new one.
# Pre-emption: --requeue lets SLURM put a pre-empted job back in the queue; --signal=B:USR1@300 makes SLURM send
#         USR1 to this script 5 minutes before the time limit, and the trap below requeues the job itself (it
#         loses at most checkpoint.every steps: set it so that a checkpoint interval is well under the time limit).
#
#SBATCH --job-name=dist_stab-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

CONFIG=${1:-configs/7b_fsdp.yaml}
if [ $# -gt 0 ]; then shift; fi
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}            # sbatch runs a copy of this script: use the submit dir
cd "$REPO"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_NNODES:-1}
RUN_NAME=${RUN_NAME:-$(basename "$CONFIG" .yaml)}
RUN_ROOT=${RUN_ROOT:-$REPO/runs}
RUN_DIR=$RUN_ROOT/$RUN_NAME
CKPT_DIR=${CKPT_DIR:-$RUN_DIR/checkpoints}
VENV=${VENV:-$REPO/.venv}
PY=${PYTHON:-$VENV/bin/python}
mkdir -p "$RUN_DIR" "$CKPT_DIR"

# ---- NCCL / torch environment (exported to every task by srun)
export NCCL_NVLS_ENABLE=0                     # NVLink multicast (NVLS) off: unavailable or unstable on shared hosts
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1     # torch symmetric memory: no multicast objects either
export NVSHMEM_DISABLE_NVLS=1                 # and none through NVSHMEM
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}         # INFO to see rings/trees and the chosen transport
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # a failed collective ends the process
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # per trainer process (data loading is memory-mapped)
export DIST_STAB_TIMEOUT=${DIST_STAB_TIMEOUT:-1800}   # collective timeout (s): the first step and DCP loads are slow
# Site-specific (uncomment / set as your cluster documents): InfiniBand HCAs and the socket interface
# export NCCL_IB_HCA=mlx5; export NCCL_SOCKET_IFNAME=ib0; export NCCL_IB_GID_INDEX=3

# ---- rendezvous: the first node of the allocation hosts torchrun's c10d store
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')   # awk reads all: no SIGPIPE
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}   # per job: two jobs on one node do not collide

requeue() {
  echo "$(date -u +%FT%TZ) USR1: time limit near, requeueing job $SLURM_JOB_ID (resumes from $CKPT_DIR)"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $NNODES nodes x $GPUS_PER_NODE GPUs," \
     "config $CONFIG, rendezvous $HEAD_NODE:$RDZV_PORT, run dir $RUN_DIR"
LATEST=$(ls -1d "$CKPT_DIR"/*/ 2>/dev/null | sort | tail -n 1 || true)
echo "checkpoint to resume from: ${LATEST:-none (fresh start)}"

CONTAINER_ARGS=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then                        # pyxis: run inside the docker image
  CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$REPO:$REPO,$RUN_ROOT:$RUN_ROOT"
                  --container-workdir="$REPO")
  PY=python
fi

# One srun task per node; torchrun forks GPUS_PER_NODE workers and restarts them all (from the newest
# checkpoint) up to MAX_RESTARTS times when one fails. The trainer reads RANK/WORLD_SIZE/LOCAL_RANK from torchrun.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"} \
  "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
    --max_restarts="${MAX_RESTARTS:-3}" \
    -m dist_stab.train --config "$CONFIG" \
    --set "log.run_dir=$RUN_DIR" "log.name=$RUN_NAME" "checkpoint.dir=$CKPT_DIR" "checkpoint.resume=true" \
    "$@" &
SRUN_PID=$!
# `wait` returns early when USR1 arrives (the trap runs, then we wait for srun to be stopped by the requeue)
wait "$SRUN_PID" || wait "$SRUN_PID"
