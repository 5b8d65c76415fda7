"""The kernel caches the directory listings of a mount, and drops the ones a new version changes.

`peerdrive mount` opens every directory with cache_readdir and keep_cache
(through patches/pyfuse3-*-cache-readdir.patch), so only the first listing
of a directory reaches the mount process. Whether a listing reaches it is
observed, not assumed: the directory is opened first (OPENDIR is answered),
then the mount process is stopped (SIGSTOP) and the listing runs in a
thread. A listing that needs the process waits until it runs again; one the
kernel answers alone finishes while it is stopped. A stopped process never
answers, so either outcome is certain, however slow the machine. The kernel
may drop its copy at any time (memory pressure, anything on the machine
writing /proc/sys/vm/drop_caches), so "cached" means: right after a listing,
the next one is the kernel's alone, in one of a few tries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import mount_pid, mounted, publish
from tests.swarm_helpers import Swarm, wait_until
from vfs.fs import LISTINGS_BY_INODE

pytestmark = pytest.mark.fuse

# How long a listing may take while the mount process is stopped, when the kernel
# answers it alone (microseconds, in fact), and how long to wait before calling a
# listing blocked when it cannot finish at all until the process runs again.
CACHED_WAIT = 10.0
BLOCKED_WAIT = 1.0
CACHED_TRIES = 3


def list_with_mount_stopped(path: Path, pid: int, wait: float) -> tuple[bool, list[str]]:
    """List `path` while the mount process `pid` is stopped: (it had to wait, names).

    The directory is opened and fstat(2)ed before the stop (os.listdir of a
    descriptor fstats it, and a listing the process answered leaves the
    directory's atime to be asked for again), so only the listing itself,
    getdents(2) and whatever the kernel sends for it, is observed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fstat(fd)
        got: list[list[str] | BaseException] = []

        def lister() -> None:
            try:
                got.append(sorted(os.listdir(fd)))
            except BaseException as exc:  # reported by the caller
                got.append(exc)

        thread = threading.Thread(target=lister, daemon=True)
        os.kill(pid, signal.SIGSTOP)
        try:
            thread.start()
            thread.join(wait)
            waited = thread.is_alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        thread.join(60)
        assert got, "the listing did not finish even once the mount process ran again"
        if isinstance(got[0], BaseException):
            raise got[0]
        return waited, got[0]
    finally:
        os.close(fd)


def opened_and_listed_with_mount_stopped(path: Path, pid: int) -> bool:
    """Whether open + getdents + close of `path` finish while the mount process is stopped.

    With the patched pyfuse3's readdir_by_inode the mount answers OPENDIR with
    ENOSYS once, and the kernel then never sends OPENDIR or RELEASEDIR again.
    """
    for _ in range(CACHED_TRIES):
        names(path)
        names(path)  # the first may leave the directory's atime to be asked for again
        done: list[list[str]] = []
        thread = threading.Thread(target=lambda done=done: done.append(names(path)), daemon=True)
        os.kill(pid, signal.SIGSTOP)
        try:
            thread.start()
            thread.join(CACHED_WAIT)
            in_time = not thread.is_alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        thread.join(60)
        if in_time and done:
            return True
    return False


def names(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def cached_listing(path: Path, pid: int) -> tuple[bool, list[str]]:
    """Whether the listing right after a listing of `path` is the kernel's alone: (yes, names)."""
    for _ in range(CACHED_TRIES):
        names(path)
        waited, got = list_with_mount_stopped(path, pid, CACHED_WAIT)
        if not waited:
            return True, got
    return False, got


def find(root: Path) -> list[str]:
    out = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True)
    return sorted(out.stdout.splitlines())


def ls_lr(root: Path) -> list[str]:
    """`ls -lR` with times to the nanosecond, less what no two file systems agree on.

    Left out: the "total" block counts and the sizes of directories (4096 on
    the mount, the space the source file system gave each directory), and so
    the padding of the columns.
    """
    out = subprocess.run(["ls", "-lR", "--time-style=+%s.%N", "."], cwd=root,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "LC_ALL": "C.UTF-8"})
    lines = []
    for line in out.stdout.splitlines():
        if line.startswith("total "):
            continue
        fields = line.split(maxsplit=6)  # mode, links, user, group, size, time, name
        if len(fields) == 7 and fields[0].startswith("d"):
            fields[4] = "DIR"
        lines.append(" ".join(fields))
    return lines


def assert_same_tree(mnt: Path, src: Path) -> None:
    assert find(mnt) == find(src)
    assert ls_lr(mnt) == ls_lr(src)


def make_tree(src: Path) -> None:
    many = src / "many"
    many.mkdir(parents=True)
    for i in range(1500):
        (many / f"file-{i:04d}.txt").write_bytes(f"{i}\n".encode())
    (src / "docs" / "deep" / "deeper").mkdir(parents=True)
    (src / "docs" / "readme.txt").write_text("read me\n")
    (src / "docs" / "grows.txt").write_text("short\n")
    (src / "docs" / "deep" / "deeper" / "bottom.txt").write_text("bottom\n")
    (src / "other").mkdir()
    (src / "other" / "still.txt").write_text("never changes\n")
    (src / "same-mtime").mkdir()
    (src / "same-mtime" / "first.txt").write_text("first\n")
    (src / "empty-dir").mkdir()
    (src / "top.txt").write_text("top\n")
    (src / "ünïcödé – 日本語.txt").write_text("unicode\n")
    os.symlink("docs/readme.txt", src / "link")
    os.symlink("/nonexistent", src / "dangling")


# ----------------------------------------------------------------------------- a, c


def test_a_second_listing_never_reaches_the_mount_process(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    make_tree(src)
    home = node_home("pub")
    link = publish(home, src)["read_link"]
    with mounted(home, link, tmp_path / "mnt") as mnt:
        pid = mount_pid(home, mnt)
        assert pid is not None
        for rel in ("many", "docs/deep", "."):
            # the first listing has to ask the mount process: the observation works
            waited, got = list_with_mount_stopped(mnt / rel, pid, BLOCKED_WAIT)
            assert waited, f"{rel}: the first listing did not need the mount process"
            assert got == names(src / rel)
            # the next is the kernel's alone
            cached, got = cached_listing(mnt / rel, pid)
            assert cached, f"{rel}: every listing reached the mount process"
            assert got == names(src / rel)
            if LISTINGS_BY_INODE:  # not even the open and close of the directory do
                assert opened_and_listed_with_mount_stopped(mnt / rel, pid), rel
        # the tools people use, cold and then from the kernel's caches
        assert_same_tree(mnt, src)
        assert_same_tree(mnt, src)


# ----------------------------------------------------------------------------- b, c


def test_a_new_version_replaces_cached_listings_in_a_live_mount(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    home = tmp_path / "home-publisher"
    home.mkdir()
    link = publish(home, src)["read_link"]
    reader_home = tmp_path / "home-reader"
    reader_home.mkdir()
    listed = [".", "many", "docs", "docs/deep", "docs/deep/deeper", "other", "same-mtime"]
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", home)
        reader = swarm.mount("reader", reader_home, link, tmp_path / "mnt", bootstrap=[pub.addr])
        mnt = reader.mountpoint
        for rel in listed:  # every one cached, so the new version has something to replace
            cached, got = cached_listing(mnt / rel, reader.pid)
            assert cached, f"{rel}: the listing was not cached in version 1"
            assert got == names(src / rel)
        # A file that grows in version 2 and stays open: its old inode keeps answering
        # stat until the mount drops its name, the last notification of a new version.
        # A handle on docs opened in version 1 is first read in version 2.
        signal_file = mnt / "docs" / "grows.txt"
        with open(signal_file, "rb"), contextlib.ExitStack() as stack:
            stale = os.open(mnt / "docs", os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, stale)
            # version 2: entries added, removed and renamed in listed directories
            (src / "many" / "file-0000.txt").unlink()
            (src / "many" / "file-0001.txt").rename(src / "many" / "renamed-0001.txt")
            (src / "many" / "zz-added.txt").write_text("added\n")
            (src / "docs" / "readme.txt").rename(src / "docs" / "README.md")
            (src / "docs" / "added.txt").write_text("added\n")
            (src / "docs" / "grows.txt").write_text("grows, and so gets a new inode\n")
            (src / "docs" / "deep" / "deeper" / "bottom.txt").unlink()
            (src / "docs" / "deep" / "deeper" / "new-bottom.txt").write_text("new\n")
            (src / "top.txt").unlink()
            (src / "new-top").mkdir()
            # a name added where the directory keeps its mtime (as `rsync -a` leaves it):
            # the kernel cannot notice this one by itself
            quiet = (src / "same-mtime").stat()
            (src / "same-mtime" / "second.txt").write_text("second\n")
            os.utime(src / "same-mtime", ns=(quiet.st_atime_ns, quiet.st_mtime_ns))
            assert publish(home, src)["seq"] == 2
            grown = (src / "docs" / "grows.txt").stat().st_size
            assert wait_until(lambda: signal_file.stat().st_size == grown, 20), (
                f"version 2 did not reach the mount\n{swarm.diagnostics()}")
            # every notification is in: the listings are version 2's, at once
            assert sorted(os.listdir(stale)) == names(src / "docs")
        for rel in listed:
            assert names(mnt / rel) == names(src / rel), rel
        assert names(mnt / "new-top") == []
        assert (mnt / "docs" / "README.md").read_text() == "read me\n"
        assert not (mnt / "top.txt").exists()
        for rel in listed:  # and cached again
            cached, got = cached_listing(mnt / rel, reader.pid)
            assert cached, f"{rel}: the listing of version 2 was not cached"
            assert got == names(src / rel)
        assert_same_tree(mnt, src)
