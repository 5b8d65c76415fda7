"""Load: 64 concurrent readers of one mount plus a pin that keeps running, for 60 s
(issue 11, "Also build").

A real `peerdrive mount` served by a real `peerdrive serve` on 127.0.0.1.
64 threads read random ranges of several files and compare every byte with
what was published; meanwhile a pinner pins a folder (waiting until it is
whole), unpins it and evicts it, again and again, so the readers keep
missing in the cache and racing the pin for the same blocks. Nothing may
deadlock (every reader must finish its last read within a generous bound),
and no byte may be wrong. The first-byte latency (a 4 KiB read at a random
offset, the start of each range) is printed as p50/p99 (`pytest -s`);
speed goals live in scripts/bench, not here.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import peerdrive, publish
from tests.pin_helpers import MiB, Nodes

pytestmark = pytest.mark.fuse

READERS = 64
SECONDS = 60.0
STUCK = 120.0  # a read not done in this long is a hang (only a deadlock breaks it)


def content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_64_readers_and_a_running_pin_for_60_s(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    files: dict[str, bytes] = {}
    layout = {"a.bin": 24 * MiB, "b.bin": 16 * MiB + 12345, "c.bin": 3 * MiB,
              "pinned/p1.bin": 20 * MiB, "pinned/p2.bin": 7 * MiB + 1,
              "pinned/deep/p3.bin": 5 * MiB}
    for i, (rel, size) in enumerate(layout.items()):
        data = content(100 + i, size)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        files[rel] = data
    pub, reader = node_home("pub"), node_home("reader")
    link = publish(pub, src)["read_link"]

    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr,
                        "--fetch-timeout", "30")
        stop = threading.Event()
        lock = threading.Lock()
        first_byte: list[float] = []
        wrong: list[str] = []
        errors: list[str] = []
        reads = [0]
        bytes_read = [0]
        last_progress: dict[int, float] = {}
        pin_rounds = [0]

        def read_loop(n: int) -> None:
            rng = random.Random(n)
            names = sorted(files)
            while not stop.is_set():
                rel = rng.choice(names)
                data = files[rel]
                off = rng.randrange(len(data))
                size = rng.choice((4096, 65536, 300_000, 1 << 20))
                try:
                    fd = os.open(m.path / rel, os.O_RDONLY)
                    try:
                        started = time.monotonic()
                        first = os.pread(fd, 4096, off)
                        took = time.monotonic() - started
                        rest = os.pread(fd, size, off + len(first)) if size > 4096 else b""
                    finally:
                        os.close(fd)
                except OSError as exc:
                    with lock:
                        errors.append(f"{rel}@{off}: {exc}")
                    continue
                got = first + rest
                want = data[off:off + len(got)]
                with lock:
                    last_progress[n] = time.monotonic()
                    first_byte.append(took)
                    reads[0] += 1
                    bytes_read[0] += len(got)
                    if got != want or len(first) != min(4096, len(data) - off):
                        wrong.append(f"{rel}@{off}+{len(got)}")

        def pin_loop() -> None:
            folder = m.path / "pinned"
            while not stop.is_set():
                try:
                    peerdrive(reader, "pin", str(folder), "--stall-timeout", "60", timeout=120)
                    peerdrive(reader, "unpin", str(folder), timeout=60)
                    peerdrive(reader, "evict", str(folder), timeout=60)
                except AssertionError as exc:
                    with lock:
                        errors.append(f"pin round: {exc}")
                    return
                pin_rounds[0] += 1

        threads = [threading.Thread(target=read_loop, args=(i,), daemon=True)
                   for i in range(READERS)]
        pinner = threading.Thread(target=pin_loop, daemon=True)
        started = time.monotonic()
        for t in threads:
            t.start()
        pinner.start()
        try:
            while time.monotonic() - started < SECONDS:
                time.sleep(1)
                now = time.monotonic()
                with lock:
                    stuck = [i for i, t in last_progress.items() if now - t > STUCK]
                assert not stuck, f"readers {stuck} made no progress for {STUCK:.0f} s"
        finally:
            stop.set()
        for t in [*threads, pinner]:
            t.join(timeout=STUCK)
        alive = [t.name for t in [*threads, pinner] if t.is_alive()]
        assert not alive, f"threads still blocked after the run (deadlock?): {alive}\n" \
                          f"{nodes.diagnostics()}"
        elapsed = time.monotonic() - started
        lat = sorted(first_byte)
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        print(f"\n{READERS} readers, {elapsed:.0f} s: {reads[0]} reads, "
              f"{bytes_read[0] / MiB:.0f} MiB, {len(wrong)} wrong, {len(errors)} errors, "
              f"{pin_rounds[0]} pin/unpin/evict rounds; first byte p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms, max {lat[-1] * 1000:.0f} ms")
        assert wrong == []
        assert errors == [], errors[:10]
        assert reads[0] > READERS  # every reader got somewhere
        assert len(last_progress) == READERS
        assert pin_rounds[0] >= 1
        # the mount is still healthy: one whole file reads back right
        assert (m.path / "pinned" / "p1.bin").read_bytes() == files["pinned/p1.bin"]
