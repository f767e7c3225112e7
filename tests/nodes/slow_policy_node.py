"""The policy node on a device too slow for its deadline: the executor's denoise stage is an engine (the
public seam) that takes DENOISE_S and writes zero actions. The executor is busy meanwhile, as on a slow
GPU. Run as a script by test_policy_node.py."""

from __future__ import annotations

import functools
import sys
import time

from vla_runtime.nodes import policy_node
from vla_runtime.runtime.executor import PipelinedExecutor

DENOISE_S = 0.08  # more than the 50 ms deadline


def slow_denoise(slot) -> None:
    time.sleep(DENOISE_S)
    slot.actions.zero_()


if __name__ == "__main__":
    factory = functools.partial(PipelinedExecutor, engines={"denoise": slow_denoise})
    sys.exit(policy_node.main(policy_factory=factory))
