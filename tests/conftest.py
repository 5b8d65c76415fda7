from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis' default 200 ms deadline per example measures the machine, not the
# code: on a loaded 2-core machine a decoder example can take longer and fail
# with DeadlineExceeded. Correctness is what the properties check; a hang is
# still caught by pytest-timeout.
settings.register_profile("peerdrive", deadline=None)
settings.load_profile("peerdrive")


@pytest.fixture
def node_home(tmp_path: Path):
    """A fresh PEERDRIVE_HOME factory: node_home('a') -> path."""

    def make(name: str = "node") -> Path:
        p = tmp_path / f"home-{name}"
        p.mkdir(exist_ok=True)
        return p

    return make
