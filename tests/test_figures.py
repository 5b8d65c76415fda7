"""Folder figures without walks (issue 17), in process: a real store, a fake network.

The reader's Drive is the mount's own object, over a real LMDB store; its
"network" hands out the publisher store's ciphertext (what a peer would
send), so presence on this device changes exactly as in a mount. What is
checked: a folder's status does not walk its tree (the tree walker and the
summary builder are counted), the event loop stays free while a pin of
100,000 files runs, and the per-directory figures always equal a full walk
after any sequence of reads, pins, evictions and new versions.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache.store import BlockStore
from dht.types import Priority
from tests.drive_builder import DriveBuilder, small_tree
from vfs import xattrs
from vfs.capability import WriteCap
from vfs.drive import Drive
from vfs.errors import UsageError
from vfs.formats import Entry
from vfs.pins import Pins
from vfs.storage import DriveStorage
from vfs.tree import Tree


def fake_network(source: BlockStore, delay: float = 0.0):
    async def fetch(block_id: bytes, priority: Priority) -> bytes:
        await trio.sleep(delay)
        data = source.get(block_id)
        if data is None:
            from vfs.errors import BlockUnavailable
            raise BlockUnavailable("no peer holds it")
        return data
    return fetch


async def walk_usage(drive: Drive, entry: Entry) -> tuple[int, int]:
    """The figures the old way: every entry below, every chunk looked up in the store."""
    store = drive.storage.store
    if entry.is_file:
        chunks = (await drive.tree.chunk_map(entry)).chunks
        gone = set(store.missing([r.block_id for r in chunks]))
        return sum(r.length for r in chunks if r.block_id not in gone
                   or drive.blocks.is_unstored(r.block_id)), entry.size
    have = total = 0
    if entry.is_dir:
        async for _, child in drive.tree.entries(entry.node):
            h, t = await walk_usage(drive, child)
            have += h
            total += t
    return have, total


async def walk_files(drive: Drive, entry: Entry) -> int:
    """Files at or below `entry`, every entry visited (each path of a shared subtree)."""
    if not entry.is_dir:
        return 1 if entry.is_file else 0
    n = 0
    async for _, child in drive.tree.entries(entry.node):
        n += await walk_files(drive, child)
    return n


@pytest.fixture
def two_stores(tmp_path: Path):
    with BlockStore(tmp_path / "publisher") as pub, BlockStore(tmp_path / "reader") as rd:
        yield pub, rd


def test_status_of_a_folder_never_walks_its_tree(two_stores, monkeypatch) -> None:
    pub, reader = two_stores
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    head = b.commit(pub, small_tree(b, 5000, per_folder=100))
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fake_network(pub))
    walker = {"entries": 0, "nodes": 0}
    entries, node = Tree.entries, Tree.node

    def counting_entries(self, *a, **k):
        walker["entries"] += 1
        return entries(self, *a, **k)

    async def counting_node(self, *a, **k):
        walker["nodes"] += 1
        return await node(self, *a, **k)

    monkeypatch.setattr(Tree, "entries", counting_entries)
    monkeypatch.setattr(Tree, "node", counting_node)
    root = drive.root_entry()

    async def main() -> None:
        assert await drive.answers.get([], root, xattrs.STATE) == b"cloud"
        assert walker["entries"] == 0  # the tree walker is never used for status
        assert drive.figures.walks == 51  # each directory summed once: root + 50 folders
        built = walker["nodes"]
        # read a few files the way FUSE does: the figures follow without any walk
        for d in (b"d00003", b"d00042"):
            folder = await drive.lookup(root, d)
            f = await drive.lookup(folder, b"f007")
            of = await drive.open(f, folder.node.block_id)
            assert len(await drive.read(of, 0, 1 << 20)) == 64
        for _ in range(20):
            assert await drive.answers.get([], root, xattrs.CACHED) == b"128"
            assert await drive.answers.get([], root, xattrs.STATE) == b"partial"
        assert await drive.answers.get([], root, xattrs.SIZE) == str(5000 * 64).encode()
        assert walker["entries"] == 0 and drive.figures.walks == 51
        # reads looked up two folders and two files: no other node was read again
        assert walker["nodes"] - built <= 4

    trio.run(main)


def gated_network(source: BlockStore, gate: trio.Event):
    """A peer that answers nothing until `gate` is set (a directory read cannot end)."""
    async def fetch(block_id: bytes, priority: Priority) -> bytes:
        await gate.wait()
        data = source.get(block_id)
        assert data is not None
        return data
    return fetch


def figures_of(drive: Drive, entry: Entry):
    async def get() -> xattrs.FiguresState:
        return xattrs.FiguresState.decode(await drive.answers.get([], entry, xattrs.FIGURES))
    return get


async def until_complete(drive: Drive, entry: Entry) -> xattrs.FiguresState:
    """Ask `figures` until the background count says complete (a state, not a time)."""
    with trio.fail_after(60):  # a hang, not a slow machine
        while not (f := await figures_of(drive, entry)()).complete:
            await trio.sleep(0.01)
    return f


def folders(b: DriveBuilder, n: int, changed: int | None = None) -> Entry:
    """The root of `n` folders of 100 files of 64 bytes; folder `changed` with one file
    changed (every other folder the very same node as without it)."""
    out = []
    for d in range(n):
        files = [b.file(f"f{i:03d}".encode(),
                        bytes([d % 256, i, 1 if d == changed and i == 0 else 0]) * 21 + b"x")
                 for i in range(100)]
        out.append(b.dir(f"d{d:05d}".encode(), files))
    return b.dir(b"root", out)


def test_the_first_status_of_a_version_answers_at_once_and_a_new_one_counts_only_what_changed(
        two_stores) -> None:
    """`figures` and `size` of a folder answer at once from the drive's folder aggregates
    while no directory below can be read (the peer stalls); the count runs in the
    background and ends with the same figures; after a new version with one file
    changed the count reads two directories (the root and that folder), not 51."""
    pub, reader = two_stores
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    head = b.commit(pub, folders(b, 50))
    gate = trio.Event()
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=gated_network(pub, gate))
    root = drive.root_entry()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(drive.run)
            with trio.fail_after(60):  # the peer answers nothing: only a wait would hang
                first = await figures_of(drive, root)()
                size = await drive.answers.get([], root, xattrs.SIZE)
            assert not first.complete
            assert (first.files, first.size, first.counted_files) == (5000, 5000 * 64, 0)
            assert size == str(5000 * 64).encode()
            assert drive.figures.walks == 0  # nothing below the root was read for them
            gate.set()
            done = await until_complete(drive, root)
            assert (done.files, done.size, done.counted_files) == (5000, 5000 * 64, 5000)
            assert drive.figures.walks == 51
            assert await drive.answers.get([], root, xattrs.STATE) == b"cloud"
            assert await drive.answers.get([], root, xattrs.SIZE) == str(5000 * 64).encode()
            # a new version: one file of d00007 changed
            b2 = DriveBuilder(cap)
            drive.set_head(b2.commit(pub, folders(b2, 50, changed=7)))
            new_root = drive.root_entry()
            assert new_root.node != root.node
            done = await until_complete(drive, new_root)
            assert (done.files, done.size) == (5000, 5000 * 64)
            assert drive.figures.walks == 53  # the new root and d00007 only
            assert await drive.answers.get([], new_root, xattrs.CACHED) == b"0"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_after_a_pin_of_a_folder_its_figures_are_complete_without_a_count(two_stores) -> None:
    """A pin's listing reads every directory below the folder: `figures` says complete
    at once afterwards (no count started, nothing read again)."""
    pub, reader = two_stores
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    head = b.commit(pub, folders(b, 5))
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fake_network(pub))
    drive.pins = pins = Pins(drive)
    root = drive.root_entry()

    async def main() -> None:
        pins.pin([])
        await pins.sync_one([])
        walks = drive.figures.walks
        f = await figures_of(drive, root)()
        assert f.complete and (f.files, f.size) == (500, 500 * 64)
        assert drive.figures.counting(root.node) is None and drive.figures.walks == walks
        assert await drive.answers.get([], root, xattrs.STATE) == b"device"

    trio.run(main)


def test_a_version_without_folder_aggregates_still_has_its_figures(two_stores) -> None:
    """A drive written before the folder aggregates: `figures` says nothing of the
    totals while counting, and the count gives them."""
    pub, reader = two_stores
    cap = WriteCap.generate()
    b = DriveBuilder(cap, aggregates=False)
    head = b.commit(pub, folders(b, 5))
    assert head.root is not None and head.root.total_files is None
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fake_network(pub))
    root = drive.root_entry()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(drive.run)
            first = await figures_of(drive, root)()
            if not first.complete:
                assert first.files is None and first.size is None
            done = await until_complete(drive, root)
            assert (done.files, done.size) == (500, 500 * 64)
            assert await drive.answers.get([], root, xattrs.SIZE) == str(500 * 64).encode()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_getxattr_is_answered_while_a_pin_of_100000_files_runs(two_stores) -> None:
    """The event loop is never held: a status request during a big pin is answered at once.

    The wait is bounded only by what a blocked loop would break (seconds, on a
    loop that should answer in milliseconds).
    """
    pub, reader = two_stores
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    head = b.commit(pub, small_tree(b, 100_000, per_folder=100, seed=7))
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fake_network(pub))
    root = drive.root_entry()
    lags: list[float] = []
    answered: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(drive.run)
            assert drive.pins is not None
            drive.pins.pin([])
            # measure while it runs: how late a 10 ms sleep wakes, how long a getxattr takes
            while True:
                t0 = trio.current_time()
                await trio.sleep(0.01)
                lags.append(trio.current_time() - t0 - 0.01)
                t0 = trio.current_time()
                with trio.fail_after(60):
                    await drive.answers.get([], root, xattrs.STATE)
                    progress = await drive.answers.get([], root, xattrs.PROGRESS)
                answered.append(trio.current_time() - t0)
                if progress is not None and xattrs.PinProgress.decode(progress).complete:
                    break
            assert await drive.answers.get([], root, xattrs.STATE) == b"device"
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert reader.missing(list(b.blocks)) == []
    # a blocked loop shows as a late wake-up; 2 s is far past any single step of the pin
    assert max(lags) < 2.0, f"the event loop was held for {max(lags):.2f} s"
    assert len(answered) > 3


# ----------------------------------------------------------------------------- the model


class FiguresMachine(RuleBasedStateMachine):
    """Random reads, pins, evictions and new versions; the figures always equal a full walk."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self._dir = tempfile.TemporaryDirectory()
        base = Path(self._dir.name)
        self.pub = BlockStore(base / "p")
        self.reader = BlockStore(base / "r")
        self.cap = WriteCap.generate()
        self.rng = random.Random(1)
        self.version = 0
        self.drive: Drive | None = None
        self._new_version()

    def _layout(self) -> Entry:
        b = DriveBuilder(self.cap)
        sub = [b.file(f"s{i}".encode(), bytes([self.version % 3, i]) * 40) for i in range(3)]
        folders = []
        for d in range(3):
            files = [b.file(f"f{i}".encode(),
                            bytes([d, i, self.rng.randrange(3)]) * self.rng.randint(1, 50))
                     for i in range(4)]
            # the same bytes in every folder: one block held by several directories
            files.append(b.file(b"same", b"equal in every folder" * (1 + self.version % 2)))
            # a shared subfolder (same node in two folders) and an empty one
            files.append(b.dir(b"shared", sub))
            files.append(b.dir(b"zempty", []))
            folders.append(b.dir(f"d{d}".encode(), files))
        root = b.dir(b"root", folders)
        self.builder = b
        return root

    def _new_version(self) -> None:
        self.version += 1
        root = self._layout()
        head = self.builder.commit(self.pub, root)
        if self.drive is None:
            self.drive = Drive(self.cap.read_cap(), DriveStorage(self.reader), head,
                               fetch=fake_network(self.pub))
            self.pins = Pins(self.drive)
            self.drive.pins = self.pins
        else:
            self.drive.set_head(head)

    def teardown(self) -> None:
        self.pub.close()
        self.reader.close()
        self._dir.cleanup()

    async def _path(self, parts: list[bytes]) -> tuple[Entry, bytes | None]:
        entry = self.drive.root_entry()
        folder = None
        for p in parts:
            folder = entry.node.block_id
            entry = await self.drive.lookup(entry, p)
        return entry, folder

    paths = st.sampled_from([[], [b"d0"], [b"d1"], [b"d2", b"shared"], [b"d0", b"f1"],
                             [b"d1", b"shared", b"s2"], [b"d2", b"zempty"]])
    files = st.sampled_from([[b"d0", b"f0"], [b"d1", b"f3"], [b"d2", b"f2"], [b"d1", b"same"],
                             [b"d0", b"shared", b"s1"], [b"d2", b"shared", b"s0"]])

    @rule(path=files)
    def read(self, path: list[bytes]) -> None:
        async def go() -> None:
            entry, folder = await self._path(path)
            of = await self.drive.open(entry, folder)
            await self.drive.read(of, 0, entry.size)
        trio.run(go)

    @rule(path=paths)
    def pin(self, path: list[bytes]) -> None:
        self.pins.pin(path)
        trio.run(self.pins.sync_one, path)

    @rule(path=paths)
    def unpin(self, path: list[bytes]) -> None:
        # a path pinned only through a folder above it cannot be unpinned on its own
        with contextlib.suppress(UsageError):
            self.pins.unpin(path)

    @rule(path=paths)
    def evict(self, path: list[bytes]) -> None:
        async def go() -> None:
            entry, folder = await self._path(path)
            await self.drive.answers.set(path, entry, xattrs.EVICT, b"1", folder)
        trio.run(go)

    @rule()
    def foreign_eviction(self) -> None:
        """Another process of this node (or the cache limit) evicts: nobody here is told."""
        unpinned = [i for i in self.reader.eviction_order()]
        if unpinned:
            self.reader.evict(self.rng.sample(unpinned, max(1, len(unpinned) // 3)))
        self.drive.figures.check_store()

    @precondition(lambda self: self.version < 6)
    @rule()
    def new_version(self) -> None:
        self._new_version()

    @invariant()
    def figures_equal_a_walk(self) -> None:
        async def check() -> None:
            for path in ([], [b"d0"], [b"d1"], [b"d2"], [b"d2", b"shared"], [b"d1", b"f2"]):
                entry, _ = await self._path(path)
                figures = await self.drive.answers.usage(entry)
                assert figures == await walk_usage(self.drive, entry), path
                state = await self.drive.answers.get(path, entry, xattrs.STATE)
                assert state == xattrs.state_of(*figures).encode()
                if entry.is_dir:  # the signed folder aggregates say what a walk finds
                    assert entry.total_bytes == figures[1], path
                    assert entry.total_files == await walk_files(self.drive, entry), path
        trio.run(check)


TestFigures = FiguresMachine.TestCase
TestFigures.settings = settings(max_examples=20, stateful_step_count=10, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
