"""Shared fixtures: a tiny SentencePiece model trained here, and random observations."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import sentencepiece
from vla_runtime.graphs.config import get_preset
from vla_runtime.runtime.types import Observation

WORDS = [
    "pick",
    "up",
    "the",
    "black",
    "bowl",
    "put",
    "it",
    "on",
    "plate",
    "open",
    "drawer",
    "close",
    "stove",
    "turn",
    "ketchup",
    "basket",
    "Task",
    "State",
    "Action",
]


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory) -> str:
    """A 300-piece SentencePiece model trained on prompt-like text, written to a temporary file."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(2000):
        words = " ".join(rng.choice(WORDS, size=rng.integers(3, 9)))
        state = " ".join(map(str, rng.integers(0, 256, size=rng.integers(3, 9))))
        lines.append(f"Task: {words}, State: {state};\nAction: ")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=300,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "test_tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


def random_observation(
    rng: np.random.Generator,
    preset: str = "pi05_tiny",
    state_dim: int = 8,
    skip: tuple[str, ...] = (),
    side: int | None = None,
) -> Observation:
    cfg = get_preset(preset)
    images = {}
    for name in cfg.camera_names:
        if name in skip:
            continue
        h = side or int(rng.integers(40, 300))
        w = side or int(rng.integers(40, 300))
        images[name] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    words = " ".join(rng.choice(WORDS[:15], size=int(rng.integers(2, 7))))
    return Observation(images, rng.uniform(-1, 1, state_dim).astype(np.float32), words, time.time())


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh inputs every run; the seed is printed, so a failure (whose captured output pytest shows)
    can be replayed with np.random.default_rng(seed)."""
    seed = np.random.SeedSequence().entropy
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def inductor_settings_restored(monkeypatch, tmp_path):
    """An executor with a compile cache points Inductor at it (the environment variable) and, when the
    cache is warm, turns its compile workers off: both are put back after the test. Unset before, the
    variable points at this test's own directory meanwhile (never a relative path in the working tree)."""
    import os

    import torch._inductor.config as inductor_config

    name = "TORCHINDUCTOR_CACHE_DIR"
    monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / "inductor")))
    # Not monkeypatch.setattr: its undo of a value torch set meanwhile deletes the setting instead.
    threads = inductor_config.compile_threads
    yield
    inductor_config.compile_threads = threads
