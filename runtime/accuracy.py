"""Accuracy gates: a precision mode against the float32 reference, per layer and per stage, on fresh
random inputs (the same seeded weights on both sides).

Gates (what `vla-runtime accuracy` and tests/gpu check):
- vision in fp16 or bf16: cosine >= 0.999 for every SigLIP layer's output and for the image tokens;
- prefix in FP8: cosine >= 0.99 for every layer's keys and values; per-tensor e4m3 has 3 mantissa bits
  (relative rounding up to 6%), spread over 2048-long dot products errors average out to ~1% per GEMM,
  so 0.99 leaves room for that and no more; a wrong scale or a saturated layer falls far below;
- actions: cosine >= 0.99 against float32 and relative L2 error <= 0.15, the same noise on both sides:
  the actions pass through 18 expert layers and 10 Euler steps reading the cached keys and values, so the
  prefix's error reaches them amplified; the table reports the bf16 run's figure beside it for scale.
- int8 (W8A8, both stacks): the FP8 gates; 8-bit integers with per-channel and per-token scales round
  more finely than e4m3 (measured on the tiny presets: keys / values cosine 0.9999, actions 0.9999).
- w4a8 (4-bit weights, both stacks): keys / values and actions cosine >= 0.97, actions relative L2 <=
  0.30. A 4-bit grid per 128 weights rounds each weight by up to a fourteenth of its group's largest,
  about 11% relative error per GEMM (cosine ~0.994 each), and it compounds over the layers; measured on
  the tiny presets: keys / values cosine 0.982-0.987, actions cosine 0.979-0.9997, relative L2 up to
  0.21. These gates are looser by necessity; a trained checkpoint's table is what decides its use.

`quantisation_gate` checks int8 and w4a8 at start-up (runtime/integer_precision.py): against the same
model unquantised (its float weights are kept), so no second model is built on the robot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import RuntimeConfig
from .inputs import pixels_to_model_input
from .loading import PolicyParts, build_parts
from .synthetic import synthetic_observation

VISION_LAYER_COSINE = 0.999
GATE_STREAM = 2  # the start-up gate's frames: a stream apart from the calibration's (seed alone)


@dataclass(frozen=True)
class Gates:
    """What a quantised precision mode must hold against the unquantised model (see the module's doc)."""

    kv_cosine: float
    actions_cosine: float
    actions_rel_l2: float


GATES = {
    "fp8": Gates(kv_cosine=0.99, actions_cosine=0.99, actions_rel_l2=0.15),
    "int8": Gates(kv_cosine=0.99, actions_cosine=0.99, actions_rel_l2=0.15),
    "w4a8": Gates(kv_cosine=0.97, actions_cosine=0.97, actions_rel_l2=0.30),
}


@torch.inference_mode()
def stage_outputs(parts: PolicyParts, obs, noise: np.ndarray) -> dict[str, torch.Tensor]:
    """Every layer's output of vision, every layer's keys and values, and the model-space actions."""
    model, device = parts.model, parts.device
    inputs = parts.preparer(obs)
    t = lambda a: torch.from_numpy(a)[None].to(device)  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, y, i=i: out.__setitem__(f"vision.layer{i:02d}", y.float()))
        for i, layer in enumerate(model.vision.encoder.layers)
    ]
    try:
        tokens = model.encode_images(pixels_to_model_input(inputs.pixels_on(device)[None]))
    finally:
        for h in hooks:
            h.remove()
    out["vision.image_tokens"] = tokens.float()
    kv, prefix_mask = model.fill_prefix(
        tokens, t(inputs.image_masks), t(inputs.tokens), t(inputs.token_masks)
    )
    valid = prefix_mask[0]
    for i in range(kv.shape[0]):
        out[f"prefix.layer{i:02d}.k"] = kv[i, 0][..., valid, :].float()
        out[f"prefix.layer{i:02d}.v"] = kv[i, 1][..., valid, :].float()
    from ..graphs.pi0 import time_schedule  # noqa: PLC0415

    times, dt = time_schedule(parts.config.denoising_steps)
    actions = model.denoise(
        kv, prefix_mask, t(inputs.state), t(noise), torch.from_numpy(times).to(device), dt
    )
    out["actions"] = actions.float()
    return out


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    a, b = candidate.flatten().double(), reference.flatten().double()
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "max_abs_err": float((a - b).abs().max()),
        "rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-30)),
    }


def gate_for(name: str, config: RuntimeConfig) -> tuple[str, float] | None:
    if name.startswith("vision.") and config.vision_dtype != torch.float32:
        return "cosine", VISION_LAYER_COSINE
    gates = GATES.get(config.precision)
    if gates is not None and name.startswith("prefix."):
        return "cosine", gates.kv_cosine
    if gates is not None and name == "actions":
        return "cosine", gates.actions_cosine
    return None


def passes(name: str, measured: dict[str, float], config: RuntimeConfig) -> bool:
    gate = gate_for(name, config)
    ok = gate is None or measured[gate[0]] >= gate[1]
    if name == "actions" and config.precision in GATES:
        ok = ok and measured["rel_l2"] <= GATES[config.precision].actions_rel_l2
    return ok


def worst_of(worst: dict[str, dict[str, float]], name: str, row: dict[str, float]) -> None:
    w = worst.setdefault(name, row)
    worst[name] = {
        "cosine": min(w["cosine"], row["cosine"]),
        "max_abs_err": max(w["max_abs_err"], row["max_abs_err"]),
        "rel_l2": max(w["rel_l2"], row["rel_l2"]),
    }


def quantisation_gate(parts: PolicyParts, stacks: list, frames: int = 2) -> list[str]:
    """The gates of `parts.config.precision` the quantised `stacks` miss against the same model with
    their quantisation switched off (the float weights are kept), on synthetic frames: ["actions: cosine
    0.95 < 0.97", ...], empty when every gate holds."""
    config = parts.config
    rng = np.random.default_rng([config.seed, GATE_STREAM])  # not the calibration frames
    worst: dict[str, dict[str, float]] = {}
    cfg = config.model
    for _ in range(frames):
        obs = synthetic_observation(config, rng)
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        quantised = stage_outputs(parts, obs, noise)
        for stack in stacks:
            stack.set_quantized(False)
        try:
            reference = stage_outputs(parts, obs, noise)
        finally:
            for stack in stacks:
                stack.set_quantized(True)
        for name in reference:
            if name.startswith(("prefix.", "actions")):
                worst_of(worst, name, compare(reference[name], quantised[name]))
    failures = []
    for name, measured in worst.items():
        kind, bound = gate_for(name, config)
        if measured[kind] < bound:
            failures.append(f"{name}: {kind} {measured[kind]:.4f} < {bound}")
        limit = GATES[config.precision].actions_rel_l2
        if name == "actions" and measured["rel_l2"] > limit:
            failures.append(f"actions: rel L2 {measured['rel_l2']:.3f} > {limit}")
    return failures


def float32_reference(config: RuntimeConfig) -> PolicyParts:
    return build_parts(
        config.replace(
            precision="float32",
            vision_precision=None,
            compile_stages=False,
            fp8_expert=False,
            fp8_calibration=None,
            integer_calibration=None,
        )
    )


def accuracy_table(
    config: RuntimeConfig,
    frames: int = 4,
    seed: int | None = None,
    reference: PolicyParts | None = None,
    candidate: PolicyParts | None = None,
    observations: list | None = None,
) -> dict:
    """Worst case over `frames` fresh random observations (or the given recorded ones) and noises of every
    layer's comparison."""
    reference = reference or float32_reference(config)
    candidate = candidate or build_parts(config.replace(force_precision=True))  # the table, pass or fail
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {}
    cfg = config.model
    if frames < 1:
        raise ValueError(f"frames: must be at least 1, got {frames}")
    observed = (
        observations[:frames] if observations else [synthetic_observation(config, rng) for _ in range(frames)]
    )
    for obs in observed:
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        ref, cand = stage_outputs(reference, obs, noise), stage_outputs(candidate, obs, noise)
        for name in ref:
            worst_of(worst, name, compare(ref[name], cand[name]))
    rows, passed = [], True
    for name, m in worst.items():
        gate = gate_for(name, config)
        ok = passes(name, m, config)
        passed &= ok
        rows.append(
            {"name": name, **m, "gate": None if gate is None else f"{gate[0]} >= {gate[1]}", "ok": ok}
        )
    return {
        "model": config.model_name,
        "precision": config.precision,
        # the tower is never quantised: its dtype (with fp8 / int8 / w4a8, the compute dtype's)
        "vision_precision": str(config.vision_dtype).removeprefix("torch."),
        "frames": len(observed),
        "observations": "recorded" if observations else "random",
        "rows": rows,
        "passed": passed,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']}: precision {result['precision']}, vision {result['vision_precision']}, worst "
        f"of {result['frames']} {result['observations']} frames against float32",
        f"{'tensor':24s} {'cosine':>10s} {'max abs err':>12s} {'rel L2':>9s}  gate",
    ]
    for r in result["rows"]:
        gate = "" if r["gate"] is None else f"{r['gate']} {'ok' if r['ok'] else 'FAILED'}"
        lines.append(
            f"{r['name']:24s} {r['cosine']:10.6f} {r['max_abs_err']:12.4e} {r['rel_l2']:9.2e}  {gate}"
        )
    lines.append("all gates passed" if result["passed"] else "GATES FAILED")
    return "\n".join(lines)
