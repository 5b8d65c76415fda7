"""Have/HaveReply end to end: which blocks a peer holds, and how many peers hold all of some.

Real PeerServers over TLS on 127.0.0.1; counts only, no timing asserts (the
deadlines turn a hang into a failure).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio

from dht.client import PeerConnection
from dht.errors import DhtError, PeerGoneError, PeerProtocolError
from dht.fetch import FetchConfig, Fetcher
from dht.frames import MAX_HAVE_IDS, MAX_WHOLE_IDS, Have, HaveReply, encode
from dht.identity import NodeIdentity
from dht.types import PeerAddr, Priority
from tests.helpers import run_trio
from tests.test_peer_support import (
    CorruptSource,
    RawServer,
    make_blocks,
    new_drive,
    random_id,
    read_message,
    stall,
    start_raw_server,
    start_server,
)

TEST_DEADLINE = 25.0
# few slots per peer, so a burst of fetches is certain to reach every peer
FAST = FetchConfig(connect_timeout=2.0, backoff_base=0.1, backoff_max=1.0,
                   provider_refresh_min_interval=0.05, holders_timeout=3.0,
                   max_in_flight_per_peer=4, foreground_reserve=2)


run = functools.partial(run_trio, deadline=TEST_DEADLINE)  # run(test): test(nursery)


def fixed(addrs: Sequence[PeerAddr]) -> Callable[[], Awaitable[list[PeerAddr]]]:
    async def providers() -> list[PeerAddr]:
        return list(addrs)

    return providers


class HasOnlySource:
    """A source with `has` and a `get` that must never be called for a Have."""

    def __init__(self, ids: set[bytes]) -> None:
        self.ids = ids
        self.gets = 0
        self.has_calls = 0

    def get(self, block_id: bytes) -> bytes | None:
        self.gets += 1
        return None

    def has(self, block_id: bytes) -> bool:
        self.has_calls += 1
        return block_id in self.ids


class BrokenHasSource:
    def get(self, block_id: bytes) -> bytes | None:
        return None

    def has(self, block_id: bytes) -> bool:
        raise OSError("disk on fire")


def test_have_answers_from_has_without_reading_blocks() -> None:
    dk, secret = new_drive()
    held = {random_id() for _ in range(300)}
    absent = [random_id() for _ in range(300)]
    source = HasOnlySource(held)
    ids = [x for pair in zip(sorted(held), absent, strict=True) for x in pair]  # 600, interleaved

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, source, {dk: secret})
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            flags = await conn.have(ids)
            assert flags == [i in held for i in ids]
            assert conn.stats.haves_sent == -(-len(ids) // MAX_HAVE_IDS)
            assert await conn.have([]) == []
        assert source.gets == 0 and source.has_calls == len(ids)
        assert server.stats.haves_received == -(-len(ids) // MAX_HAVE_IDS)

    run(test)


def test_have_falls_back_to_get_for_a_source_without_has() -> None:
    dk, secret = new_drive()
    blocks = make_blocks(5)
    ids = [*blocks, random_id()]

    async def test(nursery: trio.Nursery) -> None:
        _, addr = await start_server(nursery, blocks, {dk: secret})  # a dict: only .get
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            assert await conn.have(ids) == [True] * 5 + [False]

    run(test)


def test_a_failing_source_holds_nothing_and_the_server_lives_on() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, BrokenHasSource(), {dk: secret})
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            assert await conn.have([random_id(), random_id()]) == [False, False]
            assert await conn.ping() >= 0
        assert server.stats.source_errors == 2

    run(test)


class CountingSource:
    """Blocks from a dict; remembers how many had been read when each Have was asked."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.blocks = blocks
        self.gets = 0
        self.gets_at_have: list[int] = []

    def get(self, block_id: bytes) -> bytes | None:
        self.gets += 1
        return self.blocks.get(block_id)

    def has(self, block_id: bytes) -> bool:
        self.gets_at_have.append(self.gets)
        return block_id in self.blocks


def test_have_is_answered_ahead_of_queued_blocks() -> None:
    """A Have sent behind 64 queued wants is answered before they are all served."""
    dk, secret = new_drive()
    blocks = make_blocks(64, 256 * 1024)
    source = CountingSource(blocks)

    async def test(nursery: trio.Nursery) -> None:
        _, addr = await start_server(nursery, source, {dk: secret})
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            async with trio.open_nursery() as fetches:
                for bid in blocks:
                    fetches.start_soon(conn.fetch, bid)
                while conn.stats.wants_sent < len(blocks):
                    await trio.sleep(0.001)
                assert await conn.have(list(blocks)[:3]) == [True] * 3
        assert source.gets == len(blocks)
        assert max(source.gets_at_have) < len(blocks)

    run(test)


async def _lying_bitmap(server: RawServer, stream: trio.SSLStream, decoder) -> None:
    while (msg := await read_message(stream, decoder)) is not None:
        server.received.append(msg)
        if isinstance(msg, Have):
            await stream.send_all(encode(HaveReply(msg.req_id, b"\xff" * 5)))


def test_a_bitmap_of_the_wrong_length_drops_the_connection() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        raw = await start_raw_server(nursery, _lying_bitmap)
        assert raw.addr is not None
        async with PeerConnection.open(raw.addr, NodeIdentity.generate(), dk, secret) as conn:
            with pytest.raises(PeerProtocolError, match="bad bitmap"):
                await conn.have([random_id(), random_id()])
            assert conn.closed

    run(test)


def test_a_peer_that_vanishes_fails_pending_haves() -> None:
    dk, secret = new_drive()

    async def vanish(server: RawServer, stream: trio.SSLStream, decoder) -> None:
        msg = await read_message(stream, decoder)
        server.received.append(msg)  # a Have: never answered, the connection just ends

    async def test(nursery: trio.Nursery) -> None:
        raw = await start_raw_server(nursery, vanish)
        assert raw.addr is not None
        async with PeerConnection.open(raw.addr, NodeIdentity.generate(), dk, secret) as conn:
            with pytest.raises(PeerGoneError):
                await conn.have([random_id()])
        assert isinstance(raw.received[0], Have)

    run(test)


def test_have_rejects_malformed_ids_locally() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        _, addr = await start_server(nursery, {}, {dk: secret})
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            with pytest.raises(DhtError, match="32 bytes"):
                await conn.have([b"short"])

    run(test)


def test_count_holders_counts_reachable_peers_holding_every_id() -> None:
    dk, secret = new_drive()
    file_a = make_blocks(200, 1024)  # more than one Have frame
    file_b = make_blocks(3, 1024)
    everything = file_a | file_b
    half_a = dict(list(file_a.items())[:100])

    async def test(nursery: trio.Nursery) -> None:
        _, full1 = await start_server(nursery, everything, {dk: secret})
        _, full2 = await start_server(nursery, everything, {dk: secret})
        _, only_b = await start_server(nursery, file_b | half_a, {dk: secret})
        _, other_drive = await start_server(nursery, everything, {new_drive()[0]: secret})
        dead = PeerAddr(random_id(), "127.0.0.1", 1)  # nobody listens there
        providers = [full1, full2, only_b, other_drive, dead]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(providers),
                           config=FAST) as fetcher:
            assert await fetcher.count_holders(list(file_a), timeout=3.0) == 2
            assert await fetcher.count_holders(list(file_b), timeout=3.0) == 3
            assert await fetcher.count_holders([random_id()], timeout=3.0) == 0
            answers = await fetcher.have_map([*file_a, *file_b], timeout=3.0)
            assert set(answers) == {full1.node_id, full2.node_id, only_b.node_id}
            assert answers[only_b.node_id] == [True] * 100 + [False] * 100 + [True] * 3
            # no ids: every provider that answers a ping
            assert await fetcher.count_holders([], timeout=3.0) == 3

    run(test)


def test_a_silent_peer_does_not_count_and_does_not_hold_up_the_answer_past_the_timeout() -> None:
    dk, secret = new_drive()
    blocks = make_blocks(3, 1024)

    async def test(nursery: trio.Nursery) -> None:
        _, good = await start_server(nursery, blocks, {dk: secret})
        silent = await start_raw_server(nursery, stall)  # handshakes, never answers
        assert silent.addr is not None
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([good, silent.addr]),
                           config=FAST) as fetcher:
            with trio.fail_after(10):  # far above the 2 s budget: a hang fails, no speed assert
                assert await fetcher.count_holders(list(blocks), timeout=2.0) == 1
        assert any(isinstance(m, Have) for m in silent.received)

    run(test)


class AskedLiar(CorruptSource):
    """The liar: wrong bytes for every block, and `asked` set once it is asked for one.

    `has` answers a Have without reading, so counting holders never sets `asked`."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        super().__init__(blocks)
        self.asked = threading.Event()

    def has(self, block_id: bytes) -> bool:
        return block_id in self.blocks

    def get(self, block_id: bytes) -> bytes | None:
        self.asked.set()
        return super().get(block_id)


class GatedSource:
    """The honest peer's blocks, each read only once `gate` is set (or after `bound`
    seconds, so a liar never asked fails the test instead of hanging it).

    The scheduler need not spread 20 small PIN blocks over two peers: they leave the
    queue at random moments over `swarm_jitter`, and once the first peer asked has
    answered in a millisecond, it beats a peer never measured (50 ms assumed) for
    every later one (about 1 run in 20 on an idle machine never asked the liar).
    Held answers fill the honest peer's slots and raise its estimate, so the
    scheduler itself picks the liar; no sleep decides it."""

    def __init__(self, blocks: dict[bytes, bytes], gate: threading.Event, bound: float) -> None:
        self.blocks, self.gate, self.bound = blocks, gate, bound

    def has(self, block_id: bytes) -> bool:
        return block_id in self.blocks

    def get(self, block_id: bytes) -> bytes | None:
        if not self.gate.wait(self.bound):  # (a worker thread of the server's)
            self.bound = 0.0  # waited once in vain: the test fails, it need not be slow
        return self.blocks.get(block_id)


def test_a_peer_caught_sending_corrupt_blocks_is_not_counted() -> None:
    dk, secret = new_drive()
    blocks = make_blocks(20, 1024)
    liar_source = AskedLiar(blocks)
    # One attempt per block, no stall inside the test's deadline: the block the liar is
    # asked for ends only with the liar's own answer, which is checked (a hedge
    # answered first by the honest peer would cancel it unchecked).
    config = dataclasses.replace(FAST, max_parallel_attempts=1, stall_timeout=4 * TEST_DEADLINE)

    async def test(nursery: trio.Nursery) -> None:
        _, good = await start_server(nursery, GatedSource(blocks, liar_source.asked,
                                                          TEST_DEADLINE / 2), {dk: secret})
        _, liar = await start_server(nursery, liar_source, {dk: secret})
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([good, liar]),
                           config=config) as fetcher:
            ids = list(blocks)
            assert await fetcher.count_holders(ids, timeout=3.0) == 2  # it says it has them
            assert not liar_source.asked.is_set()
            async with fetcher.fetch_many(ids, concurrency=20) as results:
                async for block_id, data in results:
                    assert data == blocks[block_id]
            [caught] = [p for p in fetcher.peer_stats() if p.node_id == liar.node_id]
            assert caught.bad_blocks >= 1
            assert await fetcher.count_holders(ids, timeout=3.0) == 1

    run(test)


def test_count_holders_needs_a_running_fetcher() -> None:
    async def main() -> None:
        fetcher = Fetcher(NodeIdentity.generate(), *new_drive(), fixed([]))
        with pytest.raises(DhtError, match="not running"):
            await fetcher.count_holders([random_id()])

    trio.run(main)


def test_whole_announcements_reach_clients_as_they_connect_and_as_they_change() -> None:
    """Whole: what a node keeps whole, said to each client on connecting and on change;
    `whole_map` gathers it from every reachable provider with one ping each."""
    dk, secret = new_drive()
    tree_a, tree_b = random_id(), random_id()

    async def test(nursery: trio.Nursery) -> None:
        server1, addr1 = await start_server(nursery, {}, {dk: secret})
        server2, addr2 = await start_server(nursery, {}, {dk: secret})
        _, addr3 = await start_server(nursery, {}, {dk: secret})  # says nothing
        server1.announce_whole(dk, [tree_a])  # before anyone connects
        server1.announce_whole(new_drive()[0], [tree_b])  # another drive's: not ours
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([addr1, addr2, addr3]),
                           config=FAST) as fetcher:
            assert await fetcher.whole_map(timeout=3.0) == {
                addr1.node_id: frozenset([tree_a]), addr2.node_id: frozenset(),
                addr3.node_id: frozenset()}
            assert server2.announce_whole(dk, [tree_a, tree_b]) == 1
            assert server2.announce_whole(dk, [tree_a, tree_b]) == 0  # unchanged: not sent
            server1.announce_whole(dk, [])  # it keeps nothing whole any more
            answers = await fetcher.whole_map(timeout=3.0)
            assert answers[addr2.node_id] == frozenset([tree_a, tree_b])
            assert answers[addr1.node_id] == frozenset()
        # more than one frame holds is cut to what one frame holds
        many = [random_id() for _ in range(MAX_WHOLE_IDS + 5)]
        server1.announce_whole(dk, many)
        async with PeerConnection.open(addr1, NodeIdentity.generate(), dk, secret) as conn:
            await conn.ping()
            assert conn.whole == frozenset(many[:MAX_WHOLE_IDS])

    run(test)


def test_small_blocks_are_read_in_batches_and_a_large_block_alone() -> None:
    """The server reads wanted blocks a batch per worker-thread call: many small ones
    together, a large one on its own (the read stops at the batch's byte budget)."""
    small = make_blocks(200, 64)
    large = make_blocks(3, 1 << 20)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, small | large, {dk: secret})
        reads: list[int] = []
        lookup_many = server.lookup_many

        def recording(dk_: bytes, ids: list[bytes], budget: int) -> list[bytes | None]:
            found = lookup_many(dk_, ids, budget)
            reads.append(len(found))
            return found

        server.lookup_many = recording  # type: ignore[method-assign]
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            async def get(bid: bytes, want: dict[bytes, bytes]) -> None:
                assert await conn.fetch(bid, Priority.PIN) == want[bid]

            async with trio.open_nursery() as n:
                for bid in small:
                    n.start_soon(get, bid, small)
            assert sum(reads) == len(small)
            assert len(reads) < len(small) // 4 and max(reads) >= 16, reads
            reads.clear()
            async with trio.open_nursery() as n:
                for bid in large:
                    n.start_soon(get, bid, large)
            assert reads.count(1) >= len(large) and max(reads) == 1, reads

    run(test)
