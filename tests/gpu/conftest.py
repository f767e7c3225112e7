"""The GPU tier: full-size presets on a CUDA device. Run with `pytest -m gpu tests/gpu` on a CUDA machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:  # the hook sees the whole session's items: mark only this folder's
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu needs a CUDA GPU (CI runs only the CPU tier: -m 'not gpu and not bench')")
    return torch.device("cuda")
