#!/usr/bin/env bash
# THE MAIN JOB (README): a short real pretraining run on CPU, 2 processes, FSDP2, twice with the same
# seed -- global-norm clipping, then AdaGC -- printing the loss, the communication report of each run
# and a side-by-side comparison. About 2-3 minutes on 2 cores (first run: + venv set-up).
#   launch/demo.sh                       # defaults: configs/tiny_cpu.yaml, 100 steps
#   STEPS=150 launch/demo.sh             # longer
#   launch/demo.sh --set optim.lr=1e-3   # extra overrides for both runs
# Corpus: ../shared/data/gutenberg-small.*.txt.xz (or $DIST_STAB_DATA). Outputs: runs/demo-*/ (metrics.jsonl,
# summary.json) and runs/demo.png when matplotlib is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
STEPS=${STEPS:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU wheel, so that nothing later pulls a CUDA build
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train]"
export OMP_NUM_THREADS=1
EXTRA=("$@")
[ -n "$STEPS" ] && EXTRA+=(--set "train.steps=$STEPS")
start=$(date +%s)
for T in global_clip adagc; do
  echo
  echo "=== run: transform=$T ($CONFIG, torchrun 2 processes, FSDP2) ==="
  rm -rf "runs/demo-$T"
  .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m dist_stab.train --config "$CONFIG" \
    --set "transform.name=$T" "log.name=demo-$T" "log.run_dir=runs/demo-$T" "${EXTRA[@]}" \
    2> >(grep -v -e "FutureWarning" -e "warnings.warn" -e "^\s*$" >&2)
done
echo
echo "=== comparison (same seed, same data; FSDP2 on 2 CPU processes) ==="
.venv/bin/python -m dist_stab.train.report runs/demo-global_clip runs/demo-adagc
if .venv/bin/python -c "import matplotlib" 2>/dev/null; then
  .venv/bin/python -m dist_stab.plot runs/demo-global_clip runs/demo-adagc -o runs/demo.png
fi
echo "demo wall time: $(( $(date +%s) - start )) s"
