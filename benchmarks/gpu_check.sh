#!/usr/bin/env bash
# One short GPU session (< 8 minutes on a fresh machine): the CUDA tests, then every timing, one JSON.
#   bash benchmarks/gpu_check.sh --out "$OUT"          (any benchmarks/gpu_check.py options may follow)
# Runs from any directory; imports the package from this repository (nothing is installed or downloaded).
# Each section records its own failure and the rest still run; the JSON goes to benchmarks/results/
# and to --out (default $OUT). Safe to run twice in a row: every run directory is a fresh temp dir.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-$(command -v python3 || command -v python)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(nvidia-smi not available)"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
"$PY" benchmarks/gpu_check.py "$@"
