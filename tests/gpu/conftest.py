"""The engine on CUDA GPUs. Every test here is marked `gpu` (`pytest -m "not gpu"` leaves them out); each
module skips itself where the GPUs it needs are missing."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # the hook sees every collected item, not only this directory's
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)
