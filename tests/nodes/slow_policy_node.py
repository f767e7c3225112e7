"""The policy node on a device too slow for its deadline: the executor's prefix stage is an engine (the
public seam) that takes PREFIX_S and leaves an empty KV cache; the denoising loop is the model's own, so
its step count is real. The executor is busy meanwhile, as on a slow GPU. Run as a script by
test_policy_node.py."""

from __future__ import annotations

import functools
import sys
import time

from vla_runtime.nodes import policy_node
from vla_runtime.runtime.executor import PipelinedExecutor

PREFIX_S = 0.08  # more than the 50 ms deadline


def slow_prefix(slot) -> None:
    time.sleep(PREFIX_S)
    slot.kv_cache.zero_()
    slot.prefix_mask.zero_()  # nothing to attend to in the prefix: the actions come from the noise alone


if __name__ == "__main__":
    factory = functools.partial(PipelinedExecutor, engines={"prefix": slow_prefix})
    sys.exit(policy_node.main(policy_factory=factory))
