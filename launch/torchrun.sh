#!/usr/bin/env bash
# Single-node run of the reference trainer with torchrun, any config:
#   launch/torchrun.sh configs/tiny_cpu.yaml                        # 2 processes (CPU: gloo)
#   NPROC=8 launch/torchrun.sh configs/llama_130m.yaml --set optim.lr=1e-3
# NPROC defaults to the number of GPUs, or 2 without one. Extra arguments go to the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/torchrun.sh CONFIG.yaml [--set key=value ...]}
shift
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m dist_stab.train --config "$CONFIG" "$@"
