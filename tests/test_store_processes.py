"""Several processes on one store, and processes killed with SIGKILL mid-write.

Every child is started here, waited for with a deadline, and killed by its PID
in a `finally`, so a failing test leaves no process behind.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cache.store import BlockStore
from tests.test_store import make_block

REPO = Path(__file__).resolve().parent.parent
KIB = 1024

# A writer that never stops by itself (bounded to 120 s): blocks of varied sizes,
# a pin that follows "versions", records, reads and flushes. It prints a line
# after each committed step, so the parent knows what must survive a kill.
WRITER = textwrap.dedent(
    """
    import sys, time
    from cache.errors import StoreFull
    from cache.store import BlockStore
    from tests.test_store import make_block

    path, tag, start, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = BlockStore(path, limit_bytes=None if limit == "none" else int(limit),
                       initial_map_bytes=1 << 20)
    deadline = time.monotonic() + 120
    i = start
    while time.monotonic() < deadline:
        block_id, data = make_block(f"{tag}{i}", 1000 + (i * 7919) % (90 * 1024))
        try:
            store.put(block_id, data)
        except StoreFull:  # everything left is pinned: the limit holds, the block waits
            pass
        if i % 7 == 0:
            ids = [make_block(f"{tag}{j}", 1000 + (j * 7919) % (90 * 1024))[0]
                   for j in range(max(0, i - 20), i + 1)]
            store.set_pin(f"{tag}-version", ids)
        if i % 5 == 0:
            store.put_record(f"{tag}-n".encode(), str(i).encode())
        store.get(make_block(f"{tag}{i // 2}", 1000 + ((i // 2) * 7919) % (90 * 1024))[0])
        if i % 11 == 0:
            store.flush()
        print(i, flush=True)
        i += 1
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


class Child:
    """A child process and its stdout, read line by line with a deadline.

    Lines are split here, from os.read, not by a buffered reader: a buffered
    readline could swallow two lines while select() watches the empty pipe.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._buffer = b""

    def read_line(self, timeout: float = 60.0) -> str:
        """The next output line; fails (with the child's stderr) if it ends or stalls."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            assert ready, f"child {self.pid} printed nothing for {timeout} s"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self.proc.wait(timeout=30)
                raise AssertionError(f"child {self.pid} ended: {self.proc.stderr.read()!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextmanager
def child(args: list[str]) -> Iterator[Child]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield Child(proc)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def run_writer_and_kill(path: Path, tag: str, start: int, steps: int, limit: str) -> int:
    """Start a writer, let it commit `steps` steps, SIGKILL it; the last step it reported."""
    with child(["-c", WRITER, str(path), tag, str(start), limit]) as proc:
        last = -1
        for _ in range(steps):
            last = int(proc.read_line())
        proc.kill()
        assert proc.proc.returncode == -signal.SIGKILL
    return last


def version(tag: str, step: int) -> list[bytes]:
    """The ids the writer's pin holds after `step` (a multiple of 7)."""
    return sorted(
        make_block(f"{tag}{j}", size_of(j))[0] for j in range(max(0, step - 20), step + 1)
    )


def size_of(i: int) -> int:
    return 1000 + (i * 7919) % (90 * 1024)


def test_sigkill_mid_writes_leaves_committed_state(tmp_path: Path) -> None:
    path = tmp_path / "store"
    survivors: list[bytes] = []
    for round_no, steps in enumerate((40, 75, 120)):
        tag = f"r{round_no}-"
        last = run_writer_and_kill(path, tag, 0, steps, "none")
        survivors += [make_block(f"{tag}{i}", size_of(i))[0] for i in range(last + 1)]
        with BlockStore(path) as store:
            assert store.check_consistency(deep=True) == [], f"round {round_no}"
            assert store.missing(survivors) == []  # everything reported committed is there
            assert int(store.get_record(f"{tag}-n".encode()) or b"-1") >= last - last % 5
            pinned = store.pin_ids(f"{tag}-version")
            candidates = range(last - last % 7, last + 200, 7)
            assert any(version(tag, s) == pinned for s in candidates), "pin is not a version"
            assert store.missing(pinned) == []


def test_sigkill_with_eviction_keeps_limit_and_pins(tmp_path: Path) -> None:
    path = tmp_path / "store"
    limit = 400 * KIB
    last = run_writer_and_kill(path, "e", 0, 150, str(limit))
    with BlockStore(path) as store:
        assert store.check_consistency(deep=True) == []
        assert store.limit_bytes == limit
        # Under the limit, or nothing left to evict but pinned blocks (pins win).
        assert store.total_bytes <= limit or store.total_bytes == store.pinned_bytes
        pinned = store.pin_ids("e-version")
        assert any(version("e", s) == pinned for s in range(last - last % 7, last + 200, 7))
        assert store.pin_progress("e-version").present_count > 0


RECENCY = textwrap.dedent(
    """
    import sys, time
    from cache.store import BlockStore
    from tests.test_store import make_block

    store = BlockStore(sys.argv[1], limit_bytes=64 * 1024)
    ids = [make_block(i, 1024)[0] for i in range(8)]
    for i in range(8):
        store.put(*make_block(i, 1024))
    store.set_pin("p", ids[6:])
    store.get(ids[0])
    store.get(ids[3])
    store.flush()
    print(" ".join(b.hex() for b in store.eviction_order()), flush=True)
    store.get(ids[1])  # never flushed: lost with the process
    store.get(ids[2])
    print("unflushed", " ".join(b.hex() for b in store.eviction_order()), flush=True)
    time.sleep(120)
    """
)


def test_sigkill_loses_only_unflushed_recency(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with child(["-c", RECENCY, str(path)]) as proc:
        flushed = [bytes.fromhex(h) for h in proc.read_line().split()]
        unflushed = proc.read_line().split()
        assert unflushed[0] == "unflushed" and len(unflushed) == 7
        proc.kill()
    ids = [make_block(i, 1024)[0] for i in range(8)]
    assert flushed == [ids[1], ids[2], ids[4], ids[5], ids[0], ids[3]]
    with BlockStore(path) as store:
        assert store.eviction_order() == flushed
        assert store.pin_ids("p") == sorted(ids[6:])
        assert (store.count, store.total_bytes, store.limit_bytes) == (8, 8 * KIB, 64 * KIB)
        assert store.check_consistency(deep=True) == []


SHARED = textwrap.dedent(
    """
    import sys
    from cache.store import BlockStore
    from tests.test_store import make_block

    path, tag = sys.argv[1], sys.argv[2]
    store = BlockStore(path, sync=False, initial_map_bytes=1 << 20)
    for i in range(150):
        block_id, data = make_block(f"{tag}{i}", 4096 + (i * 977) % 20000)
        store.put(block_id, data)
        for j in (i // 2, i // 3):
            got = store.get(make_block(f"{tag}{j}", 4096 + (j * 977) % 20000)[0])
            assert got is None or len(got) == 4096 + (j * 977) % 20000
        if i % 25 == 0:
            store.set_pin(f"{tag}-pin", [block_id])
    store.close()
    print("done", flush=True)
    """
)


def test_processes_share_one_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    limit = 600 * KIB
    with BlockStore(path, sync=False, limit_bytes=limit, initial_map_bytes=1 << 20) as store:
        with child(["-c", SHARED, str(path), "a"]) as a, child(["-c", SHARED, str(path), "b"]) as b:
            deadline = time.monotonic() + 120
            while a.proc.poll() is None or b.proc.poll() is None:
                # this process reads and writes too, while the others grow the map
                store.put(*make_block(f"parent{time.monotonic_ns()}", 3000))
                assert store.total_bytes <= limit
                assert time.monotonic() < deadline, "children did not finish"
            assert a.read_line() == "done"
            assert b.read_line() == "done"
        assert store.total_bytes <= limit
        assert store.pin_names() == ["a-pin", "b-pin"]
        assert store.check_consistency(deep=True) == []
        for tag in "ab":
            pinned = store.pin_ids(f"{tag}-pin")
            assert store.missing(pinned) == []


GROWER = textwrap.dedent(
    """
    import sys
    from cache.store import BlockStore
    from tests.test_store import make_block

    with BlockStore(sys.argv[1], sync=False, initial_map_bytes=1 << 20) as store:
        for i in range(100):
            store.put(*make_block(f"g{i}", 64 * 1024))
    print("grown", flush=True)
    """
)


def test_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with BlockStore(path, sync=False, initial_map_bytes=1 << 20) as store:
        assert store.stats()["map_bytes"] == 1 << 20
        with child(["-c", GROWER, str(path)]) as proc:
            assert proc.read_line() == "grown"
        # The data now lies beyond this process's 1 MiB map: LMDB says MAP_RESIZED.
        block_id, data = make_block("g99", 64 * KIB)
        assert store.get(block_id) == data
        assert store.stats()["map_bytes"] > 1 << 20
        store.put(*make_block("mine", 64 * KIB))
        assert store.count == 101
        assert store.check_consistency() == []
