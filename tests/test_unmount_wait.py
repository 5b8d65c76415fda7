"""How long `peerdrive unmount` waits for the process of the mount it unmounted.

A writable mount makes its last version once the kernel let go of it, which
after a big write can take a while: the unmount waits for it (bounded by
LAST_VERSION_SECONDS) and says it waits, where it used to SIGTERM the process
after 20 s, part-way through the publish. A read-only mount has nothing left
to do and keeps the short bound. The mount's side (a SIGTERM does not cut the
publish short) is tests/test_writable_mount.py::test_sigterm_while_the_last_*.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from vfs.mount import LAST_VERSION_SECONDS, wait_for_mount_process

# stands for a mount process still publishing: it ends by itself after the wait
# a read-only mount gets, well before a writable one's bound
SLOW_EXIT = "import time; time.sleep(3)"


def child(code: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", code])
    return proc, os.pidfd_open(proc.pid)


def test_a_writable_mounts_process_gets_its_last_version_time_and_a_line_says_so() -> None:
    proc, pidfd = child(SLOW_EXIT)
    said: list[float] = []
    try:
        assert wait_for_mount_process(pidfd, True, 0.5, said.append)
        assert proc.wait(timeout=60) == 0  # ended by itself, not by SIGTERM
        assert said == [0.5 + LAST_VERSION_SECONDS]
    finally:
        proc.kill()
        proc.wait()


def test_a_read_only_mounts_process_is_terminated_after_the_short_wait() -> None:
    proc, pidfd = child(SLOW_EXIT)
    said: list[float] = []
    try:
        assert not wait_for_mount_process(pidfd, False, 0.5, said.append)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        assert said == []
    finally:
        proc.kill()
        proc.wait()


def test_a_writable_mount_that_ends_at_once_is_not_waited_for_aloud() -> None:
    proc, pidfd = child("pass")
    said: list[float] = []
    try:
        proc.wait(timeout=60)
        assert wait_for_mount_process(pidfd, True, 0.5, said.append)
        assert said == []
    finally:
        proc.kill()
        proc.wait()
