"""Chunk hand-over: how a new chunk takes over from the one the robot is executing.

While a chunk is computed the robot goes on executing the previous one, so the first `delay` actions of
the new chunk (counted from its observation's stamp) will never run: the old chunk's run instead. The
modes differ in what happens at the splice:

    switch   the new chunk replaces the old at its aligned time; nothing links the two
    blend    the new chunk as computed, cross-faded from the old over the guided region (host side)
    inpaint  the delayed prefix is frozen to the old actions at every denoising step (no guidance)
    rtc      frozen as in inpaint, and the following actions guided toward the old chunk with a
             decaying weight: real-time chunking (Black, Galliker, Levine, arXiv 2506.07339), a
             vector-Jacobian product through the action expert, its weight clipped. The exact product
             costs a backward pass per step; `vjp_steps` computes it on the first (noisiest) steps only
             and takes the Jacobian as the identity on the rest (see `RtcGuidance`)

The policy receives a `PreviousChunk` with each observation (the node and the episode loop build it from
the chunk scheduler); this module turns it into the model-space tensors the guided denoising loop reads
(`HandoverArrays`) and applies the host-side part of each mode to the finished chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HANDOVER_MODES = ("switch", "blend", "inpaint", "rtc")
GUIDED_MODES = ("inpaint", "rtc")  # modes that change the denoising loop (the others act on the result)
SCHEDULES = ("exp", "linear", "ones", "zeros")  # the soft mask's decay after the frozen actions


@dataclass(frozen=True)
class PreviousChunk:
    """What the robot will execute from its current chunk, aligned to the new observation.

    actions: [n, robot_action_dim] robot units; actions[k] is due k control periods after the new
             observation's stamp (the old chunk's actions whose time has passed are cut off)
    delay_steps: how many of them will have run when the new chunk arrives (the expected delay)
    """

    actions: np.ndarray
    delay_steps: int

    def checked(self, robot_action_dim: int) -> PreviousChunk:
        """Itself with float32 actions, or ValueError naming the field."""
        try:
            actions = np.asarray(self.actions, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError("previous.actions: must be an array of numbers") from None
        if actions.ndim != 2 or actions.shape[1] != robot_action_dim:
            raise ValueError(
                f"previous.actions: expected shape [n, {robot_action_dim}], got {list(actions.shape)}"
            )
        if not np.all(np.isfinite(actions)):
            raise ValueError("previous.actions: contains NaN or inf")
        delay = self.delay_steps
        if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)) or delay < 0:
            raise ValueError(
                f"previous.delay_steps: must be a non-negative integer, got {self.delay_steps!r}"
            )
        return PreviousChunk(actions, int(self.delay_steps))

    def frozen_steps(self, length: int) -> int:
        """Actions of a new chunk of `length` that are frozen: the delayed ones the old chunk covers."""
        return min(self.delay_steps, len(self.actions), length)


@dataclass(frozen=True)
class RtcGuidance:
    """rtc's guidance over one denoising schedule: per step its clipped weight, and whether the
    vector-Jacobian product is exact (a backward pass through the expert) or approximated by taking the
    Jacobian d x0_hat / d x_t = I - t dv/dx_t as the identity, which it tends to as t -> 0 (the late
    steps) and which costs nothing."""

    weights: list[float]
    exact: list[bool]


@dataclass(frozen=True)
class Handover:
    """The hand-over settings of a policy (RuntimeConfig's handover, rtc_*)."""

    mode: str = "switch"
    execution_horizon: int = 10  # end of the guided region, in actions of the new chunk
    max_guidance_weight: float = 10.0  # rtc: the clip of the guidance weight
    schedule: str = "exp"
    vjp_steps: int = 2  # rtc: steps (from the noise end) with the exact vector-Jacobian product

    def __post_init__(self):
        if self.mode not in HANDOVER_MODES:
            raise ValueError(f"handover: must be one of {', '.join(HANDOVER_MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"rtc_schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.execution_horizon < 1:
            raise ValueError(f"rtc_execution_horizon: must be at least 1, got {self.execution_horizon}")
        if not self.max_guidance_weight > 0:
            raise ValueError(f"rtc_max_guidance_weight: must be > 0, got {self.max_guidance_weight}")
        if self.vjp_steps < 0:
            raise ValueError(f"rtc_vjp_steps: must be at least 0, got {self.vjp_steps}")

    @property
    def guided(self) -> bool:
        return self.mode in GUIDED_MODES

    def prefix_weights(self, frozen: int, available: int, length: int) -> np.ndarray:
        """The soft mask [length]: 1 on the `frozen` actions, then decaying to 0 at the execution horizon
        (or where the previous chunk ends, if sooner), 0 after. `ones` keeps 1 up to there, `zeros`
        guides the frozen actions only."""
        end = min(self.execution_horizon, available, length)
        weights = np.zeros(length, dtype=np.float32)
        weights[:frozen] = 1.0
        span = end - frozen
        if span > 0 and self.schedule != "zeros":
            if self.schedule == "ones":
                weights[frozen:end] = 1.0
            else:
                ramp = np.linspace(1.0, 0.0, span + 2, dtype=np.float64)[1:-1]  # strictly between 1 and 0
                if self.schedule == "exp":  # the paper's c * (e^c - 1) / (e - 1)
                    ramp = ramp * np.expm1(ramp) / (np.e - 1.0)
                weights[frozen:end] = ramp
        return weights

    def guidance_weights(self, times: np.ndarray) -> np.ndarray:
        """The rtc guidance weight of each denoising step [k], clipped at `max_guidance_weight`. In this
        sampler's convention (t = 1 is noise, 0 is data) the paper's tau is 1 - t: weight =
        t / (1 - t) * ((1 - t)^2 + t^2) / t^2, infinite (hence the clip) at t = 1."""
        t = np.asarray(times, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = (t / (1.0 - t)) * ((1.0 - t) ** 2 + t**2) / t**2
        weight = np.where(np.isfinite(weight), weight, self.max_guidance_weight)
        return np.minimum(weight, self.max_guidance_weight).astype(np.float32)

    def guidance(self, times: np.ndarray) -> RtcGuidance | None:
        """rtc's guidance for a schedule of `times` (from t = 1, the noise); None in the other modes."""
        if self.mode != "rtc":
            return None
        weights = self.guidance_weights(times).tolist()
        return RtcGuidance(weights, [i < self.vjp_steps for i in range(len(weights))])

    def blend(self, actions: np.ndarray, previous: PreviousChunk) -> np.ndarray:
        """blend: the frozen actions are the old chunk's, then a linear cross-fade from the old to the new
        chunk up to the execution horizon, the new chunk after it."""
        out = actions.copy()
        overlap = min(len(previous.actions), len(actions), max(self.execution_horizon, 1))
        frozen = previous.frozen_steps(len(actions))
        out[:frozen] = previous.actions[:frozen]
        span = overlap - frozen
        if span > 0:
            alpha = np.linspace(0.0, 1.0, span + 2, dtype=np.float32)[1:-1, None]  # new chunk's share
            old, new = previous.actions[frozen:overlap], actions[frozen:overlap]
            out[frozen:overlap] = (1.0 - alpha) * old + alpha * new
        return out

    def finish(self, actions: np.ndarray, previous: PreviousChunk | None) -> np.ndarray:
        """The host-side part of the mode, on a finished chunk [n, dof] in robot units: blend cross-fades;
        inpaint and rtc set the frozen actions to the old chunk's exactly (the denoising loop froze
        them in model space, where normalisation round-trips leave float rounding)."""
        if previous is None or self.mode == "switch":
            return actions
        if self.mode == "blend":
            return self.blend(actions, previous)
        out = actions.copy()
        frozen = previous.frozen_steps(len(actions))
        out[:frozen] = previous.actions[:frozen]
        return out


@dataclass(frozen=True)
class HandoverArrays:
    """What the guided denoising loop reads, in model space, all [horizon, action_dim] float32:
    previous actions (zero where there are none), the soft mask's weights (zero on dims the robot does
    not execute) and the frozen entries (1.0 / 0.0). Packed as one [3, H, A] array for one copy."""

    packed: np.ndarray

    @classmethod
    def none(cls, horizon: int, action_dim: int) -> HandoverArrays:
        """No previous chunk: weights and frozen entries zero, so every mode computes what switch does."""
        return cls(np.zeros((3, horizon, action_dim), dtype=np.float32))

    @classmethod
    def build(
        cls,
        handover: Handover,
        previous: PreviousChunk | None,
        model_actions: np.ndarray | None,
        horizon: int,
        action_dim: int,
        robot_action_dim: int,
    ) -> HandoverArrays:
        """`model_actions`: previous.actions in model space [n, action_dim] (PolicyParts.to_model_actions)."""
        arrays = cls.none(horizon, action_dim)
        if previous is None or model_actions is None or not handover.guided:
            return arrays
        n = min(len(model_actions), horizon)
        frozen = previous.frozen_steps(horizon)
        arrays.packed[0, :n] = model_actions[:n]
        weights = handover.prefix_weights(frozen, n, horizon)
        arrays.packed[1, :, :robot_action_dim] = weights[:, None]
        arrays.packed[2, :frozen, :robot_action_dim] = 1.0
        return arrays


def splice_metrics(old_actions: np.ndarray, executed: int, new_actions: np.ndarray, delay: int) -> dict:
    """How smoothly a new chunk took over, both chunks aligned to their own observation: the old chunk's
    actions [0:executed] ran before the new observation, its next `delay` ones while the new chunk was
    computed, then the new chunk from its action `delay`.

    jump: the distance between the last action executed from the old chunk and the first from the new;
    step: the old chunk's own distance between consecutive actions there (what a smooth hand-over looks
          like);
    deviation: the distance between the first action from the new chunk and the old chunk's action for
          the same time (the discontinuity itself, without the motion of one step);
    disagreement: the mean distance between the two chunks over the actions both cover after the splice.
    """
    if not 1 <= executed + delay <= len(old_actions) or not 0 <= delay < len(new_actions):
        raise ValueError(  # (a negative index would read the old chunk's last action, silently)
            f"splice: executed + delay must be in 1..{len(old_actions)} and delay in "
            f"0..{len(new_actions) - 1}, got executed {executed}, delay {delay}"
        )
    last_old = old_actions[executed + delay - 1]
    first_new = new_actions[delay]
    overlap = min(len(old_actions) - executed, len(new_actions))
    after = range(delay, overlap)
    disagreement = (
        float(np.mean([np.linalg.norm(new_actions[i] - old_actions[executed + i]) for i in after]))
        if len(after)
        else float("nan")
    )
    following = old_actions[executed + delay] if executed + delay < len(old_actions) else None
    nan = float("nan")
    return {
        "jump": float(np.linalg.norm(first_new - last_old)),
        "step": float(np.linalg.norm(following - last_old)) if following is not None else nan,
        "deviation": float(np.linalg.norm(first_new - following)) if following is not None else nan,
        "disagreement": disagreement,
    }
