from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def node_home(tmp_path: Path):
    """A fresh PEERDRIVE_HOME factory: node_home('a') -> path."""

    def make(name: str = "node") -> Path:
        p = tmp_path / f"home-{name}"
        p.mkdir(exist_ok=True)
        return p

    return make
