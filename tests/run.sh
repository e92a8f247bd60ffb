#!/usr/bin/env bash
# The test command (README): creates .venv if needed, installs the package with its test
# extras (torch 2.13.0 CPU wheel pinned first so nothing pulls a CUDA build), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,deepspeed]"
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout=600 "$@"
