"""The cost of resizing camera frames to the model's 224, each way the runtime can, in one run: on the
host (`resize_with_pad`, image by image, as `submit` does with resize_on_device off), on the device one
image per call (how `place_raw_images` worked before it grouped images), and on the device with the
images of one size together (`place_raw_images` now: one pinned upload, one resize call).

Each way's time is the caller's wall time to the resized pixels on the device (a synchronize at the
end), median of --repeats after --warmup; beside it the span between CUDA events recorded before and
after the call on the current stream (which includes the host's issuing, not the kernels alone). Each
way starts from zeroed pixels and its result is compared with the host's.
Workloads: LIBERO (two 256 renders) for one robot and a batch of 8, and three 480x640 cameras.

    python3 benchmarks/resize_bench.py $OUT/resize.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results_doc import run_header
from vla_runtime.runtime.inputs import place_raw_images, resize_with_pad

SIZE = 224
WORKLOADS = {  # name -> (images, height, width)
    "libero_1_robot": (2, 256, 256),
    "libero_8_robots": (16, 256, 256),
    "three_480x640": (3, 480, 640),
}


def on_the_host(images: list[np.ndarray], pixels: torch.Tensor) -> None:
    resized = np.stack([resize_with_pad(image, SIZE) for image in images])
    pixels.copy_(torch.from_numpy(resized).pin_memory(), non_blocking=True)


def on_the_device_one_by_one(images: list[np.ndarray], pixels: torch.Tensor) -> None:
    for index, image in enumerate(images):
        place_raw_images(pixels, {index: image})


def on_the_device_together(images: list[np.ndarray], pixels: torch.Tensor) -> None:
    place_raw_images(pixels, dict(enumerate(images)))


WAYS = {
    "host": on_the_host,
    "device_one_by_one": on_the_device_one_by_one,
    "device_together": on_the_device_together,
}


def measure(way, images, pixels, warmup: int, repeats: int) -> dict:
    walls, kernels = [], []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        start_event.record()
        way(images, pixels)
        end_event.record()
        torch.cuda.synchronize()
        if i >= warmup:
            walls.append((time.perf_counter() - start) * 1e3)
            kernels.append(start_event.elapsed_time(end_event))
    return {"wall_ms_p50": float(np.median(walls)), "stream_span_ms_p50": float(np.median(kernels))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for name, (count, height, width) in WORKLOADS.items():
        images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
        pixels = torch.zeros((count, SIZE, SIZE, 3), dtype=torch.uint8, device="cuda")
        reference = None
        results[name] = {}
        for way_name, way in WAYS.items():  # each way's pixels checked against the host's
            pixels.zero_()
            results[name][way_name] = measure(way, images, pixels, args.warmup, args.repeats)
            got = pixels.cpu().int()
            reference = got if reference is None else reference
            results[name][way_name]["most_levels_from_host"] = int((got - reference).abs().max())
            print(name, way_name, results[name][way_name], flush=True)
    out = {
        **run_header(),
        "what": "resize to 224 with padding: caller's wall to pixels on the device (p50), stream span",
        "workloads": {k: {"images": c, "height": h, "width": w} for k, (c, h, w) in WORKLOADS.items()},
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
