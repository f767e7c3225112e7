"""Prompt formats against cases written from openpi's PaligemmaTokenizer source."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece
from vla_runtime.graphs.tokenizer import PromptTokenizer, demo_tokenizer_path, discretize_state, pi05_prompt


def test_state_discretisation_matches_openpi():
    # openpi: np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    state = np.array([-1.0, -0.99, 0.0, 0.5, 0.999, 1.0], dtype=np.float32)
    assert discretize_state(state).tolist() == [0, 1, 128, 192, 255, 255]


def test_pi05_prompt_format():
    state = np.array([0.0, -1.0, 1.0], dtype=np.float32)
    assert pi05_prompt("  pick_up the bowl\n", state) == "Task: pick up the bowl, State: 128 0 255;\nAction: "


def test_pi05_tokens_are_bos_plus_formatted_prompt(spm_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    tok = PromptTokenizer(spm_path, max_len=96)
    state = np.random.default_rng().uniform(-1, 1, 8).astype(np.float32)
    tokens, mask = tok("put the bowl on the plate", state)
    expected = sp.encode(pi05_prompt("put the bowl on the plate", state), add_bos=True)
    n = len(expected)
    assert tokens.shape == (96,) and mask.shape == (96,) and tokens.dtype == np.int64
    assert tokens[:n].tolist() == expected and tokens[0] == sp.bos_id()
    assert mask[:n].all() and not mask[n:].any() and not tokens[n:].any()
    assert sp.decode(tokens[:n].tolist()).endswith(";\nAction:")  # decode drops the trailing space


def test_pi0_tokens_end_with_newline_piece(spm_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    tokens, mask = PromptTokenizer(spm_path, max_len=48)("open_the drawer")
    expected = sp.encode("open the drawer", add_bos=True) + sp.encode("\n")
    assert tokens[: len(expected)].tolist() == expected and mask.sum() == len(expected)


def test_bad_instructions(spm_path):
    tok = PromptTokenizer(spm_path, max_len=12)
    for bad in ("", "   ", None):
        with pytest.raises(ValueError, match="instruction"):
            tok(bad)
    with pytest.raises(
        ValueError, match="instruction: the prompt is .* over the model's max_token_len of 12"
    ):
        tok("pick up the black bowl and put it on the plate next to the stove", np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="tokenizer"):
        PromptTokenizer("/nonexistent/tokenizer.model", 10)


def test_demo_tokenizer_ships_with_the_package():
    tok = PromptTokenizer(demo_tokenizer_path(), max_len=96)
    tokens, mask = tok("put the black bowl on the plate", np.zeros(8, np.float32))
    assert mask.sum() > 10


@pytest.mark.parametrize(
    "preset, overrides, prompt",
    [
        # (what the checkpoint was trained on, the literal text openpi's tokenizer builds for it)
        ("pi0_tiny", {}, "put the bowl on the plate"),  # + a separate "\n" piece
        ("pi05_tiny", {}, "Task: put the bowl on the plate, State: 0 128 255 192 0 0 0 0;\nAction: "),
        ("pi05_tiny", {"state_in_prompt": False}, "put the bowl on the plate"),  # openpi pi05_libero
    ],
)
def test_exact_token_ids_of_each_prompt_format(spm_path, preset, overrides, prompt):
    """The token ids the policy feeds, against ids built by hand from the literal prompt text."""
    from vla_runtime.runtime.config import RuntimeConfig
    from vla_runtime.runtime.loading import build_parts
    from vla_runtime.runtime.types import Observation

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    parts = build_parts(RuntimeConfig(preset=preset, tokenizer=spm_path, **overrides))
    state = np.array([-1.0, 0.0, 1.0, 0.5, -1, -1, -1, -1], dtype=np.float32)  # bins 0 128 255 192 0 ...
    images = {"base_0_rgb": np.zeros((8, 8, 3), np.uint8), "left_wrist_0_rgb": np.zeros((8, 8, 3), np.uint8)}
    prepared = parts.preparer(Observation(images, state, "put_the bowl on the plate\n"))
    expected = [sp.bos_id()] + sp.encode(prompt)
    if not prompt.startswith("Task:"):
        expected += sp.encode("\n")
    n = int(prepared.token_masks.sum())
    assert prepared.tokens[:n].tolist() == expected
    assert not prepared.tokens[n:].any()
