"""Shape profiles on the CPU (tiny presets, fresh random inputs): a frame runs the smallest shape that
holds it (the cameras present, the prompt padded to a bucket) and gets the actions of the full shape."""

from __future__ import annotations

import time

import numpy as np
import pytest
from vla_runtime.runtime.buffers import PROMPT_BUCKETS, prompt_bucket
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy
from vla_runtime.runtime.stages import StageRunner, compile_limits, stage_shapes, within_compile_limits
from vla_runtime.runtime.types import Observation

from ..conftest import random_observation


def test_prompt_buckets():
    assert [prompt_bucket(n, 200) for n in (1, 32, 33, 64, 65, 128, 129, 200)] == [
        32,
        32,
        64,
        64,
        128,
        128,
        200,
        200,
    ]
    assert prompt_bucket(40, 48) == 48 and PROMPT_BUCKETS == (32, 64, 128)


@pytest.mark.parametrize("preset", ["pi05_tiny", "pi0_tiny"])
def test_small_shapes_give_the_full_shapes_actions(preset):
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset=preset, shape_profiles=True, max_batch=2))
    reference = EagerPolicy(parts=parts)
    cfg = parts.config.model
    optional = parts.config.optional_camera_names[0]
    cases = []
    for repeats in (
        1,
        4,
        10,
        25,
        60,
    ):  # prompts of different buckets (those over the model's length left out)
        for skip in ((), (optional,)):
            obs = random_observation(rng, preset, skip=skip)
            text = " ".join(["red"] * repeats)
            obs = Observation(obs.images, obs.state, text, obs.timestamp)
            try:
                parts.preparer(obs)
            except ValueError:
                continue
            noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
            cases.append((obs, noise))
    assert len(cases) >= 4
    with PipelinedExecutor(parts=parts) as executor:
        for obs, noise in cases:
            got = executor.infer(obs, noise).actions
            np.testing.assert_allclose(got, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5)
        # a batch of two robots with different cameras and prompts: each row in its own compacted layout
        (a, noise_a), (b, noise_b) = cases[1], cases[2]
        futures = executor.submit_batch([a, b], [noise_a, noise_b])
        for (obs, noise), future in zip([(a, noise_a), (b, noise_b)], futures, strict=True):
            np.testing.assert_allclose(
                future.result(timeout=120).actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5
            )
        shapes = {(p["views"], p["prompt_len"]) for p in executor.report()["profiles"]}
    assert any(views == 2 for views, _ in shapes), shapes  # the optional camera's absence saved a view
    assert any(length < cfg.max_token_len for _, length in shapes), shapes  # and a short prompt, tokens


def test_infer_waits_for_a_new_shapes_capture_longer_than_the_device_timeout(monkeypatch):
    """A new shape's compilation and capture can take a minute on a GPU, longer than infer's wait for a
    frame on the device; infer waits it out instead of raising TimeoutError."""
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", shape_profiles=True))
    with PipelinedExecutor(parts=parts) as executor:
        # infer's wait for one frame made short; the device timeout (the watchdog's) left as it is
        monkeypatch.setattr(executor, "_idle_timeout", lambda: 0.3)
        build = StageRunner.__init__
        slow = 3 * executor._idle_timeout()

        def slow_build(self, *args, **kwargs):
            time.sleep(slow)
            build(self, *args, **kwargs)

        monkeypatch.setattr(StageRunner, "__init__", slow_build)
        obs = random_observation(rng, "pi05_tiny", skip=parts.config.optional_camera_names[:1])
        profiles = len(executor.report()["profiles"])
        assert executor.infer(obs).actions.shape[0] == parts.config.model.chunk_length
        assert len(executor.report()["profiles"]) == profiles + 1  # the frame needed a new shape


def test_a_compiled_stage_meets_every_profiles_shape_compiled_and_one_more_is_an_error():
    """Dynamo's default recompile limit (8) would run every further shape eagerly without a word; a
    stage as StageRunner compiles it compiles each profile's shape (with room for several entries per
    shape) and fails loudly past its limit; dynamo's own settings are left as they were."""
    import torch

    before = dict(torch._dynamo.config.get_config_copy())
    limit = compile_limits(cameras=1)["recompile_limit"]
    assert limit >= 2 * stage_shapes(cameras=1) > 8

    def stage(x):  # a fresh code object: dynamo counts compiles per code object
        return x * 2 + 1

    compiled = within_compile_limits(torch.compile(stage, backend="eager", dynamic=False), cameras=1)
    for n in range(1, limit + 1):  # one shape per profile and more, all compiled
        assert torch.equal(compiled(torch.ones(n)), torch.full((n,), 3.0))
    with pytest.raises(Exception, match="recompile"):
        compiled(torch.ones(limit + 1))
    assert dict(torch._dynamo.config.get_config_copy()) == before


def test_a_robots_prompt_bucket_follows_its_instruction_not_its_state():
    """pi0.5 writes the state into the prompt, so the token count changes with the state's digits from
    frame to frame; the bucket is sized for the widest state, so one robot stays in one shape (a new shape
    is a capture, seconds with the device idle on a GPU)."""
    rng = np.random.default_rng()
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", shape_profiles=True))
    assert parts.config.model.prompt_has_state
    base = random_observation(rng, "pi05_tiny")
    frames = [
        Observation(base.images, rng.uniform(-1, 1, base.state.shape).astype(np.float32), "pick it", 0.0)
        for _ in range(30)
    ]
    frames.append(Observation(base.images, np.zeros_like(base.state), "pick it", 0.0))  # a narrow state
    prepared = [parts.preparer(obs) for obs in frames]
    counts = {int(p.token_masks.sum()) for p in prepared}
    assert len(counts) > 1, counts  # the state's digits change the prompt's length
    assert len({p.prompt_room for p in prepared}) == 1 and prepared[0].prompt_room >= max(counts)
    with PipelinedExecutor(parts=parts) as executor:
        before = len(executor.report()["profiles"])
        for obs in frames[:6]:
            executor.infer(obs)
        assert len(executor.report()["profiles"]) == before + 1  # one shape for all of them


def test_shapes_captured_ahead_serve_their_frames_and_others_run_larger_without_a_capture():
    """A robot's configuration names its shapes (ahead_shapes): they are captured at start; with
    capture_new_shapes false a frame of another shape runs in the smallest captured one that holds it
    (no capture, no stall), with the same actions as the eager reference."""
    rng = np.random.default_rng()
    wrists = ("left_wrist_0_rgb", "right_wrist_0_rgb")
    config = RuntimeConfig(
        preset="pi05_tiny",
        shape_profiles=True,
        ahead_shapes="2x32, 2x64",
        capture_new_shapes=False,
        optional_cameras=wrists,
    )
    parts = build_parts(config)
    reference = EagerPolicy(parts=parts)
    full = (config.model.num_views, config.model.max_token_len)
    assert config.ahead_shape_sizes == ((2, 32), (2, 64))
    two_cameras = random_observation(rng, "pi05_tiny", skip=wrists[1:])
    one_camera = random_observation(rng, "pi05_tiny", skip=wrists)
    long_prompt = Observation(two_cameras.images, two_cameras.state, " ".join(["red"] * 20), 0.0)
    with PipelinedExecutor(parts=parts) as executor:
        captured = {(p["views"], p["prompt_len"]) for p in executor.report()["profiles"]}
        assert captured == {full, (2, 32), (2, 64)}
        captures = executor.report()["counters"]["captures"]
        for obs in (two_cameras, one_camera, long_prompt):
            noise = rng.standard_normal(
                (config.model.action_horizon, config.model.action_dim), dtype=np.float32
            )
            got = executor.infer(obs, noise)
            np.testing.assert_allclose(got.actions, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5)
        report = executor.report()
    assert report["counters"]["captures"] == captures  # nothing captured while serving (on a GPU)
    assert {(p["views"], p["prompt_len"]) for p in report["profiles"]} == captured  # no shape added
    assert parts.preparer(long_prompt).prompt_room > 64
    # one camera ran in a captured two-camera shape (or the full one), the long prompt in the full shape;
    # the two cameras in their own captured shape, unless their prompt passed 64 tokens
    assert report["counters"]["larger_shape"] == 2 + (parts.preparer(two_cameras).prompt_room > 64)


@pytest.mark.parametrize(
    ("ahead", "message"),
    [("2y64", "CAMERASxTOKENS"), ("4x64", "cameras"), ("2x999", "tokens"), ("x64", "CAMERASxTOKENS")],
)
def test_bad_ahead_shapes_name_the_setting(ahead, message):
    with pytest.raises(ValueError, match=f"ahead_shapes: .*{message}"):
        RuntimeConfig(preset="pi05_tiny", shape_profiles=True, ahead_shapes=ahead)
    with pytest.raises(ValueError, match="ahead_shapes: .*need shape_profiles"):
        RuntimeConfig(preset="pi05_tiny", ahead_shapes="2x64")


@pytest.mark.parametrize("scope", ["stage", "layer"])
def test_an_executor_compiles_each_stage_a_few_times_per_shape_within_its_limits(monkeypatch, scope):
    """The stages as the executor compiles them (dynamo with its eager backend here: the guards are what
    count, not the kernels): each shape met takes at most a few entries per compiled function, well inside
    compile_limits; compiled per layer, one function serves every layer of a stack (entries do not grow
    with the depth); either way the compiled stages give the eager reference's actions."""
    import functools

    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from vla_runtime.graphs import pi0

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    rng = np.random.default_rng()
    # compile_cache none: torch.compile traces at every start (the path precompiled artifacts replace)
    config = RuntimeConfig(preset="pi05_tiny", shape_profiles=True, compile_stages=True, compile_scope=scope)
    config = config.replace(compile_cache="none")
    parts = build_parts(config)
    reference = EagerPolicy(parts=parts)
    skip = config.optional_camera_names[:1]
    frames = [random_observation(rng, "pi05_tiny", skip=s) for s in ((), skip, (), skip)]
    with PipelinedExecutor(parts=parts) as executor:
        for obs in frames:
            noise = rng.standard_normal(
                (config.model.action_horizon, config.model.action_dim), dtype=np.float32
            )
            got = executor.infer(obs, noise).actions
            np.testing.assert_allclose(got, reference.infer(obs, noise).actions, rtol=1e-4, atol=1e-5)
        shapes = len(executor.report()["profiles"])
    limit = compile_limits(len(config.model.camera_names))["recompile_limit"]
    if scope == "stage":
        compiled = [pi0.PI0Model.encode_images, pi0.PI0Model.fill_prefix, pi0.PI0Model.velocity]
    else:
        compiled = [
            pi0.call_layer,
            pi0.prefix_layer,
            pi0.prefix_layer_kv,
            pi0.expert_layer,
            pi0.velocity_head,
        ]
        assert config.model.expert.depth > 1 and config.model.vision.depth > 1  # layers share a compile
    for fn in compiled:
        entries = len(_debug_get_cache_entry_list(fn.__code__))
        assert 1 <= entries <= shapes < limit, (fn.__name__, entries, shapes)  # one entry per shape
    torch._dynamo.reset()


def test_one_layer_compile_serves_every_layer_of_a_stack():
    """Regional compilation's premise: the layers of a stack share one compiled entry (dynamo guards on
    their parameters' shapes, not on which layer it is), so start-up traces one layer per stack."""
    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from vla_runtime.graphs import pi0
    from vla_runtime.graphs.layers import attention_bias, prefix_lm_mask

    torch._dynamo.reset()
    model = build_parts(RuntimeConfig(preset="pi05_tiny")).model
    vision, lm = model.vision.encoder.layers, model.prefix_lm.layers
    assert len(vision) > 1 and len(lm) > 1
    run_vision = torch.compile(pi0.call_layer, backend="eager", dynamic=False)
    run_prefix = torch.compile(pi0.prefix_layer, backend="eager", dynamic=False)
    with torch.inference_mode():  # as the stages run (an input made outside it would be guarded apart)
        x = torch.randn(1, 16, model.cfg.vision.width)
        want, got = x, x
        for layer in vision:
            want, got = layer(want), run_vision(layer, got)
        torch.testing.assert_close(got, want)
        valid = torch.ones(1, 12, dtype=torch.bool)
        cos, sin = model.prefix_rope(valid)
        bias = attention_bias(prefix_lm_mask(valid, torch.zeros(12, dtype=torch.int32)), model.compute_dtype)
        h = torch.randn(1, 12, model.cfg.prefix_lm.width, dtype=model.compute_dtype)
        want, got = h, h
        for layer in lm:
            (kv_want, want), (kv_got, got) = (
                pi0.prefix_layer(layer, want, cos, sin, bias),
                run_prefix(layer, got, cos, sin, bias),
            )
            torch.testing.assert_close(kv_got, kv_want)
        torch.testing.assert_close(got, want)
    assert len(_debug_get_cache_entry_list(pi0.call_layer.__code__)) == 1
    assert len(_debug_get_cache_entry_list(pi0.prefix_layer.__code__)) == 1
    torch._dynamo.reset()


def test_the_denoising_loop_is_compiled_once_per_shape(monkeypatch):
    """Every Euler step's x_t is the same kind of tensor (the loop copies the noise buffer, which is
    allocated outside inference mode): a compiled velocity is traced once per shape, not twice."""
    import functools

    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from vla_runtime.graphs.pi0 import PI0Model

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    rng = np.random.default_rng()
    config = RuntimeConfig(preset="pi05_tiny", compile_stages=True, compile_cache="none")  # traced each start
    with PipelinedExecutor(config) as executor:
        for _ in range(2):
            executor.infer(random_observation(rng, "pi05_tiny"))
        assert len(executor.report()["profiles"]) == 1
    assert len(_debug_get_cache_entry_list(PI0Model.velocity.__code__)) == 1
    torch._dynamo.reset()
