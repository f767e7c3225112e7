"""Bytes of weights the Gemma stacks' GEMMs read per chunk in each precision mode (issue 17, item 4), and
what that implies for a memory-bound edge GPU: an estimate by bandwidth arithmetic, not a measurement.

For each distinct GEMM shape of a preset the quantised module is built on the CPU with random weights
(graphs/int8.py, graphs/w4a8.py with a DuQuant smoothing fitted on random inputs) and its `weight_bytes`
read: the bytes one application reads, what is stored (packed values, scales, rotations). bf16 is 2
bytes per weight; FP8 1 byte per weight plus one scale (e4m3 needs a GPU to build, so it is counted).
Per chunk: the prefix's GEMMs once, the expert's once per denoising step.

python benchmarks/weight_bytes.py OUT.json [--preset pi05] [--steps 10] [--bandwidth-gbs 204.8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from results_doc import run_header  # noqa: E402
from vla_runtime.graphs.config import get_preset
from vla_runtime.graphs.duquant import fit_smoothing
from vla_runtime.graphs.int8 import Int8Linear
from vla_runtime.graphs.w4a8 import W4A8Linear

ORIN_BANDWIDTH_GBS = 204.8  # Jetson AGX Orin 64 GB, LPDDR5 (NVIDIA's datasheet)


def bytes_per_mode(n: int, k: int) -> dict[str, int]:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k)).to(torch.bfloat16) / k**0.5
    samples = torch.randn(64, k)
    return {
        "bf16": n * k * 2,
        "fp8": n * k + 4,
        "int8": Int8Linear(weight).weight_bytes(),
        "w4a8": W4A8Linear(weight, fit_smoothing(samples, weight)).weight_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="pi05")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bandwidth-gbs", type=float, default=ORIN_BANDWIDTH_GBS)
    args = parser.parse_args()
    cfg = get_preset(args.preset)
    per_stage: dict[str, dict[str, int]] = {}
    for stage, lm, applications in (("prefix", cfg.prefix_lm, 1), ("expert", cfg.expert, args.steps)):
        totals: dict[str, int] = {}
        for name, (n, k) in lm.gemm_shapes().items():
            # the prefix's last layer computes keys and values only: its q/k/v GEMM alone
            layers = lm.depth if (stage == "expert" or name == "qkv") else lm.depth - 1
            for mode, b in bytes_per_mode(n, k).items():
                totals[mode] = totals.get(mode, 0) + b * layers * applications
        per_stage[stage] = totals
    modes = per_stage["expert"].keys()
    doc = {
        **run_header(),
        "preset": args.preset,
        "steps": args.steps,
        "what": "bytes of GEMM weights read per chunk (prefix once, expert per step); counted, not timed",
        "bytes_per_chunk": per_stage,
        "expert_ratio_vs_bf16": {m: per_stage["expert"]["bf16"] / per_stage["expert"][m] for m in modes},
        "estimate": {
            "bandwidth_gbs": args.bandwidth_gbs,
            "note": "an estimate: the GEMMs' time if they only read their weights at full bandwidth",
            "ms": {
                stage: {m: b / (args.bandwidth_gbs * 1e9) * 1e3 for m, b in totals.items()}
                for stage, totals in per_stage.items()
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
