"""Which step of a frame reads and writes which tensor of its pipeline slot, and the waits derived from it.

This table is the one declaration of the executor's buffer use; the CUDA path issues exactly the waits
`derive_waits` returns, and tests/runtime/test_hazards.py checks, by simulating the streams, that they
order every pair of conflicting accesses (read-after-write, write-after-read, write-after-write) within
a frame and across the frames that share a slot.

Frame N uses slot N % 2, so the previous user of a slot is frame N - 2: its steps may still be running
on their streams when frame N's copies start.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str  # also the timing key (`copy_in`, `vision`, ...) where one is reported
    stream: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


# In issue order. The host-to-device copies are grouped by the first stage that reads them, so that each
# group waits only for the previous user's readers of *its* tensors (image_masks is read by the prefix,
# not by vision: copied with the pixels, it would overwrite a mask the previous user's prefix still reads).
PIPELINE: tuple[Step, ...] = (
    Step("copy_in", "h2d", writes=("pixels",)),
    Step("copy_prefix_inputs", "h2d", writes=("image_masks", "tokens", "token_masks")),
    Step("copy_denoise_inputs", "h2d", writes=("state", "noise", "handover")),
    Step("vision", "vision", reads=("pixels",), writes=("image_tokens",)),
    Step(
        "prefix",
        "prefix",
        reads=("image_tokens", "image_masks", "tokens", "token_masks"),
        writes=("kv_cache", "prefix_mask"),
    ),
    Step(
        "denoise",
        "denoise",
        reads=("kv_cache", "prefix_mask", "state", "noise", "handover"),
        writes=("actions",),
    ),
    Step("copy_out", "d2h", reads=("actions",)),
)
STEP_NAMES = tuple(step.name for step in PIPELINE)


@dataclass(frozen=True)
class Waits:
    """Before it starts, a step waits for the end of `this_frame` steps (its inputs are ready) and of
    `previous_user` steps of the slot's previous frame (they are done with what it overwrites)."""

    this_frame: tuple[str, ...]
    previous_user: tuple[str, ...]


def _conflicts(a: Step, b: Step) -> bool:
    """Whether running b before a has finished can change what either sees."""
    return bool(set(a.writes) & (set(b.reads) | set(b.writes)) or set(a.reads) & set(b.writes))


def derive_waits(pipeline: tuple[Step, ...] = PIPELINE) -> dict[str, Waits]:
    """Each step waits for every conflicting step before it in this frame and every conflicting step of
    the previous user, except those its own stream already runs before it (a stream is in order)."""
    waits = {}
    for i, step in enumerate(pipeline):
        earlier = [p for p in pipeline[:i] if p.stream != step.stream and _conflicts(p, step)]
        previous = [p for p in pipeline if p.stream != step.stream and _conflicts(p, step)]
        waits[step.name] = Waits(tuple(p.name for p in earlier), tuple(p.name for p in previous))
    return waits


WAITS = derive_waits()
