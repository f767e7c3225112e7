#!/usr/bin/env bash
# One call on the CUDA machine for issue 12: the policy node itself (ROS 2 Jazzy wheels for cp312, carried
# in .whl/ros) against a 30 Hz peer, next to the engine in-process, for pi05 (FP8) on the GPU and the tiny
# preset on the CPU, and the node's floor (an instant policy). Carry .whl. The machine has no package index: everything installs from the wheels.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLA_COMMIT=${VLA_COMMIT:-unknown}
# A virtual environment for the ROS wheels (their .pth start-up hook needs a real site-packages), which
# also sees the machine's own packages (torch, numpy) through a .pth of their directories.
python3 -m venv --without-pip /tmp/v || exit 1
SITE=$(echo /tmp/v/lib/python3*/site-packages)
python3 -c "import site; print('\n'.join(site.getsitepackages() + [site.getusersitepackages()]))" > "$SITE/machine.pth"
python3 -m pip --python /tmp/v/bin/python install -q --no-index --no-deps --no-compile .whl/ros/*.whl .whl/*.whl \
    || exit 1
python3 -m pip --python /tmp/v/bin/python install -q --no-deps --no-build-isolation . 2>&1 | grep -v -i warning
export AMENT_PREFIX_PATH=/tmp/v ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=42
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
nproc
PY=/tmp/v/bin/python
$PY -c "import rclpy, torch, numpy, vla_runtime; print('rclpy', rclpy.__file__, 'torch', torch.__version__)" || exit 1
$PY benchmarks/node_latency.py --preset pi05 --device cuda --precision fp8 --fp8-expert --seconds 20 \
    --out "$OUT/node-latency-pi05-fp8.json" 2>&1 | grep -v "^\[INFO\]" | tail -5
# The floor: the same node and peer with a policy that answers at once (ROS and the node's Python alone).
$PY benchmarks/node_latency.py --instant --seconds 20 --out "$OUT/node-latency-instant.json" 2>&1 | tail -3
if [ "${TINY:-1}" = "1" ]; then
    $PY benchmarks/node_latency.py --preset pi05_tiny --device cpu --steps 10 --seconds 20 \
        --out "$OUT/node-latency-tiny-cpu.json" 2>&1 | tail -5
fi
if [ "${1:-}" = "tests" ]; then
    cd /tmp && $PY -m pytest -q -p no:cacheprovider "$OLDPWD/tests/nodes" 2>&1 | tail -15
fi
