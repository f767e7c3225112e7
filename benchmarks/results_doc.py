"""What every benchmark's results JSON starts with, and how it is written (benchmarks/results/ keeps them).

Imported by the scripts beside it (run as `python benchmarks/<script>.py`, whose folder is on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch


def run_header() -> dict:
    """Device, date, commit (VLA_COMMIT: the tree on a GPU machine is a copy) and torch version."""
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("VLA_COMMIT", "unknown"),
        "torch": torch.__version__,
    }


def save(doc: dict, path: Path) -> None:
    """Written whole after each row, so a run stopped at its time limit keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
