"""Helpers for the cache-limit and pin tests: seeders, mounts with options, status, the store.

Seeders are `peerdrive serve` processes started through `tests.swarm_helpers.Swarm`
(127.0.0.1, port 0, no LAN). Mounts here take any extra options
(`--cache-size`, `--fetch-timeout`), always listen on 127.0.0.1:0 without LAN
discovery, and are remembered by PID: `Nodes.close()` unmounts and stops every
one whatever state the test left it in (killed, busy, half started).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cache.store import BlockStore
from tests.helpers import is_mounted, peerdrive
from tests.processes import stop_pid, wait_exit
from tests.swarm_helpers import NodeProcess, Swarm
from vfs.home import Home

LOOPBACK = "127.0.0.1"
MiB = 1 << 20


@dataclass
class Mounted:
    """A background `peerdrive mount` (its daemon's PID and its DHT/peer port)."""

    home: Path
    link: str
    path: Path
    pid: int
    port: int

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for log in sorted((self.home / "logs").glob("mount-*.log")):
            with contextlib.suppress(OSError):
                out.append("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


class Nodes:
    """Every seeder and mount one test starts; `close()` (or leaving the `with`) ends them."""

    def __init__(self, workdir: Path) -> None:
        self.swarm = Swarm(workdir / "node-logs")
        self.mounts: list[Mounted] = []
        self._mountpoints: list[tuple[Path, Path]] = []

    def __enter__(self) -> Nodes:
        self.swarm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve(self, name: str, home: Path, bootstrap: Iterable[str] = ()) -> NodeProcess:
        return self.swarm.serve(name, home, bootstrap)

    def mount(self, home: Path, link: str, path: Path, *extra: str,
              verbose: bool = False) -> Mounted:
        """`peerdrive mount LINK PATH --listen 127.0.0.1:0 --no-lan EXTRA`, live on return
        (with `verbose`, `peerdrive -v mount`: its log has the info lines)."""
        path.mkdir(parents=True, exist_ok=True)
        self._mountpoints.append((home, path))
        out = peerdrive(home, *(["-v"] if verbose else []), "mount", link, str(path), "--listen", f"{LOOPBACK}:0", "--no-lan",
                        "--json", *extra, timeout=120)
        pid = int(json.loads(out.stdout)["pid"])
        info = json.loads(Home(home).mount_file(path.resolve()).read_text())
        m = Mounted(home, link, path, pid, int(info["port"]))
        self.mounts.append(m)
        assert is_mounted(path.resolve()), f"mount returned but {path} is not mounted"
        return m

    def unmount(self, m: Mounted) -> None:
        """`peerdrive unmount` (waits for the daemon), forced and stopped by PID if that fails."""
        try:
            if is_mounted(m.path.resolve()):
                res = peerdrive(m.home, "unmount", str(m.path), check=False, timeout=60)
                if res.returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", str(m.path)],
                                   capture_output=True, check=False)
        finally:
            stop_pid(m.pid)
            if m in self.mounts:
                self.mounts.remove(m)

    def kill_mount(self, m: Mounted) -> None:
        """SIGKILL the mount daemon, then clear the dead mount with `peerdrive unmount`."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGKILL)
        assert wait_exit(m.pid, None, 30), f"mount pid {m.pid} survived SIGKILL"
        res = peerdrive(m.home, "unmount", str(m.path), check=False, timeout=60)
        if res.returncode != 0 or is_mounted(m.path.resolve()):
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True,
                           check=False)
        if m in self.mounts:
            self.mounts.remove(m)
        assert not is_mounted(m.path.resolve()), f"{m.path} still mounted after the kill"

    def close(self) -> None:
        for m in list(reversed(self.mounts)):
            with contextlib.suppress(Exception):
                self.unmount(m)
        for home, path in self._mountpoints:
            with contextlib.suppress(Exception):
                if is_mounted(path.resolve()):
                    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                                   check=False)
                with contextlib.suppress(OSError, ValueError, KeyError):
                    info = json.loads(Home(home).mount_file(path.resolve()).read_text())
                    stop_pid(int(info["pid"]))
        self._mountpoints.clear()
        self.swarm.close()

    def diagnostics(self) -> str:
        return "\n".join([self.swarm.diagnostics(),
                          *(f"--- mount {m.path} ---\n{m.log_tail()}" for m in self.mounts)])


# ----------------------------------------------------------------------------- status


def status(home: Path, path: Path | None = None) -> dict:
    """`peerdrive status [PATH] --json`."""
    args = ["status", "--json"] if path is None else ["status", str(path), "--json"]
    return json.loads(peerdrive(home, *args, timeout=60).stdout)


def status_table(home: Path, path: Path) -> dict[str, str]:
    """`peerdrive status PATH` (the table), as {row name: value}."""
    out = peerdrive(home, "status", str(path), timeout=60).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        key, _, value = line.strip().partition(" ")
        rows[key] = value.strip()
    return rows


def xattrs(path: Path) -> dict[str, str]:
    """Every `user.peerdrive.*` attribute of `path`, by short name."""
    prefix = "user.peerdrive."
    return {n[len(prefix):]: os.getxattr(path, n).decode()
            for n in os.listxattr(path) if n.startswith(prefix)}


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.peerdrive.{name}").decode()


@dataclass(frozen=True)
class StoreState:
    total_bytes: int
    pins: tuple[str, ...]
    order: tuple[bytes, ...]


def store_state(home: Path) -> StoreState:
    """Total, pins and LRU order of a home's store (opened just for this, then closed).

    Several processes may open the store at once (docs/cache.md), so this is
    safe while a mount runs; it then sees what that mount has committed.
    """
    with BlockStore(Home(home).store_path) as store:
        return StoreState(store.total_bytes, tuple(store.pin_names()),
                          tuple(store.eviction_order()))


@contextlib.contextmanager
def open_store(home: Path) -> Iterator[BlockStore]:
    with BlockStore(Home(home).store_path) as store:
        yield store


# ----------------------------------------------------------------------------- content


def drop_page_cache(path: Path) -> None:
    """Forget the kernel's cached pages of one file, so the next read reaches the mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def poll(predicate, timeout: float, interval: float = 0.25):
    """Call `predicate` until it returns something truthy or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
