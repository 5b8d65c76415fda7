"""A mounted drive loads its root and the chunk lists of listed directories' large files ahead.

In-process: a publisher's store, a reader's empty store and a fetch function
between them that records what was asked for and at which priority.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

import vfs.drive as drive_mod
import vfs.publish as publish_mod
from cache.store import BlockStore
from dht.types import Priority
from vfs.capability import WriteCap
from vfs.drive import Drive
from vfs.publish import Publisher
from vfs.storage import DriveStorage

CAP = WriteCap.from_secrets(os.urandom(32), os.urandom(32))
MIB = 1024 * 1024
# Files of more chunks than this keep their chunk list in blocks (256 in the real format,
# which takes a file of ~70 MiB or more; the decoder accepts lists for any count).
INLINE = 4


@pytest.fixture(autouse=True)
def small_inline_lists(monkeypatch) -> None:
    monkeypatch.setattr(publish_mod, "MAX_INLINE_CHUNKS", INLINE)


def publish(tmp_path: Path, sizes: dict[str, int]):
    src = tmp_path / "src"
    src.mkdir()
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))
    store = BlockStore(tmp_path / "pub", sync=False)
    result = trio.run(Publisher(DriveStorage(store), CAP, src).run)
    return store, result.head


def run_reader(tmp_path: Path, pub: BlockStore, head, seconds: float):
    """Mount-less drive over an empty store for `seconds`; returns (fetched, drive)."""
    reader = BlockStore(tmp_path / "reader", sync=False)
    fetched: list[tuple[bytes, Priority]] = []

    async def fetch(block_id: bytes, priority: Priority) -> bytes:
        fetched.append((block_id, priority))
        data = pub.get(block_id)
        assert data is not None
        await trio.sleep(0)
        return data

    drive = Drive(CAP.read_cap(), DriveStorage(reader), head, fetch=fetch)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(drive.run)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()

    trio.run(main)
    reader.close()
    return fetched, drive


def test_root_and_its_large_files_chunk_lists_arrive_before_any_open(tmp_path: Path) -> None:
    pub, head = publish(tmp_path, {"big.bin": 8 * MIB, "small.txt": 1000})
    fetched, drive = run_reader(tmp_path, pub, head, 2.0)

    async def lists():
        out = {}
        async for _, e in drive.tree.entries(head.root.node):
            out[e.name] = e
        return out

    entries = trio.run(lists)
    big = entries[b"big.bin"]
    assert big.chunk_lists is not None and sum(c.nchunks for c in big.chunk_lists) > INLINE
    list_ids = {c.ref.block_id for c in big.chunk_lists}
    got = dict(fetched)
    assert got[head.root.node.block_id] == Priority.READ  # the root, at once
    for block_id in list_ids:
        assert got.get(block_id) == Priority.PREFETCH
    # nothing else: no chunk of any file was fetched
    assert set(got) == list_ids | {head.root.node.block_id}
    pub.close()


def test_chunk_lists_ahead_stay_within_the_budget(tmp_path: Path, monkeypatch) -> None:
    pub, head = publish(tmp_path, {"a.bin": 8 * MIB, "b.bin": 8 * MIB})

    async def lists():
        return [e async for _, e in Drive(CAP.read_cap(), DriveStorage(pub), head)
                .tree.entries(head.root.node)]
    a, b = trio.run(lists)
    assert a.chunk_lists is not None and b.chunk_lists is not None
    one = sum(c.ref.length for c in a.chunk_lists)
    monkeypatch.setattr(drive_mod, "CHUNK_LIST_PREFETCH_BYTES", one)  # room for a's only
    fetched, _ = run_reader(tmp_path, pub, head, 2.0)
    got = {block_id for block_id, _ in fetched}
    assert {c.ref.block_id for c in a.chunk_lists} <= got
    assert not {c.ref.block_id for c in b.chunk_lists} & got
    pub.close()


def test_a_listed_folders_subfolder_nodes_arrive_together_before_they_are_listed(
        tmp_path: Path, monkeypatch) -> None:
    """`find` descends into every folder it lists: the subfolders' nodes are fetched
    ahead at PREFETCH and stored in one commit, so each costs no round trip of its own."""
    from tests.drive_builder import DriveBuilder, small_tree

    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    pub = BlockStore(tmp_path / "pub", sync=False)
    head = b.commit(pub, small_tree(b, 3000, per_folder=100))
    reader = BlockStore(tmp_path / "reader", sync=False)
    commits: list[int] = []
    real_put_many = reader.put_many

    def put_many(items, **kwargs):
        items = list(items)
        commits.append(len(items))
        return real_put_many(items, **kwargs)

    monkeypatch.setattr(reader, "put_many", put_many)
    fetched: list[tuple[bytes, Priority]] = []

    async def fetch(block_id: bytes, priority: Priority) -> bytes:
        fetched.append((block_id, priority))
        await trio.sleep(0)
        return pub.get(block_id)

    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch)
    folders: list = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(drive.run)
            folders.extend([e async for _, e in drive.tree.entries(head.root.node)])
            nodes = [e.node.block_id for e in folders]
            with trio.fail_after(30):
                while reader.missing(nodes):  # the mount's warm-up listed the root
                    await trio.sleep(0.01)
            # listing a folder now fetches nothing of it
            before = len(fetched)
            assert len([e async for _, e in drive.tree.entries(folders[7].node)]) == 100
            assert len(fetched) == before
            nursery.cancel_scope.cancel()

    trio.run(main)
    nodes = {e.node.block_id for e in folders}
    assert len(nodes) == 30
    assert {block_id: p for block_id, p in fetched if block_id in nodes} == dict.fromkeys(
        nodes, Priority.PREFETCH)
    assert 30 in commits  # all 30 in one store commit, not one commit each
    reader.close()
    pub.close()
