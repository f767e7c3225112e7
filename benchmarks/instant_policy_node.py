"""The policy node with a policy that answers at once (zero actions): what is left of a chunk's age is
ROS and the node's own Python, the floor under any engine. For `node_latency.py --instant` only."""

from __future__ import annotations

import queue
import sys
import threading
from concurrent.futures import Future

import numpy as np
from vla_runtime.nodes import policy_node
from vla_runtime.runtime.policy import Policy, PolicyMetadata
from vla_runtime.runtime.types import ActionChunk


class InstantPolicy(Policy):
    """Answers from its own thread, as the engine's completion thread does."""

    def __init__(self, config):
        self.config = config
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._answer, daemon=True).start()

    def _answer(self):
        while True:
            obs, future = self._queue.get()
            future.set_result(self.infer(obs))

    def infer(self, obs, noise=None, previous=None):
        return ActionChunk(np.zeros((50, 7), np.float32), obs.timestamp, {"total": 0.0})

    def reset(self):
        pass

    def submit(self, obs, noise=None, steps=None, previous=None):
        future: Future = Future()
        self._queue.put((obs, future))
        return future

    @property
    def metadata(self):
        c = self.config
        names = tuple(f"a{i}" for i in range(7))
        cameras, optional = c.model.camera_names, c.optional_camera_names
        return PolicyMetadata(
            "instant", True, 50, names, cameras, optional, 8, 10, "cpu", "float32", "switch"
        )

    def health(self):
        return {"latency_ms": {"total": {"p50": 0.0, "p99": 0.0}}, "counters": {}}


if __name__ == "__main__":
    sys.exit(policy_node.main(policy_factory=InstantPolicy))
