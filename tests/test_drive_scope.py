"""Drive-scoped serving (issue 11 item 6), performed: a client that proved drive A asks a node
that also holds drive B for B's blocks by id, and probes with `have`.

Both drives are published by the real command line into one node home; that
home's store is then served by a real `NetworkNode` (the wiring `peerdrive
serve` uses) on 127.0.0.1, and the client speaks the real peer protocol.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from cache.store import BlockStore
from dht.client import PeerConnection
from dht.errors import BlockNotFound
from dht.identity import NodeIdentity
from dht.types import PeerAddr, Priority
from tests.helpers import publish
from vfs.blocks import BlockReader
from vfs.capability import parse_link
from vfs.formats import Ref
from vfs.home import Home
from vfs.network import NetworkNode


def pinned_ids(store: BlockStore) -> set[bytes]:
    return {bid for name in store.pin_names() for bid in store.pin_ids(name)}


def make_folder(path: Path, files: int) -> Path:
    path.mkdir()
    for i in range(files):
        (path / f"f{i}").write_bytes(os.urandom(5000 + i))
    return path


@pytest.fixture
def two_drives(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    link_a = publish(home, make_folder(tmp_path / "a", 3))["read_link"]
    with BlockStore(Home(home).store_path) as store:
        ids_a = pinned_ids(store)
    link_b = publish(home, make_folder(tmp_path / "b", 3))["read_link"]
    with BlockStore(Home(home).store_path) as store:
        ids_b = pinned_ids(store) - ids_a
    return home, parse_link(link_a), ids_a, parse_link(link_b), ids_b


def test_publish_tags_every_block_with_its_drive(two_drives):
    home, cap_a, ids_a, cap_b, ids_b = two_drives
    assert ids_a and ids_b
    with BlockStore(Home(home).store_path) as store:
        assert all(store.is_member(cap_a.discovery_key, b) for b in ids_a)
        assert all(store.is_member(cap_b.discovery_key, b) for b in ids_b)
        assert not any(store.is_member(cap_b.discovery_key, b) for b in ids_a)
        assert not any(store.is_member(cap_a.discovery_key, b) for b in ids_b)


def test_a_client_of_drive_a_cannot_read_nor_probe_the_blocks_of_drive_b(two_drives):
    home, cap_a, ids_a, cap_b, ids_b = two_drives

    async def main():
        with BlockStore(Home(home).store_path) as store, trio.fail_after(60):
            node = NetworkNode(NodeIdentity.generate(), store, listen=("127.0.0.1", 0),
                               lan=False)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(node.run)
                node.serve_drive(cap_a)
                node.serve_drive(cap_b)
                addr = PeerAddr(node.identity.node_id, "127.0.0.1", port)
                client = NodeIdentity.generate()
                async with PeerConnection.open(addr, client, cap_a.discovery_key,
                                               cap_a.pubkey) as conn:
                    for block_id in sorted(ids_b):
                        with pytest.raises(BlockNotFound):
                            await conn.fetch(block_id, Priority.READ)
                    assert await conn.have(sorted(ids_b)) == [False] * len(ids_b)
                    # the same connection is served its own drive
                    assert await conn.have(sorted(ids_a)) == [True] * len(ids_a)
                    for block_id in sorted(ids_a):
                        assert len(await conn.fetch(block_id, Priority.READ)) > 0
                assert node.server.stats.out_of_scope == len(ids_b)
                # and the other way round
                async with PeerConnection.open(addr, client, cap_b.discovery_key,
                                               cap_b.pubkey) as conn:
                    assert await conn.have(sorted(ids_a)) == [False] * len(ids_a)
                    with pytest.raises(BlockNotFound):
                        await conn.fetch(min(ids_a), Priority.READ)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_blocks_fetched_for_a_drive_are_stored_as_members_of_it(tmp_path: Path):
    data = os.urandom(3000)
    block_id = hashlib.sha256(data).digest()
    dk = os.urandom(32)

    async def fetch(bid: bytes, priority: Priority) -> bytes:
        assert bid == block_id
        return data

    async def main():
        with BlockStore(tmp_path / "store") as store:
            reader = BlockReader(store, os.urandom(32), fetch, tag=dk)
            assert await reader.ciphertext(Ref(block_id, block_id, len(data)),
                                           Priority.READ) == data
            assert store.is_member(dk, block_id)
            assert not store.is_member(os.urandom(32), block_id)
            store.evict([block_id])
            assert not store.is_member(dk, block_id)  # the tag goes with the block

    trio.run(main)


def test_membership_is_written_with_the_block_or_not_at_all(tmp_path: Path):
    """One transaction: a put the store refuses (over its limit) tags nothing."""
    from cache.errors import StoreFull

    tag = os.urandom(32)
    small, big = os.urandom(1000), os.urandom(50_000)
    with BlockStore(tmp_path / "store", limit_bytes=20_000) as store:
        sid, bid = hashlib.sha256(small).digest(), hashlib.sha256(big).digest()
        with pytest.raises(StoreFull):
            store.put_many([(sid, small), (bid, big)], tag=tag)
        assert not store.is_member(tag, sid) and not store.is_member(tag, bid)
        store.put_many([(sid, small)])
        assert not store.is_member(tag, sid)  # stored for nobody
        assert store.add_members(tag, [sid, bid]) == 1  # only what is present
        assert store.is_member(tag, sid) and not store.is_member(tag, bid)
        store.put_pinned("p", [(sid, small)], tag=os.urandom(32))
        assert store.is_member(tag, sid)  # a block may belong to several tags
