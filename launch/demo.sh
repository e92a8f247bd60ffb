#!/usr/bin/env bash
# THE MAIN JOB (README): a short real pretraining run on CPU -- a 3.4M-parameter LLaMA on Gutenberg text,
# torchrun with 2 processes, FSDP2 -- under the stress a user meets in real runs, once per method with the same
# seed and batches: global-norm clipping, AdaGC, GradientStabilizer. Each run prints its loss, the spikes the
# monitor detects, the steps it skips and why, and its communication report; then a side-by-side table, a few
# sentences computed from the measured numbers, and runs/demo.png. About 3 minutes on 2 cores after set-up.
#
#   bash launch/demo.sh                          # stressed runs (below)
#   bash launch/demo.sh --clean                  # the same runs without stress: config LR, no injected faults
#   METHODS="global_clip adagc" bash launch/demo.sh   # fewer methods (also zclip, none)
#   STEPS=150 bash launch/demo.sh --set optim.lr=2e-2  # steps (default 80 x 1,024 tokens); extra --set overrides
#                                                      # go to every run
#
# The stress (--set overrides of configs/tiny_cpu.yaml, each visible in every run's first lines):
#   optim.lr=1e-2                 3.3x the config's peak LR (configs/tiny_cpu.yaml: 3e-3, bench.quality's LR
#                                 sweep: global clipping loses at 1e-2 what AdaGC keeps)
#   train.inject_spike_every=25   every gradient x1000 (train.inject_spike_scale) at steps 25, 50, 75
#   train.inject_nan_at=40        a NaN in one gradient element on rank 0 at step 40: the skip policy drops the
#                                 whole step on both ranks and prints why
#   spikes.window=20              the spike monitor's window is shorter than the spike spacing: a spike still in
#                                 the window inflates its std and would hide the next one
# Corpus: ../shared/data/gutenberg-small.*.txt.xz (or $DIST_STAB_DATA). Outputs: runs/demo-<method>/
# (metrics.jsonl, summary.json, config.json, tb/) and runs/demo.png (matplotlib); DEMO_OUT=dir for another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
STEPS=${STEPS:-80}
METHODS=${METHODS:-global_clip adagc gradient_stabilizer}
OUT=${DEMO_OUT:-runs}
STRESS=(optim.lr=1e-2 train.inject_spike_every=25 train.inject_nan_at=40 spikes.window=20)
EXTRA=()
for a in "$@"; do
  if [ "$a" = "--clean" ]; then STRESS=(); else EXTRA+=("$a"); fi
done

# set-up (first run only): a venv with torch pinned to the CPU wheel first, so nothing later pulls a CUDA
# build, then the package with its trainer extras
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, yaml, tokenizers, tqdm, matplotlib, tensorboard, dist_stab
assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train]"
fi
export OMP_NUM_THREADS=1

SETS=("${STRESS[@]}")
[ -n "$STEPS" ] && SETS+=("train.steps=$STEPS")
start=$(date +%s)
echo "dist_stab demo: ${CONFIG} on 2 CPU processes (torchrun, FSDP2), one run per method, same seed and batches"
if [ ${#STRESS[@]} -gt 0 ]; then echo "stress: ${STRESS[*]}"; else echo "clean: no injected faults, the config's LR"; fi
RUNS=()
n=0
for T in $METHODS; do
  n=$((n + 1))
  echo
  echo "=== run $n: transform=$T ==="
  rm -rf "$OUT/demo-$T"
  # FutureWarnings of third-party packages (torch.distributed internals) go; everything else on stderr stays
  .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m dist_stab.train --config "$CONFIG" \
    --set "transform.name=$T" "log.name=demo-$T" "log.run_dir=$OUT/demo-$T" ${SETS[@]+"${SETS[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"} 2> >(grep -v -e "FutureWarning" -e "warnings.warn" -e "^\s*$" >&2)
  RUNS+=("$OUT/demo-$T")
done
echo
echo "=== what each run did, side by side, and what that shows ==="
PLOT=()
.venv/bin/python -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/demo.png")
.venv/bin/python -m dist_stab.train.report --summaries --conclusions ${PLOT[@]+"${PLOT[@]}"} "${RUNS[@]}"
echo "demo wall time: $(( $(date +%s) - start )) s (set-up excluded)"
