"""peerdrive side by side with rclone, nginx, borg and the local disk.

Run it as `scripts/bench` (which installs what is missing first):

    scripts/bench            1 GiB file, 20,000-file tree, median of 3 runs per
                             figure; writes docs/benchmarks.md, .json and .png
    scripts/bench --quick    256 MiB, 2,000 files, 1 run each (about two
                             minutes); prints the table only (unless --md,
                             --json or --png name files to write)

Everything runs as separate processes, the way a user runs them, all on
127.0.0.1 and in one temporary directory removed at the end:

* peerdrive: a publisher node (`peerdrive publish`, then ONE `peerdrive serve
  --listen 127.0.0.1:PORT --no-lan` kept for the whole run, as users keep
  one) and, for each measurement, a reader node with an empty cache (a fresh
  PEERDRIVE_HOME) that mounts the drive with `--bootstrap 127.0.0.1:PORT
  --listen 127.0.0.1:0 --no-lan`: every block crosses a real TLS connection,
  and every reader mounts next to the readers that came and went before it.
  The `churn` figure times readers 2-5 after departed ones (half killed); the
  `swarm` figure has four readers of one file at once, beside libtorrent.
* rclone: `rclone mount` of an `:http:` remote served by nginx on 127.0.0.1
  (`--vfs-cache-mode full`, its own cache directory per measurement).
* nginx + curl: the same file over HTTP on loopback, the network's limit.
* borg: `borg create` into a fresh repokey-blake2 repository, beside
  `peerdrive publish`.
* native: the source files on the local disk, the disk's limit.

Within a run the systems alternate (peerdrive, rclone, the references), so a
noisy neighbour hurts all of them alike. Cold figures drop the page cache
(`sync; echo 3 > /proc/sys/vm/drop_caches`) first; where that is not
permitted the output says so.

Structure: one function per figure (`figure_*`, listed in FIGURES) takes the
`Bench` context and returns `Row`s, one per system; `GOALS` compares rows; the
results are one dict (`results_dict`) written as JSON, a markdown table
(`markdown`) and a plot (`plot`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.processes import stop_pid  # noqa: E402  (shared with the tests)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.nginx_helpers import Nginx, NginxError  # noqa: E402 - needs ROOT on the path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
FIRST_BYTES = 64 * KiB
RANDOM_READS = 200
RANDOM_READ_SIZE = 4 * KiB
RSS_POLL_SECONDS = 0.2

RCLONE_FLAGS = ("--read-only", "--vfs-cache-mode", "full")
PEERDRIVE_MOUNT_FLAGS = ("--listen", "127.0.0.1:0", "--no-lan")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One system's runs of one figure."""

    figure: str
    system: str
    unit: str  # "MB/s" (10^6 bytes/s), "files/s", "ms", "s" or "MB" (10^6 bytes)
    runs: list[float]
    higher_is_better: bool
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass(frozen=True)
class Goal:
    """peerdrive's row must be at least `factor` times as good as the other row.

    "As good" is speed for MB/s and files/s and the inverse for ms, so a
    factor of 1.0 means "at least as fast", 0.5 "at most twice as slow".
    """

    text: str
    figure: str
    system: str
    against: str
    factor: float


@dataclass(frozen=True)
class Limit:
    """peerdrive's row must stay under `value` (memory)."""

    text: str
    figure: str
    system: str
    value: float


# ----------------------------------------------------------------------------- processes


def sync() -> None:
    subprocess.run(["sync"], check=False)


def stop_proc(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def unmount_quietly(path: Path) -> None:
    if is_mounted(path):
        res = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
        if res.returncode != 0 and is_mounted(path):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                           check=False)


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (the DHT uses the same number)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError("no free port on 127.0.0.1")


def memory_of(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of a live process in bytes (empty if it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


class RssWatch:
    """Polls the memory of watched processes every RSS_POLL_SECONDS (a daemon thread).

    VmHWM is the kernel's own peak of the resident set; the peak of RssAnon
    (the process's own memory, without file pages it maps) needs polling.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peaks: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        with self._lock:
            self._peaks.setdefault(pid, {})
        self._sample(pid)

    def done(self, pid: int) -> dict[str, int]:
        """The peaks of `pid` (one last sample first), and stop watching it."""
        self._sample(pid)
        with self._lock:
            return self._peaks.pop(pid, {})

    def _sample(self, pid: int) -> None:
        now = memory_of(pid)
        with self._lock:
            peaks = self._peaks.get(pid)
            if peaks is None:
                return
            for key, value in now.items():
                peaks[key] = max(peaks.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(RSS_POLL_SECONDS):
            with self._lock:
                pids = list(self._peaks)
            for pid in pids:
                self._sample(pid)

    def stop(self) -> None:
        self._stop.set()


def command_output(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return (res.stdout.strip() or res.stderr.strip())


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_quiet(argv: list[str], *, env: dict[str, str] | None = None, what: str = "",
              timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{what or argv[0]} exited {proc.returncode}: "
                         f"{(proc.stderr.strip() or proc.stdout.strip())[-2000:]}")
    return proc


def cat_to_null(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds


def same_samples(a: Path, b: Path, size: int) -> bool:
    """Spot check that two files agree (start, middle, end, some odd offsets)."""
    offsets = {0, 1, size // 3 + 12345, size // 2, max(0, size - MiB)}
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in sorted(offsets):
            fa.seek(off)
            fb.seek(off)
            if fa.read(MiB) != fb.read(MiB):
                return False
    return True


# ----------------------------------------------------------------------------- context


@dataclass
class Mount:
    """A live mount: where, the process serving it, and what it is."""

    path: Path
    pid: int
    system: str


@dataclass
class Bench:
    """Options, the work directory, the data, the servers, notes."""

    size: int
    files: int
    folders: int
    runs: int
    quick: bool
    workdir: Path
    peerdrive_argv: list[str]
    stack: contextlib.ExitStack
    notes: list[str] = field(default_factory=list)
    cache_drops: int = 0
    cache_drop_failures: int = 0
    peak_rss: dict[str, list[float]] = field(default_factory=dict)  # "figure|system" -> MB
    peak_anon: dict[str, list[float]] = field(default_factory=dict)  # the same, RssAnon
    rss_watch: RssWatch = field(default_factory=RssWatch)
    _counter: int = 0
    _big: Path | None = None
    _tree: Path | None = None
    _links: dict[str, str] | None = None
    _last_pid: int = 0
    _nginx: int | None = None
    _serve: tuple[subprocess.Popen, int] | None = None

    # -- names ------------------------------------------------------------------------

    def fresh(self, name: str) -> Path:
        """A new, empty directory under the work directory."""
        self._counter += 1
        path = self.workdir / f"{name}-{self._counter}"
        path.mkdir()
        return path

    # -- data -------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def big(self) -> Path:
        """The random file (data/big/random.bin), written once in 4 MiB pieces, synced."""
        if self._big is None:
            folder = self.data / "big"
            folder.mkdir(parents=True)
            path = folder / "random.bin"
            log(f"writing {fmt_size(self.size)} of random data to {path}")
            with open(path, "wb") as f:
                left = self.size
                while left:
                    n = min(left, 4 * MiB)
                    f.write(os.urandom(n))
                    left -= n
            sync()
            self._big = path
        return self._big

    def tree(self) -> Path:
        """data/tree: `files` small random files (512 B to 8 KiB) in `folders` folders."""
        if self._tree is None:
            root = self.data / "tree"
            root.mkdir(parents=True)
            log(f"writing a tree of {self.files} small files in {self.folders} folders")
            rng = random.Random(20261122)
            per = -(-self.files // self.folders)
            made = 0
            for d in range(self.folders):
                folder = root / f"dir{d:03d}"
                folder.mkdir()
                for i in range(min(per, self.files - made)):
                    (folder / f"file{i:04d}.dat").write_bytes(
                        rng.randbytes(rng.randint(512, 8 * KiB)))
                    made += 1
            sync()
            self._tree = root
        return self._tree

    def tree_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.tree().rglob("*") if p.is_file())

    # -- the page cache -----------------------------------------------------------------

    def drop_page_cache(self) -> None:
        """Write dirty pages, then drop the page cache; remember whether it worked."""
        sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            self.cache_drops += 1
        except OSError as exc:
            if self.cache_drop_failures == 0:
                msg = (f"the page cache could not be dropped ({exc.strerror}): "
                       "'cold' figures were measured with whatever the cache held")
                self.notes.append(msg)
                log("note: " + msg)
            self.cache_drop_failures += 1

    # -- peerdrive ----------------------------------------------------------------------

    def env_for(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PEERDRIVE_HOME"] = str(home)
        env["PYTHONPATH"] = str(ROOT)
        env.pop("PEERDRIVE_BOOTSTRAP", None)
        return env

    def peerdrive(self, home: Path, *args: str,
                  timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return run_quiet([*self.peerdrive_argv, *args], env=self.env_for(home),
                         what=f"peerdrive {args[0]}", timeout=timeout)

    def publish(self, home: Path, folder: Path) -> dict:
        home.mkdir(parents=True, exist_ok=True)
        return json.loads(self.peerdrive(home, "publish", str(folder), "--json").stdout)

    def links(self) -> dict[str, str]:
        """The publisher node's read links of data/big and data/tree (published once)."""
        self.link("big")
        self.link("tree")
        assert self._links is not None
        return self._links

    def link(self, which: str) -> str:
        """The read link of data/big ("big") or data/tree ("tree"), published on first use."""
        if self._links is None:
            self._links = {}
        if which not in self._links:
            folder = self.big().parent if which == "big" else self.tree()
            self._links[which] = self.publish(self.publisher_home, folder)["read_link"]
        return self._links[which]

    @property
    def publisher_home(self) -> Path:
        return self.workdir / "home-publisher"

    @contextlib.contextmanager
    def serving(self) -> Iterator[int]:
        """The port of the publisher's `peerdrive serve` on 127.0.0.1.

        One serve process for the whole run, as users keep one: every reader
        of every figure mounts next to the readers that came and went before
        it (issue 9: departed readers must cost a newcomer nothing).
        """
        yield self.serve_port()

    def serve_port(self) -> int:
        """Start the publisher's long-lived serve process (once; stopped at the end)."""
        if self._serve is not None:
            return self._serve[1]
        self.link("big")  # something to serve; later publishes are picked up as they land
        port = free_port()
        with open(self.workdir / "serve.log", "ab") as logf:
            proc = subprocess.Popen(
                [*self.peerdrive_argv, "serve", "--listen", f"127.0.0.1:{port}", "--no-lan",
                 "--json"], env=self.env_for(self.publisher_home), cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf)

        def stop() -> None:
            stop_proc(proc)
            if proc.stdout is not None:
                proc.stdout.close()

        self.stack.callback(stop)
        line = read_line(proc, 60, "peerdrive serve")
        try:
            info = json.loads(line)
        except ValueError:
            raise BenchError(f"peerdrive serve said {line!r}, not JSON") from None
        if info.get("port") != port:
            raise BenchError(f"peerdrive serve listens on {info.get('port')}, not {port}")
        self._serve = (proc, port)
        return port

    def serve_bytes_sent(self) -> int:
        """Bytes of blocks the publisher's serve has sent so far (its status snapshot)."""
        return int(self.serve_counters()["bytes_served"])

    def serve_counters(self) -> dict:
        """The publisher's serve's server counters now (its status snapshot's "server")."""
        assert self._serve is not None
        pid = self._serve[0].pid
        path = self.publisher_home / "run" / f"{pid}.json"
        after = time.time() + 0.05
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                snap = json.loads(path.read_text())
                if snap.get("time", 0) > after:
                    return dict(snap["server"])
            time.sleep(0.1)
        raise BenchError(f"the publisher's serve wrote no status snapshot to {path}")

    @contextlib.contextmanager
    def peerdrive_mount(self, which: str, figure: str,
                        home: Path | None = None) -> Iterator[Mount]:
        """Mount drive `which` ("big" or "tree") on a reader node fetching from the publisher.

        A fresh PEERDRIVE_HOME (an empty cache) unless `home` is given. The
        peak RSS of the mount process is recorded under `figure`.
        """
        links = self.links()
        home = home or self.fresh("home-reader")
        mnt = self.fresh("mnt-peerdrive")
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(self.serving())
            stack.enter_context(self._mounted(home, mnt, figure, links[which], port))
            yield Mount(mnt, self._last_pid, "peerdrive")

    @contextlib.contextmanager
    def mirror_mount(self, home: Path, mnt: Path, figure: str, link: str,
                     url: str) -> Iterator[Mount]:
        """Mount `link` on a fresh node whose only source is the HTTP mirror at `url`."""
        with self._mounted(home, mnt, figure, link, None, ("--mirror", url)):
            yield Mount(mnt, self._last_pid, "peerdrive")

    @contextlib.contextmanager
    def _mounted(self, home: Path, mnt: Path, figure: str, link: str,
                 port: int | None, extra: tuple[str, ...] = ()) -> Iterator[None]:
        pid: int | None = None
        try:
            boot = ("--bootstrap", f"127.0.0.1:{port}") if port is not None else ()
            out = self.peerdrive(home, "mount", link, str(mnt), *boot, *extra,
                                 *PEERDRIVE_MOUNT_FLAGS, "--json", timeout=180)
            pid = int(json.loads(out.stdout)["pid"])
            self.rss_watch.watch(pid)
            if not is_mounted(mnt):
                raise BenchError(f"peerdrive mount returned but nothing is mounted at {mnt}")
            self._last_pid = pid
            yield
        finally:
            if pid is not None:
                self.note_rss(figure, "peerdrive mount", pid)
            if is_mounted(mnt):
                res = subprocess.run([*self.peerdrive_argv, "unmount", str(mnt)],
                                     env=self.env_for(home), cwd=ROOT, capture_output=True,
                                     timeout=60, check=False)
                if res.returncode != 0:
                    unmount_quietly(mnt)
            if pid is not None:
                stop_pid(pid)

    # -- nginx and rclone ---------------------------------------------------------------

    def nginx(self) -> int:
        """nginx serving data/ on 127.0.0.1 (autoindex for rclone's listings); its port.

        The same private nginx the tests use (tests/nginx_helpers.py).
        """
        if self._nginx is None:
            self.big()
            self.tree()
            server = Nginx(self.data, self.workdir / "nginx", autoindex=True)
            try:
                server.start()
            except NginxError as exc:
                raise BenchError(str(exc)) from None
            self.stack.callback(server.stop)
            assert server.proc is not None
            log(f"nginx (pid {server.proc.pid}) on 127.0.0.1:{server.port}")
            self._nginx = server.port
        return self._nginx

    @contextlib.contextmanager
    def rclone_mount(self, figure: str, cache: Path | None = None,
                     local: Path | None = None) -> Iterator[Mount]:
        """`rclone mount :http: MNT` of nginx's data/, with its own VFS cache directory; or,
        with `local`, a writable `rclone mount :local:DIR --vfs-cache-mode writes`."""
        cache = cache or self.fresh("rclone-cache")
        mnt = self.fresh("mnt-rclone")
        conf = self.workdir / "rclone.conf"
        conf.touch()
        logf = self.workdir / f"{mnt.name}.log"
        if local is None:
            remote = [":http:", str(mnt), "--http-url", f"http://127.0.0.1:{self.nginx()}/",
                      *RCLONE_FLAGS]
        else:
            remote = [f":local:{local}", str(mnt), "--vfs-cache-mode", "writes"]
        proc = subprocess.Popen(
            ["rclone", "mount", *remote, "--cache-dir", str(cache), "--config", str(conf),
             "--log-file", str(logf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.rss_watch.watch(proc.pid)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"rclone mount did not mount: see {logf}: "
                                     + (logf.read_text()[-1000:] if logf.exists() else ""))
                time.sleep(0.05)
            yield Mount(mnt, proc.pid, "rclone")
        finally:
            self.note_rss(figure, "rclone mount", proc.pid)
            unmount_quietly(mnt)
            stop_proc(proc)

    def note_rss(self, figure: str, system: str, pid: int) -> None:
        peaks = self.rss_watch.done(pid)
        if peaks.get("VmHWM"):
            self.peak_rss.setdefault(f"{figure}|{system}", []).append(peaks["VmHWM"] / 1e6)
        if peaks.get("RssAnon"):
            self.peak_anon.setdefault(f"{figure}|{system}", []).append(peaks["RssAnon"] / 1e6)


def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The first line `proc` writes to its stdout pipe, within `timeout` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what} said nothing within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                raise BenchError(f"{what} exited {proc.wait()} before it was ready")
            buf += data
    return buf.split(b"\n", 1)[0].decode(errors="replace")


# ----------------------------------------------------------------------------- measurements


def first_bytes_ms(path: Path) -> float:
    """open + read of the first 64 KiB, in ms."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, FIRST_BYTES)
    finally:
        os.close(fd)
    took = (time.perf_counter() - started) * 1000
    if len(data) != FIRST_BYTES:
        raise BenchError(f"{path}: read {len(data)} bytes, expected {FIRST_BYTES}")
    return took


def random_read_ms(path: Path, offsets: list[int]) -> list[float]:
    """Latency in ms of one 4 KiB pread at each offset (file opened once, first)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            started = time.perf_counter()
            data = os.pread(fd, RANDOM_READ_SIZE, off)
            out.append((time.perf_counter() - started) * 1000)
            if len(data) != RANDOM_READ_SIZE:
                raise BenchError(f"{path}: short read at {off}")
    finally:
        os.close(fd)
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def walk_seconds(argv: list[str]) -> float:
    return timed(lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, check=True))


# ----------------------------------------------------------------------------- figures


def cold_cat(bench: Bench, target: Path, source: Path | None = None) -> float:
    """MB/s of `cat target` with the page cache dropped first; checked against `source`."""
    bench.drop_page_cache()
    speed = mb_per_s(bench.size, timed(lambda: cat_to_null(target)))
    if source is not None and not same_samples(target, source, bench.size):
        raise BenchError(f"{target} holds different bytes from {source}")
    return speed


def figure_read_cold(bench: Bench) -> list[Row]:
    """Sequential read of the big file, nothing cached anywhere.

    peerdrive: a reader node with an empty cache fetches every block from the
    one publisher over TLS on loopback. rclone: first read through a fresh
    mount (and VFS cache) of nginx. curl: the file from nginx straight to
    /dev/null, the loopback network's limit. The page cache is dropped before
    each, so the servers read from disk too.
    """
    big = bench.big()
    port = bench.nginx()
    bench.links()
    name = f"cold sequential read, {fmt_size(bench.size)}"
    pd, rc, curl = [], [], []
    for i in range(bench.runs):
        with bench.peerdrive_mount("big", name) as m:
            pd.append(cold_cat(bench, m.path / big.name, big))
        with bench.rclone_mount(name) as m:
            rc.append(cold_cat(bench, m.path / "big" / big.name))
        bench.drop_page_cache()
        curl.append(mb_per_s(bench.size, timed(lambda: run_quiet(
            ["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{port}/big/{big.name}"],
            what="curl"))))
        log(f"{name} run {i + 1}: peerdrive {pd[-1]:.0f}, rclone {rc[-1]:.0f}, "
            f"curl {curl[-1]:.0f} MB/s")
    return [
        Row(name, "peerdrive mount", "MB/s", pd, True,
            "`cat`; fresh reader node (empty cache), every block from one peer over TLS"),
        Row(name, "rclone mount", "MB/s", rc, True,
            "`cat`; fresh mount and VFS cache, first read of nginx over HTTP"),
        Row(name, "curl from nginx", "MB/s", curl, True,
            "`curl -o /dev/null`: the loopback network's limit"),
    ]


def figure_read_mirror(bench: Bench) -> list[Row]:
    """Sequential read of the big file through an HTTP mirror, nothing cached anywhere.

    peerdrive: `peerdrive mirror` wrote the drive's ciphertext under data/
    (once); a fresh reader node (empty cache, no peer, no DHT, no LAN) mounts
    with `--mirror` pointing at it on the same nginx and fetches every block
    over HTTP. rclone: first read through a fresh mount of the plain file on
    that nginx, as in the cold read. Page cache dropped before each.
    """
    big = bench.big()
    port = bench.nginx()
    links = bench.links()
    mirror = bench.data / "mirror-big"
    if not mirror.exists():
        out = json.loads(bench.peerdrive(bench.publisher_home, "mirror", links["big"],
                                         str(mirror), "--json").stdout)
        log(f"peerdrive mirror wrote {out['written']} blocks ({fmt_size(out['written_bytes'])})")
    url = f"http://127.0.0.1:{port}/{mirror.name}"
    name = f"cold read through an HTTP mirror, {fmt_size(bench.size)}"
    pd, rc = [], []
    for i in range(bench.runs):
        home = bench.fresh("home-mirror-reader")
        mnt = bench.fresh("mnt-peerdrive")
        with bench.mirror_mount(home, mnt, name, links["big"], url) as m:
            pd.append(cold_cat(bench, m.path / big.name, big))
        with bench.rclone_mount(name) as m:
            rc.append(cold_cat(bench, m.path / "big" / big.name))
        log(f"{name} run {i + 1}: peerdrive {pd[-1]:.0f}, rclone {rc[-1]:.0f} MB/s")
    return [
        Row(name, "peerdrive mount", "MB/s", pd, True,
            "`cat`; fresh reader node, no peer: every block from `peerdrive mirror`'s "
            "directory on nginx (`mount --mirror`)"),
        Row(name, "rclone mount", "MB/s", rc, True,
            "`cat`; fresh mount and VFS cache of the plain file on the same nginx"),
    ]


def figure_read_hot(bench: Bench) -> list[Row]:
    """Sequential read of the big file from each system's own cache on this device.

    peerdrive: a reader node that already fetched every block, mounted
    afresh (its in-memory caches empty), page cache dropped. rclone: the same
    mount read a second time from its full VFS cache, page cache dropped.
    native: the source file with the page cache dropped, the disk's limit.
    """
    big = bench.big()
    bench.nginx()
    bench.links()
    name = f"hot sequential read, {fmt_size(bench.size)}"
    home = bench.fresh("home-hot")
    with bench.peerdrive_mount("big", name, home=home) as m:
        cat_to_null(m.path / big.name)  # every block into the reader's store
    pd, rc, native = [], [], []
    rcache = bench.fresh("rclone-cache-hot")
    with bench.rclone_mount(name, cache=rcache) as m:
        target = m.path / "big" / big.name
        cat_to_null(target)  # fill the VFS cache
        for i in range(bench.runs):
            with bench.peerdrive_mount("big", name, home=home) as pm:
                bench.drop_page_cache()
                pd.append(mb_per_s(bench.size, timed(lambda t=pm.path / big.name: cat_to_null(t))))
            bench.drop_page_cache()
            rc.append(mb_per_s(bench.size, timed(lambda t=target: cat_to_null(t))))
            bench.drop_page_cache()
            native.append(mb_per_s(bench.size, timed(lambda: cat_to_null(big))))
            log(f"{name} run {i + 1}: peerdrive {pd[-1]:.0f}, rclone {rc[-1]:.0f}, "
                f"native {native[-1]:.0f} MB/s")
    return [
        Row(name, "peerdrive mount", "MB/s", pd, True,
            "`cat`; every block in the node's store, fresh mount, page cache dropped"),
        Row(name, "rclone mount", "MB/s", rc, True,
            "`cat`; second read, from the full VFS cache, page cache dropped"),
        Row(name, "native", "MB/s", native, True,
            "`cat` of the source file, page cache dropped: the disk's limit"),
    ]


def figure_first_byte(bench: Bench) -> list[Row]:
    """open + read of the first 64 KiB of the big file through a fresh, empty mount."""
    big = bench.big()
    bench.nginx()
    bench.links()
    name = "first 64 KiB, uncached"
    pd, rc = [], []
    for i in range(bench.runs):
        with bench.peerdrive_mount("big", name) as m:
            bench.drop_page_cache()
            pd.append(first_bytes_ms(m.path / big.name))
        with bench.rclone_mount(name) as m:
            bench.drop_page_cache()
            rc.append(first_bytes_ms(m.path / "big" / big.name))
        log(f"{name} run {i + 1}: peerdrive {pd[-1]:.1f}, rclone {rc[-1]:.1f} ms")
    return [
        Row(name, "peerdrive mount", "ms", pd, False,
            "lookup, chunk list and first block from one peer, decrypted"),
        Row(name, "rclone mount", "ms", rc, False,
            "lookup (directory listing from nginx) and the first range request"),
    ]


def figure_random_reads(bench: Bench) -> list[Row]:
    """RANDOM_READS reads of 4 KiB at random offsets of the uncached big file: p50, p99."""
    big = bench.big()
    bench.nginx()
    bench.links()
    name50 = f"random 4 KiB reads ({RANDOM_READS}), p50, uncached"
    name99 = f"random 4 KiB reads ({RANDOM_READS}), p99, uncached"
    rows: dict[str, list[float]] = {"pd50": [], "pd99": [], "rc50": [], "rc99": []}
    for i in range(bench.runs):
        rng = random.Random(1000 + i)
        offsets = [rng.randrange(0, bench.size - RANDOM_READ_SIZE) for _ in range(RANDOM_READS)]
        with bench.peerdrive_mount("big", name99) as m:
            bench.drop_page_cache()
            lat = random_read_ms(m.path / big.name, offsets)
            rows["pd50"].append(percentile(lat, 0.5))
            rows["pd99"].append(percentile(lat, 0.99))
        with bench.rclone_mount(name99) as m:
            bench.drop_page_cache()
            lat = random_read_ms(m.path / "big" / big.name, offsets)
            rows["rc50"].append(percentile(lat, 0.5))
            rows["rc99"].append(percentile(lat, 0.99))
        log(f"random reads run {i + 1}: peerdrive p50 {rows['pd50'][-1]:.2f} "
            f"p99 {rows['pd99'][-1]:.2f}, rclone p50 {rows['rc50'][-1]:.2f} "
            f"p99 {rows['rc99'][-1]:.2f} ms")
    note_pd = "`pread` 4 KiB, same offsets for both; each block from one peer"
    note_rc = "`pread` 4 KiB, same offsets; range requests to nginx"
    return [
        Row(name50, "peerdrive mount", "ms", rows["pd50"], False, note_pd),
        Row(name50, "rclone mount", "ms", rows["rc50"], False, note_rc),
        Row(name99, "peerdrive mount", "ms", rows["pd99"], False, note_pd),
        Row(name99, "rclone mount", "ms", rows["rc99"], False, note_rc),
    ]


def figure_metadata(bench: Bench) -> list[Row]:
    """`find` and `ls -lR` over the tree: cold (fresh mount, page cache dropped), then warm."""
    tree = bench.tree()
    bench.nginx()
    bench.links()
    what = f"{bench.files:,} files"
    figs = {(cmd, state): f"`{cmd}` over {what}, {state}"
            for cmd in ("find", "ls -lR") for state in ("cold", "warm")}
    res: dict[tuple[str, str, str], list[float]] = {}

    def measure(system: str, root: Path, cmd: str) -> None:
        argv = ["find", str(root)] if cmd == "find" else ["ls", "-lR", str(root)]
        bench.drop_page_cache()
        res.setdefault((system, cmd, "cold"), []).append(walk_seconds(argv) * 1000)
        res.setdefault((system, cmd, "warm"), []).append(walk_seconds(argv) * 1000)

    for i in range(bench.runs):
        for cmd in ("find", "ls -lR"):
            with bench.peerdrive_mount("tree", figs[(cmd, "cold")]) as m:
                measure("peerdrive mount", m.path, cmd)
            with bench.rclone_mount(figs[(cmd, "cold")]) as m:
                measure("rclone mount", m.path / "tree", cmd)
            measure("native", tree, cmd)
        log(f"metadata run {i + 1}: " + ", ".join(
            f"{s} {c} {st} {v[-1]:.0f} ms" for (s, c, st), v in res.items()))
    notes = {"peerdrive mount": "fresh reader node: directory nodes from one peer",
             "rclone mount": "fresh mount: listings (nginx autoindex) and HEADs over HTTP",
             "native": "the source tree on the local disk"}
    rows = []
    for (cmd, state), name in figs.items():
        for system in ("peerdrive mount", "rclone mount", "native"):
            rows.append(Row(name, system, "ms", res[(system, cmd, state)], False,
                            notes[system]))
    return rows


def figure_churn(bench: Bench) -> list[Row]:
    """Readers 2-5 of one long-lived publisher, each earlier one stopped (half with SIGKILL):
    time to mount and to the first 64 KiB of the big file."""
    big = bench.big()
    link = bench.link("big")
    port = bench.serve_port()
    mount_name = "mount, fresh reader 2-5 after departed ones"
    first_name = "first 64 KiB, fresh reader 2-5 after departed ones"
    ready_name = "mount ready (node start to ready), fresh reader 2-5"
    mounts, firsts, readies = [], [], []
    for i in range(5):
        home = bench.fresh("home-churn")
        mnt = bench.fresh("mnt-churn")
        started = time.perf_counter()
        out = bench.peerdrive(home, "mount", link, str(mnt), "--bootstrap",
                              f"127.0.0.1:{port}", *PEERDRIVE_MOUNT_FLAGS, "--json",
                              timeout=180)
        mount_ms = (time.perf_counter() - started) * 1000
        pid = int(json.loads(out.stdout)["pid"])
        try:
            if not is_mounted(mnt):
                raise BenchError(f"peerdrive mount returned but nothing is mounted at {mnt}")
            first = first_bytes_ms(mnt / big.name)
            ready = mount_ready_ms(home, pid)
        finally:
            killed = i % 2 == 1
            if killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                stop_pid(pid)
                unmount_quietly(mnt)
            else:
                unmount_quietly(mnt)
                stop_pid(pid)
        shown = "?" if ready is None else f"{ready:.0f}"
        log(f"churn reader {i + 1}: mount {mount_ms:.0f} ms (ready {shown} ms after its "
            f"node started), first 64 KiB {first:.1f} ms, then "
            f"{'SIGKILL' if killed else 'SIGTERM'}")
        if i > 0:
            mounts.append(mount_ms)
            firsts.append(first)
            if ready is not None:
                readies.append(ready)
    rows = [
        Row(mount_name, "peerdrive mount", "ms", mounts, False,
            "`peerdrive mount` command, start to return (its interpreter start and its daemon's included)"),
        Row(first_name, "peerdrive mount", "ms", firsts, False,
            "open + read of 64 KiB of the big file, empty cache"),
    ]
    if readies:
        rows.insert(1, Row(ready_name, "peerdrive mount", "ms", readies, False,
                           "the mount's own clock: node start to mount ready"))
    return rows


def mount_ready_ms(home: Path, pid: int) -> float | None:
    """`timings.ready` of a mount's status snapshot, in ms (None: a version without it)."""
    path = home / "run" / f"{pid}.json"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return float(json.loads(path.read_text())["timings"]["ready"]) * 1000
        time.sleep(0.1)
    return None


SWARM_SIZE = 256 * MiB
SWARM_READERS = 4


def figure_swarm(bench: Bench) -> list[Row]:
    """Four fresh readers of one 256 MiB file at once, from the one publisher: time until
    the last has every byte, and what the publisher sent; libtorrent's swarm beside it."""
    folder = bench.data / "swarm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "swarm.bin"
    if not path.exists():
        with open(path, "wb") as f:
            for _ in range(SWARM_SIZE // (4 * MiB)):
                f.write(os.urandom(4 * MiB))
        sync()
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    link = bench.publish(bench.publisher_home, folder)["read_link"]
    port = bench.serve_port()
    name = f"{SWARM_READERS} readers of one {fmt_size(SWARM_SIZE)} file at once"
    sent_name = f"publisher sent, {SWARM_READERS} readers at once"
    times, sent, lt_times, lt_sent = [], [], [], []
    for run in range(bench.runs):
        mounts: list[tuple[Path, int]] = []
        try:
            for _ in range(SWARM_READERS):
                home = bench.fresh("home-swarm")
                mnt = bench.fresh("mnt-swarm")
                out = bench.peerdrive(home, "mount", link, str(mnt), "--bootstrap",
                                      f"127.0.0.1:{port}", *PEERDRIVE_MOUNT_FLAGS, "--json",
                                      timeout=180)
                mounts.append((mnt, int(json.loads(out.stdout)["pid"])))
            before = bench.serve_bytes_sent()
            started = time.perf_counter()
            with ThreadPoolExecutor(SWARM_READERS) as pool:
                digests = list(pool.map(lambda m: sha256_of(m[0] / path.name), mounts))
            times.append(time.perf_counter() - started)
            if digests != [want] * SWARM_READERS:
                raise BenchError("a swarm reader read wrong bytes")
            sent.append((bench.serve_bytes_sent() - before) / 1e6)
        finally:
            for mnt, pid in mounts:
                unmount_quietly(mnt)
                stop_pid(pid)
        seconds, mb = libtorrent_swarm(bench, path)
        lt_times.append(seconds)
        lt_sent.append(mb)
        log(f"{name} run {run + 1}: peerdrive {times[-1]:.1f} s, publisher sent "
            f"{sent[-1]:.0f} MB; libtorrent {seconds:.1f} s, seeder sent {mb:.0f} MB")
    return [
        Row(name, "peerdrive mount", "s", times, False,
            "4 fresh mounts read the file at once; until the last has every byte"),
        Row(name, "libtorrent", "s", lt_times, False,
            "1 seeder + 4 leechers (libtorrent 2.1 sessions, TCP on 127.0.0.1)"),
        Row(sent_name, "peerdrive mount", "MB", sent, False,
            f"bytes of blocks the publisher sent (the file is {SWARM_SIZE / 1e6:.0f} MB)"),
        Row(sent_name, "libtorrent", "MB", lt_sent, False,
            "payload bytes the seeder uploaded"),
    ]


def figure_host(bench: Bench) -> list[Row]:
    """A host (`peerdrive host`, store link only) completes a 1 GiB version that the
    publisher pushes to it (`serve --push`): from the publisher's serve starting to the
    host's status saying the version is complete (every block fetched, checked, pinned)."""
    big = bench.big()
    publisher = bench.fresh("home-host-publisher")
    link = bench.publish(publisher, big.parent)["read_link"]
    store_link = json.loads(bench.peerdrive(publisher, "share", link, "--store",
                                            "--json").stdout)["link"]
    name = f"host completes a {fmt_size(bench.size)} version pushed from the publisher"
    times = []
    for run in range(bench.runs):
        host = bench.fresh("home-host")
        procs: list[subprocess.Popen] = []
        try:
            with open(bench.workdir / "host-serve.log", "ab") as logf:
                procs.append(subprocess.Popen(
                    [*bench.peerdrive_argv, "serve", "--listen", "127.0.0.1:0", "--no-lan",
                     "--json"], env=bench.env_for(host), cwd=ROOT, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=logf))
            port = int(json.loads(read_line(procs[-1], 60, "the host's serve"))["port"])
            bench.peerdrive(host, "host", store_link, "--no-wait")
            started = time.perf_counter()
            with open(bench.workdir / "host-publisher-serve.log", "ab") as logf:
                procs.append(subprocess.Popen(
                    [*bench.peerdrive_argv, "serve", "--listen", "127.0.0.1:0", "--no-lan",
                     "--json", "--push", f"127.0.0.1:{port}"],
                    env=bench.env_for(publisher), cwd=ROOT, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=logf))
            read_line(procs[-1], 60, "the publisher's serve")
            snapshot = host / "run" / f"{procs[0].pid}.json"
            deadline = time.monotonic() + 600
            while True:
                with contextlib.suppress(OSError, ValueError):
                    states = json.loads(snapshot.read_text()).get("hosting", [])
                    if states and states[0]["state"] == "complete":
                        break
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise BenchError("the host did not complete the version (see "
                                     "host-serve.log and host-publisher-serve.log)")
                time.sleep(0.05)
            times.append(time.perf_counter() - started)
            log(f"{name} run {run + 1}: {times[-1]:.1f} s "
                f"({mb_per_s(bench.size, times[-1]):.0f} MB/s)")
        finally:
            for proc in reversed(procs):
                stop_proc(proc)
                if proc.stdout is not None:
                    proc.stdout.close()
    return [Row(name, "peerdrive host", "s", times, False,
                "store link only; every block over the publisher's push connection on "
                "127.0.0.1, checked against the signed block list and pinned")]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def libtorrent_swarm(bench: Bench, path: Path) -> tuple[float, float]:
    """One seeder and SWARM_READERS leechers of `path` over TCP on 127.0.0.1 (libtorrent
    sessions in this process; its work runs in its own threads): seconds until every
    leecher has every piece, and MB of payload the seeder uploaded."""
    try:
        import libtorrent as lt
    except ImportError:
        raise BenchError("the libtorrent package is missing: run scripts/bench "
                         "(it installs requirements-bench.lock)") from None
    with warnings.catch_warnings():  # the 2.x bindings deprecate these, without a successor
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = lt.file_storage()
        lt.add_files(fs, str(path))
        torrent = lt.create_torrent(fs)
    lt.set_piece_hashes(torrent, str(path.parent))
    info = lt.torrent_info(lt.bencode(torrent.generate()))

    def params(save_path: Path, seed: bool = False) -> lt.add_torrent_params:
        atp = lt.add_torrent_params()
        atp.ti = info
        atp.save_path = str(save_path)
        if seed:
            atp.flags |= lt.torrent_flags.seed_mode
        return atp

    def session() -> lt.session:
        return lt.session({
            "listen_interfaces": "127.0.0.1:0",
            "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
            "enable_natpmp": False, "enable_incoming_utp": False,
            "enable_outgoing_utp": False, "allow_multiple_connections_per_ip": True,
            "alert_mask": 0,
        })

    seeder = session()
    seed = seeder.add_torrent(params(path.parent, seed=True))
    leechers, handles = [], []
    for _ in range(SWARM_READERS):
        s = session()
        target = bench.fresh("lt-leecher")
        handles.append(s.add_torrent(params(target)))
        leechers.append(s)
    ports = [s.listen_port() for s in (seeder, *leechers)]
    started = time.perf_counter()
    for h in handles:
        for p in ports:
            h.connect_peer(("127.0.0.1", p))
    deadline = time.monotonic() + 600
    while not all(h.status().is_seeding for h in handles):
        if time.monotonic() > deadline:
            raise BenchError("the libtorrent swarm did not finish within 10 minutes")
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    uploaded = seed.status().total_payload_upload / 1e6
    for s in (seeder, *leechers):
        del s
    return seconds, uploaded


def figure_publish(bench: Bench) -> list[Row]:
    """`peerdrive publish` into a fresh home beside `borg create` into a fresh repository."""
    big = bench.big()
    tree = bench.tree()
    tree_bytes = bench.tree_bytes()
    name_big = f"publish {fmt_size(bench.size)} file"
    name_tree = f"publish {bench.files:,} small files"
    pd_big, pd_tree, borg_big, borg_tree = [], [], [], []
    borg_env = dict(os.environ, BORG_PASSPHRASE="peerdrive-bench",
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_BASE_DIR=str(bench.workdir / "borg-base"))

    def borg(folder: Path) -> float:
        repo = bench.fresh("borg-repo") / "repo"
        run_quiet(["borg", "init", "--encryption", "repokey-blake2", str(repo)],
                  env=borg_env, what="borg init")
        sync()
        # cd into the parent so the archive holds relative paths, as publish does
        argv = ["borg", "create", f"{repo}::bench", folder.name]
        started = time.perf_counter()
        res = subprocess.run(argv, env=borg_env, cwd=folder.parent, capture_output=True,
                             text=True, check=False)
        took = time.perf_counter() - started
        if res.returncode != 0:
            raise BenchError(f"borg create exited {res.returncode}: {res.stderr[-2000:]}")
        shutil.rmtree(repo.parent)
        return took

    def peerdrive(folder: Path) -> float:
        home = bench.fresh("home-publish")
        sync()
        started = time.perf_counter()
        info = bench.publish(home, folder)
        took = time.perf_counter() - started
        if info["new_bytes"] <= 0:
            raise BenchError(f"publish reported {info}")
        shutil.rmtree(home)
        return took

    for i in range(bench.runs):
        pd_big.append(mb_per_s(bench.size, peerdrive(big.parent)))
        borg_big.append(mb_per_s(bench.size, borg(big.parent)))
        pd_tree.append(bench.files / peerdrive(tree))
        borg_tree.append(bench.files / borg(tree))
        log(f"publish run {i + 1}: file peerdrive {pd_big[-1]:.0f}, borg {borg_big[-1]:.0f} "
            f"MB/s; tree peerdrive {pd_tree[-1]:.0f}, borg {borg_tree[-1]:.0f} files/s")
    pd_note = "`peerdrive publish` into a fresh home (wall time, process start included)"
    borg_note = "`borg create` into a fresh repokey-blake2 repository (default lz4)"
    return [
        Row(name_big, "peerdrive publish", "MB/s", pd_big, True, pd_note),
        Row(name_big, "borg create", "MB/s", borg_big, True, borg_note),
        Row(name_tree, "peerdrive publish", "files/s", pd_tree, True,
            pd_note + f"; {tree_bytes / 1e6:.0f} MB"),
        Row(name_tree, "borg create", "files/s", borg_tree, True, borg_note),
    ]


def _mount_port(home: Path, mnt: Path) -> int:
    for f in (home / "mounts").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = json.loads(f.read_text())
            if info["mountpoint"] == str(mnt):
                return int(info["port"])
    raise BenchError(f"no mount record for {mnt} under {home}")


def _wait_visible(path: Path, size: int, timeout: float = 600) -> float:
    """Seconds until `path` exists with `size` bytes (a reader's mount following versions)."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if path.stat().st_size == size:
                return time.perf_counter() - started
        time.sleep(0.02)
    raise BenchError(f"{path} did not appear with {size} bytes in {timeout:.0f} s")


def _watch_copy(bench: Bench, big: Path) -> float:
    """Copy the bench file into a folder `publish --watch` watches: seconds from the end of
    the copy to the version naming it; exactly one version may name it."""
    home = bench.fresh("home-watch")
    folder = bench.fresh("watched")
    (folder / "start.txt").write_text("start\n")
    proc = subprocess.Popen(
        [*bench.peerdrive_argv, "publish", str(folder), "--watch", "--json", "--listen",
         "127.0.0.1:0", "--no-lan"], env=bench.env_for(home), cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = [b""]

    def next_line(timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in pending[0]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError(f"publish --watch said nothing within {timeout:.0f} s")
            data = os.read(fd, 65536)
            if not data:
                raise BenchError(f"publish --watch exited {proc.wait()}")
            pending[0] += data
        line, pending[0] = pending[0].split(b"\n", 1)
        return line.decode(errors="replace")

    try:
        while '"watching"' not in next_line(120):
            pass
        run_quiet(["cp", str(big), str(folder / "big.bin")], what="cp")
        copied = time.perf_counter()
        while True:
            event = json.loads(next_line(600))
            names = event.get("added", []) + event.get("modified", [])
            if "big.bin" in names:
                took = time.perf_counter() - copied
                break
        (folder / "after.txt").write_text("after\n")
        event = json.loads(next_line(120))
        if "big.bin" in event.get("added", []) + event.get("modified", []):
            raise BenchError("publish --watch published the copied file twice")
        return took
    finally:
        stop_proc(proc)
        shutil.rmtree(home, ignore_errors=True)


def figure_write(bench: Bench) -> list[Row]:
    """Writing a file through a writable mount (issue 13), beside `cp` to the local disk and
    through `rclone mount --vfs-cache-mode writes`; and how long a save takes to show in a
    reader's mount on another node.

    Each copy is `cp` then an fsync of the copy (`sync FILE`): for peerdrive that is when
    the bytes are cut, encrypted, stored and journalled (the version follows at once);
    for rclone when its cache file is written (it uploads on close); native, on the disk.
    """
    big = bench.big()
    name_write = f"write {fmt_size(bench.size)} file"
    name_big_visible = f"{fmt_size(bench.size)} save to visible in a reader's mount"
    name_small_visible = "small save to visible in a reader's mount"
    pd, rc, native, big_visible, small_visible = [], [], [], [], []
    watched: list[float] = []
    name_watch = f"{fmt_size(bench.size)} copied into a watched folder: copy end to its version"

    def copy(target: Path) -> float:
        bench.drop_page_cache()
        started = time.perf_counter()
        run_quiet(["cp", str(big), str(target)], what="cp")
        run_quiet(["sync", str(target)], what="sync FILE")
        return time.perf_counter() - started

    for i in range(bench.runs):
        dest = bench.fresh("write-native")
        native.append(mb_per_s(bench.size, copy(dest / "copy.bin")))
        shutil.rmtree(dest)

        writer = bench.fresh("home-writer")
        empty = bench.fresh("empty-drive")
        info = bench.publish(writer, empty)
        write_link = bench.peerdrive(writer, "share", str(empty), "--write").stdout.strip()
        wmnt = bench.fresh("mnt-writable")
        with bench._mounted(writer, wmnt, name_write, write_link, None):
            rmnt = bench.fresh("mnt-reader")
            port = _mount_port(writer, wmnt)
            with bench._mounted(bench.fresh("home-reader"), rmnt, name_big_visible,
                                info["read_link"], port):
                pd.append(mb_per_s(bench.size, copy(wmnt / "copy.bin")))
                big_visible.append(_wait_visible(rmnt / "copy.bin", bench.size))
                if not same_samples(big, rmnt / "copy.bin", bench.size):
                    raise BenchError("the reader's copy differs from the file written")
                note = wmnt / "note.txt"
                saved = time.perf_counter()
                note.write_bytes(b"a small save\n" * 100)  # no fsync: the quiet period
                _wait_visible(rmnt / "note.txt", 1300)
                small_visible.append(time.perf_counter() - saved)
        shutil.rmtree(writer)

        watched.append(_watch_copy(bench, big))

        rdest = bench.fresh("rclone-local")
        with bench.rclone_mount(name_write, local=rdest) as m:
            rc.append(mb_per_s(bench.size, copy(m.path / "copy.bin")))
        shutil.rmtree(rdest, ignore_errors=True)
        log(f"write run {i + 1}: peerdrive {pd[-1]:.0f}, rclone {rc[-1]:.0f}, native "
            f"{native[-1]:.0f} MB/s; visible in a reader {big_visible[-1]:.2f} s (big, after "
            f"fsync), {small_visible[-1]:.2f} s (small save)")
    return [
        Row(name_write, "peerdrive mount", "MB/s", pd, True,
            "`cp` + fsync into a write link's mount (cut, encrypted, stored, journalled)"),
        Row(name_write, "rclone mount", "MB/s", rc, True,
            "`cp` + fsync into `rclone mount :local:DIR --vfs-cache-mode writes`"),
        Row(name_write, "native", "MB/s", native, True, "`cp` + fsync on the local disk"),
        Row(name_big_visible, "peerdrive mount", "s", big_visible, False,
            "from the writer's fsync to the whole file in a reader's mount on another node"),
        Row(name_watch, "peerdrive publish --watch", "s", watched, False,
            "`cp` into a folder `publish --watch` watches (--publish-delay 2): seconds from the "
            "end of the copy to the one version holding the whole file (checked: exactly one)"),
        Row(name_small_visible, "peerdrive mount", "s", small_visible, False,
            "a 1.3 kB save without fsync (published after the default 2 s quiet period) "
            "until a reader's mount shows it"),
    ]


FIGURES: list[Callable[[Bench], list[Row]]] = [
    figure_read_cold,
    figure_read_mirror,
    figure_read_hot,
    figure_first_byte,
    figure_random_reads,
    figure_metadata,
    figure_publish,
    figure_write,
    figure_churn,
    figure_swarm,
    figure_host,
]


def memory_rows(bench: Bench) -> list[Row]:
    """Peak memory of the mount processes: for each system, one value per figure that mounted
    (the largest of that figure's mounts); the figure's median is of those."""
    rows = []
    for name, table, note in (
            ("mount peak RSS", bench.peak_rss, "VmHWM, the peak resident set, file pages the "
             "process maps included (for peerdrive: the LMDB store's pages, shared with the "
             "page cache); one value per figure, the largest of its mounts"),
            ("mount peak anonymous RSS", bench.peak_anon, "peak RssAnon (polled every "
             f"{RSS_POLL_SECONDS} s): the process's own memory, no file pages")):
        by_system: dict[str, list[float]] = {}
        for key, values in table.items():
            _figure, system = key.split("|", 1)
            by_system.setdefault(system, []).append(max(values))
        for system, values in sorted(by_system.items(), key=lambda kv: kv[0] != "peerdrive mount"):
            rows.append(Row(name, system, "MB", values, False, note))
    return rows


# ----------------------------------------------------------------------------- goals

GOALS: list[Goal | Limit] = [
    Goal("cold read >= 1.0x rclone", "cold sequential read", "peerdrive mount",
         "rclone mount", 1.0),
    Goal("cold read >= 0.5x curl from nginx", "cold sequential read", "peerdrive mount",
         "curl from nginx", 0.5),
    Goal("mirror read >= 0.5x rclone", "cold read through an HTTP mirror", "peerdrive mount",
         "rclone mount", 0.5),
    Goal("hot read >= 1.0x rclone", "hot sequential read", "peerdrive mount", "rclone mount",
         1.0),
    Goal("hot read >= 0.5x native", "hot sequential read", "peerdrive mount", "native", 0.5),
    Goal("first byte <= rclone", "first 64 KiB", "peerdrive mount", "rclone mount", 1.0),
    Goal("random 4 KiB p99 <= rclone", "random 4 KiB reads (", "peerdrive mount",
         "rclone mount", 1.0),
    Goal("warm find <= 2x native", "`find` over", "peerdrive mount", "native", 0.5),
    Goal("publish file >= 1.0x borg create", "publish ", "peerdrive publish", "borg create",
         1.0),
    Goal("publish tree >= 1.0x borg create", "publish ", "peerdrive publish", "borg create",
         1.0),
    Limit("mount RSS < 200 MB (largest of any figure)", "mount peak RSS", "peerdrive mount",
          200.0),
    Limit("mount anonymous RSS < 200 MB (largest of any figure)", "mount peak anonymous RSS",
          "peerdrive mount", 200.0),
]


def goal_figure(goal: Goal | Limit, figures: list[dict]) -> list[str]:
    """The figure names a goal is about (matched by prefix and, where needed, a word)."""
    names = list(dict.fromkeys(f["figure"] for f in figures))
    hits = [n for n in names if n.startswith(goal.figure)]
    if isinstance(goal, Limit):
        hits = [n for n in hits if n == goal.figure]
    if goal.text.startswith("random"):
        hits = [n for n in hits if "p99" in n]
    elif goal.text.startswith("warm find"):
        hits = [n for n in hits if n.endswith("warm")]
    elif goal.text.startswith("publish file"):
        hits = [n for n in hits if n.endswith("file")]
    elif goal.text.startswith("publish tree"):
        hits = [n for n in hits if n.endswith("files")]
    return hits


def advantage(mine: dict, other: dict) -> float | None:
    """How many times as good `mine` is as `other` (speed, or inverse time)."""
    if not mine["median"] or not other["median"]:
        return None
    if mine["higher_is_better"]:
        return mine["median"] / other["median"]
    return other["median"] / mine["median"]


def evaluate_goals(figures: list[dict]) -> list[dict]:
    out = []
    for goal in GOALS:
        for name in goal_figure(goal, figures):
            rows = {f["system"]: f for f in figures if f["figure"] == name}
            mine = rows.get(goal.system)
            if mine is None:
                continue
            if isinstance(goal, Limit):
                worst = max(mine["runs"])
                out.append({"goal": goal.text, "figure": name, "value": worst,
                            "unit": mine["unit"], "met": worst < goal.value})
                continue
            other = rows.get(goal.against)
            if other is None:
                continue
            adv = advantage(mine, other)
            out.append({"goal": goal.text, "figure": name,
                        "ratio": None if adv is None else round(adv, 3),
                        "met": adv is not None and adv >= goal.factor - 1e-9})
    return out


# ----------------------------------------------------------------------------- the machine


def machine_info(workdir: Path) -> dict:
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fstype = command_output(["df", "--output=fstype", str(workdir)]).splitlines()[-1:]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem_kib * 1024,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "work_filesystem": fstype[0].strip() if fstype else "",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    out = {}
    for dist in ("peerdrive", "pyfuse3", "trio", "cryptography", "lmdb", "pyfastcdc",
                 "msgpack", "kademlia", "matplotlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                            "vfs", "dht", "cache"])
    out["git_commit"] = commit + ("+uncommitted changes" if dirty else "")
    out["fuse"] = command_output(["fusermount3", "--version"]).replace(
        "fusermount3 version: ", "")
    out["rclone"] = command_output(["rclone", "version"]).splitlines()[0:1]
    out["nginx"] = command_output(["nginx", "-v"]).replace("nginx version: ", "")
    out["borg"] = command_output(["borg", "--version"])
    out["curl"] = command_output(["curl", "--version"]).split(" (")[0]
    out["coreutils"] = command_output(["cat", "--version"]).splitlines()[0:1]
    for key in ("rclone", "coreutils"):
        out[key] = out[key][0] if out[key] else ""
    return out


# ----------------------------------------------------------------------------- output


def fmt_size(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_value(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def results_dict(bench: Bench, rows: list[Row], machine: dict, vers: dict,
                 argv: list[str], seconds: float) -> dict:
    figures = []
    for r in rows:
        figures.append({
            "figure": r.figure,
            "system": r.system,
            "unit": r.unit,
            "higher_is_better": r.higher_is_better,
            "runs": [round(x, 3) for x in r.runs],
            "median": round(r.median, 3),
            "note": r.note,
        })
    for f in figures:
        pd = next((g for g in figures if g["figure"] == f["figure"]
                   and g["system"].startswith("peerdrive")), None)
        adv = None if pd is None or pd is f else advantage(pd, f)
        f["peerdrive_advantage"] = None if adv is None else round(adv, 3)
    return {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["scripts/bench", *argv]),
        "config": {
            "size_bytes": bench.size,
            "tree_files": bench.files,
            "tree_folders": bench.folders,
            "runs": bench.runs,
            "quick": bench.quick,
            "page_cache_dropped": bench.cache_drop_failures == 0 and bench.cache_drops > 0,
            "mb": "10^6 bytes",
            "seconds_total": round(seconds, 1),
            "peerdrive_mount_flags": ["--bootstrap", "127.0.0.1:PORT",
                                      *PEERDRIVE_MOUNT_FLAGS],
            "peerdrive_serve_flags": ["--listen", "127.0.0.1:PORT", "--no-lan"],
            "rclone_flags": [":http:", "--http-url", "http://127.0.0.1:PORT/", *RCLONE_FLAGS,
                             "--cache-dir", "DIR"],
            "nginx": "worker_processes 1; sendfile on; tcp_nopush on; autoindex on; "
                     "access_log off; listen 127.0.0.1",
            "borg": "borg init --encryption repokey-blake2; borg create (defaults: lz4)",
        },
        "machine": machine,
        "versions": vers,
        "figures": figures,
        "goals": evaluate_goals(figures),
        "notes": bench.notes,
    }


def table(results: dict) -> str:
    lines = ["| figure | system | median | unit | runs | peerdrive's advantage |",
             "|---|---|---:|---|---|---:|"]
    for f in results["figures"]:
        runs = ", ".join(fmt_value(x) for x in f["runs"])
        adv = f.get("peerdrive_advantage")
        shown = "–" if adv is None else f"{adv:.2f}×"
        lines.append(f"| {f['figure']} | {f['system']} | {fmt_value(f['median'])} | "
                     f"{f['unit']} | {runs} | {shown} |")
    return "\n".join(lines)


def goals_table(results: dict) -> str:
    lines = ["| goal | figure | measured | met |", "|---|---|---:|---|"]
    for g in results["goals"]:
        if "ratio" in g:
            measured = "–" if g["ratio"] is None else f"{g['ratio']:.2f}×"
        else:
            measured = f"{fmt_value(g['value'])} {g['unit']}"
        lines.append(f"| {g['goal']} | {g['figure']} | {measured} | "
                     f"{'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


def markdown(results: dict, analysis: str) -> str:
    m, v, c = results["machine"], results["versions"], results["config"]
    cold = ("the page cache was dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) "
            "before every cold run" if c["page_cache_dropped"] else
            "**the page cache could not be dropped**: cold figures are not cold")
    notes_block = "".join(f"\n- {n}" for n in results["notes"])
    notes_block = f"\nNotes:\n{notes_block}\n" if notes_block else ""
    seen: set[tuple[str, str]] = set()
    system_notes = ""
    for f in results["figures"]:
        key = (f["figure"].split(",")[0], f["system"])
        if f["note"] and key not in seen:
            seen.add(key)
            system_notes += f"- *{f['system']}* ({f['figure']}): {f['note']}\n"
    flags = (f"- peerdrive: `peerdrive serve {' '.join(c['peerdrive_serve_flags'])}` on the "
             f"publisher; `peerdrive mount LINK MNT {' '.join(c['peerdrive_mount_flags'])}` "
             "on each reader\n"
             f"- rclone: `rclone mount {' '.join(c['rclone_flags'])}`\n"
             f"- nginx: {c['nginx']}\n"
             f"- borg: {c['borg']}, `BORG_PASSPHRASE` set, a fresh repository per run\n")
    return f"""# peerdrive benchmarks

Produced by `{results['command']}` on {results['generated']} in {c['seconds_total']:.0f} s
(`scripts/bench.py`; the same figures as JSON in `benchmarks.json`, as a plot in
`benchmarks.png`). Regenerate with `scripts/bench`, or try `scripts/bench --quick`.

peerdrive beside rclone (mounting the same data served by nginx over HTTP),
curl from nginx (the loopback network's limit), borg (publishing) and the
local disk ("native"). Data: one {fmt_size(c['size_bytes'])} file of random
bytes and a tree of {c['tree_files']:,} small random files (512 B to 8 KiB) in
{c['tree_folders']} folders. Each figure is the median of {c['runs']} run(s),
the systems alternating within each run; every server listens on 127.0.0.1
only. peerdrive reads come from a *separate node*: a reader with an empty
cache (a fresh `PEERDRIVE_HOME`) fetching every block from one publisher
over TLS on loopback. For the cold figures {cold}. MB/s is 10^6 bytes per
second. "peerdrive's advantage" is how many times as good peerdrive's median
is as that row's (speed for MB/s and files/s, inverse time for ms): above 1
peerdrive is better. Machines are noisy: the runs column shows the spread.

## Goals

{goals_table(results)}

## All figures

{table(results)}

![the figures as bars](benchmarks.png)

What each system does:

{system_notes}
Flags:

{flags}{notes_block}
{analysis}
## Machine

| | |
|---|---|
| CPU | {m['cpu']} |
| nproc | {m['nproc']} |
| memory | {m['memory_bytes'] / GiB:.1f} GiB |
| kernel | {m['kernel']} |
| OS | {m['os']} |
| Python | {m['python']} |
| work directory filesystem | {m['work_filesystem']} |
| load average at start (1, 5, 15 min) | {', '.join(str(x) for x in m['load_average_at_start'])} |
| load average at end (1, 5, 15 min) | {', '.join(str(x) for x in m['load_average_at_end'])} |
| peerdrive | {v['peerdrive']} (git {v['git_commit']}) |
| pyfuse3 / libfuse | {v['pyfuse3']} / {v['fuse']} |
| trio / cryptography / lmdb | {v['trio']} / {v['cryptography']} / {v['lmdb']} |
| pyfastcdc / msgpack | {v['pyfastcdc']} / {v['msgpack']} |
| rclone | {v['rclone']} |
| nginx | {v['nginx']} |
| borg | {v['borg']} |
| curl | {v['curl']} |
| coreutils | {v['coreutils']} |
| matplotlib (plot) | {v['matplotlib']} |
"""


ANALYSIS_START = "<!-- analysis -->"
ANALYSIS_END = "<!-- /analysis -->"


def kept_analysis(md_path: Path) -> str:
    """The hand-written analysis section of an existing benchmarks.md, kept across runs."""
    with contextlib.suppress(OSError):
        text = md_path.read_text()
        start, end = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
        if 0 <= start < end:
            return text[start:end + len(ANALYSIS_END)] + "\n"
    return f"{ANALYSIS_START}\n{ANALYSIS_END}\n"


def plot(results: dict, path: Path) -> None:
    """One panel per figure: each system's median as a bar, peerdrive highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(f["figure"] for f in results["figures"]))
    cols = 3
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(15, 2.6 * rows_n), squeeze=False)
    colours = {"peerdrive": "#d9480f", "rclone": "#1c7ed6", "curl": "#5c940d",
               "native": "#868e96", "borg": "#7048e8"}
    for ax, name in zip(axes.flat, names, strict=False):
        rows = [f for f in results["figures"] if f["figure"] == name]
        labels = [r["system"] for r in rows]
        values = [r["median"] for r in rows]
        colour = [next((c for k, c in colours.items() if r["system"].startswith(k)), "#495057")
                  for r in rows]
        ax.barh(labels, values, color=colour)
        ax.invert_yaxis()
        better = "higher is better" if rows[0]["higher_is_better"] else "lower is better"
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{rows[0]['unit']} ({better})", fontsize=8)
        ax.tick_params(labelsize=8)
        for y, v in enumerate(values):
            ax.text(v, y, " " + fmt_value(v), va="center", fontsize=8)
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"peerdrive vs rclone, nginx, borg, native — {results['generated']} "
                 f"(median of {results['config']['runs']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"": 1, "K": KiB, "M": MiB, "G": GiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMG" else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M or 1G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return int(value * units[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=(
        "Measure peerdrive beside rclone, nginx + curl, borg and the local disk; write "
        "docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks.png."))
    p.add_argument("--quick", action="store_true",
                   help="256 MiB, 2,000 files, 1 run per figure; writes files only if "
                        "--md/--json/--png say")
    p.add_argument("--runs", type=int, help="runs per figure (default 3, --quick 1)")
    p.add_argument("--size", type=parse_size, help="file size, e.g. 1G (default 1G, --quick 256M)")
    p.add_argument("--files", type=int, help="files in the tree (default 20000, --quick 2000)")
    p.add_argument("--md", type=Path, help="markdown output (default docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="JSON output (default docs/benchmarks.json)")
    p.add_argument("--png", type=Path, help="plot output (default docs/benchmarks.png)")
    p.add_argument("--workdir", type=Path,
                   help="where the temporary directory goes (default: $TMPDIR or /tmp)")
    p.add_argument("--swarm", action="store_true",
                   help="only the swarm goals in network namespaces (scripts/bench_swarm.py)")
    p.add_argument("--only", action="append", metavar="FIGURE",
                   help="run only this figure (read_cold, read_hot, first_byte, random_reads, "
                        "metadata, publish, write, churn, swarm, host; repeatable)")
    p.add_argument("--growth", metavar="COUNTS",
                   help="instead of the figures: the growth table (issue 17) for these file "
                        "counts, e.g. 1000,10000,100000; written into docs/benchmarks.md "
                        "unless --md says where")
    p.add_argument("--step-timeout", type=float, default=3600,
                   help="growth table: seconds a step may take before it is cut and shown "
                        "as '> N' (default 3600)")
    p.add_argument("--growth-skip", action="append", default=[], metavar="STEP",
                   choices=GROWTH_OPTIONAL,
                   help="growth table: leave out this comparison step (shown as 'not run'; "
                        f"repeatable; one of {', '.join(GROWTH_OPTIONAL)})")
    return p


def peerdrive_argv() -> list[str]:
    script = Path(sys.executable).parent / "peerdrive"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vfs.cli"]


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run the cleanup in `main`'s finally blocks


def missing_tools(figures: list[Callable[[Bench], list[Row]]]) -> list[str]:
    """The tools the chosen figures need that are not installed (the churn and swarm
    figures measure peerdrive, and libtorrent from Python, only)."""
    needed = {"fusermount3"}
    for fig in figures:
        if fig not in (figure_churn, figure_swarm, figure_host):
            needed |= {"rclone", "nginx", "borg", "curl"}
    return sorted(t for t in needed if shutil.which(t) is None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.growth:
        counts = [int(c) for c in args.growth.split(",")]
        return growth_main(counts, args.md or ROOT / "docs" / "benchmarks.md", args.workdir,
                           args.step_timeout, frozenset(args.growth_skip))
    if args.swarm:
        from bench_swarm import run_swarm_goals

        return run_swarm_goals(args.workdir)
    size = args.size or (256 * MiB if args.quick else GiB)
    files = args.files or (2000 if args.quick else 20000)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1 or files < 1:
        print("bench: --runs and --files must be at least 1", file=sys.stderr)
        return 2
    default_out = not args.quick and not args.only
    md_path = args.md or (ROOT / "docs" / "benchmarks.md" if default_out else None)
    json_path = args.json or (ROOT / "docs" / "benchmarks.json" if default_out else None)
    png_path = args.png or (ROOT / "docs" / "benchmarks.png" if default_out else None)
    figures = FIGURES
    if args.only:
        known = {f.__name__.removeprefix("figure_"): f for f in FIGURES}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            print(f"bench: unknown figure(s) {', '.join(unknown)}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
        figures = [known[n] for n in args.only]
    missing = missing_tools(figures)
    if missing:
        print(f"bench: missing {', '.join(missing)}: run scripts/bench (it installs them)",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)

    workdir = Path(tempfile.mkdtemp(prefix="peerdrive-bench-run-", dir=args.workdir))
    started = time.monotonic()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        bench = Bench(size=size, files=files, folders=max(1, min(200, files // 100)),
                      runs=runs, quick=args.quick, workdir=workdir,
                      peerdrive_argv=peerdrive_argv(), stack=stack)
        stack.callback(cleanup, workdir)
        stack.callback(bench.rss_watch.stop)
        try:
            machine = machine_info(workdir)
            for fig in figures:
                log(f"{fig.__name__.removeprefix('figure_')}: {runs} run(s)")
                rows.extend(fig(bench))
            rows.extend(memory_rows(bench))
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = results_dict(bench, rows, machine, versions(), argv, time.monotonic() - started)
    print(goals_table(results))
    print()
    print(table(results))
    for n in bench.notes:
        print(f"note: {n}")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {json_path}")
    if md_path is not None:
        md_path.write_text(markdown(results, kept_analysis(md_path)))
        log(f"wrote {md_path}")
    if png_path is not None:
        plot(results, png_path)
        log(f"wrote {png_path}")
    return 0


# ----------------------------------------------------------------------------- growth
#
# `scripts/bench --growth 1000,10000,100000`: how each step's cost grows with
# the number of files (issue 17). Small random files (64 bytes) in folders of
# 100; a publisher node and one fresh reader on loopback (--no-lan), as the
# figures above. Written into docs/benchmarks.md between the growth markers.

GROWTH_FILE_BYTES = 64
GROWTH_PER_FOLDER = 100
GROWTH_STEPS = ("publish", "borg create", "mount", "find cold", "find warm",
                "rclone find cold", "rclone ls -lR cold", "status root", "status root complete",
                "status root xattrs", "pin root",
                "cat every file", "evict root", "mount peak RSS MB", "mount peak anon MB")
# the comparisons `--growth-skip` may leave out (at 10^6 files they take hours)
GROWTH_OPTIONAL = ("borg create", "cat every file", "rclone")
GROWTH_LOG_EVERY = 60.0  # seconds between progress lines of the tree writing and publish


def growth_tree(root: Path, files: int) -> int:
    """`files` random files of GROWTH_FILE_BYTES in folders of GROWTH_PER_FOLDER; bytes."""
    rng = random.Random(files)
    folder = None
    started = last = time.monotonic()
    for i in range(files):
        if i % GROWTH_PER_FOLDER == 0 and time.monotonic() - last >= GROWTH_LOG_EVERY:
            # ~10 min at 10^6 files on a loaded machine: say that it goes on
            last = time.monotonic()
            log(f"growth {files:,}: writing the tree: {i:,} files "
                f"({last - started:.0f} s)")
        if i % GROWTH_PER_FOLDER == 0:
            folder = root / f"d{i // GROWTH_PER_FOLDER:05d}"
            folder.mkdir(parents=True)
        fd = os.open(folder / f"f{i % GROWTH_PER_FOLDER:03d}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, rng.randbytes(GROWTH_FILE_BYTES))
        os.close(fd)
    sync()
    return files * GROWTH_FILE_BYTES


def growth_publish(bench: Bench, home: Path, tree: Path, files: int) -> str:
    """`peerdrive publish TREE --json` as `Bench.publish` runs it, with a progress line
    every GROWTH_LOG_EVERY seconds (the process's CPU, RSS and the store's size: the
    publish of 10^6 files takes ~20 min and prints nothing until it ends); the read link."""
    store = home / "store"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*bench.peerdrive_argv, "publish", str(tree), "--json"],
                                env=bench.env_for(home), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
        started = time.monotonic()
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=GROWTH_LOG_EVERY)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    break
                if time.monotonic() - started > 1800:
                    raise BenchError(f"peerdrive publish of {files:,} files took over 1800 s")
                mem = memory_of(proc.pid)
                stored = sum(f.stat().st_size for f in store.glob("*.mdb")) if store.is_dir() else 0
                log(f"growth {files:,}: publish: {time.monotonic() - started:.0f} s, "
                    f"CPU {proc_cpu_seconds(proc.pid):.0f} s, RSS {mem.get('VmRSS', 0) / 1e6:.0f} MB, "
                    f"store files {stored / 1e6:.0f} MB")
        finally:
            if proc.poll() is None:
                stop_pid(proc.pid)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise BenchError(f"peerdrive publish exited {proc.returncode}: "
                             f"{err.read().decode(errors='replace').strip()[-2000:]}")
        return json.loads(out.read())["read_link"]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def growth_row(bench: Bench, files: int, step_timeout: float,
               skip: frozenset[str] = frozenset()) -> dict[str, float | str]:
    """One line of the growth table: seconds per step (MB for memory); `skip`: see
    GROWTH_OPTIONAL."""
    out: dict[str, float | str] = {step: "not run" for step in GROWTH_STEPS
                                   if step in skip or step.startswith("rclone") and "rclone" in skip}
    base = bench.fresh(f"growth-{files}")
    bench.data.mkdir(exist_ok=True)
    tree = bench.data / f"growth-{files}"
    log(f"growth {files:,}: writing the tree")
    growth_tree(tree, files)
    home = bench.publisher_home
    if bench._serve is not None:
        # the last row's serve runs on this home, which goes now: a serve of a deleted
        # store would never see the new drive (every reader then found no version of it)
        stop_proc(bench._serve[0])
        bench._serve = None
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    started = time.perf_counter()
    link = growth_publish(bench, home, tree, files)
    out["publish"] = time.perf_counter() - started
    bench._links = {"growth": link}
    borg_env = dict(os.environ, BORG_PASSPHRASE="peerdrive-bench",
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_BASE_DIR=str(base / "borg-base"))
    if shutil.which("borg") and "borg create" not in skip:
        repo = base / "borg-repo"
        run_quiet(["borg", "init", "--encryption", "repokey-blake2", str(repo)],
                  env=borg_env, what="borg init")
        out["borg create"] = timed(lambda: subprocess.run(
            ["borg", "create", f"{repo}::g", tree.name], env=borg_env, cwd=tree.parent,
            capture_output=True, check=True, timeout=step_timeout))
        shutil.rmtree(repo)
    peaks: list[dict[str, int]] = []

    def timed_cmd(step: str, argv: list[str], env_home: Path | None = None) -> None:
        try:
            out[step] = timed(lambda: subprocess.run(
                argv, env=bench.env_for(env_home) if env_home else None, cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True,
                timeout=step_timeout))
        except subprocess.TimeoutExpired:
            out[step] = f"> {step_timeout:.0f}"
            log(f"growth {files:,}: {step} still running after {step_timeout:.0f} s")
        log(f"growth {files:,}: {step}: {out[step]}")

    @contextlib.contextmanager
    def fresh_reader(name: str, port: int) -> Iterator[tuple[Path, Path]]:
        """A fresh reader node mounting the drive; (home, mountpoint); its peaks noted."""
        home, mnt = base / name, base / f"mnt-{name}"
        home.mkdir()
        mnt.mkdir()
        started = time.perf_counter()
        res = bench.peerdrive(home, "mount", link, str(mnt), "--bootstrap",
                              f"127.0.0.1:{port}", *PEERDRIVE_MOUNT_FLAGS, "--json",
                              timeout=180)
        out.setdefault("mount", time.perf_counter() - started)
        pid = int(json.loads(res.stdout)["pid"])
        bench.rss_watch.watch(pid)
        try:
            yield home, mnt
        finally:
            subprocess.run([*bench.peerdrive_argv, "unmount", str(mnt)],
                           env=bench.env_for(home), cwd=ROOT, capture_output=True,
                           check=False, timeout=120)
            unmount_quietly(mnt)
            stop_pid(pid)
            peaks.append(bench.rss_watch.done(pid))

    try:
        with bench.serving() as port:
            pd = [*bench.peerdrive_argv]
            with fresh_reader("reader", port) as (reader, mnt):
                bench.drop_page_cache()
                timed_cmd("find cold", ["find", str(mnt), "-type", "f"])
                timed_cmd("find warm", ["find", str(mnt), "-type", "f"])
                timed_cmd("status root", [*pd, "status", str(mnt), "--json"], reader)
                # until the root's figures are counted (`status` answers before that with
                # the drive's folder aggregates and complete: false); a version without
                # `status --wait` waited in `status root` already
                timed_cmd("status root complete", [*pd, "status", str(mnt), "--json", "--wait"],
                          reader)
                out["status root xattrs"] = timed(lambda: [
                    os.getxattr(mnt, f"user.peerdrive.{n}") for n in ("state", "cached", "size")])
                timed_cmd("pin root", [*pd, "pin", str(mnt), "--json"], reader)
                timed_cmd("status root pinned", [*pd, "status", str(mnt), "--json"], reader)
                subprocess.run([*pd, "unpin", str(mnt)], env=bench.env_for(reader),
                               cwd=ROOT, capture_output=True, check=False, timeout=step_timeout)
                timed_cmd("evict root", [*pd, "evict", str(mnt), "--json"], reader)
            if "cat every file" not in skip:
                # a second fresh reader reads every file with cat: what the pin is measured
                # against
                with fresh_reader("reader2", port) as (_, mnt2):
                    timed_cmd("cat every file", ["sh", "-c", f"find {mnt2} -type f -print0 | "
                                                 "xargs -0 cat > /dev/null"])
    finally:
        bench._links = None
    out["mount peak RSS MB"] = max(p.get("VmHWM", 0) for p in peaks) / 1e6
    out["mount peak anon MB"] = max(p.get("RssAnon", 0) for p in peaks) / 1e6
    if shutil.which("rclone") and shutil.which("nginx") and "rclone" not in skip:
        bench._big = bench._tree = tree  # nginx serves data/ as it is: nothing else to write
        with bench.rclone_mount("growth") as m:
            bench.drop_page_cache()
            timed_cmd("rclone find cold", ["find", str(m.path / tree.name), "-type", "f"])
        with bench.rclone_mount("growth") as m:
            bench.drop_page_cache()
            timed_cmd("rclone ls -lR cold", ["ls", "-lR", str(m.path / tree.name)])
    shutil.rmtree(base, ignore_errors=True)
    return out


def growth_markdown(rows: dict[int, dict[str, float | str]]) -> str:
    counts = sorted(rows)
    steps = [s for s in (*GROWTH_STEPS, "status root pinned")
             if any(s in rows[n] for n in counts)]
    lines = ["| step | " + " | ".join(f"{n:,} files" for n in counts) + " |",
             "|---" * (len(counts) + 1) + "|"]
    for s in steps:
        cells = []
        for n in counts:
            v = rows[n].get(s, "")
            cells.append(v if isinstance(v, str) else (f"{v:.0f}" if "MB" in s else f"{v:.2f}"))
        unit = "" if "MB" in s else " (s)"
        lines.append(f"| {s}{unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth_main(counts: list[int], md_path: Path | None, workdir: Path | None,
                step_timeout: float, skip: frozenset[str] = frozenset()) -> int:
    """Run the growth table for `counts` files; print it, and write it into `md_path`."""
    work = Path(tempfile.mkdtemp(prefix="peerdrive-bench-growth-", dir=workdir))
    rows: dict[int, dict[str, float | str]] = {}
    with contextlib.ExitStack() as stack:
        bench = Bench(size=0, files=0, folders=1, runs=1, quick=True, workdir=work,
                      peerdrive_argv=peerdrive_argv(), stack=stack)
        stack.callback(cleanup, work)
        stack.callback(bench.rss_watch.stop)
        try:
            for n in counts:
                rows[n] = growth_row(bench, n, step_timeout, skip)
                print(json.dumps({n: rows[n]}), flush=True)
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
    text = growth_markdown(rows)
    print(text)
    if md_path is not None:
        md = md_path.read_text() if md_path.exists() else ""
        start, end = "<!-- growth -->", "<!-- /growth -->"
        block = f"{start}\n{text}\n{end}"
        if start in md and end in md:
            md = md[:md.index(start)] + block + md[md.index(end) + len(end):]
        else:
            md += "\n## Growth with the number of files\n\n" + block + "\n"
        md_path.write_text(md)
        log(f"wrote the growth table into {md_path}")
    return 0


def cleanup(workdir: Path) -> None:
    """Unmount anything left under the work directory, then remove it."""
    still = []
    with open("/proc/mounts") as f:
        for line in f:
            point = line.split()[1]
            if point.startswith(str(workdir) + "/"):
                still.append(point)
    for point in still:
        unmount_quietly(Path(point))
    if any(is_mounted(Path(p)) for p in still):
        log(f"left {workdir} in place: something is still mounted under it")
        return
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
