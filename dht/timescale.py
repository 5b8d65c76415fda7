"""Hours in minutes, for tests: the one place `PEERDRIVE_TIME_SCALE` is read.

A node that stays up for hours runs timers a test of a few minutes never sees
fire: provider records expire after an hour and are announced again every 20
minutes, the DHT refreshes its buckets and culls its storage every 15 minutes
and re-stores its heads every hour, stored heads live 24 hours, a serve
counts copies every minute, a fetcher re-reads its providers every minute.
`tests/test_uptime.py` runs real processes with `PEERDRIVE_TIME_SCALE=N` in
their environment: each of those periods and lifetimes (every call of
`scaled` below; the table is in docs/testing.md) is divided by N, but never
below `FLOOR` seconds (a period shorter than that already is stays as it is),
so short timers are untouched and the long ones come round many times.

It is for tests: a node that runs with a scale other than 1 says so in its
log. A value that is not a number from 1 to 100,000 is refused by the command
line (`problem()`), never half applied.
"""

from __future__ import annotations

import math
import os

ENV = "PEERDRIVE_TIME_SCALE"
FLOOR = 1.0  # seconds: no scaled period or lifetime gets shorter than this
MAX_SCALE = 100_000.0


def _read() -> tuple[float, str | None]:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0, None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 1.0 <= value <= MAX_SCALE:  # NaN fails both
        return 1.0, f"{ENV}={raw!r} is not a number from 1 to {MAX_SCALE:,.0f}"
    return value, None


SCALE, _PROBLEM = _read()


def problem() -> str | None:
    """Why the environment's time scale was refused (then SCALE is 1), or None."""
    return _PROBLEM


def scaled(seconds: float) -> float:
    """`seconds` divided by the time scale, at least `FLOOR` (or `seconds`, if shorter)."""
    if SCALE == 1.0:
        return seconds
    return max(seconds / SCALE, min(seconds, FLOOR))


def scaled_int(seconds: int) -> int:
    """`scaled` for whole seconds (a record's lifetime): rounded up, at least 1."""
    if SCALE == 1.0:
        return seconds
    return max(1, math.ceil(scaled(seconds)))
