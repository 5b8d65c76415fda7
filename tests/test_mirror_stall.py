"""A mount whose only source is a mirror that stalls once reads again as soon as it is back.

The mirror (a loopback HTTP server this test controls, serving what `peerdrive
mirror` wrote) freezes in the middle of a streaming read: every block request
from then on gets no answer, so the mount's requests in flight time out and
the mirror is backed off, a failure at a time. Once the mount has counted 8
failures (by the old rule a backoff of 0.5 s x 2^7, capped at 60 s: twice the
fetch timeout) the mirror serves again. A read then must return the file's
bytes: the mount probes its lone source instead of failing every read with
EIO until the backoff ends (issue 10's fetch path; the rule is in
docs/architecture.md, "Penalties" in docs/protocol.md; its unit tests in
tests/test_fetch_probe.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dht.mirror_layout import BLOCKS_DIR
from tests.helpers import peerdrive, publish, write_random
from tests.swarm_helpers import Swarm

pytestmark = [pytest.mark.fuse]

FETCH_TIMEOUT = 30.0  # the mount's; by the old rule the mirror stayed backed off 60 s
FAILURES = 8  # the mount's failures at the mirror before it serves again
SERVED_BEFORE_FREEZE = 6  # block files of a streaming read served before the freeze
WITHIN = 180.0  # a bound only a hang (or the mount never noticing the stall) reaches


class FreezingMirror:
    """A mirror directory over HTTP/1.1 keep-alive on 127.0.0.1 that freezes once.

    Once `freeze_after(n)` was called and n more block files were served,
    every block request is held unanswered (a frozen server) until `thaw()`;
    a held request whose client gives up is counted. The head and HEAD
    requests are always answered.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.served_before_freeze = math.inf
        self.lock = threading.Lock()
        self.served = 0  # block files answered
        self.held = 0  # block requests held while frozen
        self.given_up = 0  # held requests whose connection the client closed
        self.thawed = threading.Event()
        self.stopping = threading.Event()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                if self.path.startswith(f"/{BLOCKS_DIR}/") and not mirror._may_serve():
                    if not mirror._hold(self.connection):
                        self.close_connection = True
                        return
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = (mirror.root / self.path.lstrip("/")).resolve()
                if mirror.root not in path.parents or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
                    if self.path.startswith(f"/{BLOCKS_DIR}/"):
                        with mirror.lock:
                            mirror.served += 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def freeze_after(self, files: int) -> None:
        with self.lock:
            self.served_before_freeze = self.served + files

    def _may_serve(self) -> bool:
        with self.lock:
            return self.thawed.is_set() or self.served < self.served_before_freeze

    def _hold(self, conn: socket.socket) -> bool:
        """Hold a request until thawed (True) or its client hangs up (False)."""
        with self.lock:
            self.held += 1
        while not self.thawed.wait(0.05):
            if self.stopping.is_set():
                return False
            readable, _, _ = select.select([conn], [], [], 0)
            if readable and not conn.recv(1, socket.MSG_PEEK):
                with self.lock:
                    self.given_up += 1
                return False
        return True

    def thaw(self) -> None:
        self.thawed.set()

    def __enter__(self) -> FreezingMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def read_in_background(path: Path) -> threading.Thread:
    """A `cat` of `path` in a thread of its own, started (the labs' streaming reader, whose
    EIO while the mirror is frozen is expected and dropped)."""

    def stream() -> None:
        try:
            path.read_bytes()
        except OSError:
            pass

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    return reader


def mirror_failures(snap: dict, url: str) -> int:
    return sum(m["failures"] for d in snap["drives"].values() for m in d["mirrors"]
               if m["url"] == url)


def mirrored_drive(work: Path) -> tuple[str, Path, Path, str, str]:
    """A published drive of a 16 MiB `big.bin` and a 4 MiB `later.bin` (read only once
    the mirror is back: its blocks are in no cache of the mount's), mirrored into
    work/www, and an empty reader home: (read link, www, reader home, the two files'
    SHA-256). Shared with scripts/stall_lab.py, which times the same freeze."""
    src = work / "src"
    src.mkdir(parents=True)
    want = write_random(src / "big.bin", 16 * 1024 * 1024, seed=10)
    want_later = write_random(src / "later.bin", 4 * 1024 * 1024, seed=11)
    publisher = work / "publisher"
    publisher.mkdir()
    link = publish(publisher, src)["read_link"]
    www = work / "www"
    json.loads(peerdrive(publisher, "mirror", link, str(www), "--json").stdout)
    reader_home = work / "reader"
    reader_home.mkdir()
    return link, www, reader_home, want, want_later


def test_a_lone_mirror_that_stalls_once_serves_reads_again_without_a_long_backoff(
        tmp_path: Path) -> None:
    link, www, reader_home, want, want_later = mirrored_drive(tmp_path)

    with FreezingMirror(www) as mirror, Swarm(tmp_path / "swarm") as swarm:
        reader = swarm.mount("reader", reader_home, link, tmp_path / "mnt",
                             fetch_timeout=FETCH_TIMEOUT, extra=["--mirror", mirror.url])
        path = reader.mountpoint / "big.bin"
        assert sorted(p.name for p in reader.mountpoint.iterdir()) == ["big.bin", "later.bin"]
        mirror.freeze_after(SERVED_BEFORE_FREEZE)
        first: list[object] = []

        def stream() -> None:  # the read the freeze catches in the middle
            try:
                first.append(hashlib.sha256(path.read_bytes()).hexdigest())
            except OSError as exc:
                first.append(exc)

        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        deadline = time.monotonic() + WITHIN
        while mirror_failures(reader.snapshot(), mirror.url) < FAILURES:
            assert time.monotonic() < deadline, (
                f"the mount never counted {FAILURES} failures at the frozen mirror "
                f"(held {mirror.held}, given up {mirror.given_up})\n{reader.log_tail()}")
            time.sleep(0.2)
        assert mirror.held >= 1 and mirror.given_up >= 1  # the mount saw it stall
        # status counts every failed request, and apart the incidents that set the backoff
        [counted] = [m for d in reader.snapshot()["drives"].values() for m in d["mirrors"]
                     if m["url"] == mirror.url]
        assert 1 <= counted["incidents"] <= counted["failures"], counted
        mirror.thaw()
        streaming.join(timeout=WITHIN)
        assert not streaming.is_alive()
        # caught by the freeze: its bytes, or EIO at the fetch timeout; never wrong bytes
        assert isinstance(first[0], OSError) or first[0] == want

        # Served again: every byte, now, not EIO for the rest of a 60 s backoff.
        assert hashlib.sha256((reader.mountpoint / "later.bin").read_bytes()).hexdigest() \
            == want_later
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want


RECOVERY_FETCH_TIMEOUT = 4.0  # short: the first READ fails at it (EIO) while frozen


def test_a_read_right_after_the_mirror_thaws_gets_the_bytes_not_eio_from_memory(
        tmp_path: Path) -> None:
    """The mount remembers a block that failed (vfs/drive.py, UNAVAILABLE_MEMORY, 2 s)
    so that the kernel's read right after a failed readahead does not wait a second
    fetch timeout. By that memory alone a reader retrying at once after an EIO got EIO
    again though the mirror was back: nothing asked it. Now the retry's READ asks once
    (RECHECK_WAIT; the fetcher probes the backed-off mirror at once: DriveFetch.probe_now)
    and returns the bytes. Through a real mount, so the kernel's own reads and the
    mount's DriveFetch are in the path (tests/test_read_after_recovery.py has the
    rule in process)."""
    link, www, reader_home, want, _ = mirrored_drive(tmp_path)
    big = (www.parent / "src" / "big.bin").read_bytes()

    with FreezingMirror(www) as mirror, Swarm(tmp_path / "swarm") as swarm:
        reader = swarm.mount("reader", reader_home, link, tmp_path / "mnt",
                             fetch_timeout=RECOVERY_FETCH_TIMEOUT,
                             extra=["--mirror", mirror.url])
        path = reader.mountpoint / "big.bin"
        fd = os.open(path, os.O_RDONLY)  # its chunk list loaded while the mirror serves
        try:
            mirror.freeze_after(0)
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, 0)  # EIO at the fetch timeout: the mirror is frozen
            assert failed.value.errno == errno.EIO
            assert mirror.held >= 1
            mirror.thaw()
            # the reader retries at once: the bytes (old rule: EIO from memory for 2 s)
            assert os.pread(fd, 4096, 0) == big[:4096]
        finally:
            os.close(fd)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want
