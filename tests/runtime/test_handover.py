"""Chunk hand-over modes on tiny presets, fresh random inputs: the frozen prefix, the guidance, the clip,
no previous chunk = switch, the executor against the eager reference, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.handover import HANDOVER_MODES, SCHEDULES, Handover, PreviousChunk, splice_metrics
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation


@pytest.fixture(scope="module")
def parts():
    """pi05_tiny's parts, shared by every mode (the mode lives in the config, the weights in the model)."""
    return build_parts(RuntimeConfig(preset="pi05_tiny"))


def policy_for(parts, mode: str, **handover) -> EagerPolicy:
    config = parts.config.replace(handover=mode, **handover)
    return EagerPolicy(parts=type(parts)(**{**vars(parts), "config": config}))


def inputs(rng, parts, delay: int | None = None):
    cfg = parts.config
    noise = rng.standard_normal((cfg.model.action_horizon, cfg.model.action_dim), dtype=np.float32)
    old = rng.uniform(-1, 1, (cfg.model.chunk_length, cfg.robot_action_dim)).astype(np.float32)
    delay = int(rng.integers(1, cfg.model.chunk_length // 2)) if delay is None else delay
    return random_observation(rng, "pi05_tiny"), noise, PreviousChunk(old, delay)


def test_prefix_weights_freeze_then_decay_to_the_execution_horizon():
    for schedule in SCHEDULES:
        h = Handover("rtc", execution_horizon=8, schedule=schedule)
        w = h.prefix_weights(frozen=3, available=20, length=12)
        assert w.shape == (12,) and np.all(w[:3] == 1.0) and np.all(w[8:] == 0.0)
        assert np.all(np.diff(w) <= 0), (schedule, w)
        if schedule == "ones":
            assert np.all(w[3:8] == 1.0)
        elif schedule == "zeros":
            assert np.all(w[3:] == 0.0)
        else:
            assert np.all((w[3:8] > 0) & (w[3:8] < 1)), (schedule, w)
    exp = Handover(schedule="exp").prefix_weights(2, 20, 12)
    linear = Handover(schedule="linear").prefix_weights(2, 20, 12)
    assert np.all(exp[2:10] < linear[2:10])  # exp decays faster than linear
    # a previous chunk shorter than the horizon ends the guided region where it ends
    assert np.all(Handover(execution_horizon=10).prefix_weights(2, 5, 12)[5:] == 0.0)


def test_the_guidance_weight_is_clipped_and_follows_the_paper_elsewhere():
    times = np.array([1.0, 0.8, 0.5, 0.2, 0.05], dtype=np.float32)
    for clip in (0.5, 3.0, 10.0, 1000.0):
        w = Handover("rtc", max_guidance_weight=clip).guidance_weights(times)
        assert w[0] == pytest.approx(clip)  # infinite at t = 1 (pure noise): the clip
        assert np.all(w <= clip + 1e-6)
        tau = 1.0 - times[1:].astype(np.float64)  # the paper's time: 0 noise, 1 data
        paper = (1 - tau) / tau / ((1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2))
        np.testing.assert_allclose(w[1:], np.minimum(paper, clip), rtol=1e-5)


@pytest.mark.parametrize("mode", ["inpaint", "rtc", "blend"])
def test_the_frozen_prefix_is_the_previous_chunk_exactly(parts, rng, mode):
    obs, noise, previous = inputs(rng, parts)
    chunk = policy_for(parts, mode).infer(obs, noise, previous)
    d = previous.delay_steps
    np.testing.assert_array_equal(chunk.actions[:d], previous.actions[:d])
    assert chunk.frozen_steps == d and chunk.handover == mode


@pytest.mark.parametrize("mode", ["inpaint", "rtc"])
def test_the_denoising_loop_itself_freezes_the_prefix(parts, rng, mode, monkeypatch):
    """Without the host-side copy of the frozen actions (Handover.finish), the loop's output already
    holds them (no normalisation here: model space is robot space on the robot's dims)."""
    monkeypatch.setattr(Handover, "finish", lambda self, actions, previous: actions)
    obs, noise, previous = inputs(rng, parts)
    d = previous.delay_steps
    actions = policy_for(parts, mode).infer(obs, noise, previous).actions
    np.testing.assert_array_equal(actions[:d], previous.actions[:d])
    switch = policy_for(parts, "switch").infer(obs, noise, previous).actions
    assert not np.allclose(switch[:d], previous.actions[:d])  # the check above can fail


def test_rtc_guides_the_next_actions_toward_the_previous_chunk(parts, rng):
    """Same inputs and noise: the guided region (after the frozen actions, up to the execution horizon)
    is closer to the previous chunk with rtc than with switch, and than with inpaint (freezing alone)."""
    distance = {}
    for _ in range(3):
        obs, noise, previous = inputs(rng, parts)
        d, end = previous.delay_steps, parts.config.rtc_execution_horizon
        for mode in ("switch", "inpaint", "rtc"):
            actions = policy_for(parts, mode).infer(obs, noise, previous).actions
            gap = np.abs(actions[d:end] - previous.actions[d:end]).mean()
            distance[mode] = distance.get(mode, 0.0) + gap
    assert distance["rtc"] < 0.7 * distance["switch"], distance
    assert distance["rtc"] < distance["inpaint"], distance


def test_guidance_with_the_identity_jacobian_still_guides(parts, rng):
    """rtc_vjp_steps 0 (no backward pass): closer to the previous chunk than switch, and not the exact
    loop's actions (the setting reaches the loop)."""
    gap = {"switch": 0.0, "identity": 0.0}
    for _ in range(3):
        obs, noise, previous = inputs(rng, parts)
        d, end = previous.delay_steps, parts.config.rtc_execution_horizon
        switch = policy_for(parts, "switch").infer(obs, noise, previous).actions
        identity = policy_for(parts, "rtc", rtc_vjp_steps=0).infer(obs, noise, previous).actions
        exact = policy_for(parts, "rtc", rtc_vjp_steps=10).infer(obs, noise, previous).actions
        assert np.abs(identity - exact).max() > 1e-4
        gap["switch"] += np.abs(switch[d:end] - previous.actions[d:end]).mean()
        gap["identity"] += np.abs(identity[d:end] - previous.actions[d:end]).mean()
    assert gap["identity"] < 0.7 * gap["switch"], gap


def test_the_identity_jacobian_equals_the_exact_product_where_it_is_exact(parts, rng, monkeypatch):
    """A velocity that does not depend on x_t makes d x0_hat / d x_t the identity: then every split
    between exact and identity steps gives the same actions."""
    bias = float(rng.uniform(-1, 1))

    def velocity(workspace, prefix_len, attn_bias, cos, sin, state, x_t, cond):
        return torch.full_like(x_t, bias) + cond.mean()

    monkeypatch.setattr(parts.model, "velocity", velocity)
    obs, noise, previous = inputs(rng, parts)
    results = [
        policy_for(parts, "rtc", rtc_vjp_steps=k).infer(obs, noise, previous).actions for k in (0, 3, 10)
    ]
    np.testing.assert_allclose(results[0], results[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[1], results[2], rtol=1e-5, atol=1e-5)


def test_the_clip_reaches_the_loop(parts, rng):
    """A tiny clip makes rtc's guidance vanish (inpaint's actions); the default clip does not."""
    obs, noise, previous = inputs(rng, parts)
    inpaint = policy_for(parts, "inpaint").infer(obs, noise, previous).actions
    weak = policy_for(parts, "rtc", rtc_max_guidance_weight=1e-2).infer(obs, noise, previous).actions
    strong = policy_for(parts, "rtc").infer(obs, noise, previous).actions
    assert np.abs(weak - inpaint).max() < 0.05 * np.abs(strong - inpaint).max()


@pytest.mark.parametrize("mode", HANDOVER_MODES)
def test_with_no_previous_chunk_every_mode_is_switch(parts, rng, mode):
    obs, noise, _ = inputs(rng, parts)
    expected = policy_for(parts, "switch").infer(obs, noise).actions
    chunk = policy_for(parts, mode).infer(obs, noise, None)
    np.testing.assert_array_equal(chunk.actions, expected)
    assert chunk.frozen_steps == 0


@pytest.mark.parametrize("mode", ["blend", "rtc"])
def test_the_executor_equals_the_reference(parts, rng, mode):
    reference = policy_for(parts, mode)
    with PipelinedExecutor(parts=reference.parts) as executor:
        for _ in range(3):
            obs, noise, previous = inputs(rng, parts)
            got = executor.infer(obs, noise, previous)
            want = reference.infer(obs, noise, previous)
            np.testing.assert_allclose(got.actions, want.actions, rtol=1e-5, atol=1e-5)
            assert got.frozen_steps == want.frozen_steps == previous.delay_steps


def test_a_bad_previous_chunk_names_the_field_and_the_executor_keeps_serving(parts, rng):
    obs, noise, previous = inputs(rng, parts)
    bad = {
        "previous.actions: expected shape": PreviousChunk(previous.actions[:, :3], 2),
        "previous.actions: contains NaN": PreviousChunk(np.full_like(previous.actions, np.nan), 2),
        "previous.delay_steps": PreviousChunk(previous.actions, -1),
    }
    with PipelinedExecutor(parts=policy_for(parts, "rtc").parts) as executor:
        for message, wrong in bad.items():
            with pytest.raises(ValueError, match=message.replace(".", r"\.")):
                executor.submit(obs, noise, previous=wrong)
        assert executor.infer(obs, noise, previous).frozen_steps == previous.delay_steps


def test_settings_are_checked_where_they_are_declared():
    with pytest.raises(ValueError, match="handover: must be one of"):
        RuntimeConfig(handover="crossfade")
    with pytest.raises(ValueError, match="rtc_schedule"):
        RuntimeConfig(rtc_schedule="cubic")
    with pytest.raises(ValueError, match="rtc_max_guidance_weight"):
        RuntimeConfig(rtc_max_guidance_weight=0.0)
    with pytest.raises(ValueError, match="rtc_vjp_steps"):
        RuntimeConfig(rtc_vjp_steps=-1)
    fp8_expert = dict(device="cuda", precision="fp8", fp8_expert=True, handover="rtc")
    with pytest.raises(ValueError, match="rtc with rtc_vjp_steps > 0 .* set rtc_vjp_steps 0"):
        RuntimeConfig(**fp8_expert)  # the default: 2 exact steps, a backward pass the FP8 GEMMs lack
    assert RuntimeConfig(**fp8_expert, rtc_vjp_steps=0).handover_settings.vjp_steps == 0


def test_splice_metrics_measure_the_jump_at_the_hand_over():
    old = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # a straight line
    smooth = old[5:].copy()  # the new chunk continues the old one exactly
    m = splice_metrics(old, executed=5, new_actions=smooth, delay=2)
    assert m["jump"] == pytest.approx(np.sqrt(2)) == pytest.approx(m["step"]) and m["disagreement"] == 0.0
    assert m["deviation"] == 0.0
    shifted = smooth + 3.0
    m = splice_metrics(old, executed=5, new_actions=shifted, delay=2)
    assert m["deviation"] == pytest.approx(np.linalg.norm([3.0, 3.0]))
    assert m["jump"] == pytest.approx(np.linalg.norm([4.0, 4.0])) and m["disagreement"] == pytest.approx(
        np.linalg.norm([3.0, 3.0])
    )
    with pytest.raises(ValueError, match="splice: executed \\+ delay must be in 1..10"):
        splice_metrics(old, executed=0, new_actions=smooth, delay=0)  # nothing of the old chunk ran
    with pytest.raises(ValueError, match="delay in 0..4, got executed 5, delay 5"):
        splice_metrics(old, executed=5, new_actions=smooth, delay=5)  # past the new chunk's end


def test_a_denoise_engine_refuses_what_changes_the_loop(parts):
    def engine(slot):
        slot.actions.zero_()

    for mode, adaptive in (("rtc", False), ("inpaint", False), ("switch", True)):
        config_parts = type(parts)(
            **{**vars(parts), "config": parts.config.replace(handover=mode, adaptive_steps=adaptive)}
        )
        with pytest.raises(ValueError, match="engines: a denoise engine runs its own loop"):
            PipelinedExecutor(parts=config_parts, engines={"denoise": engine})
    with PipelinedExecutor(parts=parts, engines={"denoise": engine}) as executor:
        obs = random_observation(np.random.default_rng(), "pi05_tiny")
        with pytest.raises(ValueError, match="steps: the denoise engine runs its own loop"):
            executor.submit(obs, steps=2)
        assert np.all(executor.infer(obs).actions == 0.0)
