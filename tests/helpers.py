"""Shared helpers for tests that run the real `peerdrive` command and real mounts.

Every process a test starts is tracked by PID and stopped in a finally; every
mount is unmounted (lazily if it must be) even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


TRIO_DEADLINE = 20.0  # no in-process trio test may hang: each runs under this bound


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
        )
    return proc


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


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


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
