#!/usr/bin/env bash
# The trainer under the DeepSpeed launcher, on the hosts of a hostfile (ssh/pdsh to each, one process per GPU).
#
#   HOSTFILE=/path/hosts launch/deepspeed.sh configs/7b_fsdp.yaml        # 7B on the hostfile's GPUs (e.g. 8 x 8)
#   HOSTFILE=/path/hosts launch/deepspeed.sh configs/7b_zero3.yaml       # the same, from the ZeRO-3 config (64 GPUs)
#   launch/deepspeed.sh configs/7b_fsdp.yaml --set optim.name=scale      # extra args go to the trainer
#   NUM_GPUS=2 HOSTFILE=none launch/deepspeed.sh configs/tiny_cpu.yaml   # this machine only (no hostfile, no ssh)
#
# Needs: `pip install -e .[deepspeed,train]` (deepspeed==0.19.8) in the same Python environment at the same path on
# every host, this repository at the same path on every host (shared filesystem), passwordless ssh from this
# node to every host of the hostfile (and pdsh, DeepSpeed's default multi-node runner), GPUs with NCCL.
# Hostfile format: launch/hostfile.example ("<host> slots=<GPUs>" per line). The DeepSpeed launcher exports RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to each process (the trainer reads them, as under torchrun);
# --no_local_rank keeps it from adding a --local_rank argument.
#
# DeepSpeed ZeRO-3 config: configs/ds_zero3_7b.json (DS_CONFIG), made for 64 GPUs with the 7B configs:
#   train_micro_batch_size_per_gpu 2, gradient_accumulation_steps 16   2 x 16 x 64 = 2048 sequences per step (the
#                                                                      trainer's global_batch_size; DeepSpeed derives
#                                                                      train_batch_size from the world size)
#   bf16.enabled true                      bf16 params/grads, fp32 master + optimizer state (16 B/param, ZeRO paper)
#   gradient_clipping 0.0                  dist_stab's transforms clip (AdaGC & co.); DeepSpeed's clip must be off
#   zero_allow_untested_optimizer true     the optimizer is the trainer's (torch AdamW or dist_stab's SCALE/SPAM/...)
#   stage 3                                params, grads and optimizer state partitioned over all GPUs
#   overlap_comm, contiguous_gradients     overlap the reduce-scatter with backward; one contiguous grad buffer
#   reduce_bucket_size 16777216            hidden^2 (4096^2) elements, HF's "auto" rule for ZeRO-3
#   stage3_prefetch_bucket_size 15099494   0.9 x hidden^2, the same rule
#   stage3_param_persistence_threshold 40960   10 x hidden: norms stay gathered (tiny)
#   stage3_max_live_parameters 1e9         gathered params allowed at once (2 GB in bf16); DeepSpeed's default
#   stage3_max_reuse_distance 1e9          DeepSpeed's default
#   sub_group_size 1e9                     optimizer steps the partition in 1e9-element pieces (default)
#   stage3_gather_16bit_weights_on_model_save false   checkpoints stay sharded (no 13 GB gather on rank 0)
#   steps_per_print 100, wall_clock_breakdown false   DeepSpeed's own logging
# Memory per GPU: python -m dist_stab.memory_plan --config configs/7b_fsdp.yaml --deepspeed configs/ds_zero3_7b.json
#   --world-size 64
# How the trainer is told to use DeepSpeed: TRAIN_DS_SET (below) is passed as `--set ...`; it must name the
# trainer's DeepSpeed keys (see dist_stab/train/config.py); leave it empty to run the config's own parallel.mode.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/deepspeed.sh CONFIG.yaml [--set key=value ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero3_7b.json}
TRAIN_DS_SET=${TRAIN_DS_SET-parallel.mode=deepspeed parallel.deepspeed_config=$DS_CONFIG}
MASTER_PORT=${MASTER_PORT:-29500}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DS=${DEEPSPEED:-$(dirname "$PY")/deepspeed}
[ -x "$DS" ] || DS=deepspeed

# NCCL_* variables are forwarded to the other hosts by DeepSpeed's runner itself; the rest go through an env file
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} DIST_STAB_TIMEOUT=${DIST_STAB_TIMEOUT:-1800}
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")
trap 'rm -f "$ENV_FILE"' EXIT
for v in TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS \
         DIST_STAB_TIMEOUT DIST_STAB_DATA PYTORCH_CUDA_ALLOC_CONF; do
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$ENV_FILE"; fi
done
export DS_ENV_FILE=$ENV_FILE   # an absolute path: DeepSpeed's runner reads it and exports each line on every host

HOST_ARGS=()
if [ "$HOSTFILE" = none ]; then
  HOST_ARGS=(--num_gpus "${NUM_GPUS:-1}")
else
  [ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found (see launch/hostfile.example)" >&2; exit 2; }
  HOST_ARGS=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}")
fi
SET_ARGS=()
if [ -n "$TRAIN_DS_SET" ]; then
  read -r -a DS_ITEMS <<< "$TRAIN_DS_SET"
  SET_ARGS=(--set "${DS_ITEMS[@]}")
fi

exec "$DS" "${HOST_ARGS[@]}" --master_port "$MASTER_PORT" --no_local_rank \
  --module dist_stab.train --config "$CONFIG" ${SET_ARGS[@]+"${SET_ARGS[@]}"} "$@"
