#!/usr/bin/env bash
# One call on a CUDA machine: install, run the gpu tier and the bench tier, leave JSON + trace in $OUT.
# The CUDA machine has torch but no package index: the project installs with --no-deps.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLA_BENCH_DIR="$OUT" VLA_COMMIT=${VLA_COMMIT:-unknown}
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
python3 -m pytest -q -p no:cacheprovider tests/gpu -m gpu -s "$@" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
python3 -m pytest -q -p no:cacheprovider tests/bench -m bench -s --benchmark-disable-gc \
    --benchmark-json="$OUT/pytest-benchmark.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^$" | tail -40
