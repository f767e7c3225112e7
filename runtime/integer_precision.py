"""`precision: int8` and `precision: w4a8`: the Gemma stacks' GEMMs (the q/k/v, output, gate/up and down
projections of the prefix, the action expert, or both: `integer_stages`, by default both with int8 and the
expert with w4a8) in integers, set up once at load.

int8   W8A8 (graphs/int8.py): per-channel weights, per-token activations; nothing to calibrate.
w4a8   4-bit weights, 8-bit activations (graphs/w4a8.py), each GEMM's input smoothed by a DuQuant
       transform (graphs/duquant.py) fitted on the inputs that GEMM sees over a few calibration frames:
       the first frames of `integer_calibration` (a recording), else synthetic ones; as many as the FP8
       calibration uses (`fp8_calibration_frames`).

Vision, the projections in and out of the expert, attention and norms stay in the compute dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..graphs.duquant import fit_smoothing
from ..graphs.int8 import Int8Linear
from ..graphs.w4a8 import W4A8Linear
from .calibration import frames_runner, synthetic_observations
from .loading import PolicyParts

log = logging.getLogger(__name__)
SAMPLED_ROWS = 1024  # per GEMM: the calibration inputs a smoothing is fitted on (a uniform sample)


class InputSampler(nn.Module):
    """Stands in for a quantised GEMM while calibrating: the float product, and a uniform sample of the
    input rows it saw over every frame and step (reservoir sampling, at most SAMPLED_ROWS)."""

    observing = True

    def __init__(self, weight: torch.Tensor, seed: int = 0):
        super().__init__()
        self.weight = weight
        self.reservoir: torch.Tensor | None = None
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).detach().float().cpu()
        if self.reservoir is None:
            self.reservoir = rows[:SAMPLED_ROWS].clone()
            self.seen, rows = len(self.reservoir), rows[SAMPLED_ROWS:]
        if len(self.reservoir) < SAMPLED_ROWS:  # still filling (a first call of fewer rows)
            room = SAMPLED_ROWS - len(self.reservoir)
            self.reservoir = torch.cat([self.reservoir, rows[:room]])
            self.seen, rows = self.seen + len(rows[:room]), rows[room:]
        if len(rows):
            # algorithm R, for all rows at once: the i-th row seen replaces a uniform slot of i with
            # probability SAMPLED_ROWS / i; where two rows draw one slot, the later one stays
            seen_at = self.seen + torch.arange(1, len(rows) + 1, dtype=torch.float64)
            slots = (torch.rand(len(rows), generator=self.generator, dtype=torch.float64) * seen_at).long()
            kept = torch.nonzero(slots < SAMPLED_ROWS).flatten().flip(0)  # the latest first
            slot_list, winners = slots[kept].tolist(), {}
            for slot, row in zip(slot_list, kept.tolist(), strict=True):
                winners.setdefault(slot, row)
            if winners:
                self.reservoir[list(winners)] = rows[list(winners.values())]
            self.seen += len(rows)
        return F.linear(x, self.weight)

    def samples(self) -> torch.Tensor:
        return self.reservoir


def stacks(parts: PolicyParts) -> list[tuple]:
    """(stack, last_layer_kv_only) of the Gemma stacks `integer_stages` names: the prefix LM's last layer
    makes only keys and values (PI0Model.fill_prefix)."""
    chosen = parts.config.quantised_stages
    return [
        (stack, kv_only)
        for name, stack, kv_only in (
            ("prefix", parts.model.prefix_lm, True),
            ("expert", parts.model.expert, False),
        )
        if chosen in ("both", name)
    ]


def calibration_frames(parts: PolicyParts) -> list:
    """The frames the smoothing is fitted on: a recording's first ones, else synthetic ones."""
    config = parts.config
    if not config.integer_calibration:
        return synthetic_observations(parts, config.fp8_calibration_frames, config.seed)
    from .recording import read_observations  # noqa: PLC0415 - mcap is needed only here

    cfg = parts.config.model
    try:
        frames = read_observations(
            config.integer_calibration, cfg.camera_names, config.state_dim, config.fp8_calibration_frames
        )
    except ValueError as err:
        raise ValueError(f"integer_calibration: {err}") from None
    if not frames:
        raise ValueError(f"integer_calibration: {config.integer_calibration} holds no complete observation")
    return frames


def prepare_integer(parts: PolicyParts) -> int:
    """Quantise both stacks for `parts.config.precision` (int8 or w4a8) and route them through it.
    Returns the number of quantised GEMMs."""
    config = parts.config
    if config.precision == "int8":
        count = sum(stack.quantize(Int8Linear, kv_only) for stack, kv_only in stacks(parts))
    else:
        samplers: dict[int, InputSampler] = {}

        def sampler(weight: torch.Tensor) -> InputSampler:
            samplers[id(weight)] = InputSampler(weight)
            return samplers[id(weight)]

        for stack, kv_only in stacks(parts):
            stack.quantize(sampler, kv_only)
            stack.set_quantized(True)
        frames = calibration_frames(parts)
        frames_runner(parts, frames, True, config.seed)()

        def smoothed(weight: torch.Tensor) -> W4A8Linear:
            return W4A8Linear(weight, fit_smoothing(samplers[id(weight)].samples(), weight))

        count = sum(stack.quantize(smoothed, kv_only) for stack, kv_only in stacks(parts))
        if config.integer_calibration:
            log.info("w4a8 smoothing fitted on %d frames of %s", len(frames), config.integer_calibration)
        else:
            log.warning(
                "w4a8 smoothing fitted on %d synthetic frames; for a trained checkpoint, give recorded "
                "observations (integer_calibration)",
                len(frames),
            )
    for stack, _ in stacks(parts):
        stack.set_quantized(True)
    if not config.force_precision:
        from .accuracy import quantisation_gate  # noqa: PLC0415 - accuracy imports loading, as this does

        failures = quantisation_gate(parts, [stack for stack, _ in stacks(parts)])
        if failures:
            narrower = (
                "integer_stages expert keeps the prefix unquantised; or "
                if config.quantised_stages != "expert"
                else ""
            )
            raise ValueError(
                f"precision: {config.precision} misses its accuracy gate against the unquantised model "
                f"({'; '.join(failures)}); {narrower}set force_precision true to serve it anyway"
            )
    if not config.keep_float_weights:
        freed = sum(stack.release_float_weights() for stack, _ in stacks(parts))
        log.info("released %.1f MiB of float weights the quantised GEMMs replace", freed / 2**20)
    return count
