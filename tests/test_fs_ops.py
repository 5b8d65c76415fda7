"""The FUSE operations class in process: DriveOperations over a Drive, no kernel.

Each request the kernel would send is a method call here, answered from a
real store and a fake network (tests/inprocess.py): attributes, lookups,
opens and reads, every write refused with EROFS, the drive's errors turned
into errno in one place (EIO, EINVAL, ENOSPC), status and pins through the
extended attributes. What the kernel does with the answers (page cache,
cached listings, invalidation) is for the mount tests.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyfuse3
import pytest
import trio

from cache.errors import StoreFull
from cache.store import BlockStore
from tests.helpers import reply_bytes, run_trio
from tests.inprocess import FakeNetwork, new_cap, publish_folder, running_drive, wrong_key_chunks
from vfs.drive import Drive
from vfs.fs import ATTR_TIMEOUT, DriveOperations
from vfs.pins import BUILDING, pin_name
from vfs.storage import DriveStorage
from vfs.xattrs import PREFIX_BYTES as XATTR_PREFIX
from vfs.xattrs import FiguresState, PinProgress

MiB = 1 << 20
DEADLINE = 120.0  # seconds: generous, only a hang reaches it on a loaded machine
MARKER = b"WRONG KEY CHUNK"
ROOT = pyfuse3.ROOT_INODE


@pytest.fixture
def ops_world(tmp_path: Path, monkeypatch):
    src = tmp_path / "src"
    (src / "docs" / "deep").mkdir(parents=True)
    data = {"docs/a.bin": os.urandom(2 * MiB), "docs/deep/b.txt": b"bee\n" * 100,
            "top.txt": b"top\n", "bad.txt": MARKER + b"?" * 300}
    for rel, content in data.items():
        (src / rel).write_bytes(content)
    os.symlink("docs/deep/b.txt", src / "link")
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    os.utime(src / "top.txt", ns=(1_600_000_000_000_000_007, 1_600_000_000_000_000_007))
    cap = new_cap()
    pub = BlockStore(tmp_path / "pub", sync=False)
    with wrong_key_chunks(monkeypatch, MARKER):
        head = publish_folder(pub, src, cap)
    reader = BlockStore(tmp_path / "reader", sync=False)
    net = FakeNetwork(pub)
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=net.fetch,
                  holders=None)
    yield DriveOperations(drive), drive, net, data, reader
    reader.close()
    pub.close()


async def walk(ops: DriveOperations, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT
    attrs = await ops.getattr(ROOT, None)
    for name in path.split("/"):
        attrs = await ops.lookup(ino, name.encode(), None)
        ino = attrs.st_ino
    return attrs


async def read_all(ops: DriveOperations, ino: int, size: int) -> bytes:
    fi = await ops.open(ino, os.O_RDONLY, None)
    assert fi.keep_cache  # a version never changes: the kernel may keep the pages
    out = b""
    while len(out) < size:
        out += reply_bytes(await ops.read(fi.fh, len(out), 128 * 1024))
    assert reply_bytes(await ops.read(fi.fh, size, 4096)) == b""  # at the end: nothing
    await ops.release(fi.fh)
    return out


async def fuse_errno(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await call
    return exc.value.errno


def test_attributes_lookups_and_reads(ops_world) -> None:
    ops, drive, _, data, _ = ops_world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            top = await walk(ops, "top.txt")
            assert stat.S_ISREG(top.st_mode) and stat.S_IMODE(top.st_mode) == 0o644
            assert top.st_size == 4 and top.st_nlink == 1
            assert top.st_mtime_ns == 1_600_000_000_000_000_007
            assert top.entry_timeout == top.attr_timeout == ATTR_TIMEOUT
            assert stat.S_IMODE((await walk(ops, "run.sh")).st_mode) == 0o755
            docs = await walk(ops, "docs")
            assert stat.S_ISDIR(docs.st_mode) and docs.st_nlink == 3  # . and .. and deep
            assert (await ops.getattr(docs.st_ino, None)).st_ino == docs.st_ino
            assert (await walk(ops, "docs")).st_ino == docs.st_ino  # stable by path
            link = await walk(ops, "link")
            assert stat.S_ISLNK(link.st_mode)
            assert await ops.readlink(link.st_ino, None) == b"docs/deep/b.txt"
            assert await fuse_errno(ops.readlink(top.st_ino, None)) == errno.EINVAL
            assert (await ops.lookup(docs.st_ino, b".", None)).st_ino == docs.st_ino
            assert (await ops.lookup(docs.st_ino, b"..", None)).st_ino == ROOT
            assert await fuse_errno(ops.lookup(ROOT, b"missing", None)) == errno.ENOENT
            assert await fuse_errno(ops.lookup(top.st_ino, b"x", None)) == errno.ENOTDIR
            assert await fuse_errno(ops.getattr(10 ** 9, None)) == errno.ENOENT
            for rel, content in data.items():
                if rel != "bad.txt":
                    attrs = await walk(ops, rel)
                    assert await read_all(ops, attrs.st_ino, attrs.st_size) == content, rel
            assert await fuse_errno(ops.open(docs.st_ino, os.O_RDONLY, None)) == errno.EISDIR
            assert await fuse_errno(ops.open(link.st_ino, os.O_RDONLY, None)) == errno.EINVAL
            assert await fuse_errno(ops.read(12345, 0, 10)) == errno.EBADF
            # the kernel forgets what it looked up: the inode goes once every lookup is undone
            deep = await walk(ops, "docs/deep")
            await ops.forget([(deep.st_ino, 10 ** 6)])
            assert await fuse_errno(ops.getattr(deep.st_ino, None)) == errno.ENOENT

    run_trio(main, DEADLINE)


def test_every_write_is_erofs(ops_world) -> None:
    ops, drive, *_ = ops_world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            top = await walk(ops, "top.txt")
            for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                          os.O_WRONLY | os.O_APPEND):
                assert await fuse_errno(ops.open(top.st_ino, flags, None)) == errno.EROFS
            for call in (ops.setattr(top.st_ino, None, None, None, None),
                         ops.mknod(ROOT, b"n", 0o644, 0, None), ops.mkdir(ROOT, b"d", 0o755, None),
                         ops.unlink(ROOT, b"top.txt", None), ops.rmdir(ROOT, b"docs", None),
                         ops.symlink(ROOT, b"s", b"t", None),
                         ops.rename(ROOT, b"top.txt", ROOT, b"x", 0, None),
                         ops.link(top.st_ino, ROOT, b"h", None), ops.write(1, 0, b"x"),
                         ops.create(ROOT, b"c", 0o644, os.O_WRONLY, None),
                         ops.removexattr(top.st_ino, b"user.peerdrive.pinned", None),
                         ops.setxattr(top.st_ino, b"user.other", b"1", None)):
                assert await fuse_errno(call) == errno.EROFS

    run_trio(main, DEADLINE)


def test_drive_errors_become_errno(ops_world, monkeypatch) -> None:
    ops, drive, net, data, reader = ops_world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            bad = await walk(ops, "bad.txt")
            fi = await ops.open(bad.st_ino, os.O_RDONLY, None)
            assert await fuse_errno(ops.read(fi.fh, 0, 4096)) == errno.EIO  # does not decrypt
            a = await walk(ops, "docs/a.bin")
            fi = await ops.open(a.st_ino, os.O_RDONLY, None)
            chunks = (await drive.tree.chunk_map(await drive.lookup(
                await drive.lookup(drive.root_entry(), b"docs"), b"a.bin"))).chunks
            net.unavailable.add(chunks[-1].block_id)
            assert await fuse_errno(ops.read(fi.fh, a.st_size - 10, 10)) == errno.EIO
            top = await walk(ops, "top.txt")
            name = XATTR_PREFIX + b"pinned"
            assert await fuse_errno(ops.setxattr(top.st_ino, name, b"2", None)) == errno.EINVAL

            def full(*args):
                raise StoreFull("the store is full of pinned blocks")

            monkeypatch.setattr(reader, "set_pin", full)
            assert await fuse_errno(ops.setxattr(top.st_ino, name, b"1", None)) == errno.ENOSPC
            monkeypatch.undo()
            assert reply_bytes(await ops.read(fi.fh, 0, 10)) == data["docs/a.bin"][:10]  # still up

    run_trio(main, DEADLINE)


def test_status_attributes_follow_the_device(ops_world) -> None:
    ops, drive, _, data, _ = ops_world

    async def xattrs(ino: int) -> dict[str, str]:
        names = await ops.listxattr(ino, None)
        assert names == [XATTR_PREFIX + n for n in (b"state", b"cached", b"size", b"pinned",
                                                     b"copies", b"figures")]
        found = {n[len(XATTR_PREFIX):].decode(): (await ops.getxattr(ino, n, None)).decode()
                 for n in names if n != XATTR_PREFIX + b"figures"}
        # figures: whether state and cached are at hand; once `state` answered, they are
        figures = FiguresState.decode(await ops.getxattr(ino, XATTR_PREFIX + b"figures", None))
        assert figures.complete and not figures.error, figures
        return found

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            a = await walk(ops, "docs/a.bin")
            docs = await walk(ops, "docs")
            size = str(2 * MiB)
            assert await xattrs(a.st_ino) == {"state": "cloud", "cached": "0", "size": size,
                                              "pinned": "0", "copies": "0"}
            await read_all(ops, a.st_ino, a.st_size)
            await drive.blocks._store_unstored()  # what the store writer does next
            assert await xattrs(a.st_ino) == {"state": "device", "cached": size, "size": size,
                                              "pinned": "0", "copies": "1"}  # this device
            folder = await xattrs(docs.st_ino)
            total = 2 * MiB + len(data["docs/deep/b.txt"])
            assert folder == {"state": "partial", "cached": size, "size": str(total),
                              "pinned": "0", "copies": "0"}  # b.txt: on no device known
            assert await fuse_errno(ops.getxattr(a.st_ino, b"user.peerdrive.nope", None)) \
                == pyfuse3.ENOATTR
            # no labels, no ACLs: "not supported", which tools remember per file system
            for foreign in (b"security.selinux", b"system.posix_acl_access", b"trusted.x"):
                assert await fuse_errno(ops.getxattr(a.st_ino, foreign, None)) == errno.EOPNOTSUPP
            # evict (what `peerdrive evict` sets, minus the kernel's pages: no kernel here)
            await drive.answers.evict(docs_entry(drive, docs))
            assert (await xattrs(a.st_ino))["state"] == "cloud"

    def docs_entry(drive: Drive, attrs):
        return ops.inodes[attrs.st_ino].entry

    run_trio(main, DEADLINE)


def test_pins_fetch_everything_below_and_refuse_a_partial_unpin(ops_world) -> None:
    ops, drive, net, data, reader = ops_world
    name = XATTR_PREFIX + b"pinned"

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            docs = await walk(ops, "docs")
            b = await walk(ops, "docs/deep/b.txt")
            top = await walk(ops, "top.txt")
            await ops.setxattr(docs.st_ino, name, b"1", None)
            pin = pin_name(drive.cap, [b"docs"])
            assert reader.has_pin(pin)
            # done as `peerdrive pin` sees it: the pin's own progress says complete (the
            # 'state' may say device earlier: it counts blocks fetched for any reason)
            progress = XATTR_PREFIX + b"progress"
            while not PinProgress.decode(await ops.getxattr(docs.st_ino, progress,
                                                             None)).complete:
                await trio.sleep(0.01)
            assert await ops.getxattr(docs.st_ino, XATTR_PREFIX + b"state", None) == b"device"
            assert await ops.getxattr(b.st_ino, name, None) == b"1"  # through the folder
            assert await ops.getxattr(top.st_ino, name, None) == b"0"
            entry = ops.inodes[docs.st_ino].entry
            want = set()
            for rel in ("docs/a.bin", "docs/deep/b.txt"):
                f = ops.inodes[(await walk(ops, rel)).st_ino].entry
                want |= {r.block_id for r in (await drive.tree.chunk_map(f)).chunks}
            # complete means: every block committed to the store and held under the pin's
            # own name (never evicted), the set it was built in gone
            assert not reader.missing(list(want))
            assert want <= set(reader.pin_ids(pin))
            assert not reader.has_pin(pin + BUILDING)
            # pinned blocks survive an evict of the folder
            await drive.answers.evict(entry)
            assert not reader.missing(list(want))
            assert await fuse_errno(ops.setxattr(b.st_ino, name, b"0", None)) == errno.EINVAL
            assert await ops.getxattr(b.st_ino, name, None) == b"1"
            await ops.setxattr(docs.st_ino, name, b"0", None)
            assert not reader.has_pin(pin)
            assert await ops.getxattr(b.st_ino, name, None) == b"0"

    run_trio(main, DEADLINE)


def test_a_pin_that_cannot_complete_says_why_and_completes_later(ops_world) -> None:
    ops, drive, net, data, reader = ops_world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            a = await walk(ops, "docs/a.bin")
            entry = ops.inodes[a.st_ino].entry
            chunks = (await drive.tree.chunk_map(entry)).chunks
            net.unavailable.add(chunks[-1].block_id)  # the last: a 2 MiB file may be one chunk
            await ops.setxattr(a.st_ino, XATTR_PREFIX + b"pinned", b"1", None)
            pin = pin_name(drive.cap, [b"docs", b"a.bin"])
            assert drive.pins is not None
            while pin not in drive.pins.errors:
                await trio.sleep(0.01)
            assert "still missing" in drive.pins.errors[pin]
            assert (await ops.getxattr(a.st_ino, XATTR_PREFIX + b"state", None)) != b"device"
            assert await ops.getxattr(a.st_ino, XATTR_PREFIX + b"pinned", None) == b"1"
            net.unavailable.clear()
            drive.pins.refresh()  # as a retry (10 s) or a new version would
            while pin in drive.pins.errors:  # the round that completes it clears the error
                await trio.sleep(0.01)
            assert (await ops.getxattr(a.st_ino, XATTR_PREFIX + b"state", None)) == b"device"

    run_trio(main, DEADLINE)


def test_a_new_version_makes_a_complete_pin_wait_for_its_own_round(tmp_path: Path) -> None:
    """"complete" is for the version mounted now: after a new version the pin's progress
    says so only once the pin holds that version's blocks under its own name."""
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.bin").write_bytes(os.urandom(MiB))
    cap = new_cap()
    pub = BlockStore(tmp_path / "pub", sync=False)
    reader = BlockStore(tmp_path / "reader", sync=False)
    try:
        first = publish_folder(pub, src, cap)
        (src / "docs" / "a.bin").write_bytes(os.urandom(MiB))  # every chunk changes
        second = publish_folder(pub, src, cap)
        drive = Drive(cap.read_cap(), DriveStorage(reader), first, fetch=FakeNetwork(pub).fetch,
                      holders=None)
        ops = DriveOperations(drive)
        pin = pin_name(drive.cap, [b"docs"])
        progress = XATTR_PREFIX + b"progress"

        async def chunks() -> set[bytes]:
            a = ops.inodes[(await walk(ops, "docs/a.bin")).st_ino].entry
            return {r.block_id for r in (await drive.tree.chunk_map(a)).chunks}

        async def until_complete(ino: int) -> None:
            while not PinProgress.decode(await ops.getxattr(ino, progress, None)).complete:
                await trio.sleep(0.01)

        async def main(nursery: trio.Nursery) -> None:
            async with running_drive(drive):
                docs = await walk(ops, "docs")
                await ops.setxattr(docs.st_ino, XATTR_PREFIX + b"pinned", b"1", None)
                await until_complete(docs.st_ino)
                old = await chunks()
                assert old <= set(reader.pin_ids(pin))
                drive.set_head(second)
                # at once, before any round on the new version has run
                assert not PinProgress.decode(await ops.getxattr(docs.st_ino, progress,
                                                                 None)).complete
                docs = await walk(ops, "docs")
                await until_complete(docs.st_ino)
                new = await chunks()
                held = set(reader.pin_ids(pin))
                assert new <= held and not old & held  # the old version's blocks released
                assert not reader.missing(list(new))
                assert not reader.has_pin(pin + BUILDING)

        run_trio(main, DEADLINE)
    finally:
        reader.close()
        pub.close()


def test_statfs_reports_the_cache(ops_world) -> None:
    ops, drive, *_ = ops_world

    async def main(nursery: trio.Nursery) -> None:
        s = await ops.statfs(None)
        assert s.f_bsize == 4096 and s.f_namemax == 255 and s.f_bfree == 0

    run_trio(main, DEADLINE)
