"""resize_on_device's default on a GPU rests on this: camera frames reach the model's size sooner resized on
the device (uploaded as they came, the images of one size in one call) than on the host's CPU. Both
ways in one run, on LIBERO's two 256 renders and on three 480x640 cameras, each from the frames in host
memory to the resized pixels on the device."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from vla_runtime.runtime.inputs import place_raw_images, resize_with_pad

SIZE = 224


def median_ms(fn, warmup: int = 10, repeats: int = 100) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


@pytest.mark.parametrize("count, height, width", [(2, 256, 256), (3, 480, 640)])
def test_frames_are_resized_sooner_on_the_device_than_on_the_host(benchmark, cuda, count, height, width):
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    on_device = torch.zeros((count, SIZE, SIZE, 3), dtype=torch.uint8, device=cuda)
    on_host = torch.zeros((count, SIZE, SIZE, 3), dtype=torch.uint8, device=cuda)

    def device_way():
        place_raw_images(on_device, dict(enumerate(images)))

    def host_way():
        resized = np.stack([resize_with_pad(image, SIZE) for image in images])
        on_host.copy_(torch.from_numpy(resized).pin_memory(), non_blocking=True)

    host_ms = median_ms(host_way)
    device_ms = median_ms(device_way)
    benchmark.pedantic(lambda: (device_way(), torch.cuda.synchronize()), rounds=50, iterations=1)
    print(f"{count} x {height}x{width}: host {host_ms:.3f} ms, device {device_ms:.3f} ms")
    assert (on_device.int() - on_host.int()).abs().max() <= 1  # the same pixels, to a level
    assert device_ms < host_ms
