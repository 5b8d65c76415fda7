"""Where a node keeps its state: `PEERDRIVE_HOME` and the files under it.

    PEERDRIVE_HOME/
        node.key            this node's Ed25519 identity (0600)
        config.toml         optional: bootstrap peers, cache size, listen address
        store/              the LMDB block store (ciphertext only)
        drives/.lock        held while a publish finds or creates the drive of a folder
        drives/<pubkey>/    one folder per drive this node publishes
            write.cap       the write capability link (0600)
            source          the folder it publishes
            publish.lock    held (flock) by the one publish of this drive in progress
        mounts/             one JSON file per live mount (pid and its start time, mountpoint,
                            drive, port) and its .lock, held by the mount process
        hosts/<pubkey>.json one per drive this node hosts: store link, quota, versions kept
        run/                one JSON snapshot per running node process (<pid>.json)
        logs/               logs of background mounts

This module is the only one that knows that layout: everything else asks a
`Home` for a path or a record.

Several nodes run side by side on one machine by giving each its own home.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from dht.mirror_layout import MirrorUrlError, check_base_url

from .capability import WriteCap, parse_link
from .errors import LinkError, MountError, UsageError
from .process import start_time


def default_home() -> Path:
    env = os.environ.get("PEERDRIVE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("peerdrive"))


def write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an flock on `path` (created 0600) for the block; `on_wait` runs once if another
    process holds it and this one has to wait. The kernel drops the lock when the
    holder exits, however it exits, so a crash never leaves a stale lock behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def checked_mirror_url(url: str, where: str = "") -> str:
    """A mirror base URL in canonical form, or UsageError saying what is wrong with it."""
    try:
        return check_base_url(url)
    except MirrorUrlError as exc:
        raise UsageError(f"{where}{exc}") from None


@dataclass
class Config:
    bootstrap: list[str]
    cache_size: str | None
    listen: str | None
    lan: bool
    fetch_timeout: float
    mirrors: list[str] = field(default_factory=list)  # mirror base URLs tried for every drive
    push: list[str] = field(default_factory=list)  # HOST:PORT targets serve/mount push to


class Home:
    """The state directory of one node."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = (path or default_home()).resolve()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def store_path(self) -> Path:
        return self.path / "store"

    @property
    def node_key_path(self) -> Path:
        return self.path / "node.key"

    @property
    def mounts_dir(self) -> Path:
        d = self.path / "mounts"
        d.mkdir(exist_ok=True)
        return d

    @property
    def logs_dir(self) -> Path:
        d = self.path / "logs"
        d.mkdir(exist_ok=True)
        return d

    @property
    def hosts_dir(self) -> Path:
        """One `<drive pubkey hex>.json` per drive this node hosts (`vfs/host.py`)."""
        return self.path / "hosts"

    @property
    def run_dir(self) -> Path:
        """Where running node processes keep `<pid>.json` snapshots (NetworkNode writes them)."""
        return self.path / "run"

    def mount_log_path(self, drive_id: str) -> Path:
        """The log file of the background mount of one drive."""
        return self.logs_dir / f"mount-{drive_id[:16]}.log"

    def config(self) -> Config:
        f = self.path / "config.toml"
        data: dict = {}
        if f.exists():
            try:
                data = tomllib.loads(f.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise UsageError(f"{f}: not valid TOML: {exc}") from exc
        boots = data.get("bootstrap", [])
        if isinstance(boots, str):
            boots = [boots]
        mirrors = data.get("mirrors", [])
        if isinstance(mirrors, str):
            mirrors = [mirrors]
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise UsageError(f"{f}: mirrors must be a list of URLs")
        pushes = data.get("push", [])
        if isinstance(pushes, str):
            pushes = [pushes]
        return Config(
            bootstrap=[str(b) for b in boots],
            cache_size=str(data["cache_size"]) if "cache_size" in data else None,
            listen=str(data["listen"]) if "listen" in data else None,
            lan=bool(data.get("lan", True)),
            fetch_timeout=float(data.get("fetch_timeout", 20.0)),
            mirrors=[checked_mirror_url(m, f"{f}: ") for m in mirrors],
            push=[str(p) for p in pushes],
        )

    # -- drives this node publishes -------------------------------------------------

    def _drive_dir(self, pubkey: bytes) -> Path:
        return self.path / "drives" / pubkey.hex()

    def drive_for_source(self, source: Path) -> WriteCap | None:
        """The drive that already publishes `source`, so a re-publish makes a new version."""
        drives = self.path / "drives"
        if not drives.is_dir():
            return None
        want = str(source.resolve())
        for d in sorted(drives.iterdir()):
            with contextlib.suppress(OSError):
                if (d / "source").read_text() == want:
                    return self._load_write_cap(d)
        return None

    def drive_of_source(self, source: Path) -> WriteCap:
        """The drive publishing `source`, created if there is none yet: one drive per folder,
        even when two publishes of a new folder start at once."""
        with exclusive_lock(self.path / "drives" / ".lock"):
            return self.drive_for_source(source) or self.create_drive(source)

    def publish_lock(self, cap: WriteCap, on_wait: Callable[[], None] | None = None):
        """Held for a whole publish: one publish of a drive at a time on this node, so
        two never interleave their pins or sign two versions from one base."""
        return exclusive_lock(self._drive_dir(cap.pubkey) / "publish.lock", on_wait)

    def _load_write_cap(self, d: Path) -> WriteCap:
        cap = parse_link((d / "write.cap").read_text())
        if not isinstance(cap, WriteCap):
            raise LinkError(f"{d / 'write.cap'} does not hold a write capability")
        return cap

    def create_drive(self, source: Path | None) -> WriteCap:
        """A new drive published from `source` (None: `peerdrive new`, no folder)."""
        cap = WriteCap.generate()
        d = self._drive_dir(cap.pubkey)
        d.mkdir(parents=True, exist_ok=False)
        write_private(d / "write.cap", (cap.link() + "\n").encode())
        if source is not None:
            (d / "source").write_text(str(source.resolve()))
        return cap

    def adopt_drive(self, source: Path, cap: WriteCap) -> WriteCap:
        """`publish FOLDER --into WRITE_LINK`: from now on `source` publishes that drive
        (a second device of the drive's owner). Refused if the folder already publishes
        another drive, or this node publishes the drive from another folder."""
        with exclusive_lock(self.path / "drives" / ".lock"):
            current = self.drive_for_source(source)
            if current is not None and current.pubkey != cap.pubkey:
                raise UsageError(f"{source} already publishes drive {current.drive_id[:16]}")
            other = self.drive_source(cap.pubkey)
            if other is not None and other != str(source.resolve()):
                raise UsageError(f"this node publishes drive {cap.drive_id[:16]} from {other}")
            d = self._drive_dir(cap.pubkey)
            d.mkdir(parents=True, exist_ok=True)
            write_private(d / "write.cap", (cap.link() + "\n").encode())
            (d / "source").write_text(str(source.resolve()))
        return cap

    def drive_source(self, pubkey: bytes) -> str | None:
        """The folder this node publishes a drive from, or None if it publishes no such drive."""
        try:
            return (self._drive_dir(pubkey) / "source").read_text()
        except OSError:
            return None

    def published_drives(self) -> list[WriteCap]:
        drives = self.path / "drives"
        if not drives.is_dir():
            return []
        out = []
        for d in sorted(drives.iterdir()):
            if (d / "write.cap").exists():
                out.append(self._load_write_cap(d))
        return out

    # -- live mounts ---------------------------------------------------------------

    def mount_file(self, mountpoint: Path) -> Path:
        # abspath, not resolve(): the mount process must never stat its own mount point
        key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
        return self.mounts_dir / f"{key}.json"

    def register_mount(self, mountpoint: Path, info: dict) -> None:
        f = self.mount_file(mountpoint)
        f.write_text(json.dumps(info))

    def unregister_mount(self, mountpoint: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.mount_file(mountpoint).unlink()

    def mount_record(self, mountpoint: Path) -> dict | None:
        """The record of the mount at `mountpoint`, live or stale (None if there is none)."""
        with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
            info = json.loads(self.mount_file(mountpoint).read_text())
            if isinstance(info, dict):
                return info
        return None

    @contextlib.contextmanager
    def mount_lock(self, mountpoint: Path) -> Iterator[None]:
        """Held by the one process that mounts (and then serves) `mountpoint` from this home.

        Two `peerdrive mount` of one path at once: the second finds the lock
        held and fails with a clear error instead of stacking a second mount
        and overwriting the first one's record.
        """
        lock = self.mount_file(mountpoint).with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = self.mount_record(mountpoint) or {}
                raise MountError(f"{mountpoint} is being mounted or served by another peerdrive "
                                 f"process (pid {other.get('pid', '?')}); unmount it first "
                                 f"(peerdrive unmount {mountpoint})") from None
            yield
        finally:
            os.close(fd)

    def live_mounts(self) -> list[dict]:
        """`{pid, mountpoint, drive, port}` of every mount whose process is alive."""
        return live_records(self.mounts_dir)

    def running_nodes(self) -> list[dict]:
        """The snapshots (NetworkNode.snapshot) of this home's live serve and mount processes."""
        return live_records(self.run_dir)


def live_records(directory: Path) -> list[dict]:
    """The JSON records in `directory` whose `pid` is a live process, in file name order.

    A record left behind by a killed process (its pid gone) or one half
    written or malformed is skipped, never an error.
    """
    out = []
    for f in sorted(directory.glob("*.json")):
        try:
            info = json.loads(f.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue
        # a record with the process's start time names only that process: a pid reused
        # by another process since is a stale record, not a live one
        if "start" in info and start_time(int(info["pid"])) != info["start"]:
            continue
        out.append(info)
    return out
