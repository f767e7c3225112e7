"""The bench tier: pytest-benchmark on a CUDA GPU. Results go to benchmarks/results/<date>-<device>.json
(or $VLA_BENCH_DIR) in the schema of docs/performance.md."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from results_doc import recorded_commit  # noqa: E402 - the one definition of the recorded commit

RESULTS: list[dict] = []


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:  # the hook sees the whole session's items: mark only this folder's
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.bench)


def record(
    name: str,
    mode: str,
    latencies_ms,
    stages_ms: dict,
    steps: int = 10,
    precision: str = "bf16",
    throughput_hz: float | None = None,
    preset: str = "pi05",
    views: int = 3,
    prompt_len: int = 200,
    **extra,
) -> dict:
    arr = np.asarray(latencies_ms, dtype=np.float64)
    row = {
        "name": name,
        "preset": preset,
        "mode": mode,
        "precision": precision,
        "views": views,
        "prompt_len": prompt_len,
        "steps": steps,
        "batch": 1,
        "latency_ms": {
            "p50": float(np.percentile(arr, 50)),
            "p99": float(np.percentile(arr, 99)),
            "mean": float(arr.mean()),
            "n": int(arr.size),
        },
        "stages_ms": {k: float(v) for k, v in stages_ms.items()},
        "throughput_hz": throughput_hz,
        **extra,
    }
    RESULTS.append(row)
    return row


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS or not torch.cuda.is_available():
        return
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    out_dir = Path(os.environ.get("VLA_BENCH_DIR", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device.lower().replace("nvidia ", "").replace(" ", "-")
    path = out_dir / f"{date}-{slug}.json"
    doc = {
        "device": device,
        "date": date,
        "commit": recorded_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "results": RESULTS,
    }
    path.write_text(json.dumps(doc, indent=2))
    print(f"\nbenchmark results written to {path}")


@pytest.fixture(scope="session")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/bench needs a CUDA GPU")
    return torch.device("cuda")
