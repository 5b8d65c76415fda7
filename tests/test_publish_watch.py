"""`peerdrive publish DIR --watch` (issue 13 part 2): a real watching process and a reader.

The watcher is the real command (its JSON lines say what each version
changed); the reader is a `peerdrive mount` of another node that found the
watcher through the DHT (it bootstraps from the watcher's port).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, env_for
from tests.pin_helpers import Nodes
from tests.processes import stop_pid

pytestmark = pytest.mark.fuse

MiB = 1 << 20


class Watcher:
    """`peerdrive publish SRC --watch --json` as a process; its JSON lines in a queue."""

    def __init__(self, home: Path, src: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "vfs.cli", "publish", str(src), "--watch", "--json", "--listen",
             "127.0.0.1:0", "--no-lan", *extra],
            env=env_for(home), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def next(self, timeout: float = 60.0) -> dict:
        try:
            ev = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the watcher said nothing for {timeout} s; stderr: "
                                 f"{self.stderr()}") from None
        self.events.append(ev)
        return ev

    def wait_for(self, pred, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next(max(0.1, deadline - time.monotonic()))
            if pred(ev):
                return ev

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        stop_pid(self.proc.pid, self.proc, timeout=30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for_bytes(path: Path, want: bytes, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if path.read_bytes() == want:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never held the expected {len(want)} bytes")


def test_a_saved_change_reaches_a_readers_mount_and_a_slow_copy_is_published_once(
        tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "doc.txt").write_bytes(b"first draft\n")
    (src / "keep").mkdir()
    (src / "keep" / "k.bin").write_bytes(os.urandom(300_000))
    home = node_home("watcher")
    w = Watcher(home, src, "--publish-delay", "0.5")
    with Nodes(tmp_path) as nodes:
        try:
            first = w.next()
            assert first.get("seq") == 1, first  # the folder's first publish
            watching = w.wait_for(lambda e: e.get("event") == "watching")
            reader = nodes.mount(node_home("reader"), first["read_link"], tmp_path / "rmnt",
                                 "--bootstrap", f"127.0.0.1:{watching['port']}")
            assert (reader.path / "doc.txt").read_bytes() == b"first draft\n"

            # an editor's save: a temporary file, then a rename over the original
            saved_at = time.monotonic()
            tmp = src / ".doc.txt.swp"
            tmp.write_bytes(b"second draft\n")
            os.rename(tmp, src / "doc.txt")
            ev = w.wait_for(lambda e: e.get("event") == "published")
            assert ev["modified"] == ["doc.txt"] and ev["added"] == [] and ev["removed"] == [], ev
            took = wait_for_bytes(reader.path / "doc.txt", b"second draft\n", 30)
            print(f"save to visible in a reader's mount: "
                  f"{time.monotonic() - saved_at:.2f} s (after the version: {took:.2f} s)")
            assert time.monotonic() - saved_at < 30

            # a large file copied in slowly, with pauses longer than the quiet period:
            # published once, whole
            body = os.urandom(48 * MiB)
            with open(src / "big.bin", "wb") as f:
                for i in range(0, len(body), 8 * MiB):
                    f.write(body[i:i + 8 * MiB])
                    f.flush()
                    time.sleep(1.0)
            ev = w.wait_for(lambda e: e.get("event") == "published", timeout=120)
            assert ev["added"] == ["big.bin"], ev
            wait_for_bytes(reader.path / "big.bin", body, 60)
            (src / "after.txt").write_bytes(b"after")
            ev = w.wait_for(lambda e: e.get("event") == "published")
            assert ev["added"] == ["after.txt"] and ev["modified"] == [], ev
            big_versions = [e["seq"] for e in w.events if e.get("event") == "published"
                            and ("big.bin" in e["added"] or "big.bin" in e["modified"])]
            assert len(big_versions) == 1, w.events
            # nothing unchanged was read again: only the files written
            assert sum(e["bytes_read"] for e in w.events if e.get("event") == "published") \
                == len(b"second draft\n") + len(body) + len(b"after")
        except BaseException:
            print(nodes.diagnostics(), w.events)
            raise
        finally:
            w.stop()


def test_a_restarted_watch_reads_only_what_changed_meanwhile(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(100_000))
    home = node_home("watcher")
    w = Watcher(home, src, "--publish-delay", "0.3")
    try:
        assert w.next()["seq"] == 1
        w.wait_for(lambda e: e.get("event") == "watching")
    finally:
        w.stop()
    (src / "f3.bin").write_bytes(b"changed while not watching")
    os.unlink(src / "f4.bin")
    w = Watcher(home, src, "--publish-delay", "0.3")
    try:
        w.wait_for(lambda e: e.get("event") == "watching")
        ev = w.wait_for(lambda e: e.get("event") == "published")
        assert ev["seq"] == 2
        assert ev["modified"] == ["f3.bin"] and ev["removed"] == ["f4.bin"], ev
        assert ev["bytes_read"] == len(b"changed while not watching")
    finally:
        w.stop()
