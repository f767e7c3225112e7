#!/usr/bin/env bash
# One call on a CUDA machine: install, run the gpu tier and the bench tier, leave JSON + trace in $OUT.
# The CUDA machine has torch but no package index: the project installs with --no-deps, and the wheels of
# mcap and mcap-ros2-support (+ zstandard, lz4, for cp312) travel in .whl/. The recorded-episode test reads
# VLA_RECORDING (default .gpu/libero_spatial_task0.mcap, written by `eval-libero --record --max-steps 75`
# for about 15 observations). Both folders are ignored by git: carry them to the device (.whl, .gpu).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
export VLA_RECORDING=${VLA_RECORDING:-$PWD/.gpu/libero_spatial_task0.mcap}
# The commit recorded in the results: pass VLA_COMMIT where the tree is a copy whose git metadata may be
# stale (it wins over git's HEAD); otherwise git's HEAD.
export PYTHONUNBUFFERED=1 VLA_BENCH_DIR="$OUT"
export VLA_COMMIT=${VLA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
# Both tiers take longer than one 10-minute call on an H200 (measured at d5a45a2: 38 of 46 GPU tests and
# 13 of 14 benchmarks in 540 s): run them in separate calls (TIERS=gpu, TIERS=bench), or pass test files
# after the script's name. -v writes each test's outcome as it ends, so a call cut off by its time limit
# still says which tests passed.
TIERS=${TIERS:-gpu bench}
if [[ " $TIERS " == *" gpu "* ]]; then
    python3 -m pytest -v -p no:cacheprovider -m gpu -s "${@:-tests/gpu}" 2>&1 | tee "$OUT/gpu-tests.log" \
        | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -60
fi
if [[ " $TIERS " == *" bench "* ]]; then
    python3 -m pytest -v -p no:cacheprovider tests/bench -m bench -s --benchmark-disable-gc \
        --benchmark-json="$OUT/pytest-benchmark.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^$" | tail -40
fi
