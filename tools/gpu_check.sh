#!/usr/bin/env bash
# The prepared GPU check (src/ssmscale/bench/gpu_check.py): kernels against their references and the
# memory-bandwidth floor, bf16 training of every family, a profile at L 2K-16K, one short table.
#   tools/gpu_check.sh [--out DIR] [--budget-s 420] [--sections scan,ssd,train,profile]
# Needs a CUDA GPU and the project's environment with a CUDA build of torch and triton (make setup
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"); installs and downloads nothing.
# Plans for about 5 minutes on an H100/H200; the budget stops new measurements after 7, and this
# wrapper stops the check at 8.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 480 "$python" -m ssmscale.bench.gpu_check "$@"
