"""A mount told to stop while a READ waits on a frozen peer stops at once, not at the
fetch timeout.

pyfuse3 runs each request in the task that read it from the kernel, and its
main loop ends after `pyfuse3.terminate()` only once every request in
progress has been answered: a mount with `--fetch-timeout 600` whose only
peer was SIGSTOPped stayed alive, SIGTERMed, for as long as the read waited.
Now the requests that only look (read, lookup, getxattr...) are cut short
and answered EIO first (DriveOperations.stop_waits). Real processes: a
publisher's `serve`, a reader's `peerdrive mount`, and `dd` reading an
uncached part of a file in the mount.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cache.store import BlockStore
from tests.helpers import is_mounted, peerdrive, publish, write_random
from tests.swarm_helpers import MountedReader, Swarm, peer_stats, wait_until
from vfs.home import Home

MIB = 1024 * 1024
FETCH_TIMEOUT = 600  # what a stopped mount used to wait for
HANG = 60.0  # far below FETCH_TIMEOUT, far above a loaded machine's stop
SYS_READ = 0  # x86_64
FAILED_READ = (b"Input/output error", b"Interrupted system call",
               b"Software caused connection abort", b"Transport endpoint is not connected")


def in_read_of(pid: int, path: Path) -> bool:
    """Whether process `pid` is inside read(2) on `path` (/proc/PID/syscall: the kernel's
    word, not a guess from time)."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
        if not fields or fields[0] != str(SYS_READ):
            return False
        return os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}") == str(path)
    except (OSError, ValueError, IndexError):
        return False


@contextlib.contextmanager
def read_waiting_on_a_frozen_peer(tmp_path: Path) -> Iterator[tuple[Swarm, MountedReader,
                                                                     subprocess.Popen]]:
    """A reader's mount (`--fetch-timeout 600`) whose only peer is stopped while `dd`
    waits inside a read of an uncached part of a file in it; the peer goes on after."""
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 48 * MIB, seed=31)
    pub_home = tmp_path / "pub"
    link = publish(pub_home, src)["read_link"]
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", pub_home)
        swarm.probe(pub.addr).wait_providers(link, [pub.node_id])
        reader = swarm.mount("reader", tmp_path / "reader", link, tmp_path / "mnt",
                             bootstrap=[pub.addr], fetch_timeout=FETCH_TIMEOUT)
        big = reader.mountpoint / "big.bin"
        with open(big, "rb") as f:  # a connection to the publisher, so the read is in flight
            assert len(f.read(65536)) == 65536
        os.kill(pub.pid, signal.SIGSTOP)
        dd = None
        try:
            dd = subprocess.Popen(["dd", f"if={big}", f"of={tmp_path / 'out.bin'}", "bs=1M",
                                   "skip=44", "count=1"], stderr=subprocess.PIPE)

            def waiting_on_the_peer() -> bool:
                stats = peer_stats(reader.snapshot(), pub.node_id)
                return (stats is not None and stats.get("in_flight", 0) > 0
                        and in_read_of(dd.pid, big))

            # dd is in its read in the mount, the mount's fetches wait on the frozen peer
            assert wait_until(waiting_on_the_peer, HANG), swarm.diagnostics()
            assert dd.poll() is None  # the read waits (for up to FETCH_TIMEOUT)
            yield swarm, reader, dd
        finally:
            if dd is not None and dd.poll() is None:
                dd.kill()
                dd.wait()
            os.kill(pub.pid, signal.SIGCONT)


def stopped_cleanly(tmp_path: Path, swarm: Swarm, reader: MountedReader,
                    dd: subprocess.Popen) -> None:
    """The mount process is gone and unmounted, the read failed, the cache is sound."""
    gone = wait_until(lambda: not Path(f"/proc/{reader.pid}").exists(), HANG)
    assert gone, "the mount did not stop: " + swarm.diagnostics()
    _, err = dd.communicate(timeout=HANG)
    assert dd.returncode != 0, "the read cannot have succeeded: the mount went"
    # EIO from the mount, or, for the parts of the read the kernel had not yet
    # handed to the mount, the kernel's own error once the connection is gone
    assert any(e in err for e in FAILED_READ), err
    out = tmp_path / "out.bin"
    assert not out.exists() or out.read_bytes() == b"", "no bytes from a failed read"
    assert not is_mounted(reader.mountpoint)
    with BlockStore(Home(reader.home).store_path) as store:
        assert store.check_consistency() == []


def test_sigterm_stops_a_mount_whose_read_waits_on_a_frozen_peer(tmp_path: Path) -> None:
    with read_waiting_on_a_frozen_peer(tmp_path) as (swarm, reader, dd):
        os.kill(reader.pid, signal.SIGTERM)
        stopped_cleanly(tmp_path, swarm, reader, dd)


def test_unmount_of_a_mount_whose_read_waits_on_a_frozen_peer(tmp_path: Path) -> None:
    """`peerdrive unmount` refuses a mount with a file open (busy) at once, and the mount
    keeps serving; `--lazy` then detaches it, and a SIGTERM stops it as above."""
    with read_waiting_on_a_frozen_peer(tmp_path) as (swarm, reader, dd):
        res = peerdrive(reader.home, "unmount", str(reader.mountpoint), check=False,
                        timeout=HANG)
        assert res.returncode != 0 and "busy" in res.stderr, res.stderr
        assert is_mounted(reader.mountpoint) and dd.poll() is None
        res = peerdrive(reader.home, "unmount", "--lazy", str(reader.mountpoint),
                        timeout=HANG)
        assert not is_mounted(reader.mountpoint)
        os.kill(reader.pid, signal.SIGTERM)
        stopped_cleanly(tmp_path, swarm, reader, dd)
