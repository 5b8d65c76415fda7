"""Running a mount: the FUSE session, its signals, and the background daemon.

`peerdrive mount` without `--foreground` starts itself again as a detached
process with `--foreground --ready-fd N --link-fd M` (the read link comes
through a pipe, never on a command line), waits until that process reports
the mount is live (or failed, with its message), and returns, as sshfs does.
That process is a fork of the command running the command line's `main` again
(one interpreter start fewer), or where it cannot be, a new interpreter.
The mount process unmounts on SIGTERM and SIGINT; `peerdrive unmount` asks
the kernel to unmount (which also clears a mount whose process was killed)
and waits for the process to finish.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import process
from .errors import MountError

if TYPE_CHECKING:
    import pyfuse3

log = logging.getLogger(__name__)


def fuse_options(allow_other: bool = False) -> set[str]:
    """The FUSE mount options. Only the mounting user may enter the mount unless
    `allow_other` (`mount --allow-other`): then every local user may, within the
    files' modes (`default_permissions`), which for a root mount means everyone
    on the machine reads the drive. Non-root users need `user_allow_other` in
    /etc/fuse.conf for it."""
    import pyfuse3

    opts = set(pyfuse3.default_options)
    # nosuid, nodev: a publisher must never get a setuid program or a device onto this
    # machine (libfuse adds them today; said here so no version can drop them)
    opts |= {"fsname=peerdrive", "subtype=peerdrive", "noatime", "nosuid", "nodev"}
    if allow_other:
        opts.add("allow_other")
    return opts


def check_mountpoint(mountpoint: Path, nonempty: bool = False) -> None:
    """Refuse a mount point that is not a folder, is mounted, or (unless `nonempty`)
    holds files a mount would hide."""
    if not mountpoint.is_dir():
        raise MountError(f"{mountpoint} is not a directory: create it first")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point: unmount it first "
                         f"(peerdrive unmount {mountpoint})")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as it:
                hides = next(it, None) is not None
        except OSError as exc:
            raise MountError(f"cannot read {mountpoint}: {exc.strerror}") from exc
        if hides:
            raise MountError(f"{mountpoint} is not empty: a mount would hide its files; use an "
                             "empty folder, or --nonempty to mount over them anyway")


KERNEL_READAHEAD_KB = 8192


def _mount_device(mountpoint: Path) -> str | None:
    """The "major:minor" of the mount at `mountpoint`, from /proc/self/mountinfo.

    Read from the kernel's table rather than with stat(), which would send a
    request to this very process before it serves any.
    """
    target = os.path.abspath(mountpoint)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        found = None
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                found = fields[2]  # the last (topmost) mount at that path wins
        return found
    return None


def widen_kernel_readahead(mountpoint: Path, kb: int = KERNEL_READAHEAD_KB) -> None:
    """Let the kernel read ahead `kb` KiB on this mount instead of its default 128.

    The window also bounds the kernel's read requests: with the default
    each is 128 KiB, with a wide one they grow to the 1 MiB FUSE allows, so
    a sequential read costs an eighth of the requests through this process,
    and many of them in flight keep our own readahead and the peers'
    pipelines full. Needs root (sysfs); without it we keep the default and
    say so in the log.
    """
    dev = _mount_device(mountpoint)
    if dev is None:
        log.info("could not find the mount's device; kernel readahead left as is")
        return
    try:
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")
    except OSError as exc:
        log.info("kernel readahead left at its default (%s)", exc.strerror or exc)


async def serve_fuse(ops: pyfuse3.Operations, mountpoint: Path,
                     background: Callable[..., object] | None = None,
                     on_ready: Callable[[], None] | None = None,
                     allow_other: bool = False) -> None:
    """Mount `ops` at `mountpoint` and serve until unmounted or signalled.

    `background` is started in the same nursery (with nursery.start) before
    the kernel sees the mount, so the drive's tasks are ready when the first
    request arrives.
    """
    # here, not at the top: the commands that only start, stop or report on a mount
    # (the background parent, unmount, every error report) need neither
    import pyfuse3
    import trio

    try:
        pyfuse3.init(ops, str(mountpoint), fuse_options(allow_other))
    except RuntimeError as exc:
        raise MountError(f"could not mount at {mountpoint}: {exc} (is /dev/fuse available "
                         "and fuse3 installed?)") from exc
    unmounted = False
    stopped_by: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            if background is not None:
                await nursery.start(background)

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as s:
                    async for signum in s:
                        log.info("signal %d: unmounting", signum)
                        stopped_by.append(signum)
                        # pyfuse3's loop ends only once every request in progress is
                        # answered: those waiting on the network are cut short first
                        stop_waits = getattr(ops, "stop_waits", None)
                        if stop_waits is not None:
                            stop_waits()
                        pyfuse3.terminate()
                        return

            nursery.start_soon(watch_signals)

            async def ready_after_init() -> None:
                # The kernel sets the mount's readahead from our reply to its INIT, so
                # widen it only once that reply is out (pyfuse3 calls ops.init() just
                # before sending it, and the kernel applies it within that write). Only
                # then is the mount ready: a reader opening a file at once gets the wide
                # window too.
                initialized = getattr(ops, "initialized", None)
                if initialized is not None:
                    await initialized.wait()
                    await trio.lowlevel.checkpoint()
                widen_kernel_readahead(mountpoint)
                if on_ready is not None:
                    on_ready()

            nursery.start_soon(ready_after_init)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
            unmounted = True
        if not unmounted:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                           capture_output=True, check=False)
    if stopped_by == [signal.SIGINT]:
        raise KeyboardInterrupt  # unmounted cleanly; Ctrl-C still exits 130 (interrupted)


DaemonMain = Callable[[list[str]], int]
"""The command line's entry point (`vfs.cli.main`): a forked daemon runs it in place."""


def spawn_daemon(argv: list[str], log_path: Path, secret: str | None = None,
                 timeout: float = 120.0, *, main: DaemonMain | None = None,
                 on_command_line: str | None = None) -> int:
    """Start `argv` (a foreground mount: `python_argv()` + its arguments) detached; wait
    for its readiness report.

    `secret` (the read link) goes to the daemon through a pipe named by
    `--link-fd N`, never on its command line or in its environment, which
    every local user can read in /proc. Returns the daemon's pid. Raises
    MountError with the daemon's own message if it fails before the mount is
    live.

    With `main`, the daemon is a fork of this process running `main(arguments)`:
    one interpreter start and the command line's imports fewer than a new
    interpreter (on a loaded machine that is seconds of a mount's start, all of
    it waiting for a CPU). A fork shows this command's own command line, so
    `on_command_line` (the link as given there, if it was) is first blanked out
    of it (`_blank_argument`); where that cannot be done the daemon is a new
    interpreter, as without `main`.
    """
    r, w = os.pipe()
    fds = [w]
    extra: list[str] = []
    if secret is not None:
        sr, sw = os.pipe()
        os.write(sw, secret.encode() + b"\n")  # a link is far below the pipe's buffer
        os.close(sw)
        fds.append(sr)
        extra = ["--link-fd", str(sr)]
    arguments = [*argv[len(python_argv()):], *extra, "--ready-fd", str(w)]
    forks = main is not None and (on_command_line in (None, "-")
                                  or _blank_argument(on_command_line))
    try:
        if forks:
            assert main is not None
            daemon: _Daemon = _ForkedDaemon(main, arguments, log_path, r)
        else:
            daemon = _ExecDaemon([*argv[:len(python_argv())], *arguments], log_path, fds)
    finally:
        for fd in fds:
            os.close(fd)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with os.fdopen(r, "rb", buffering=0) as pipe:
        buf = b""
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([pipe], [], [], max(0.0, left))
            if not ready:
                daemon.terminate()
                raise MountError(f"the mount did not become ready in {timeout:.0f} s; "
                                 f"see {log_path}")
            data = pipe.read(4096)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                chunks.append(line + b"\n")
                if line.startswith(b"ready"):
                    return daemon.pid
    rc = daemon.wait()
    msg = b"".join(chunks).decode(errors="replace").strip()
    if msg.startswith("error "):
        msg = msg[len("error "):]
    err = MountError(msg or f"the mount process exited with status {rc}; see {log_path}")
    if rc > 0:
        err.exit_code = rc  # the daemon already chose the right exit code for its error
    raise err


class _Daemon(abc.ABC):
    pid: int

    @abc.abstractmethod
    def wait(self) -> int:
        """The daemon's exit status (negative: the signal that ended it)."""

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


class _ExecDaemon(_Daemon):
    """The daemon as a new interpreter."""

    def __init__(self, argv: list[str], log_path: Path, fds: list[int]) -> None:
        with open(log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                pass_fds=tuple(fds), start_new_session=True, close_fds=True,
            )
        self.pid = self._proc.pid

    def wait(self) -> int:
        return self._proc.wait()


class _ForkedDaemon(_Daemon):
    """The daemon as a fork of this command (no thread and no trio run exist yet here),
    in a session of its own, stdin from /dev/null, stdout and stderr to the log, as
    `_ExecDaemon`'s."""

    def __init__(self, main: DaemonMain, arguments: list[str], log_path: Path,
                 parent_end: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log_path, "ab") as logf:
            pid = os.fork()
            if pid == 0:
                os.close(parent_end)
                _run_forked(main, arguments, logf.fileno())
        self.pid = pid

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def _run_forked(main: DaemonMain, arguments: list[str], log_fd: int) -> NoReturn:
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        code = main(arguments)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _blank_argument(argument: str) -> bool:
    """Overwrite `argument` in this process's own command line (what /proc/PID/cmdline and
    `ps` show every local user) with `-`, padded with NULs; True if it is gone from there.

    The kernel shows the bytes between the process's arg_start and arg_end
    (/proc/self/stat), which the process may write through /proc/self/mem, as
    setproctitle does. Anything unexpected (another kernel, no /proc): False.
    """
    target = argument.encode()
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49 of the file
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            area = mem.read(end - start)
            at = 0
            for part in area.split(b"\0"):
                if part == target:
                    mem.seek(start + at)
                    mem.write(b"-" + b"\0" * (len(part) - 1))
                at += len(part) + 1
            mem.seek(start)
            area = mem.read(end - start)
        with open("/proc/self/cmdline", "rb") as f:
            shown = f.read()
    except (OSError, ValueError, IndexError):
        return False
    return bool(target) and target not in area and target not in shown


def read_secret(fd: int, limit: int = 4096) -> str:
    """The text sent by `spawn_daemon` (or piped to stdin by a user) on `fd`, up to EOF."""
    data = b""
    while len(data) <= limit:
        part = os.read(fd, limit + 1 - len(data))
        if not part:
            break
        data += part
    if fd > 2:
        os.close(fd)
    return data.decode(errors="replace").strip()


def report_ready(fd: int | None, message: str = "ready") -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (message + "\n").encode())
        os.close(fd)


# A writable mount makes its last version after the kernel let go of the mount: it
# publishes what changed since its last version within this time (vfs/node.py), and
# `peerdrive unmount` waits that long on top of its usual wait before it gives up.
LAST_VERSION_SECONDS = 120.0
# How long an unmount of a writable mount waits before it says it is waiting.
SAY_WAITING_AFTER = 1.0


def unmount(mountpoint: Path, record: dict | None, lazy: bool = False,
            timeout: float = 20.0, on_wait: Callable[[float], None] | None = None) -> None:
    """Unmount and wait for the serving process to exit.

    A writable mount (its record says so) publishes its last version once
    unmounted, which can take long after a big write: it gets
    LAST_VERSION_SECONDS more, and `on_wait(seconds)` is told, if it has not
    ended after SAY_WAITING_AFTER, that the wait can last up to that long.
    A SIGTERM in the middle would not cut that publish short (the mount
    finishes it first), but the command would return while it still runs.

    The serving process is the one `record` names by pid *and* start time
    (see vfs/process.py): a record left by a killed mount whose pid now
    belongs to another process names no process, and nothing is signalled.
    With `lazy` the mount is detached at once and the process is left to end
    by itself when the last file open in the mount is closed: stopping it
    would fail those reads (ENOTCONN), which is what --lazy must not do.
    """
    if _mount_device(mountpoint) is None:  # fusermount3 would only say "Invalid argument"
        raise MountError(f"{mountpoint} is not mounted")
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    # opened before the unmount, while the mount process still lives
    pidfd = None
    if record is not None and not lazy:
        with contextlib.suppress(TypeError, ValueError, KeyError):
            pidfd = process.open_recorded(int(record["pid"]), record.get("start"))
    try:
        res = subprocess.run(args, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            err = res.stderr.strip()
            if "not mounted" in err or "not found in" in err:
                raise MountError(f"{mountpoint} is not mounted")
            if "busy" in err.lower():
                raise MountError(f"{mountpoint} is busy (a process has a file open there); "
                                 "close it or use --lazy")
            raise MountError(f"could not unmount {mountpoint}: {err}")
    except BaseException:
        if pidfd is not None:
            os.close(pidfd)
        raise
    if pidfd is not None:
        assert record is not None
        if not wait_for_mount_process(pidfd, bool(record.get("writable")), timeout, on_wait):
            log.warning("the mount process of %s did not exit in time: sent SIGTERM",
                        mountpoint)


def wait_for_mount_process(pidfd: int, writable: bool, timeout: float,
                           on_wait: Callable[[float], None] | None = None) -> bool:
    """Wait for an unmounted mount's process to exit, SIGTERM it if it does not in
    time; True if it exited by itself. Closes `pidfd`.

    A writable mount gets LAST_VERSION_SECONDS more for its last version, and
    `on_wait(seconds)` hears of the whole bound once it runs past SAY_WAITING_AFTER.
    """
    if writable:
        if not process.wait_exited(pidfd, SAY_WAITING_AFTER) and on_wait is not None:
            on_wait(timeout + LAST_VERSION_SECONDS)
        timeout += LAST_VERSION_SECONDS
    return process.wait_then_terminate(pidfd, timeout)


def python_argv() -> list[str]:
    """How to run this same peerdrive again (for the background mount)."""
    return [sys.executable, "-m", "vfs.cli"]
