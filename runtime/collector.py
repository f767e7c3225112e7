"""Python's cyclic garbage collector kept from stopping the serving threads for long.

A process that has built, compiled and captured a policy holds hundreds of thousands of objects the
cyclic collector tracks (pi05_tiny on the CPU: about 180,000; a full collection of them took 70 ms on
the CI host). CPython runs a full collection whenever the long-lived objects have grown by a quarter
since the last one: at a moment of its choosing while robots are served, every Python thread stopped
for the length of the scan (the robots' submits, the batcher, the completion of frames). On the H200 a
fleet of robots in step saw one of its threads' ticks come 330 ms late in a 60 s run (docs/many_robots.md).

`gc.freeze()` moves every object tracked so far into a generation the collector never scans. What a
start-up makes (modules, compiled graphs, captured profiles' buffers) lives as long as the executor
anyway; objects made while serving are collected as before, in collections of their own size. The
executor freezes after each capture (ahead of serving, and a profile captured lazily) and after each
profile's first frame (what a first run builds lazily: library handles, caches), and thaws on
close, so that a closed executor's cycles are collected (a process that builds several executors, one
after another, would otherwise keep each one's memory, GPU memory included, to its end). Thawing is
process-wide: another live executor's objects are scanned again until its next capture.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Every object tracked so far out of the collector's scans (gc.freeze)."""
    gc.freeze()


def thaw() -> None:
    """Frozen objects back into the oldest generation, to be collected when garbage (gc.unfreeze)."""
    gc.unfreeze()
