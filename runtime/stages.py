"""The three stages of one shape profile, run against that profile's static buffers.

Each stage reads and writes only tensors of one `DeviceSlot`, so it can be captured in a CUDA graph per
slot and replayed on its own stream. Without CUDA the same functions run eagerly, in order.

Memory pools: one private graph pool per *stage*. A stage's graphs (both slots, every profile) replay
on one stream, one at a time, so they may share temporaries; graphs of different stages replay
concurrently on different streams, so they must never share a pool. Outputs are copied into the static
buffers, which live outside every pool.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..graphs.pi0 import EAGER_LAYERS, PI0Model, time_schedule
from .buffers import (
    BATCH_PROFILE_SETS,
    PIPELINE_SLOTS,
    PROMPT_BUCKETS,
    DeviceSlot,
    ShapeProfile,
    StaticBuffers,
)
from .handover import Handover, RtcGuidance
from .inputs import pixels_to_model_input
from .precompiled import PrecompiledFunction, aot_compile_available

log = logging.getLogger(__name__)

STAGES = ("vision", "prefix", "denoise")


def stage_shapes(cameras: int) -> int:
    """How many input shapes one compiled stage function can meet: every batch profile (of any set: the
    compiled functions are shared by the executors of a process), camera count and prompt length (the
    buckets and the full length)."""
    profiles = set().union(*BATCH_PROFILE_SETS.values())
    return len(profiles) * cameras * (len(PROMPT_BUCKETS) + 1)


def compile_limits(cameras: int) -> dict:
    """Dynamo's settings while a stage compiles. Past its recompile_limit (8 by default) a compiled function
    runs eagerly for every further shape, without a word: with shape and batch profiles a stage meets more
    shapes than that (measured: pi05 with two cameras and batches up to 8 lost half its throughput). Each
    shape may take several entries (the denoise loop's first step reads a plain tensor, the later ones
    inference tensors; rtc's loop runs with grad; several executors in one process share the functions'
    entries), so the limit leaves room for 8 per shape; past it, compiling is an error, not slow."""
    shapes = stage_shapes(cameras)
    return {
        "recompile_limit": 8 * shapes,
        "accumulated_recompile_limit": 24 * shapes,
        "fail_on_recompile_limit_hit": True,
    }


def within_compile_limits(compiled, cameras: int):
    """`compiled` (a torch.compile'd stage) called under `compile_limits`, which apply to its compiles only
    (dynamo's settings are restored after each call)."""
    limits = compile_limits(cameras)

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(**limits):
            return compiled(*args, **kwargs)

    return call


# Inductor's options by stage, each kept because it won measured in place (benchmarks/stage_experiments.py,
# one run: pi05, FP8 expert, H200, 2026-12-01, 48540c0). Combo kernels fuse the denoise loop's independent
# small kernels side by side (a layer's query and key RoPE): 2107 kernels a loop instead of 2287, a 7.68 ms
# graph instead of 7.93. Hopper's programmatic dependent launch (`triton.enable_pdl`) lost in that run
# (8.35 ms, the same kernel time): not used.
INDUCTOR_OPTIONS = {"denoise": {"combo_kernels": True}}


class CompiledFunctions:
    """The compiled functions that an executor's profiles share, by name. With `directory` (the compile
    cache's), each is a `PrecompiledFunction` whose artifacts are kept there between starts; without,
    torch.compile traces each at every start. `options`: Inductor's options by stage (an experiment may
    give {} to compile every stage with Inductor's configuration as it stands)."""

    def __init__(self, directory: Path | None = None, options: dict[str, dict] | None = None):
        self.options = INDUCTOR_OPTIONS if options is None else options
        if directory is not None and not aot_compile_available():
            log.warning(
                "precompile: this torch (%s) has no aot_compile; tracing at every start", torch.__version__
            )
            directory = None
        self.directory = directory
        self.functions: dict[str, Callable] = {}

    def get(self, name: str, fn: Callable, cameras: int, stage: str | None = None) -> Callable:
        """`fn` compiled with `stage`'s Inductor options, made once per name; `cameras` sizes torch.compile's
        recompile limits (the traced path: the precompiled one has no recompiles)."""
        if name not in self.functions:
            options = self.options.get(stage)
            traced = within_compile_limits(torch.compile(fn, dynamic=False, options=options), cameras)
            self.functions[name] = (
                traced
                if self.directory is None
                else PrecompiledFunction(fn, name, self.directory, traced, options)
            )
        return self.functions[name]

    def counts(self) -> dict[str, int]:
        """Signatures met so far, loaded from an earlier run or compiled and saved; fallback: signatures
        traced, and reasons calls were traced."""
        total = Counter()
        for fn in self.functions.values():
            total.update(getattr(fn, "counts", {}))
        return dict(total)


class StageEngine(Protocol):
    """Serves one stage for one pipeline slot: reads that slot's inputs, writes its outputs in place, on
    the current CUDA stream, without allocating or synchronising (so it can be captured in a graph).

    vision : slot.pixels [B, V, S, S, 3] uint8           -> slot.image_tokens [B, V*T, D]
    prefix : slot.image_tokens, image_masks, tokens, token_masks -> slot.kv_cache, slot.prefix_mask
    denoise: slot.kv_cache, prefix_mask, state, noise, handover -> slot.actions [B, H, A] float32

    A denoise engine runs its own loop: the executor refuses it with adaptive steps, a step count other
    than the configured one, or a hand-over mode that changes the loop (inpaint, rtc).
    """

    def __call__(self, slot: DeviceSlot) -> None: ...


@dataclass
class DenoiseSchedule:
    """What the denoising loop of one step count reads besides the slot: its times, the per-step time
    conditioning (made once: it depends on the weights and times alone) and rtc's guidance."""

    steps: int
    times: torch.Tensor  # [steps] on the device
    host_times: list[float]  # the same, as constants of the guided loop
    dt: float
    step_conds: list[torch.Tensor]
    guidance: RtcGuidance | None  # rtc only


class StageRunner:
    """The stages of one input shape (views, prompt length, batch): its buffers, vision and prefix graphs,
    and a denoise graph per step count (`add_steps`): fewer steps re-capture the denoise stage only."""

    def __init__(
        self,
        model: PI0Model,
        buffers: StaticBuffers,
        device: torch.device,
        compile_stages: tuple[str, ...] | bool = (),
        compiled: CompiledFunctions | None = None,
        compile_scope: str = "stage",
        engines: dict[str, StageEngine] | None = None,
        handover: Handover | None = None,
    ):
        self.model = model
        self.buffers = buffers
        self.profile: ShapeProfile = buffers.profile
        self.device = device
        # The hand-over mode picks the denoising loop once: the plain loop unless inpaint or rtc.
        self.handover = handover or Handover()
        self.schedules: dict[int, DenoiseSchedule] = {}
        self.schedule = self.add_steps(self.profile.steps)  # the one the denoise body runs
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        # Inductor fuses a stage's elementwise chains (norms, RoPE, GeGLU, gated residuals) into a few
        # kernels; the CUDA graph then removes the launch gaps. `compile_stages` names the stages to
        # compile (True: all). The compiled functions are shared by every profile (`compiled`), so a new
        # profile recompiles only for new shapes.
        if compile_stages is True:
            compile_stages = STAGES
        compiled = CompiledFunctions() if compiled is None else compiled
        if compile_scope == "layer":
            self.fns = self._layer_compiled(model, compile_stages or (), compiled)
        else:
            self.fns = self._stage_compiled(model, compile_stages or (), compiled)
        # The stage-engine seam: whatever serves a stage reads and writes only the slot's tensors. By
        # default the model's own code (compiled or not); an external engine can take a stage's place.
        self.engines: dict[str, StageEngine] = {
            "vision": self._vision,
            "prefix": self._prefix,
            "denoise": self._denoise,
            **(engines or {}),
        }

    @staticmethod
    def _stage_compiled(model: PI0Model, stages, compiled: CompiledFunctions) -> dict:
        """The stage functions, those of `stages` compiled whole (Inductor fuses across layers)."""
        stage_of = {"encode": "vision", "fill": "prefix", "velocity": "denoise"}
        fns = {"encode": model.encode_images, "fill": model.fill_prefix, "velocity": model.velocity}
        cameras = len(model.cfg.camera_names)
        for name, fn in list(fns.items()):
            if stage_of[name] in stages:
                fns[name] = compiled.get(name, fn, cameras, stage_of[name])
        return fns

    @staticmethod
    def _layer_compiled(model: PI0Model, stages, compiled: CompiledFunctions) -> dict:
        """The stage functions with the per-layer bodies of `stages` compiled (regional compilation: one
        compile serves every layer of a stack, so a start traces one layer per stack, not the stack)."""
        layer_fns_of = {
            "vision": ("vision",),
            "prefix": ("prefix", "prefix_kv"),
            "denoise": ("expert", "head"),
        }
        cameras = len(model.cfg.camera_names)
        chosen = {}
        for stage in stages:
            for name in layer_fns_of[stage]:
                chosen[name] = compiled.get(f"layer-{name}", getattr(EAGER_LAYERS, name), cameras, stage)
        layers = dataclasses.replace(EAGER_LAYERS, **chosen)
        return {
            "encode": functools.partial(model.encode_images, layers=layers),
            "fill": functools.partial(model.fill_prefix, layers=layers),
            "velocity": functools.partial(model.velocity, layers=layers),
        }

    def add_steps(self, steps: int) -> DenoiseSchedule:
        """The schedule of `steps` denoising steps (made once; `capture` captures its graphs)."""
        if steps not in self.schedules:
            times, dt = time_schedule(steps)
            on_device = torch.from_numpy(times).to(self.device)
            # Made under no_grad, not in inference mode: the rtc loop differentiates through the expert,
            # which reads them.
            with torch.inference_mode(False), torch.no_grad():
                conds = self.model.step_conditioning(on_device, self.profile.batch)
            self.schedules[steps] = DenoiseSchedule(
                steps, on_device, times.tolist(), dt, conds, self.handover.guidance(times)
            )
        return self.schedules[steps]

    def forget_steps(self, steps: int) -> None:
        """Undo `add_steps` (its capture failed): the schedule and any graph captured for it."""
        self.schedules.pop(steps, None)
        for slot in range(PIPELINE_SLOTS):
            self.graphs.pop(self._key("denoise", slot, steps), None)

    # Eager stage bodies: write the slot's outputs in place.
    def _vision(self, d: DeviceSlot) -> None:
        d.image_tokens.copy_(self.fns["encode"](pixels_to_model_input(d.pixels)))

    def _prefix(self, d: DeviceSlot) -> None:
        # The RoPE tables are computed here, outside the compiled function: inside it, Inductor inlines
        # their cos/sin into every layer's RoPE kernel and recomputes them 18 times.
        rope = self.model.prefix_rope(self.model.prefix_validity(d.image_masks, d.token_masks))
        # The compiled function returns the cache and it is copied once: written into the slot layer by
        # layer inside it, Inductor adds a slow strided copy per layer (4.69 vs 4.89 ms, FP8 prefix, H100).
        kv, pad = self.fns["fill"](d.image_tokens, d.image_masks, d.tokens, d.token_masks, rope=rope)
        d.kv_cache.copy_(kv)
        d.prefix_mask.copy_(pad)

    def _denoise(self, d: DeviceSlot) -> None:
        s = self.schedule
        if self.handover.guided:
            d.actions.copy_(
                self.model.denoise_guided(
                    d.kv_cache,
                    d.prefix_mask,
                    d.state,
                    d.noise,
                    s.host_times,
                    s.dt,
                    s.step_conds,
                    d.handover,
                    s.guidance,
                    self.fns["velocity"],
                )
            )
            return
        d.actions.copy_(
            self.model.denoise(
                d.kv_cache,
                d.prefix_mask,
                d.state,
                d.noise,
                s.times,
                s.dt,
                s.step_conds,
                self.fns["velocity"],
            )
        )

    @staticmethod
    def _key(stage: str, slot: int, steps: int) -> tuple:
        return (stage, slot, steps) if stage == "denoise" else (stage, slot)

    def run(self, stage: str, slot: int, steps: int | None = None) -> None:
        """Replay the captured graph when there is one (on the current stream), else run eagerly. `steps`
        (denoise; default the profile's) must have been added with `add_steps`."""
        steps = steps or self.profile.steps
        graph = self.graphs.get(self._key(stage, slot, steps))
        if graph is not None:
            graph.replay()
        else:
            self.schedule = self.schedules[steps]
            self.engines[stage](self.buffers.device_slots[slot])

    @torch.inference_mode()
    def capture(
        self,
        streams: dict[str, torch.cuda.Stream],
        pools: dict[str, tuple],
        stages=STAGES,
        steps: tuple[int, ...] | None = None,
    ) -> int:
        """Capture `stages` (default: all) for both slots, the denoise stage for each of `steps` (default:
        every added schedule). Returns the number of graphs captured."""
        count = 0
        for stage in stages:
            body, stream = self.engines[stage], streams[stage]
            for n in (steps or tuple(self.schedules)) if stage == "denoise" else (self.profile.steps,):
                self.schedule = self.schedules[n]
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up outside capture: cuBLAS handles, lazy kernel loading
                        body(self.buffers.device_slots[0])
                stream.synchronize()
                for slot in range(PIPELINE_SLOTS):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(
                        graph, pool=pools[stage], stream=stream, capture_error_mode="thread_local"
                    ):
                        body(self.buffers.device_slots[slot])
                    self.graphs[self._key(stage, slot, n)] = graph
                    count += 1
        torch.cuda.synchronize()
        log.info("captured %d graphs for %s (%s)", count, self.profile, ", ".join(stages))
        return count
