"""The server answers a connection's READs ahead of its lazier wants (issue 9).

dht/server_connection.py rule 1a: a READ want (a process blocked in read())
has a lane of its own, so it is not queued behind the lazier replies its
connection already read ahead, and while it is being read those replies wait
for it (at most `LAZY_HOLD`). Each test runs one in-process server with a block source whose reads wait
at a gate (a slow disk), so which block the server reads when is the test's to
decide, not the machine's speed.
"""

from __future__ import annotations

import threading

import pytest
import trio

from dht import server_connection
from dht.frames import Block, Want
from dht.identity import NodeIdentity
from dht.server import PeerServer
from dht.types import Priority
from tests.helpers import run_trio
from tests.hostile import LOCAL, hostile_client
from tests.test_peer_support import make_blocks, new_drive

DEADLINE = 30.0  # a bound only a hang breaks


class GateSource:
    """Blocks whose reads wait until their gate opens; it records the order of the reads."""

    def __init__(self, blocks: dict[bytes, bytes], gated: set[bytes]) -> None:
        self.blocks = blocks
        self.gated = gated
        self.gate = threading.Event()
        self.asked: list[bytes] = []
        self._lock = threading.Lock()

    def get(self, block_id: bytes) -> bytes | None:
        with self._lock:
            self.asked.append(block_id)
        if block_id in self.gated:
            self.gate.wait(DEADLINE)
        return self.blocks.get(block_id)


async def serve(nursery: trio.Nursery, source: GateSource, dk: bytes, secret: bytes
                ) -> tuple[PeerServer, int]:
    server = PeerServer(NodeIdentity.generate(), source, {dk: secret})
    port = await nursery.start(server.serve, LOCAL, 0)
    return server, port


async def wait_for(predicate, timeout: float = DEADLINE) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def test_a_read_overtakes_the_lazier_replies_its_connection_read_ahead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two READAHEAD batches stuck on the disk used to hold the READ behind them: the
    loader read at most two batches ahead of the sends, whatever their priority."""
    monkeypatch.setattr(server_connection, "LAZY_LOAD_BYTES", server_connection.LOAD_BYTES)
    blocks = make_blocks(5, 512 * 1024)  # 512 KiB: each block a batch of its own
    ids = list(blocks)
    lazy, read = ids[:4], ids[4]
    source = GateSource(blocks, set(lazy))
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                  dk, secret) as (_, conn):
            assert conn is not None
            await conn.send(*(Want(i, b, Priority.READAHEAD) for i, b in enumerate(lazy)))
            await wait_for(lambda: len(source.asked) >= 2)  # two lazy batches on the disk
            await conn.send(Want(99, read, Priority.READ))
            with trio.fail_after(DEADLINE):
                first = await conn.receive()
            assert isinstance(first, Block) and first.req_id == 99 and first.data == blocks[read]
            assert not source.gate.is_set()
            source.gate.set()
            got = set()
            while len(got) < len(lazy):
                msg = await conn.receive()
                assert isinstance(msg, Block)
                got.add(msg.req_id)
            assert got == set(range(len(lazy)))

    try:
        run_trio(test, DEADLINE * 2)
    finally:
        source.gate.set()


def test_lazier_replies_wait_for_a_read_of_their_connection_being_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A READ stuck on the disk: the readahead read after it waits (the hold made long
    here), and the READ goes out first once it is read."""
    monkeypatch.setattr(server_connection, "LAZY_HOLD", DEADLINE * 4)
    blocks = make_blocks(3, 64 * 1024)
    ids = list(blocks)
    read, lazy = ids[0], ids[1:]
    source = GateSource(blocks, {read})
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                  dk, secret) as (_, conn):
            assert conn is not None
            await conn.send(Want(1, read, Priority.READ))
            await wait_for(lambda: source.asked == [read])
            await conn.send(*(Want(10 + i, b, Priority.READAHEAD) for i, b in enumerate(lazy)))
            await wait_for(lambda: len(source.asked) == 1 + len(lazy))  # read, not sent
            source.gate.set()
            order = []
            while len(order) < 1 + len(lazy):
                msg = await conn.receive()
                assert isinstance(msg, Block)
                order.append(msg.req_id)
            assert order == [1, 10, 11]

    try:
        run_trio(test, DEADLINE * 2)
    finally:
        source.gate.set()


def test_lazier_wants_are_read_several_blocks_to_a_thread_call_reads_one() -> None:
    """A bulk read's readahead of 256 KiB blocks was one worker-thread call (a GIL hand-off
    and back) per block, the serving loop's largest cost in a cold read (issue 12): the
    lazier lane reads about LAZY_LOAD_BYTES a call. READs keep batches of one such block,
    so a READ's reply never waits for three more blocks to be read."""
    blocks = make_blocks(26, 256 * 1024)
    ids = list(blocks)
    lazy, reads = ids[:24], ids[24:]
    source = GateSource(blocks, set())
    source.gate.set()
    dk, secret = new_drive()
    calls: list[int] = []

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        lookup_many = server.lookup_many

        def counting_lookup_many(discovery_key, block_ids, budget):  # type: ignore[no-untyped-def]
            found = lookup_many(discovery_key, block_ids, budget)
            calls.append(len(found))
            return found

        server.lookup_many = counting_lookup_many  # type: ignore[method-assign]
        async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                  dk, secret) as (_, conn):
            assert conn is not None
            await conn.send(*(Want(i, b, Priority.READAHEAD) for i, b in enumerate(lazy)))
            got = {}
            with trio.fail_after(DEADLINE):
                while len(got) < len(lazy):
                    msg = await conn.receive()
                    assert isinstance(msg, Block)
                    got[msg.req_id] = msg.data
            assert all(got[i] == blocks[b] for i, b in enumerate(lazy))
            assert sum(calls) == len(lazy)
            # the first calls read one block each (the lane's mean size starts at its
            # budget, and two batches are taken ahead of each update), then three: 24
            # calls before, about 13 now
            assert len(calls) <= len(lazy) * 2 // 3, \
                f"{len(calls)} thread calls for {len(lazy)} lazy blocks: {calls}"
            calls.clear()
            await conn.send(*(Want(100 + i, b, Priority.READ) for i, b in enumerate(reads)))
            with trio.fail_after(DEADLINE):
                for _ in reads:
                    msg = await conn.receive()
                    assert isinstance(msg, Block) and msg.data == blocks[reads[msg.req_id - 100]]
            assert calls == [1] * len(reads)

    run_trio(test, DEADLINE * 2)
