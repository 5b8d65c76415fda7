"""`PEERDRIVE_TIME_SCALE` (dht/timescale.py): the tests' knob that turns hours into minutes.

It is read once, at import, so each case runs a fresh interpreter with the
variable set: the long periods and lifetimes are divided, never below 1 s, the
short timers are left alone, the ratios a renewal needs hold, and a value that
is not a number in range is refused by the command line (exit code 2).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PYTHON, ROOT, env_for

PROBE = """
import json
from dht import timescale
from dht.kad import limits
from dht import lan, records
from dht.fetch import FetchConfig
from vfs import copies, network, pins
print(json.dumps({
    "scale": timescale.SCALE,
    "provider_ttl": records.PROVIDER_TTL, "max_provider_ttl": records.MAX_PROVIDER_TTL,
    "republish": records.PROVIDER_REPUBLISH_INTERVAL, "stale": records.STALE_AFTER,
    "refresh": limits.REFRESH_INTERVAL, "mutable_ttl": limits.MUTABLE_STORE_TTL,
    "mutable_republish": limits.MUTABLE_REPUBLISH_INTERVAL,
    "lan_interval": lan.LAN_ANNOUNCE_INTERVAL, "lan_ttl": lan.LAN_RECORD_TTL,
    "provider_refresh": FetchConfig().provider_refresh_interval,
    "copies_slow": copies.SLOW_INTERVAL, "pin_recheck": pins.PIN_RECHECK,
    "head_poll": network.HEAD_POLL_INTERVAL, "copies_fast": copies.FAST_INTERVAL,
}))
"""


def constants(tmp_path, scale: str | None) -> dict:
    env = env_for(tmp_path)
    env.pop("PEERDRIVE_TIME_SCALE", None)
    if scale is not None:
        env["PEERDRIVE_TIME_SCALE"] = scale
    out = subprocess.run([PYTHON, "-c", PROBE], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_without_the_variable_every_period_is_the_documented_one(tmp_path) -> None:
    c = constants(tmp_path, None)
    assert c["scale"] == 1.0
    assert (c["provider_ttl"], c["max_provider_ttl"], c["republish"], c["stale"]) == \
        (3600, 3600, 1200, 2400)
    assert (c["refresh"], c["mutable_ttl"], c["mutable_republish"]) == (900, 86400, 3600)
    assert (c["lan_interval"], c["lan_ttl"], c["provider_refresh"]) == (30, 120, 60)
    assert (c["copies_slow"], c["pin_recheck"], c["head_poll"]) == (60, 300, 2)


def test_a_scale_divides_the_long_periods_never_below_a_second_and_keeps_renewals_first(
        tmp_path) -> None:
    c = constants(tmp_path, "600")
    assert c["scale"] == 600
    assert (c["provider_ttl"], c["max_provider_ttl"], c["republish"]) == (6, 6, 2)
    assert (c["refresh"], c["mutable_ttl"], c["mutable_republish"]) == (1.5, 144, 6)
    # at the floor: a minute is a second, not a tenth of one
    assert (c["provider_refresh"], c["copies_slow"], c["pin_recheck"]) == (1, 1, 1)
    # short timers as they are
    assert (c["head_poll"], c["copies_fast"]) == (2, 2)
    # a record outlives its renewal, whatever the floor did to both
    assert c["provider_ttl"] > 2 * c["republish"] and c["lan_ttl"] >= 4 * c["lan_interval"]
    assert c["mutable_ttl"] > c["mutable_republish"]


@pytest.mark.parametrize("value", ["fast", "0", "0.5", "nan", "1e9", "-3"])
def test_a_scale_that_is_no_number_in_range_is_refused_with_exit_code_2(tmp_path, value) -> None:
    env = env_for(tmp_path)
    env["PEERDRIVE_TIME_SCALE"] = value
    out = subprocess.run([PYTHON, "-m", "vfs.cli", "status"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    assert "PEERDRIVE_TIME_SCALE" in out.stderr and "from 1 to 100,000" in out.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was opened
