"""The executor's waits, derived from the table of which step reads and writes which slot tensor, order
every pair of conflicting accesses. Checked by simulating the streams: a step happens after another when
a chain of stream order and event waits leads from one to the other."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from vla_runtime.runtime.buffers import PIPELINE_SLOTS
from vla_runtime.runtime.hazards import PIPELINE, WAITS, Step, Waits, derive_waits

FRAMES = 8  # enough for every slot to be reused three times


def unordered_conflicts(pipeline: tuple[Step, ...], waits: dict[str, Waits]) -> list[str]:
    """Issue FRAMES frames (frame n on slot n % PIPELINE_SLOTS) and list every pair of accesses to the
    same slot tensor, at least one a write, that no chain of stream order and waits orders."""
    issued = [(n, step) for n in range(FRAMES) for step in pipeline]  # the dispatcher's issue order
    after: dict[tuple[int, str], set[tuple[int, str]]] = {(n, s.name): set() for n, s in issued}
    last_on_stream: dict[str, tuple[int, str]] = {}
    for n, step in issued:
        node = (n, step.name)
        if step.stream in last_on_stream:
            after[node].add(last_on_stream[step.stream])  # a stream runs in issue order
        last_on_stream[step.stream] = node
        after[node].update((n, w) for w in waits[step.name].this_frame)
        if n >= PIPELINE_SLOTS:  # the slot's previous user
            after[node].update((n - PIPELINE_SLOTS, w) for w in waits[step.name].previous_user)
    before: dict[tuple[int, str], set] = {}
    for node in after:  # issue order is a topological order: every edge points back in it
        before[node] = set().union(*({dep} | before[dep] for dep in after[node])) if after[node] else set()
    problems = []
    for (n, a), (m, b) in itertools.combinations(issued, 2):
        if n % PIPELINE_SLOTS != m % PIPELINE_SLOTS:
            continue  # different slots share no tensor
        for tensor in set(a.writes) & (set(b.reads) | set(b.writes)) | set(a.reads) & set(b.writes):
            if (n, a.name) not in before[(m, b.name)]:
                problems.append(f"{tensor}: frame {n} {a.name} -> frame {m} {b.name}")
    return problems


def test_the_derived_waits_order_every_conflicting_access():
    assert unordered_conflicts(PIPELINE, WAITS) == []


def test_the_checker_finds_the_old_image_masks_hazard():
    """The hand-written waits before this table: image_masks copied with the pixels after the previous
    user's vision only, while its prefix still reads them."""
    old = tuple(
        Step("copy_in", "h2d", writes=("pixels", "image_masks"))
        if s.name == "copy_in"
        else Step(s.name, s.stream, s.reads, tuple(w for w in s.writes if w != "image_masks"))
        for s in PIPELINE
    )
    old_waits = {
        "copy_in": Waits((), ("vision",)),
        "copy_prefix_inputs": Waits((), ("prefix",)),
        "copy_denoise_inputs": Waits((), ("denoise",)),
        "vision": Waits(("copy_in",), ("prefix",)),
        "prefix": Waits(("vision", "copy_prefix_inputs"), ("denoise",)),
        "denoise": Waits(("prefix", "copy_denoise_inputs"), ("copy_out",)),
        "copy_out": Waits(("denoise",), ()),
    }
    problems = unordered_conflicts(old, old_waits)
    assert problems and all(p.startswith("image_masks: ") and "prefix -> " in p for p in problems), problems
    assert (
        unordered_conflicts(old, derive_waits(old)) == []
    )  # derived from the table, the same steps are safe


def test_a_missing_wait_is_found():
    """Without any one of its waits on its own frame, a step races its inputs; without the waits on the
    previous user that guard a tensor it overwrites, it races that user's readers."""
    needed = set()
    for name, waits in WAITS.items():
        for field in ("this_frame", "previous_user"):
            for dropped in getattr(waits, field):
                kept = tuple(w for w in getattr(waits, field) if w != dropped)
                weaker = {**WAITS, name: Waits(**{**vars(waits), field: kept})}
                if unordered_conflicts(PIPELINE, weaker):
                    needed.add((name, field, dropped))
    assert {(name, "this_frame", w) for name, waits in WAITS.items() for w in waits.this_frame} <= needed
    assert {
        ("copy_prefix_inputs", "previous_user", "prefix"),  # image_masks, tokens
        ("vision", "previous_user", "prefix"),  # image_tokens
        ("prefix", "previous_user", "denoise"),  # kv_cache, prefix_mask
        ("denoise", "previous_user", "copy_out"),  # actions
    } <= needed


TENSORS = ("a", "b", "c", "d", "e")
STREAMS = ("h2d", "s1", "s2", "d2h")


@st.composite
def pipelines(draw):
    steps = []
    for i in range(draw(st.integers(1, 6))):
        reads = draw(st.lists(st.sampled_from(TENSORS), max_size=3, unique=True))
        writes = draw(st.lists(st.sampled_from(TENSORS), max_size=3, unique=True))
        steps.append(Step(f"step{i}", draw(st.sampled_from(STREAMS)), tuple(reads), tuple(writes)))
    return tuple(steps)


@settings(max_examples=60, deadline=None)
@given(pipelines())
def test_any_table_gets_waits_that_order_it(pipeline):
    assert unordered_conflicts(pipeline, derive_waits(pipeline)) == []
