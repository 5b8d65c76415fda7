"""Readers never see two versions mixed while versions switch under them (issue 13 part 5).

A writable mount makes 100 versions as fast as fsync publishes them, each
rewriting one file with bytes and a size that name its version; a reader's
mount on another node follows them live (notices from the writer). Threads
in this process keep looking the file up, opening it, holding it open across
switches and reading it in small pieces: every pass over one open file must
read the bytes of exactly one version, with that version's size, from
fstat and from the reads alike.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import peerdrive, publish
from tests.pin_helpers import Nodes

pytestmark = pytest.mark.fuse

KiB = 1024
VERSIONS = 100


def size_of(v: int) -> int:
    return 1200 * KiB + v * 4104  # over one chunk; a different size for every version


def body_of(v: int) -> bytes:
    n = size_of(v)
    return (struct.pack(">Q", v) * (n // 8 + 1))[:n]


def check_pass(data: bytes, st_size: int) -> int:
    """The version one pass over an open file read; fails if bytes of two were mixed."""
    assert len(data) >= 8, f"read {len(data)} bytes"
    v = struct.unpack(">Q", data[:8])[0]
    assert 0 <= v <= VERSIONS, f"first bytes name no version: {data[:8]!r}"
    assert len(data) == size_of(v), f"version {v}: read {len(data)} bytes, it has {size_of(v)}"
    assert st_size == size_of(v), f"version {v}: fstat says {st_size}, it has {size_of(v)}"
    assert data == body_of(v), f"bytes of another version inside version {v}"
    return v


def test_open_files_never_mix_versions_across_100_rapid_switches(tmp_path: Path,
                                                                  node_home) -> None:
    start = tmp_path / "start"
    start.mkdir()
    (start / "f.bin").write_bytes(body_of(0))
    writer = node_home("writer")
    info = publish(writer, start)
    write_link = peerdrive(writer, "share", str(start), "--write").stdout.strip()
    stop = threading.Event()
    failures: list[str] = []
    seen: set[int] = set()
    passes = [0]

    def read_open_file(path: Path, hold: float) -> None:
        """Open, then read the whole file slowly, twice: each pass is one version."""
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(fd).st_size
                for _ in range(2):
                    parts = []
                    off = 0
                    while True:
                        piece = os.pread(fd, 96 * KiB, off)
                        if not piece:
                            break
                        parts.append(piece)
                        off += len(piece)
                        time.sleep(hold)
                    seen.add(check_pass(b"".join(parts), size))
                    passes[0] += 1
            except AssertionError as exc:
                failures.append(str(exc))
                stop.set()
            finally:
                os.close(fd)

    def look_up(root: Path) -> None:
        while not stop.is_set():
            try:
                os.stat(root / "f.bin")
                os.listdir(root)
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    with Nodes(tmp_path) as nodes:
        w = nodes.mount(writer, write_link, tmp_path / "wmnt", "--publish-delay", "3600")
        reader = nodes.mount(node_home("reader"), info["read_link"], tmp_path / "rmnt",
                             "--bootstrap", w.addr)
        assert (reader.path / "f.bin").read_bytes() == body_of(0)
        threads = [threading.Thread(target=read_open_file, args=(reader.path / "f.bin", h))
                   for h in (0.0005, 0.002, 0.01)]
        threads.append(threading.Thread(target=look_up, args=(reader.path,)))
        for t in threads:
            t.start()
        try:
            began = time.monotonic()
            for v in range(1, VERSIONS + 1):
                if stop.is_set():
                    break
                fd = os.open(w.path / "f.bin", os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, body_of(v))
                    os.fsync(fd)  # a version at once
                finally:
                    os.close(fd)
                time.sleep(0.05)
            print(f"100 versions written in {time.monotonic() - began:.1f} s")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stop.is_set():
                data = (reader.path / "f.bin").read_bytes()
                if data == body_of(VERSIONS):
                    break
                time.sleep(0.2)
            else:
                if not stop.is_set():
                    raise AssertionError("the reader never reached the last version")
            print(f"the reader had the last version {time.monotonic() - began:.1f} s after "
                  "the first")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not failures, failures[:3]
        print(f"{passes[0]} passes over open files, {len(seen)} versions seen")
        assert len(seen) >= 5, f"the readers saw too few versions to race them: {sorted(seen)}"
