"""resize_on_device (issue 16, item 2): camera images that are not the model's size go to the device as
they came and are resized there. On the CPU the device is the CPU, so the results must equal the host's
resize exactly: in the preparer, the eager reference and the executor (with shape profiles, where the
cameras present move to the first view slots, and in a batch of robots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vla_runtime.runtime import inputs as inputs_module
from vla_runtime.runtime.config import RuntimeConfig
from vla_runtime.runtime.executor import PipelinedExecutor
from vla_runtime.runtime.inputs import place_raw_images, resize_with_pad
from vla_runtime.runtime.loading import build_parts
from vla_runtime.runtime.reference import EagerPolicy

from ..conftest import random_observation


def test_the_preparer_keeps_other_sizes_raw_and_the_device_resize_equals_the_hosts(rng):
    parts = build_parts(RuntimeConfig(preset="pi05_tiny", resize_on_device=True))
    size = parts.config.model.vision.image_size
    obs = random_observation(rng, "pi05_tiny")
    first = parts.config.model.camera_names[0]
    obs.images[first] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # the model's size: as is
    inputs = parts.preparer(obs)
    assert 0 not in inputs.raw_images and len(inputs.raw_images) == len(obs.images) - 1
    for view in inputs.raw_images:
        assert not inputs.pixels[view].any()  # left black on the host
    names = parts.config.model.camera_names
    want = np.stack([resize_with_pad(obs.images[n], size) for n in names if n in obs.images])
    np.testing.assert_array_equal(inputs.pixels_on(torch.device("cpu")).numpy()[: len(want)], want)
    obs.images[names[1]][:] = 0  # the caller reuses its buffer after submit: the raw copy is unaffected
    np.testing.assert_array_equal(inputs.pixels_on(torch.device("cpu")).numpy()[: len(want)], want)


def test_every_path_gives_the_same_actions_as_the_host_resize(rng):
    """Odd image sizes; the middle camera absent in some frames: the small shape profile then shows the
    third camera's (raw) image in the second view slot."""
    optional = ("left_wrist_0_rgb", "right_wrist_0_rgb")
    host = RuntimeConfig(preset="pi05_tiny", shape_profiles=True, optional_cameras=optional)
    device = host.replace(resize_on_device=True)
    cfg = host.model
    frames = [
        random_observation(rng, "pi05_tiny", skip=("left_wrist_0_rgb",) if i % 2 else ()) for i in range(4)
    ]
    noises = [rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32) for _ in frames]
    with PipelinedExecutor(host) as a, PipelinedExecutor(device) as b:
        eager = EagerPolicy(device)
        for obs, noise in zip(frames, noises, strict=True):
            want = a.infer(obs, noise).actions
            np.testing.assert_array_equal(b.infer(obs, noise).actions, want)
            np.testing.assert_allclose(eager.infer(obs, noise).actions, want, rtol=1e-5, atol=1e-5)


def test_images_of_one_size_are_resized_together_each_into_its_own_place(rng, monkeypatch):
    """place_raw_images: consecutive places whose images have one size share an upload and a resize;
    each image still lands in its own place, equal to its resize alone, and a place with no raw image
    (a camera already at the model's size) is left as it was."""
    size, calls = 32, []
    real_resize = inputs_module.resize_into
    monkeypatch.setattr(
        inputs_module,
        "resize_into",
        lambda images, out: (calls.append(len(images)), real_resize(images, out)),
    )
    shapes = {0: (64, 64), 1: (64, 64), 3: (64, 64), 4: (48, 80), 5: (64, 64), 6: (64, 64), 7: (20, 33)}
    raw = {i: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for i, hw in shapes.items()}
    kept = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels = torch.from_numpy(rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8))
    pixels[2] = torch.from_numpy(kept)
    place_raw_images(pixels, raw)
    assert calls == [2, 1, 1, 2, 1]  # runs: 0-1, 3, 4 (another size), 5-6, 7
    for i, image in raw.items():
        np.testing.assert_array_equal(pixels[i].numpy(), resize_with_pad(image, size))
    np.testing.assert_array_equal(pixels[2].numpy(), kept)

    calls.clear()  # a run is cut where its pixels would pass the cap: 3 images of 64x64 fit in 2 runs
    monkeypatch.setattr(inputs_module, "MAX_RUN_PIXELS", 2 * 64 * 64)
    raw = {i: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)}
    place_raw_images(pixels, raw)
    assert calls == [2, 1]
    for i, image in raw.items():
        np.testing.assert_array_equal(pixels[i].numpy(), resize_with_pad(image, size))


@pytest.mark.parametrize("sizes", ["random", "one size"])
def test_each_robot_of_a_batch_gets_its_own_raw_images(rng, sizes):
    """Random sizes, or every camera of both robots at one size (LIBERO's 256 renders: one resize for
    the whole batch)."""
    host = RuntimeConfig(preset="pi05_tiny", max_batch=2)
    cfg = host.model
    side = 256 if sizes == "one size" else None
    frames = [random_observation(rng, "pi05_tiny", side=side) for _ in range(2)]
    noises = [rng.standard_normal((cfg.action_horizon, cfg.action_dim), dtype=np.float32) for _ in frames]
    with PipelinedExecutor(host) as alone, PipelinedExecutor(host.replace(resize_on_device=True)) as batched:
        futures = batched.submit_batch(frames, noises)
        for future, obs, noise in zip(futures, frames, noises, strict=True):
            np.testing.assert_allclose(
                future.result(60).actions, alone.infer(obs, noise).actions, rtol=1e-5, atol=1e-5
            )


def pillow_resize_with_pad(image: np.ndarray, size: int) -> np.ndarray:
    """openpi_client.image_tools.resize_with_pad, written here after its `_resize_with_pad_pil`: Pillow's
    bilinear resize keeping the aspect ratio, pasted centred on black."""
    from PIL import Image

    h, w = image.shape[:2]
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR))
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - rh) // 2, (size - rw) // 2
    out[top : top + rh, left : left + rw] = resized
    return out


def test_the_resize_is_openpis(rng):
    """Camera frames larger and smaller than the model's 224, square and not (LIBERO's 256 renders, 480p,
    720p, a small odd one, strips resized to one or two pixels across): within one level of Pillow's
    bilinear resize, as openpi prepares images for training and inference. (Plain bilinear, before,
    differed by up to 128 levels on such noise.)"""
    shapes = [(256, 256), (480, 640), (720, 1280), (151, 97), (100, 100), (1000, 5), (2, 440), (300, 2)]
    for shape in shapes:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ours = resize_with_pad(image, 224).astype(int)
        openpi = pillow_resize_with_pad(image, 224).astype(int)
        assert np.abs(ours - openpi).max() <= 1, shape
        assert np.abs(ours - openpi).mean() < 0.3, shape  # rounding: Pillow rounds in two passes
