"""vfs/heapwatch.py: the test-only allocation tracing a soak uses to name what grows."""

from __future__ import annotations

import tracemalloc

import pytest

from vfs.heapwatch import ENV, HeapWatchError, frames_wanted, report


def test_frames_wanted_reads_the_env_and_refuses_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert frames_wanted() == 0
    monkeypatch.setenv(ENV, "5")
    assert frames_wanted() == 5
    for bad in ("0", "-1", "x", "1000"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(HeapWatchError, match=ENV):
            frames_wanted()


def test_report_names_the_line_that_grew() -> None:
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        kept = [bytearray(4096) for _ in range(256)]  # ~1 MB from one line
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    text = report(after, before, "#1 since the last")
    top = text.splitlines()[1].split()  # +kB, "kB", +blocks, "blocks", file:line
    assert top[4].startswith(f"{__file__}:") and float(top[0]) >= 1024
    assert text.startswith("heap #1 since the last: +1.")
    del kept
