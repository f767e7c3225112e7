#!/usr/bin/env bash
# One call on a CUDA machine for issue 11: full-size checkpoints derived from config.json alone, FP8 scales
# from a recorded LIBERO episode (VLA_RECORDING), then (with "bench") pi05 horizon 10 next to 50.
# Needs the mcap wheels (+ zstandard, lz4) for cp312 in .whl/ (the machine has no package index).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 VLA_BENCH_DIR="$OUT"
export VLA_COMMIT=${VLA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export VLA_RECORDING=${VLA_RECORDING:-$PWD/.gpu/libero_spatial_task0.mcap}
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
if [ "${1:-checks}" = "bench" ]; then
    python3 -m pytest -q -p no:cacheprovider tests/bench/test_horizon_bench.py -m bench -s --benchmark-disable-gc \
        --benchmark-json="$OUT/pytest-benchmark-horizon.json" 2>&1 | tee "$OUT/bench-horizon.log" | grep -v "^$" | tail -30
else
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_checkpoints_gpu.py -m gpu -s 2>&1 \
        | tee "$OUT/gpu-checkpoints.log" | tail -80
fi
