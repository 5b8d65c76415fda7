"""A harness for swarm tests: several real `peerdrive` nodes on 127.0.0.1, as processes.

A `Swarm` starts `peerdrive serve --json` processes (and background mounts,
and the corrupt-serving peer of `tests/lying_peer.py`) and remembers each by
PID; `Swarm.close()` unmounts every mount and stops every process whatever
state the test left them in, so a failing test leaves nothing behind. Every
node listens on 127.0.0.1 with port 0 (the kernel picks a free one; the node
reports it) and runs with `--no-lan`: loopback tests never touch the LAN.

What a node did is read from the status snapshot it rewrites every second
under `PEERDRIVE_HOME/run/<pid>.json` (`server.blocks_served`, per-peer fetch
statistics). `DhtProbe` is a DHT node inside the test process that answers
"which nodes does the DHT list as providers of this drive", so a test can
wait until every seeder has announced itself before a reader starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dht.identity import NodeIdentity
from dht.kad import Dht
from tests.helpers import PYTHON, ROOT, digest, env_for, is_mounted, peerdrive
from tests.processes import stop_pid
from vfs.capability import parse_link
from vfs.home import Home

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 60.0


# ----------------------------------------------------------------------------- processes


def node_id_of(home: Path) -> str:
    """The node id (hex) of the node living in `home` (its key is made on first use)."""
    return NodeIdentity.load_or_create(Home(home).node_key_path).node_id.hex()


@dataclass
class NodeProcess:
    """A long-running node started by the harness (`peerdrive serve`, or the lying peer)."""

    name: str
    home: Path
    proc: subprocess.Popen
    log_path: Path
    port: int
    node_id: str
    ready: dict

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM by PID (a clean shutdown), SIGKILL if it does not go."""
        stop_pid(self.pid, self.proc)

    def kill(self) -> None:
        """SIGKILL by PID: the process dies at once, mid-whatever it was doing."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def snapshot(self, after: float | None = None) -> dict:
        return read_snapshot(self.home, self.pid, after=after)

    def log_tail(self) -> str:
        return tail(self.log_path)


@dataclass
class MountedReader:
    """A background `peerdrive mount` of one drive."""

    name: str
    home: Path
    mountpoint: Path
    pid: int
    port: int
    node_id: str

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def snapshot(self, after: float | None = None) -> dict:
        return read_snapshot(self.home, self.pid, after=after)

    def log_tail(self) -> str:
        logs = sorted((self.home / "logs").glob("mount-*.log"))
        return "\n".join(tail(p) for p in logs)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_ready_line(proc: subprocess.Popen, log_path: Path, timeout: float = READY_TIMEOUT
                    ) -> dict:
    """The one JSON line a node prints on stdout once it is serving."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{proc.args} not ready in {timeout:.0f} s\n{tail(log_path)}")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait(timeout=10)
            raise AssertionError(f"{proc.args} exited {proc.returncode} before it was ready\n"
                                 f"{tail(log_path)}")
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


# ----------------------------------------------------------------------------- snapshots


def read_snapshot(home: Path, pid: int, *, after: float | None = None,
                  timeout: float = 15.0) -> dict:
    """The node's `run/<pid>.json`; with `after`, wait for one written at or after that time.

    Snapshots are rewritten once a second, so a snapshot taken "after" some
    work reflects all of it once its `time` is past the moment the work ended.
    """
    path = home / "run" / f"{pid}.json"
    deadline = time.monotonic() + timeout
    last_error = "no snapshot yet"
    while True:
        try:
            snap = json.loads(path.read_text())
            if after is None or snap["time"] >= after:
                return snap
            last_error = f"newest snapshot is from {after - snap['time']:.1f} s too early"
        except (OSError, ValueError) as exc:
            last_error = str(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"no fresh status snapshot at {path}: {last_error}")
        time.sleep(0.1)


def blocks_served(snap: dict) -> int:
    return int(snap["server"]["blocks_served"])


def peer_stats(snap: dict, node_id: str) -> dict | None:
    """What the snapshot's node knows of peer `node_id` as a fetcher (any drive)."""
    for drive in snap["drives"].values():
        for peer in drive["peers"]:
            if peer["node_id"] == node_id:
                return peer
    return None


def blocks_from(snap: dict) -> dict[str, int]:
    """node id -> blocks this node fetched from it."""
    out: dict[str, int] = {}
    for drive in snap["drives"].values():
        for peer in drive["peers"]:
            out[peer["node_id"]] = out.get(peer["node_id"], 0) + int(peer["blocks"])
    return out


# ----------------------------------------------------------------------------- content


def tree_files(root: Path) -> list[str]:
    """Relative paths of every regular file under `root`, sorted."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(str(p.relative_to(root)))
    return sorted(out)


def tree_digests(root: Path, only: Iterable[str] | None = None) -> dict[str, str]:
    names = tree_files(root) if only is None else list(only)
    return {rel: digest(root / rel) for rel in names}


def evict_page_cache(path: Path) -> None:
    """Drop the kernel's cached pages of one file, so the next read reaches the filesystem."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the swarm


@dataclass
class Swarm:
    """Every node and mount one test (or fixture) starts; `close()` ends them all."""

    workdir: Path
    nodes: list[NodeProcess] = field(default_factory=list)
    mounts: list[MountedReader] = field(default_factory=list)
    probes: list[DhtProbe] = field(default_factory=list)
    _pending_mounts: list[tuple[Path, Path]] = field(default_factory=list)
    _count: int = 0

    def __enter__(self) -> Swarm:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log(self, name: str) -> Path:
        self._count += 1
        return self.workdir / f"{self._count:02d}-{name}.log"

    def _spawn(self, name: str, home: Path, argv: list[str]) -> NodeProcess:
        log_path = self._log(name)
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(argv, env=env_for(home), cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=logf)
        placeholder = NodeProcess(name, home, proc, log_path, 0, "", {})
        self.nodes.append(placeholder)  # stopped in close() even if it never gets ready
        ready = read_ready_line(proc, log_path)
        placeholder.port = int(ready["port"])
        placeholder.node_id = str(ready["node_id"])
        placeholder.ready = ready
        return placeholder

    def serve(self, name: str, home: Path, bootstrap: Iterable[str] = (),
              extra: Iterable[str] = (), program: Iterable[str] = ("vfs.cli",)) -> NodeProcess:
        """`peerdrive serve --listen 127.0.0.1:0 --no-lan --json [extra]`, once it serves
        (`program`: the module and its first arguments, e.g. tests.freezing_serve BYTES)."""
        argv = [PYTHON, "-m", *program, "serve", "--listen", f"{LOOPBACK}:0", "--no-lan",
                "--json", *extra]
        for b in bootstrap:
            argv += ["--bootstrap", b]
        return self._spawn(name, home, argv)

    def liar(self, name: str, home: Path, store_home: Path, link: str,
             bootstrap: Iterable[str] = ()) -> NodeProcess:
        """A node serving the blocks of `store_home`'s store with one byte flipped in each."""
        argv = [PYTHON, "-m", "tests.lying_peer", "--home", str(home), "--store",
                str(Home(store_home).store_path), "--link", link, "--listen", f"{LOOPBACK}:0"]
        for b in bootstrap:
            argv += ["--bootstrap", b]
        return self._spawn(name, home, argv)

    def mount(self, name: str, home: Path, link: str, mountpoint: Path,
              bootstrap: Iterable[str] = (), fetch_timeout: float | None = None,
              extra: Iterable[str] = ()) -> MountedReader:
        """`peerdrive mount` in the background, on 127.0.0.1 without LAN discovery."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._pending_mounts.append((home, mountpoint))
        args = ["mount", link, str(mountpoint), "--listen", f"{LOOPBACK}:0", "--no-lan",
                "--json"]
        for b in bootstrap:
            args += ["--bootstrap", b]
        if fetch_timeout is not None:
            args += ["--fetch-timeout", str(fetch_timeout)]
        args += list(extra)
        out = json.loads(peerdrive(home, *args, timeout=READY_TIMEOUT + 30).stdout)
        assert is_mounted(mountpoint), f"{name}: mount returned but nothing is mounted"
        info = json.loads(Home(home).mount_file(mountpoint).read_text())
        m = MountedReader(name, home, mountpoint, int(out["pid"]), int(info["port"]),
                          node_id_of(home))
        self._pending_mounts.remove((home, mountpoint))
        self.mounts.append(m)
        return m

    def probe(self, bootstrap: str) -> DhtProbe:
        """A DHT probe joined through `bootstrap`, up until the swarm closes.

        It outlives every node of the swarm: stopped earlier, it would leave
        them a dead contact, and each lookup would wait out an RPC timeout on it.
        """
        probe = DhtProbe(bootstrap)
        self.probes.append(probe)
        return probe.__enter__()

    def unmount(self, m: MountedReader) -> None:
        """Unmount in the kernel, then stop the mount process by PID (SIGTERM).

        Not `peerdrive unmount`, which waits up to 20 s for the process to
        exit by itself: a mount namespace created meanwhile (another test's
        network namespace, say) holds a copy of the mount, which keeps the
        FUSE connection, and so the process, alive after the unmount here.
        SIGTERM is the mount process's own clean way to stop.
        """
        try:
            if is_mounted(m.mountpoint):
                res = subprocess.run(["fusermount3", "-u", str(m.mountpoint)],
                                     capture_output=True, check=False)
                if res.returncode != 0:
                    subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)],
                                   capture_output=True, check=False)
        finally:
            stop_pid(m.pid)
            if m in self.mounts:
                self.mounts.remove(m)

    def close(self) -> None:
        """Unmount every mount and stop every process this swarm started (by PID)."""
        for m in list(reversed(self.mounts)):
            with contextlib.suppress(Exception):
                self.unmount(m)
        for home, mountpoint in self._pending_mounts:
            with contextlib.suppress(Exception):
                if is_mounted(mountpoint):
                    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                                   capture_output=True, check=False)
                with contextlib.suppress(OSError, ValueError, KeyError):
                    info = json.loads(Home(home).mount_file(mountpoint).read_text())
                    stop_pid(int(info["pid"]))
        self._pending_mounts.clear()
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                stop_pid(node.pid, node.proc)
            with contextlib.suppress(Exception):
                if node.proc.stdout is not None:
                    node.proc.stdout.close()
        self.nodes.clear()
        for probe in self.probes:
            with contextlib.suppress(Exception):
                probe.close()
        self.probes.clear()

    def diagnostics(self) -> str:
        """The tail of every node's log, for an assertion message."""
        parts = [f"--- {n.name} (pid {n.pid}) ---\n{n.log_tail()}" for n in self.nodes]
        parts += [f"--- {m.name} (pid {m.pid}) ---\n{m.log_tail()}" for m in self.mounts]
        return "\n".join(parts)


# ----------------------------------------------------------------------------- DHT probe


class DhtProbe:
    """A DHT node in this test process, in a thread of its own, for provider lookups.

    It joins through `bootstrap` and stays up until closed; get one from
    `Swarm.probe` so that it is closed only after every node has stopped.
    """

    def __init__(self, bootstrap: str) -> None:
        host, port = bootstrap.rsplit(":", 1)
        self._bootstrap = (host, int(port))
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="dht-probe", daemon=True)
        self.dht: Dht | None = None

    def __enter__(self) -> DhtProbe:
        self._thread.start()
        if not self._ready.wait(60):
            raise AssertionError("the DHT probe did not start")
        if self._error is not None:
            raise AssertionError(f"the DHT probe failed: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self.dht = Dht()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.dht.run, LOOPBACK, 0, [self._bootstrap])
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def providers(self, link: str) -> set[str]:
        """Node ids (hex) the DHT lists as providers of the drive behind `link`."""
        dk = parse_link(link).discovery_key
        assert self.dht is not None and self._token is not None
        dht = self.dht

        async def lookup() -> set[str]:
            with trio.fail_after(30):
                return {r.node_id.hex() for r in await dht.find_providers(dk)}

        return trio.from_thread.run(lookup, trio_token=self._token)

    def wait_providers(self, link: str, node_ids: Iterable[str], timeout: float = 30.0
                       ) -> set[str]:
        """Wait until every node in `node_ids` is listed as a provider; return the listing."""
        want = set(node_ids)
        deadline = time.monotonic() + timeout
        found: set[str] = set()
        while True:
            found = self.providers(link)
            if want <= found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"providers {sorted(want - found)} never showed in the "
                                     f"DHT (found {sorted(found)})")
            time.sleep(0.2)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            stop = self._stop
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
        self._thread.join(timeout=30)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
