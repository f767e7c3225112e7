"""Prompt tokenization with SentencePiece, formatted as openpi's PaligemmaTokenizer does.

pi0:   "<bos>" + cleaned instruction + "\n"
pi0.5: "<bos>Task: {instruction}, State: {s_1 ... s_n};\nAction: " where each normalised state value is
       discretised into 256 bins over [-1, 1].
Unlike openpi, which truncates silently, an over-long prompt is refused: the actions would no longer be
conditioned on what the caller asked for.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import sentencepiece

STATE_BINS = 256


def demo_tokenizer_path() -> Path:
    """A small SentencePiece model shipped for random-weight demos and benchmarks (not PaliGemma's)."""
    return Path(str(resources.files("vla_runtime.graphs") / "assets" / "demo_tokenizer.model"))


def clean_instruction(instruction: str) -> str:
    return instruction.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalised state -> integer bins 0..255 (openpi: digitize against 256 left bin edges on [-1, 1])."""
    return np.digitize(state, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1


def pi05_prompt(instruction: str, state: np.ndarray) -> str:
    state_str = " ".join(map(str, discretize_state(state)))
    return f"Task: {clean_instruction(instruction)}, State: {state_str};\nAction: "


class PromptTokenizer:
    def __init__(self, model_path: str | Path, max_len: int):
        path = Path(model_path)
        if not path.is_file():
            raise ValueError(f"tokenizer: no SentencePiece model at {path}")
        self.path = path
        self.max_len = max_len
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:  # sentencepiece's own parse errors
            raise ValueError(f"tokenizer: {path} is not a SentencePiece model ({err})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def token_ids(self, instruction: str, state: np.ndarray | None = None) -> list[int]:
        """Unpadded ids: the pi0.5 format when `state` (normalised) is given, else the pi0 format."""
        if not isinstance(instruction, str) or not clean_instruction(instruction):
            raise ValueError("instruction: must be a non-empty string")
        if state is not None:
            return self._sp.encode(pi05_prompt(instruction, state), add_bos=True)
        return self._sp.encode(clean_instruction(instruction), add_bos=True) + self._sp.encode("\n")

    def __call__(self, instruction: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> tokens int64 [max_len] (padded with 0), mask bool [max_len]."""
        ids = self.token_ids(instruction, state)
        if len(ids) > self.max_len:
            raise ValueError(
                f"instruction: the prompt is {len(ids)} tokens, over the model's "
                f"max_token_len of {self.max_len}"
            )
        tokens = np.zeros(self.max_len, dtype=np.int64)
        tokens[: len(ids)] = ids
        mask = np.zeros(self.max_len, dtype=bool)
        mask[: len(ids)] = True
        return tokens, mask
