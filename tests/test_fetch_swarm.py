"""The fetch scheduler among readers of one drive (issue 9: a streaming read under churn).

Three defects a streaming reader met while readers came and went, each seen in
its slow-read log (`dht.fetch` at INFO, `peerdrive -v mount`):

* hedges and first asks went to readers that had announced what they hold
  and not the block, one after another, each answering NotFound from a busy
  process while the seed was the one to wait for;
* our own readahead filled every slot at the seed, so a READ waited for one;
* a hedge that found nobody to ask was dropped, not parked: when the seed
  came back (its backoff over, a new address) nothing asked it again and the
  read waited for the late attempt to end or for its timeout.

And what a reader relays to the readers beside it comes from its fetcher's
memory, not a store read in a worker thread.

Real peer servers on 127.0.0.1; counts and order only, with generous upper
bounds that turn a hang into a failure.
"""

from __future__ import annotations

import functools
import socket
import time

import trio

from dht.client import PeerConnection
from dht.fetch import FetchConfig, Fetcher
from dht.frames import Want
from dht.identity import NodeIdentity
from dht.types import PeerAddr, Priority
from tests.helpers import run_trio
from tests.test_peer_support import (
    HOST,
    RecordingSource,
    make_blocks,
    new_drive,
    stall,
    start_raw_server,
    start_server,
)

run = functools.partial(run_trio, deadline=30.0)


class SlowSource:
    """A dict-backed store whose every read takes `delay` seconds (in the server's worker
    thread): a seed busy serving others."""

    def __init__(self, blocks: dict[bytes, bytes], delay: float) -> None:
        self.blocks = blocks
        self.delay = delay

    def get(self, block_id: bytes) -> bytes | None:
        time.sleep(self.delay)
        return self.blocks.get(block_id)


async def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def test_a_reader_that_did_not_announce_a_block_is_not_asked_for_it() -> None:
    """A slow seed's attempts run late and get hedged; the other provider is a reader
    that announced its blocks (Holding), none of these: it is never asked (before, every
    hedge went to it and came back NotFound)."""
    wanted = make_blocks(12, 4096)
    its_own = make_blocks(4, 4096)
    dk, secret = new_drive()
    config = FetchConfig(hedge_floor=0.05, hedge_factor=1.0, stall_timeout=20.0,
                         default_timeout=20.0, swarm_jitter=0)

    async def test(nursery: trio.Nursery) -> None:
        seed, seed_addr = await start_server(nursery, SlowSource(wanted | its_own, 0.3),
                                             {dk: secret})
        reader, reader_addr = await start_server(nursery, its_own, {dk: secret})
        async with Fetcher(NodeIdentity.generate(), dk, secret,
                           lambda: [seed_addr, reader_addr], config=config) as f:
            await wait_for(lambda: reader.connected_clients(dk) == 1
                           and seed.connected_clients(dk) == 1, "both connections")
            assert reader.announce_holding(dk, list(its_own)) == 1

            def announced() -> int:
                conn = f._peers[reader_addr.node_id].conn  # what the fetcher has heard
                return 0 if conn is None else len(conn.holding)

            await wait_for(lambda: announced() == len(its_own), "the Holding frame")
            async with trio.open_nursery() as readers:
                for bid in wanted:
                    readers.start_soon(f.fetch, bid, Priority.READ)
            stats = {s.node_id: s for s in f.peer_stats()}
            assert stats[seed_addr.node_id].late > 0, "no attempt ran late: nothing tested"
        assert reader.stats.not_found == 0
        assert stats[reader_addr.node_id].not_found == 0
        assert stats[seed_addr.node_id].blocks == len(wanted)

    run(test)


def test_readahead_leaves_the_reserve_to_a_read() -> None:
    """Readahead queued deep at a peer takes at most max_in_flight - foreground_reserve
    slots there, so a READ is sent at once instead of waiting for one to free up."""
    blocks = make_blocks(20, 4096)
    dk, secret = new_drive()
    config = FetchConfig(max_in_flight_per_peer=6, foreground_reserve=2, hedge_floor=60.0,
                         stall_timeout=60.0, default_timeout=60.0, swarm_jitter=0)

    async def test(nursery: trio.Nursery) -> None:
        staller = await start_raw_server(nursery, stall)
        assert staller.addr is not None
        ids = list(blocks)
        async with Fetcher(NodeIdentity.generate(), dk, secret, lambda: [staller.addr],
                           config=config) as f:
            async with trio.open_nursery() as waits:
                for bid in ids[:-1]:
                    waits.start_soon(f.fetch, bid, Priority.READAHEAD)
                await wait_for(lambda: sum(isinstance(m, Want) for m in staller.received) >= 4,
                               "readahead at the peer")
                await trio.sleep(0.2)  # more would have gone out by now if allowed
                assert sum(isinstance(m, Want) for m in staller.received) == 4
                assert f.peer_stats()[0].in_flight == 4
                waits.start_soon(f.fetch, ids[-1], Priority.READ)
                await wait_for(lambda: any(isinstance(m, Want) and m.block_id == ids[-1]
                                           for m in staller.received), "the READ's Want")
                assert f.peer_stats()[0].in_flight == 5
                waits.cancel_scope.cancel()

    run(test)


def test_a_parked_hedge_asks_the_seed_once_it_is_back() -> None:
    """The attempt at a silent peer runs late while the seed is unreachable (listed at a
    closed port, backing off): the hedge has nobody to ask and is parked. Once the seed is
    listed where it listens, the read is served by it, long before the silent peer's
    stall timeout or the fetch's own."""
    blocks = make_blocks(1, 4096)
    (bid, data), = blocks.items()
    dk, secret = new_drive()
    config = FetchConfig(hedge_floor=0.1, stall_timeout=60.0, default_timeout=60.0,
                         backoff_base=30.0, provider_refresh_min_interval=0.05, swarm_jitter=0)

    async def test(nursery: trio.Nursery) -> None:
        silent = await start_raw_server(nursery, stall)
        assert silent.addr is not None
        seed_ident = NodeIdentity.generate()
        closed = socket.socket()
        closed.bind((HOST, 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        _seed, live = await start_server(nursery, blocks, {dk: secret}, identity=seed_ident)
        listed = [silent.addr, PeerAddr(seed_ident.node_id, HOST, closed_port)]
        async with Fetcher(NodeIdentity.generate(), dk, secret, lambda: list(listed),
                           config=config) as f:
            def state() -> dict[bytes, object]:
                return {s.node_id: s for s in f.peer_stats()}

            await wait_for(lambda: state()[silent.addr.node_id].connected
                           and state()[seed_ident.node_id].backoff_remaining > 0,
                           "the silent peer connected and the seed backing off")
            started = trio.current_time()
            async with trio.open_nursery() as reading:
                got: list[bytes] = []

                async def read() -> None:
                    got.append(await f.fetch(bid, Priority.READ))

                reading.start_soon(read)
                await wait_for(lambda: state()[silent.addr.node_id].late > 0,
                               "the attempt at the silent peer to run late")
                await trio.sleep(0.3)  # the hedge found nobody and was set aside
                listed[1] = live
                f.request_provider_refresh()
            took = trio.current_time() - started
        assert got == [data]
        assert took < 20.0, took  # not the 60 s stall timeout nor the fetch timeout

    run(test)


def test_a_block_the_node_just_fetched_is_relayed_from_memory() -> None:
    """A reader serving the readers beside it answers a block its own fetcher holds from
    that memory (the server's `in_flight` lookup), without reading its store."""
    blocks = make_blocks(2, 4096)
    (fresh, fresh_data), (stored, stored_data) = blocks.items()
    dk, secret = new_drive()

    async def in_flight(discovery_key: bytes, block_id: bytes, timeout: float) -> bytes | None:
        return fresh_data if (discovery_key, block_id) == (dk, fresh) else None

    async def test(nursery: trio.Nursery) -> None:
        source = RecordingSource({stored: stored_data})
        server, addr = await start_server(nursery, source, {dk: secret}, in_flight=in_flight)
        conn = await PeerConnection.connect(addr, NodeIdentity.generate(), dk, secret,
                                            nursery=nursery)
        assert await conn.fetch(fresh, Priority.READ) == fresh_data
        assert await conn.fetch(stored, Priority.READ) == stored_data
        await conn.aclose()
        assert source.order == [stored]  # the fresh block never touched the store
        assert server.stats.served_in_flight == 1

    run(test)


def test_a_seed_that_once_said_not_found_still_takes_a_hedge() -> None:
    """A seed that answered NotFound once (a block of another version, say) is known to
    hold part of the drive and asked after peers nothing is known of; but when the
    attempt at such a peer runs late, the hedge goes to the seed, not into a wait for
    that attempt's stall timeout."""
    blocks = make_blocks(1, 4096)
    (bid, data), = blocks.items()
    dk, secret = new_drive()
    config = FetchConfig(hedge_floor=0.1, stall_timeout=60.0, default_timeout=60.0,
                         swarm_jitter=0)

    async def test(nursery: trio.Nursery) -> None:
        _seed, seed_addr = await start_server(nursery, blocks, {dk: secret})
        silent = await start_raw_server(nursery, stall)
        assert silent.addr is not None
        async with Fetcher(NodeIdentity.generate(), dk, secret,
                           lambda: [seed_addr, silent.addr], config=config) as f:
            def state() -> dict[bytes, object]:
                return {s.node_id: s for s in f.peer_stats()}

            await wait_for(lambda: all(s.connected for s in state().values()), "connections")
            with trio.move_on_after(1.0):
                await f.fetch(make_blocks(1).popitem()[0], Priority.READ)  # nobody has it
            assert state()[seed_addr.node_id].not_found == 1
            started = trio.current_time()
            assert await f.fetch(bid, Priority.READ) == data
            took = trio.current_time() - started
        assert took < 20.0, took  # not the silent peer's 60 s stall timeout

    run(test)
