"""A mount's memory and its questions to peers follow what is in use, not the drive's size
(issue 17), in process: the mount's own Drive and DriveOperations over real stores.

What is checked: `peerdrive status` of a folder (every name it reads) asks the
peers the same questions for a folder of 200 files and of 10,000 (one "what do
you keep whole", never a question naming blocks), and only a peer that keeps
the folder (or one above it) whole counts as a copy; inodes the kernel
forgets leave the table and are counted toward giving the heap back; a trim
gives freed heap pages back to the system (RssAnon falls, in a child process).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from cache.store import BlockStore
from tests.drive_builder import DriveBuilder, small_tree
from vfs import figures, memory, xattrs
from vfs.capability import WriteCap
from vfs.drive import Drive
from vfs.fs import DriveOperations
from vfs.storage import DriveStorage

ROOT = pyfuse3.ROOT_INODE


class CountingPeers:
    """What the mount asks its peers: every question counted, with the block ids it names."""

    def __init__(self, announced: dict[bytes, frozenset[bytes]]) -> None:
        self.announced = announced
        self.whole_asked = 0
        self.have_asked = 0
        self.ids_named = 0

    async def whole(self, timeout: float) -> dict[bytes, frozenset[bytes]]:
        self.whole_asked += 1
        return dict(self.announced)

    async def holders(self, block_ids: list[bytes], timeout: float) -> dict[bytes, list[bool]]:
        self.have_asked += 1
        self.ids_named += len(block_ids)
        return {peer: [True] * len(block_ids) for peer in self.announced}


def drive_of(tmp_path: Path, files: int, name: str):
    """A reader's Drive of a drive of `files` small files in folders of 100 (nothing here)."""
    pub = BlockStore(tmp_path / f"{name}-pub", sync=False)
    reader = BlockStore(tmp_path / f"{name}-reader", sync=False)
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    head = b.commit(pub, small_tree(b, files, per_folder=100))

    async def fetch(block_id, priority):
        return pub.get(block_id)

    return cap, head, pub, reader, fetch


async def node_ids(drive: Drive, names: list[bytes]) -> dict[bytes, bytes]:
    """The directory node ids of these folders of the root."""
    root = drive.root_entry()
    return {n: (await drive.lookup(root, n)).node.block_id for n in names}


async def status_questions(drive: Drive, path: list[bytes]) -> dict[str, int]:
    """Read every name `peerdrive status PATH` reads (what listxattr lists), as it does."""
    entry = drive.root_entry()
    for name in path:
        entry = await drive.lookup(entry, name)
    return {n: await drive.answers.get(path, entry, n) for n in drive.answers.names()}


def test_status_of_a_folder_asks_the_peers_the_same_few_questions_at_any_size(
        tmp_path: Path) -> None:
    asked: dict[tuple[int, str], tuple[int, int, int]] = {}
    for files in (200, 10_000):
        cap, head, pub, reader, fetch = drive_of(tmp_path, files, str(files))
        root = head.root
        folders = trio.run(node_ids, Drive(cap.read_cap(), DriveStorage(reader), head,
                                           fetch=fetch), [b"d00000", b"d00001"])
        # what a peer announced (Whole frames): the whole version (its root node), the
        # folder, another folder (a partial pin, or a host still fetching: no copy of
        # d00000 nor of the root), nothing
        for announce, held in (("root", {root.node.block_id}), ("folder", {folders[b"d00000"]}),
                               ("other folder", {folders[b"d00001"]}), ("nothing", set())):
            peers = CountingPeers({b"peer-1": frozenset(held), b"peer-2": frozenset()})
            drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch,
                          holders=peers.holders, whole=peers.whole)

            async def main(drive: Drive = drive) -> tuple[dict, dict]:
                return (await status_questions(drive, []),
                        await status_questions(drive, [b"d00000"]))

            top, folder = trio.run(main)
            # two status commands (the root, a folder): one Whole question each, no Have
            asked[files, announce] = (peers.whole_asked, peers.have_asked, peers.ids_named)
            assert asked[files, announce] == (2, 0, 0), asked
            assert top[xattrs.STATE] == folder[xattrs.STATE] == b"cloud"
            assert top[xattrs.SIZE] == str(files * 64).encode()
            want_root = b"1" if announce == "root" else b"0"
            want_folder = b"1" if announce in ("root", "folder") else b"0"
            assert (top[xattrs.COPIES], folder[xattrs.COPIES]) == (want_root, want_folder), \
                announce
        pub.close()
        reader.close()


def test_forgotten_inodes_leave_the_table_and_the_heap_is_trimmed(tmp_path: Path) -> None:
    cap, head, pub, reader, fetch = drive_of(tmp_path, 500, "forget")
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch)
    drive.memory = memory.Releaser(after=400, min_interval=0.0)
    ops = DriveOperations(drive)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(drive.memory.run)
            looked: list[int] = []
            for d in range(5):
                folder = await ops.lookup(ROOT, f"d{d:05d}".encode(), None)
                looked.append(folder.st_ino)
                for f in range(100):
                    looked.append((await ops.lookup(folder.st_ino, f"f{f:03d}".encode(),
                                                    None)).st_ino)
            assert len(ops.inodes) == 1 + 505
            assert drive.memory.trims == 0  # nothing freed yet
            await ops.forget([(ino, 1) for ino in looked[:300]])
            assert len(ops.inodes) == 1 + 205
            assert drive.memory.pending == 300
            await trio.testing.wait_all_tasks_blocked()
            assert drive.memory.trims == 0  # below `after`: not worth a trim yet
            await ops.forget([(ino, 1) for ino in looked[300:]])
            assert len(ops.inodes) == 1 and ops.by_name == {}
            with trio.fail_after(60):  # only a hang reaches it
                while drive.memory.trims == 0:
                    await trio.sleep(0.01)
            assert drive.memory.pending == 0
            nursery.cancel_scope.cancel()

    trio.run(main)
    pub.close()
    reader.close()


TRIM_CHILD = r"""
import sys
from vfs import memory

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

held = [bytes(4000) for _ in range(20_000)]  # 80 MB from the heap (each past pymalloc's 512)
keep = bytes(4000)  # above them: the heap's top stays in use, so free() cannot shrink it
before = anon()
del held
freed = anon()
assert memory.trim()
after = anon()
print(before, freed, after)
"""


@pytest.mark.skipif(memory._LIBC is None, reason="glibc's malloc_trim")
def test_a_trim_gives_freed_heap_pages_back(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120, check=True)
    before, freed, after = (int(x) for x in out.stdout.split())
    # freeing alone leaves the pages with the process; the trim gives most of them back
    assert freed > before - 20e6, (before, freed, after)
    assert after < freed - 60e6, (before, freed, after)


def test_a_folders_first_figures_read_its_directories_many_at_a_time(tmp_path: Path) -> None:
    """On a fresh mount a folder's figures need every directory node below it: they are
    asked for in waves (READ_AHEAD_DIRS in flight), each directory still read once."""
    cap, head, pub, reader, _ = drive_of(tmp_path, 5_000, "waves")
    in_flight = {"now": 0, "most": 0}

    async def fetch(block_id, priority):
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        try:
            await trio.sleep(0.001)  # a peer's answer comes later
            return pub.get(block_id)
        finally:
            in_flight["now"] -= 1

    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch)

    async def main() -> None:
        # `state` (not `size`, which the drive's folder aggregates answer without a read)
        assert await drive.answers.get([], drive.root_entry(), xattrs.STATE) == b"cloud"

    trio.run(main)
    assert drive.figures.walks == 51  # the root and its 50 folders, each once
    assert 8 <= in_flight["most"] <= figures.READ_AHEAD_DIRS, in_flight
    pub.close()
    reader.close()


def test_the_folder_summaries_keep_their_block_ids_out_of_the_process(tmp_path: Path) -> None:
    """The summaries of a walked drive weigh what their directories do, not their blocks:
    the ids and lengths (36 bytes a block, 36 MB at 10^6 small files) are in the spill
    file; what is allocated in vfs/figures.py for 10,000 files is a few bytes a file, and
    what a pin or an evict reads back is every block, right."""
    import tracemalloc

    cap, head, pub, reader, fetch = drive_of(tmp_path, 10_000, "spill")
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch)
    held: dict[str, int] = {}

    async def main() -> None:
        root = drive.root_entry()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await drive.figures.totals(root.node, root=True)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        where = [tracemalloc.Filter(True, figures.__file__)]
        held["bytes"] = sum(s.size_diff for s in after.filter_traces(where).compare_to(
            before.filter_traces(where), "filename"))
        ids = set()
        async for d in drive.figures.subtree(root.node):
            got, lengths = d.ids, d.lengths
            assert len(got) == len(lengths) * 32
            assert set(lengths) <= {64}  # small_tree's files: 64 bytes, one chunk each
            ids.update(d.block_ids())
        assert len(ids) == 10_000 and not pub.missing(list(ids))
        held["dirs"] = drive.figures.walks

    trio.run(main)
    assert held["dirs"] == 101  # the root and its 100 folders
    # 36 bytes a block in memory would be 360,000; the summaries' objects are ~1 KB a folder
    assert held["bytes"] < 10_000 * 12, held
    pub.close()
    reader.close()


def test_a_spill_that_cannot_write_keeps_its_records_in_memory(tmp_path: Path,
                                                               monkeypatch) -> None:
    """A full disk (or no folder) never loses a record or fails the caller: what the file
    refused is kept in memory and read back the same; what it took is read from it."""
    import errno
    import os

    spill = memory.Spill(tmp_path)
    assert os.listdir(tmp_path) == []  # unlinked: nothing to clean up after a crash
    on_disk = spill.put(b"a" * 100)
    assert isinstance(on_disk, int) and spill.in_memory == 0

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    kept = spill.put(b"b" * 100)
    monkeypatch.undo()
    assert spill.get(on_disk, 100) == b"a" * 100
    assert spill.get(kept, 100) == b"b" * 100 and spill.in_memory == 100
    nowhere = memory.Spill(None)
    assert nowhere.get(nowhere.put(b"c" * 10), 10) == b"c" * 10


def test_a_users_own_arena_limit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """`limit_arenas` sets glibc's arena limit unless the user set MALLOC_ARENA_MAX: glibc
    read that at start-up, and a mallopt would silently override it."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert memory.limit_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    # set where the C library has mallopt (glibc: Debian, this project's platform)
    assert memory.limit_arenas() is (memory._LIBC is not None)
