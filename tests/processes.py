"""Processes a test or benchmark started: is one alive, wait for it, stop it (by PID only).

Shared by the tests and scripts/bench.py, so "stopped" means the same
everywhere: SIGTERM, a bounded wait, SIGKILL if it did not go, and a child
of ours reaped (a zombie counts as gone).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def wait_exit(pid: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> bool:
    """Wait until `pid` is gone (reaping it if it is our child); True if it went in time."""
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_pid(pid: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, proc, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_exit(pid, proc, timeout)


def where_blocked(pid: int) -> str:
    """Where process `pid` waits in the kernel (state, wchan, kernel stack as root): for a
    failure message, so a hang in a FUSE request shows as one (request_wait_answer)."""
    out = [f"pid {pid}:"]
    for name in ("status", "wchan", "stack"):
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/{name}").read_text(errors="replace")
            if name == "status":
                text = next((line for line in text.splitlines() if line.startswith("State")),
                            "")
            out.append(f"  {name}: {text.strip()}")
    return "\n".join(out)
