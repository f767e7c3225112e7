"""Real-size checkpoints on the GPU: pi05 and pi0 written as openpi's converter writes them (bf16 tensors, a
config.json of five keys), their model derived from config.json and the tensor header alone (no preset),
served with the actions of the model they were saved from; FP8 scales calibrated on a recorded LIBERO
episode (VLA_RECORDING), its accuracy gates on those observations and on random ones, and a scales file
refused for another checkpoint."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from vla_runtime.graphs.checkpoint import inspect_checkpoint
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.tokenizer import demo_tokenizer_path
from vla_runtime.graphs.weights import build_model, save_checkpoint
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation

# Random weights come with no PaliGemma tokenizer: the demo tokenizer stands in (its ids fit the vocabulary).
TOKENIZER = str(demo_tokenizer_path())
# (directory, preset, the horizon its training config uses, its prompt has the state): openpi's pi05_libero
# (10, trained without the state in the prompt) and pi0_libero (50; pi0 has a state token instead).
CHECKPOINTS = {
    "pi05": ("pi05_libero_pytorch", "pi05", 10, False),
    "pi0": ("pi0_libero_pytorch", "pi0", 50, None),
}
RESULTS = Path(os.environ.get("VLA_BENCH_DIR", "benchmarks/results"))


def free():
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def written(cuda, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("full"), {}
    for family, (dirname, preset, horizon, state_in_prompt) in CHECKPOINTS.items():
        seed = int(np.random.default_rng().integers(2**31))
        twin = RuntimeConfig(
            preset=preset,
            action_horizon=horizon,
            state_in_prompt=state_in_prompt,
            device="cuda",
            precision="bf16",
            seed=seed,
        )
        model = build_model(twin.model, "cuda", seed=seed)
        start = time.perf_counter()
        directory = save_checkpoint(model, root / dirname, "openpi", "lm_head", dtype=torch.bfloat16)
        print(f"\n{family}: wrote {directory} in {time.perf_counter() - start:.1f} s (seed {seed})")
        del model
        free()
        out[family] = (directory, twin)
    return out


@pytest.mark.parametrize("family", list(CHECKPOINTS))
def test_full_size_model_from_config_json_alone(written, family):
    directory, twin = written[family]
    assert set(json.loads((directory / "config.json").read_text())) == {
        "action_dim", "action_horizon", "paligemma_variant", "action_expert_variant", "precision"
    }  # fmt: skip
    start = time.perf_counter()
    info = inspect_checkpoint(directory)
    inspect_s = time.perf_counter() - start
    preset = get_preset(CHECKPOINTS[family][1])
    derived = info.model
    for field in ("pi05", "vision", "prefix_lm", "expert", "action_dim", "max_token_len", "camera_names"):
        assert getattr(derived, field) == getattr(preset, field), field
    assert derived.action_horizon == CHECKPOINTS[family][2] and info.embedding_from_lm_head
    assert derived.prompt_format == ("pi05_no_state" if family == "pi05" else "pi0")
    tensors = info.summary()["tensors"]
    print(f"{family}: inspect {inspect_s * 1e3:.0f} ms, {tensors} tensors, {derived.prompt_format}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"inspect-{family}.json").write_text(json.dumps({**info.summary(), "inspect_s": inspect_s}))


@pytest.mark.parametrize("family", list(CHECKPOINTS))
def test_served_actions_equal_the_saved_model(written, family):
    directory, twin = written[family]
    config = RuntimeConfig(
        checkpoint=str(directory),
        device="cuda",
        precision="bf16",
        allow_unnormalized=True,
        tokenizer=TOKENIZER,
    )
    rng = np.random.default_rng()
    loaded = EagerPolicy(config)
    # The saved model is the twin rounded to bf16 (the file's dtype): the layers served in float32 (action
    # and time projections) must see those rounded weights too.
    parts = build_parts(twin)
    with torch.no_grad():
        for p in parts.model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    reference = EagerPolicy(parts=parts)
    cfg = config.model
    for _ in range(2):
        obs = random_observation(rng, CHECKPOINTS[family][1], side=224)
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32)
        a, b = loaded.infer(obs, noise).actions, reference.infer(obs, noise).actions
        assert a.shape == (CHECKPOINTS[family][2], 7)
        np.testing.assert_array_equal(a, b)
    del loaded, reference
    free()


def test_fp8_calibrated_on_a_recorded_libero_episode(written, tmp_path):
    from vla_runtime.cli import main
    from vla_runtime.runtime.accuracy import accuracy_table, format_table
    from vla_runtime.runtime.recording import read_observations

    recording = os.environ.get("VLA_RECORDING")
    if not recording:
        pytest.fail("set VLA_RECORDING to an MCAP recording of a LIBERO episode (eval-libero --record)")
    directory, _ = written["pi05"]
    scales = tmp_path / "pi05_libero_fp8.safetensors"
    common = [
        "--checkpoint",
        str(directory),
        "--device",
        "cuda",
        "--allow-unnormalized",
        "--tokenizer",
        TOKENIZER,
    ]
    assert (
        main(["calibrate", "--observations", recording, "--out", str(scales), "--fp8-expert", *common]) == 0
    )
    free()
    config = RuntimeConfig(
        checkpoint=str(directory),
        device="cuda",
        precision="fp8",
        fp8_expert=True,
        vision_precision="fp16",
        fp8_calibration=str(scales),
        allow_unnormalized=True,
        tokenizer=TOKENIZER,
    )
    recorded = read_observations(recording, config.model.camera_names, config.state_dim)
    tables = {}
    for source, observations in (("recorded", recorded), ("random", None)):
        tables[source] = accuracy_table(config, frames=4, observations=observations)
        print(f"\n{source} observations\n" + format_table(tables[source]))
        free()
    from vla_runtime.runtime.calibration import read_metadata

    meta = read_metadata(scales)
    (RESULTS / "fp8-calibration-recorded.json").write_text(
        json.dumps({"metadata": meta, "recorded": tables["recorded"], "random": tables["random"]})
    )
    assert tables["recorded"]["passed"] and tables["random"]["passed"]
    # the same scales for another checkpoint are refused before anything is served
    other, _ = written["pi0"]
    with pytest.raises(ValueError, match="fp8_calibration: .* was not made for this model"):
        EagerPolicy(config.replace(checkpoint=str(other)))
