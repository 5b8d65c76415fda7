"""Which process a recorded pid really is, so a stale record never gets a signal.

A pid names a process only while it lives: once a mount process dies, the
kernel may give its pid to any other process. A record therefore keeps the
pid *and* the process's start time (field 22 of /proc/PID/stat, in clock
ticks since boot), and only a process with both is the one recorded. A
signal goes through a pidfd opened before the check, so it reaches the
process that was checked even if the pid changes hands right after.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read()
    except (OSError, ValueError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces and ')'
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[19])  # field 22; `rest` starts at field 3
    except (IndexError, ValueError):
        return None


def open_recorded(pid: int, start: int | None) -> int | None:
    """A pidfd for the process the record names, or None if that process is gone.

    A record without a start time (written by an older peerdrive) cannot be
    checked, so it names no process.
    """
    if start is None:
        return None
    try:
        fd = os.pidfd_open(int(pid))
    except (OSError, ValueError):
        return None
    if start_time(pid) != start:  # checked after opening: fd holds the checked process
        os.close(fd)
        return None
    return fd


def is_recorded_alive(pid: int, start: int | None) -> bool:
    fd = open_recorded(pid, start)
    if fd is None:
        return False
    os.close(fd)
    return True


def wait_exited(pidfd: int, timeout: float) -> bool:
    """Whether the process exits within `timeout` seconds (`pidfd` stays open)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([pidfd], [], [], max(0.0, left))
        if readable:  # a pidfd becomes readable when its process exits
            return True
        if left <= 0:
            return False


def wait_then_terminate(pidfd: int, timeout: float) -> bool:
    """Wait up to `timeout` for the process to exit; SIGTERM it if it has not.

    Returns True if it exited by itself. Closes `pidfd`.
    """
    try:
        if wait_exited(pidfd, timeout):
            return True
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        return False
    finally:
        os.close(pidfd)
