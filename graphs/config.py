"""Model configuration: frozen dataclasses and the registry of named presets.

The full-size presets follow openpi's pi0 / pi0.5 (PaliGemma 3B = SigLIP So400m/14 + Gemma 2B, with a
Gemma-300M action expert). The tiny presets are the same code at toy widths, for the CPU test suite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# pi0.5's (and openpi's LIBERO / DROID) camera names, in the order the prefix sees them.
PI0_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower (ViT) followed by the multi-modal projector."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _require_positive(self, "image_size", "patch_size", "width", "depth", "mlp_dim", "num_heads")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma decoder stack (the prefix language model, or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0  # 0 for the action expert, which has no token embedding
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0

    def __post_init__(self):
        _require_positive(self, "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    def gemm_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of one layer's four GEMMs as served: fused q/k/v, output, fused gate/up, down."""
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return {
            "qkv": (qkv, self.width),
            "o": (self.width, self.num_heads * self.head_dim),
            "gate_up": (2 * self.mlp_dim, self.width),
            "down": (self.width, self.mlp_dim),
        }


@dataclass(frozen=True)
class ModelConfig:
    """A whole pi0 / pi0.5 policy: vision, prefix LM, action expert and the action interface."""

    name: str
    pi05: bool
    vision: SiglipConfig
    prefix_lm: GemmaConfig
    expert: GemmaConfig
    action_dim: int = 32  # the model's padded action (and pi0 state) width
    action_horizon: int = 50
    max_token_len: int = 200  # padded prompt length
    camera_names: tuple[str, ...] = PI0_CAMERAS
    default_steps: int = 10
    # pi0.5 only: the discretised state is written into the prompt (openpi's `discrete_state_input`, True
    # by default; openpi's pi05_libero was trained without). None = the family's default. pi0 reads the
    # state from a continuous state token instead, never from the prompt.
    state_in_prompt: bool | None = None
    n_action_steps: int | None = None  # actions a chunk offers the robot; None = the whole horizon

    def __post_init__(self):
        _require_positive(self, "action_dim", "action_horizon", "max_token_len", "default_steps")
        if self.state_in_prompt and not self.pi05:
            raise ValueError("state_in_prompt: pi0 reads the state from a state token, not the prompt")
        if self.n_action_steps is not None and not 1 <= self.n_action_steps <= self.action_horizon:
            raise ValueError(
                f"n_action_steps: must be in 1..action_horizon ({self.action_horizon}), "
                f"got {self.n_action_steps}"
            )
        if not self.camera_names:
            raise ValueError("camera_names must name at least one camera")
        if len(set(self.camera_names)) != len(self.camera_names):
            raise ValueError(f"camera_names has duplicates: {self.camera_names}")
        # Prefix and expert attend jointly layer by layer, so their attention layouts must match.
        for field in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.prefix_lm, field) != getattr(self.expert, field):
                raise ValueError(
                    f"prefix_lm.{field} ({getattr(self.prefix_lm, field)}) != expert.{field} "
                    f"({getattr(self.expert, field)}): the two stacks share attention"
                )
        if self.prefix_lm.vocab_size <= 0:
            raise ValueError("prefix_lm.vocab_size must be positive")
        if not 1 <= self.default_steps <= 10:
            raise ValueError(f"default_steps must be in 1..10, got {self.default_steps}")

    @property
    def prompt_has_state(self) -> bool:
        return self.pi05 if self.state_in_prompt is None else self.state_in_prompt

    @property
    def prompt_format(self) -> str:
        """pi0 (`<instruction>\\n`), pi05_state (`Task: ..., State: ...;\\nAction: `) or pi05_no_state
        (pi0.5 trained without the state: the pi0 text, as openpi's tokenizer writes it without a state)."""
        if not self.pi05:
            return "pi0"
        return "pi05_state" if self.prompt_has_state else "pi05_no_state"

    @property
    def chunk_length(self) -> int:
        """Actions a chunk offers the robot (the first `n_action_steps` of the horizon)."""
        return self.n_action_steps or self.action_horizon

    @property
    def num_views(self) -> int:
        return len(self.camera_names)

    @property
    def image_tokens(self) -> int:
        return self.num_views * self.vision.tokens_per_image

    @property
    def prefix_len(self) -> int:
        return self.image_tokens + self.max_token_len

    @property
    def suffix_len(self) -> int:
        # pi0 prepends one continuous state token to the action tokens.
        return self.action_horizon + (0 if self.pi05 else 1)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _require_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


PALIGEMMA_VOCAB = 257_152

GEMMA_2B = GemmaConfig(
    width=2048,
    depth=18,
    mlp_dim=16_384,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    vocab_size=PALIGEMMA_VOCAB,
)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)

SO400M_14 = SiglipConfig()

TINY_VISION = SiglipConfig(image_size=56, patch_size=14, width=32, depth=2, mlp_dim=64, num_heads=2)
# The tiny vocabulary holds the demo tokenizer's ids (graphs/assets) and test tokenizers of up to 1024 pieces.
TINY_LM = GemmaConfig(
    width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=1024
)
TINY_EXPERT = GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)

# Variant names -> shapes, as checkpoints name them (openpi's `paligemma_variant` / `action_expert_variant`,
# lerobot's the same). The `vla_tiny*` variants are this project's own, for the CPU tests.
LM_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GEMMA_2B,
    "gemma_300m": GEMMA_300M,
    "vla_tiny_lm": TINY_LM,
    "vla_tiny_expert": TINY_EXPERT,
}
VISION_VARIANTS: dict[str, SiglipConfig] = {"so400m/14": SO400M_14, "vla_tiny_vision": TINY_VISION}
# The vision tower PaliGemma pairs with each language model (a checkpoint names only the LM).
VISION_OF_LM = {"gemma_2b": "so400m/14", "vla_tiny_lm": "vla_tiny_vision"}


def variant_name(table: dict, config) -> str | None:
    """The table's name for a shape, or None when it is not a named variant."""
    return next((name for name, c in table.items() if c == config), None)


PRESETS: dict[str, ModelConfig] = {
    "pi0": ModelConfig(
        "pi0", pi05=False, vision=SO400M_14, prefix_lm=GEMMA_2B, expert=GEMMA_300M, max_token_len=48
    ),
    "pi05": ModelConfig(
        "pi05", pi05=True, vision=SO400M_14, prefix_lm=GEMMA_2B, expert=GEMMA_300M, max_token_len=200
    ),
    "pi0_tiny": ModelConfig(
        "pi0_tiny",
        pi05=False,
        vision=TINY_VISION,
        prefix_lm=TINY_LM,
        expert=TINY_EXPERT,
        action_dim=8,
        action_horizon=10,
        max_token_len=48,
    ),
    "pi05_tiny": ModelConfig(
        "pi05_tiny",
        pi05=True,
        vision=TINY_VISION,
        prefix_lm=TINY_LM,
        expert=TINY_EXPERT,
        action_dim=8,
        action_horizon=10,
        max_token_len=200,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
