"""Publish a real folder and read it back through a real FUSE mount served by
`peerdrive mount` in another process (issue: the foundation)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import is_mounted, mount_pid, mounted, peerdrive, publish, stop_pid
from tests.processes import wait_exit
from vfs.mount import KERNEL_READAHEAD_KB
from vfs.storage import publish_pin

pytestmark = pytest.mark.fuse

BIG = 100 * 1024 * 1024
LOOPBACK = ("--listen", "127.0.0.1:0", "--no-lan")


def make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep\n" * 1000)
    (root / "a" / "top.bin").write_bytes(os.urandom(300_000))
    many = root / "many"
    many.mkdir()
    for i in range(1000):
        (many / f"f{i:04d}.txt").write_bytes(f"entry {i}\n".encode())
    (root / "empty").write_bytes(b"")
    with open(root / "big.bin", "wb") as f:
        for _ in range(BIG // (4 << 20)):
            f.write(os.urandom(4 << 20))
    (root / "ünïcödé – 日本語.txt").write_text("unicode ✓\n")
    os.symlink("a/top.bin", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    exe = root / "run.sh"
    exe.write_text("#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    os.utime(root / "a" / "top.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def walk(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            extra = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            nlink = st.st_nlink
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_mtime_ns, size, extra, nlink)
    return out


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_round_trip_through_mount(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    home = node_home("pub")
    info = publish(home, src)
    assert info["seq"] == 1
    assert info["files"] == 1000 + 6  # regular files; symlinks are not counted
    assert info["new_bytes"] > BIG

    mnt = tmp_path / "mnt"
    with mounted(home, info["read_link"], mnt):
        if os.getuid() == 0:
            # the mount is ready only once its kernel readahead is wide (1 MiB requests)
            dev = os.stat(mnt).st_dev
            ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            assert ra.read_text().strip() == str(KERNEL_READAHEAD_KB)
        want = walk(src)
        got = walk(mnt)
        assert set(got) == set(want)
        for rel, (kind, mode, mtime, size, target, nlink) in want.items():
            g = got[rel]
            assert g[0] == kind, rel
            assert g[1] == mode, rel
            if kind != stat.S_IFLNK:  # symlink mtimes are not preserved by every tool
                assert g[2] == mtime, rel
            assert g[3] == size, rel
            assert g[4] == target, rel
            if kind == stat.S_IFDIR:
                assert g[5] == nlink, rel
        for rel, (kind, *_rest) in want.items():
            if kind == stat.S_IFREG:
                assert same_bytes(src / rel, mnt / rel), rel
        # the tools people use
        find = subprocess.run(["find", str(mnt)], capture_output=True, text=True, check=True)
        assert len(find.stdout.splitlines()) == len(want) + 1
        ls = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, check=True)
        assert "f0999.txt" in ls.stdout
        assert (
            subprocess.run([str(mnt / "run.sh")], capture_output=True, text=True, check=True).stdout
            == "hi\n"
        )
        assert (mnt / "link").read_bytes() == (src / "a" / "top.bin").read_bytes()
        # random reads across chunk boundaries
        with open(mnt / "big.bin", "rb") as fm, open(src / "big.bin", "rb") as fs:
            for off in (0, 1, 65535, 262143, 262144, BIG - 10, BIG - 1, BIG // 2 + 12345):
                fm.seek(off)
                fs.seek(off)
                assert fm.read(300_000) == fs.read(300_000), off
        # read-only: every kind of write fails with EROFS
        for action in (
            lambda: open(mnt / "new", "w"),
            lambda: open(mnt / "empty", "w"),
            lambda: open(mnt / "a" / "top.bin", "r+b"),
            lambda: os.mkdir(mnt / "d"),
            lambda: os.unlink(mnt / "empty"),
            lambda: os.rename(mnt / "empty", mnt / "x"),
            lambda: os.symlink("x", mnt / "s"),
            lambda: os.chmod(mnt / "empty", 0o600),
            lambda: os.truncate(mnt / "empty", 10),
            lambda: os.setxattr(mnt / "empty", "user.other", b"1"),
        ):
            with pytest.raises(OSError) as exc:
                action()
            assert exc.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            (mnt / "missing").stat()
        # status through extended attributes
        assert os.getxattr(mnt / "big.bin", "user.peerdrive.state") == b"device"
        assert int(os.getxattr(mnt / "big.bin", "user.peerdrive.size")) == BIG
        # no security labels, no ACLs: "not supported" (what `ls -l` remembers for the
        # whole file system instead of asking every file twice), other names "no data"
        for foreign in ("security.selinux", "system.posix_acl_access", "trusted.x"):
            with pytest.raises(OSError) as exc:
                os.getxattr(mnt / "a" / "top.bin", foreign)
            assert exc.value.errno == errno.EOPNOTSUPP, foreign
        with pytest.raises(OSError) as exc:
            os.getxattr(mnt / "a" / "top.bin", "user.other")
        assert exc.value.errno == errno.ENODATA
    assert not is_mounted(mnt)


def test_missing_block_with_no_peer_gives_eio_and_mount_survives(tmp_path: Path,
                                                                 node_home) -> None:
    """A block gone from the only store that had it: EIO within the fetch timeout.

    (A block that is there but does not decrypt: tests/test_cli_process.py,
    test_corrupt_block_gives_eio_is_evicted_and_the_mount_survives.)
    """
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_bytes(b"good\n")
    # over 2 MiB: always at least three chunks (max 1 MiB), so losing one leaves it partial
    (src / "bad.bin").write_bytes(os.urandom(3_000_000))
    home = node_home("pub")
    info = publish(home, src)
    # lose one block of bad.bin: the publisher's store is the only one that had it
    import trio

    from cache.store import BlockStore
    from vfs.capability import parse_link
    from vfs.storage import DriveStorage

    cap = parse_link(info["read_link"])
    with BlockStore(home / "store") as store:
        storage = DriveStorage(store)
        head = storage.load_head(cap)
        from vfs.blocks import BlockReader
        from vfs.tree import Tree

        tree = Tree(BlockReader(store, cap.read_key))

        async def find() -> list[bytes]:
            entry = await tree.lookup(head.root.node, b"bad.bin")
            return [r.block_id for r in (await tree.chunk_map(entry)).chunks]

        ids = trio.run(find)
        store.unpin(publish_pin(cap.pubkey, head.seq))
        assert store.evict(ids[:1]) > 0
    mnt = tmp_path / "mnt"
    with mounted(home, info["read_link"], mnt, "--fetch-timeout", "3"):
        with pytest.raises(OSError) as exc:
            (mnt / "bad.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert (mnt / "good.txt").read_bytes() == b"good\n"
        assert os.getxattr(mnt / "bad.bin", "user.peerdrive.state") == b"partial"


def test_sigterm_unmounts_and_unmount_clears_killed_mount(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("x")
    home = node_home("pub")
    info = publish(home, src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        peerdrive(home, "mount", info["read_link"], str(mnt), *LOOPBACK)
        pid = mount_pid(home, mnt)
        assert pid is not None and is_mounted(mnt)
        stop_pid(pid)  # SIGTERM
        assert not is_mounted(mnt)

        peerdrive(home, "mount", info["read_link"], str(mnt), *LOOPBACK)
        pid = mount_pid(home, mnt)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_exit(pid, None, 10), "the mount process survived SIGKILL"
        assert is_mounted(mnt)  # a dead FUSE mount stays until cleared
        peerdrive(home, "unmount", str(mnt))
        assert not is_mounted(mnt)
        # and it can be mounted again
        with mounted(home, info["read_link"], mnt):
            assert (mnt / "x").read_text() == "x"
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_mount_errors_are_clear(tmp_path: Path, node_home) -> None:
    home = node_home("a")
    res = peerdrive(home, "mount", "peerdrive:r1:nonsense", str(tmp_path), check=False)
    assert res.returncode == 2 and "link" in res.stderr
    src = tmp_path / "src"
    src.mkdir()
    info = publish(home, src)
    res = peerdrive(home, "mount", info["read_link"], str(tmp_path / "nope"), check=False)
    assert res.returncode == 6 and "not a directory" in res.stderr
    other = node_home("b")
    (tmp_path / "m").mkdir()
    res = peerdrive(other, "mount", info["read_link"], str(tmp_path / "m"), *LOOPBACK,
                    check=False)
    assert res.returncode == 4, res.stderr
    assert not is_mounted(tmp_path / "m")
