"""The server answers READs first, on every connection it serves (issue 9).

dht/server_connection.py rule 1a: a READ want (a process blocked in read())
has a lane of its own, so it is neither queued behind the lazier replies a
connection already read ahead, nor behind readahead and pins other readers
asked for: while a READ waits to be read anywhere on the server, lazier work
holds back, at most `LAZY_HOLD` per step (so a stream of READs never starves
it). Each test runs one in-process server with a block source whose reads wait
at a gate (a slow disk), so which block the server reads when is the test's to
decide, not the machine's speed.
"""

from __future__ import annotations

import random
import threading

import pytest
import trio

from dht import server_connection
from dht.frames import Block, Cancel, Want
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


def test_a_read_overtakes_the_lazier_replies_its_connection_read_ahead() -> None:
    """Two READAHEAD batches stuck on the disk used to hold the READ behind them: the
    loader read at most two batches ahead of the sends, whatever their priority."""
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
        await wait_for(lambda: server.urgent_waiting == 0)

    try:
        run_trio(test, DEADLINE * 2)
    finally:
        source.gate.set()


def test_lazier_work_of_every_connection_holds_back_while_a_read_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A READ on one connection waiting on the disk: another reader's readahead is not
    read until it is (the hold made long here, so only the READ's end can release it)."""
    monkeypatch.setattr(server_connection, "LAZY_HOLD", DEADLINE * 4)
    blocks = make_blocks(4, 64 * 1024)
    ids = list(blocks)
    read, lazy = ids[0], ids[1:]
    source = GateSource(blocks, {read})
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                  dk, secret) as (_, reader), \
                hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                               dk, secret) as (_, other):
            assert reader is not None and other is not None
            await reader.send(Want(1, read, Priority.READ))
            await wait_for(lambda: source.asked == [read])
            assert server.urgent_waiting == 1
            await other.send(*(Want(10 + i, b, Priority.READAHEAD) for i, b in enumerate(lazy)))
            await wait_for(lambda: server.stats.wants_received == 1 + len(lazy))
            await trio.sleep(0.2)  # time enough to read a lazy block, were it let
            assert source.asked == [read], "readahead was read while a READ waited"
            source.gate.set()
            msg = await reader.receive()
            assert isinstance(msg, Block) and msg.req_id == 1
            got = set()
            while len(got) < len(lazy):
                msg = await other.receive()
                assert isinstance(msg, Block)
                got.add(msg.req_id)
            assert source.asked[0] == read and set(source.asked[1:]) == set(lazy)
        await wait_for(lambda: server.urgent_waiting == 0)

    try:
        run_trio(test, DEADLINE * 2)
    finally:
        source.gate.set()


def test_a_read_is_not_held_back_behind_its_own_connections_lazier_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection whose readahead holds back for another reader's READ answers a READ
    of its own at once (its loader was waiting out the hold; now the READ ends it)."""
    monkeypatch.setattr(server_connection, "LAZY_HOLD", DEADLINE * 4)
    blocks = make_blocks(4, 64 * 1024)
    ids = list(blocks)
    stuck, lazy, mine = ids[0], ids[1:3], ids[3]
    source = GateSource(blocks, {stuck})
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                  dk, secret) as (_, reader), \
                hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                               dk, secret) as (_, other):
            assert reader is not None and other is not None
            await reader.send(Want(1, stuck, Priority.READ))
            await wait_for(lambda: source.asked == [stuck])
            await other.send(*(Want(10 + i, b, Priority.READAHEAD) for i, b in enumerate(lazy)))
            await wait_for(lambda: server.stats.wants_received == 1 + len(lazy))
            await other.send(Want(20, mine, Priority.READ))
            with trio.fail_after(DEADLINE):
                msg = await other.receive()
            assert isinstance(msg, Block) and msg.req_id == 20 and msg.data == blocks[mine]
            assert not source.gate.is_set()
            source.gate.set()
            got = set()
            while len(got) < len(lazy):
                msg = await other.receive()
                assert isinstance(msg, Block)
                got.add(msg.req_id)
            msg = await reader.receive()
            assert isinstance(msg, Block) and msg.req_id == 1
        await wait_for(lambda: server.urgent_waiting == 0)

    try:
        run_trio(test, DEADLINE * 2)
    finally:
        source.gate.set()


def test_a_read_that_never_ends_holds_lazier_work_back_only_a_moment() -> None:
    """The hold is bounded: a READ stuck on the disk does not starve another reader."""
    blocks = make_blocks(6, 64 * 1024)
    ids = list(blocks)
    read, lazy = ids[0], ids[1:]
    source = GateSource(blocks, {read})
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                  dk, secret) as (_, reader), \
                hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                               dk, secret) as (_, other):
            assert reader is not None and other is not None
            await reader.send(Want(1, read, Priority.READ))
            await wait_for(lambda: source.asked == [read])
            await other.send(*(Want(10 + i, b, Priority.PIN) for i, b in enumerate(lazy)))
            got = set()
            while len(got) < len(lazy):
                msg = await other.receive()
                assert isinstance(msg, Block)
                got.add(msg.req_id)
            assert got == {10 + i for i in range(len(lazy))}
            assert not source.gate.is_set() and server.urgent_waiting == 1
        source.gate.set()
        await wait_for(lambda: server.urgent_waiting == 0)

    try:
        run_trio(test, DEADLINE * 2)
    finally:
        source.gate.set()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_count_of_waiting_reads_comes_back_to_zero(seed: int) -> None:
    """Wants at every priority, half of them cancelled, some answered, the connection
    dropped with the rest outstanding: no READ is counted as waiting afterwards (a count
    that leaked would hold every reader's readahead back for good)."""
    rng = random.Random(seed)
    blocks = make_blocks(12, 48 * 1024)
    ids = list(blocks)
    source = GateSource(blocks, set())
    source.gate.set()
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, port = await serve(nursery, source, dk, secret)
        for round_ in range(3):
            async with hostile_client(port, server.identity.node_id, NodeIdentity.generate(),
                                      dk, secret) as (_, conn):
                assert conn is not None
                msgs: list = []
                for req in range(120):
                    msgs.append(Want(req, rng.choice(ids), rng.choice(list(Priority))))
                    if rng.random() < 0.5:
                        msgs.append(Cancel(rng.randrange(req + 1)))
                await conn.send(*msgs)
                for _ in range(rng.randrange(1, 20)):
                    await conn.receive()
            await wait_for(lambda: server.stats.connections_active == 0)
            assert server.urgent_waiting == 0, f"round {round_}"

    run_trio(test, DEADLINE * 2)
