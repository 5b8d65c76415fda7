"""Shared helpers for tests that run the real `peerdrive` command and real mounts.

Every process a test starts is tracked by PID and stopped in a finally; every
mount is unmounted (lazily if it must be) even when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio

from tests.processes import stop_pid

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


TRIO_DEADLINE = 20.0  # no in-process trio test may hang: each runs under this bound


def reply_bytes(reply: object) -> bytes:
    """The bytes of what an Operations.read returned: one buffer, or a tuple of them (the
    parts pyfuse3 built with patches/pyfuse3-*-read-parts.patch gathers into one reply)."""
    if isinstance(reply, tuple):
        return b"".join(reply)
    return bytes(reply)  # type: ignore[call-overload]


def small_chunks(monkeypatch) -> None:
    """Publish with FastCDC's sizes of before 2026-12-03 (64 KiB / ~256 KiB / 1 MiB).

    The read path's tests count an 8 MiB file's chunks against the readahead's
    window (16 chunks and more): at today's ~1 MiB (vfs/chunker.py) that file
    would need to be 32 MiB in every one of them. Chunk sizes are the
    publisher's choice and the reader never depends on them (docs/formats.md).
    """
    import vfs.chunker
    import vfs.publish
    monkeypatch.setattr(vfs.chunker, "CDC_MIN", 64 * 1024)
    monkeypatch.setattr(vfs.chunker, "CDC_AVG", 192 * 1024)
    monkeypatch.setattr(vfs.chunker, "CDC_MAX", 1024 * 1024)
    monkeypatch.setattr(vfs.publish, "CDC_MIN", 64 * 1024)


def run_trio(test: Callable[[trio.Nursery], Awaitable[object]],
             deadline: float = TRIO_DEADLINE) -> None:
    """Run `test(nursery)` under trio within `deadline` seconds.

    The nursery is the test's for background tasks (servers, drives); it is
    cancelled once the test returns, so a test need not stop them itself.
    """

    async def main() -> None:
        with trio.fail_after(deadline):
            async with trio.open_nursery() as nursery:
                await test(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PEERDRIVE_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("PEERDRIVE_BOOTSTRAP", None)
    return env


def peerdrive(
    home: Path, *args: str, check: bool = True, timeout: float = 300, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command line as a separate process."""
    proc = subprocess.run(
        [PYTHON, "-m", "vfs.cli", *args],
        env=env_for(home),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"peerdrive {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            f"{logs_named_in(proc.stderr, home if args[:1] == ('mount',) else None)}"
        )
    return proc


def logs_named_in(stderr: str, home: Path | None = None, lines: int = 80) -> str:
    """The tails of the log files an error names ("see .../mount-ID.log") and, with
    `home`, of its mount logs: a failed background mount's reason is only in its log,
    which is gone with the test's tmp dir once the run ends."""
    paths = [Path(p) for p in re.findall(r"see (/\S+\.log)", stderr)]
    if home is not None:
        paths += sorted((home / "logs").glob("mount-*.log"))
    out = []
    for path in dict.fromkeys(paths):
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            out.append(f"\n--- {path}: unreadable ({exc}) ---")
            continue
        tail = "\n".join(text.splitlines()[-lines:])
        out.append(f"\n--- last {lines} lines of {path} ---\n{tail}")
    return "".join(out)


def publish(home: Path, folder: Path) -> dict:
    return json.loads(peerdrive(home, "publish", str(folder), "--json").stdout)


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def mount_pid(home: Path, mountpoint: Path) -> int | None:
    for f in (home / "mounts").glob("*.json"):
        with contextlib.suppress(Exception):
            info = json.loads(f.read_text())
            if info["mountpoint"] == str(mountpoint):
                return int(info["pid"])
    return None


def force_unmount(home: Path, mountpoint: Path) -> None:
    """Best-effort cleanup: unmount, then stop the serving process by its PID."""
    pid = mount_pid(home, mountpoint)
    if is_mounted(mountpoint):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False
        )
    if pid is not None:
        stop_pid(pid)


@contextlib.contextmanager
def mounted(home: Path, link: str, mountpoint: Path, *extra: str) -> Iterator[Path]:
    """`peerdrive mount LINK MNT` (background daemon), unmounted on exit whatever happens."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    # tests stay on loopback: no wildcard listener, no LAN multicast, unless asked for
    if "--listen" not in extra:
        extra = (*extra, "--listen", "127.0.0.1:0")
    if "--no-lan" not in extra and "--lan" not in extra:
        extra = (*extra, "--no-lan")
    extra = tuple(x for x in extra if x != "--lan")
    try:
        peerdrive(home, "mount", link, str(mountpoint), *extra)
        assert is_mounted(mountpoint), "mount returned but nothing is mounted"
        yield mountpoint
    finally:
        if is_mounted(mountpoint):
            res = peerdrive(home, "unmount", str(mountpoint), check=False)
            if res.returncode != 0:
                force_unmount(home, mountpoint)
        else:
            force_unmount(home, mountpoint)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def write_random(path: Path, size: int, seed: int | None = None) -> str:
    """A file of `size` random bytes (reproducible with `seed`); returns its SHA-256 (hex)."""
    rng = random.Random(seed) if seed is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            piece = rng.randbytes(n) if rng is not None else os.urandom(n)
            h.update(piece)
            f.write(piece)
            left -= n
    return h.hexdigest()


def digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
