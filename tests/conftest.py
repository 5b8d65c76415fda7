from __future__ import annotations

import signal
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis' default 200 ms deadline per example measures the machine, not the
# code: on a loaded 2-core machine a decoder example can take longer and fail
# with DeadlineExceeded. Correctness is what the properties check; a hang is
# still caught by pytest-timeout.
settings.register_profile("peerdrive", deadline=None)
settings.load_profile("peerdrive")

# A suite started as a background job of a non-interactive shell (`cmd &`, some CI
# runners) inherits SIGINT ignored, every process it starts too, and Python keeps an
# ignored SIGINT ignored: `peerdrive pin` then sleeps through the SIGINT a test sends
# it (test_interrupted_pin_exits_130_and_the_pin_stays hung so). Ctrl-C's usual
# handling here gives every child the default disposition back on exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def node_home(tmp_path: Path):
    """A fresh PEERDRIVE_HOME factory: node_home('a') -> path."""

    def make(name: str = "node") -> Path:
        p = tmp_path / f"home-{name}"
        p.mkdir(exist_ok=True)
        return p

    return make


@pytest.fixture(scope="module")
def labs_possible() -> None:
    """Skip a test that needs network namespaces (a lab) where there can be none."""
    from tests.netns_helpers import require_labs

    require_labs()


@pytest.fixture(scope="module")
def nat_labs_possible() -> None:
    """`labs_possible`, and nftables for the labs' NAT routers."""
    from tests.netns_helpers import require_labs

    require_labs(nat=True)
