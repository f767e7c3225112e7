"""What every benchmark's results JSON starts with, and how it is written (benchmarks/results/ keeps them).

Imported by the scripts beside it (run as `python benchmarks/<script>.py`, whose folder is on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import torch


def run_header() -> dict:
    """Device, date, commit (`recorded_commit`) and torch version."""
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": recorded_commit(),
        "torch": torch.__version__,
    }


def recorded_commit() -> str:
    """VLA_COMMIT where set (a copy of the tree elsewhere may carry stale git metadata), else git's HEAD,
    else "unknown"."""
    return os.environ.get("VLA_COMMIT") or git_head() or "unknown"


def git_head() -> str:
    """The short hash of the checkout's HEAD, or "" outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def save(doc: dict, path: Path) -> None:
    """Written whole after each row, so a run stopped at its time limit keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
