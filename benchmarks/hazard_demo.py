"""The alternating-mask GPU test with the mask copy's waits of before runtime/hazards.py, beside the
derived ones, in one run: shows that the test catches the hazard the table fixed.

Before the table, image_masks, tokens and token_masks were copied as soon as the slot's previous user had
finished *vision*; the prefix, which reads them, could still be running. Restored here by weakening
one entry of the derived waits (the executor looks them up at issue time).

python benchmarks/hazard_demo.py OUT.json   (on a CUDA machine, from the repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: its tests package
from results_doc import run_header  # noqa: E402
from vla_runtime.runtime import executor as executor_module  # noqa: E402
from vla_runtime.runtime.config import RuntimeConfig  # noqa: E402
from vla_runtime.runtime.hazards import WAITS, Waits  # noqa: E402
from vla_runtime.runtime.reference import EagerPolicy  # noqa: E402

from tests.gpu.test_executor_gpu import (  # noqa: E402
    BF16_REL_TOL,
    alternating_masks_worst_difference,
)

OLD_WAITS = {
    **WAITS,
    "copy_prefix_inputs": Waits(WAITS["copy_prefix_inputs"].this_frame, previous_user=("vision",)),
}


def main(out: Path, rounds: int = 5) -> None:
    executor = executor_module.PipelinedExecutor(
        RuntimeConfig(preset="pi05", device="cuda", precision="bf16")
    )
    reference = EagerPolicy(parts=executor.parts)
    rng = np.random.default_rng(0)
    results = {}
    for name, waits in (("derived", WAITS), ("before the table", OLD_WAITS)):
        executor_module.WAITS = waits
        runs = [alternating_masks_worst_difference(executor, reference, rng) for _ in range(rounds)]
        results[name] = {"delivered": [d for d, _ in runs], "worst_relative_difference": [w for _, w in runs]}
        print(name, results[name], flush=True)
    executor_module.WAITS = WAITS
    executor.close()
    doc = {
        **run_header(),
        "tolerance": BF16_REL_TOL,
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
