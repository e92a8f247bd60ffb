#!/usr/bin/env bash
# The test command (README): creates .venv if needed, installs the package with its test
# extras (torch 2.13.0 CPU wheel pinned first so nothing pulls a CUDA build), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Open MPI for the mpirun launch test (Debian packages; root on CI). Skipped when already there.
if ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libopenmpi-dev openmpi-bin >/dev/null
  else
    echo "tests/run.sh: mpirun missing; install Open MPI (apt-get install libopenmpi-dev openmpi-bin)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,deepspeed,megatron,integrations]"
# torchtitan's components and config registry, datasets for its imports (see setup.py)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps torchtitan==0.3.0 datasets==4.7.0
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout=600 "$@"
