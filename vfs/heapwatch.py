"""Where a long-running node's memory goes: tracemalloc differences on SIGUSR2 (tests only).

`PEERDRIVE_TRACEMALLOC=FRAMES` (unset in normal use) makes a serve or host
trace its Python allocations from the start (`FRAMES` frames a traceback)
and, on each SIGUSR2, log the allocation sites that grew most since the
previous signal and since the first (the baseline): what a soak
(tests/test_uptime.py with `UPTIME_SOAK`) gains per version or per reader,
named by file and line, not guessed from RSS. Tracing costs CPU and memory
(tracemalloc keeps a traceback per live block), so it is never on by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import tracemalloc

import trio

from .errors import UsageError

log = logging.getLogger(__name__)

ENV = "PEERDRIVE_TRACEMALLOC"
TOP = 25  # sites logged per comparison


class HeapWatchError(UsageError):
    """PEERDRIVE_TRACEMALLOC is not a positive frame count."""


def frames_wanted() -> int:
    """The frame count PEERDRIVE_TRACEMALLOC asks for; 0 when it is unset or empty."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 0
    try:
        frames = int(raw)
    except ValueError:
        frames = 0
    if not 1 <= frames <= 100:
        raise HeapWatchError(f"{ENV}={raw!r}: a number of frames, 1 to 100")
    return frames


def _interesting(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    return snapshot.filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        tracemalloc.Filter(False, "<unknown>"),
    ))


def report(now: tracemalloc.Snapshot, then: tracemalloc.Snapshot, label: str) -> str:
    """The `TOP` allocation sites (innermost frame) that grew most from `then` to `now`."""
    diffs = now.compare_to(then, "lineno")
    total = sum(d.size_diff for d in diffs)
    lines = [f"heap {label}: {total / 1e6:+.3f} MB in {sum(d.count_diff for d in diffs):+d} "
             f"blocks; traced {sum(s.size for s in now.statistics('filename')) / 1e6:.1f} MB"]
    for d in sorted(diffs, key=lambda d: d.size_diff, reverse=True)[:TOP]:
        if d.size_diff <= 0:
            break
        frame = d.traceback[0]
        lines.append(f"  {d.size_diff / 1e3:+9.1f} kB {d.count_diff:+7d} blocks  "
                     f"{frame.filename}:{frame.lineno}")
    return "\n".join(lines)


async def watch_heap(frames: int) -> None:
    """Trace allocations and log what grew at each SIGUSR2, until cancelled."""
    tracemalloc.start(frames)
    log.warning("%s=%d: tracing allocations (tests only); SIGUSR2 logs what grew", ENV, frames)
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        baseline = previous = _interesting(tracemalloc.take_snapshot())
        count = 0
        async for _ in signals:
            count += 1
            now = _interesting(tracemalloc.take_snapshot())
            log.warning("%s\n%s", report(now, previous, f"#{count} since the last"),
                        report(now, baseline, f"#{count} since the first"))
            previous = now
