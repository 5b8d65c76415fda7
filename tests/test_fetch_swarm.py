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

Two more a churner met (a read of a block the seed had got EIO after 20 s):
a read() arriving while the readahead loaded its block waited for that load
at READAHEAD priority, so the fetcher never heard of an urgent read (none of
the READ reserve, peers answering it behind every other READAHEAD); and a
request parked with its only attempt at a lazier priority was not asked again
when a READ wanted it. Both are shown without sockets (a fake fetch, a fake
connection).

Real peer servers on 127.0.0.1; counts and order only, with generous upper
bounds that turn a hang into a failure.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from pathlib import Path

import trio

from cache.store import BlockStore
from dht.client import PeerConnection
from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.types import PeerAddr, Priority
from tests.helpers import run_trio
from tests.inprocess import new_cap, publish_folder
from tests.test_peer_support import (
    HOST,
    RecordingSource,
    make_blocks,
    new_drive,
    random_id,
    stall,
    start_raw_server,
    start_server,
    wants_in,
)
from vfs.blocks import BlockReader

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
                await wait_for(lambda: len(wants_in(staller.received)) >= 4,
                               "readahead at the peer")
                await trio.sleep(0.2)  # more would have gone out by now if allowed
                assert len(wants_in(staller.received)) == 4
                assert f.peer_stats()[0].in_flight == 4
                waits.start_soon(f.fetch, ids[-1], Priority.READ)
                await wait_for(lambda: any(m.block_id == ids[-1] for m in wants_in(staller.received)),
                               "the READ's Want")
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


def test_a_read_behind_the_readahead_of_its_block_asks_at_read_priority(tmp_path: Path) -> None:
    """The readahead is loading a block (its fetch waits on the network) when a process
    reads it: the fetch is asked again at READ, which the fetcher joins to the one in
    flight and sends ahead of everything lazier. The fake network answers only once it
    has heard of a READ (a seed whose slots the readahead filled): before, the read
    waited for the readahead's fetch and this never ended."""
    cap = new_cap()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(4096))
    pub = BlockStore(tmp_path / "pub", sync=False)
    store = BlockStore(tmp_path / "reader", sync=False)
    head = publish_folder(pub, src, cap)
    assert head.root is not None and head.root.node is not None
    ref = head.root.node
    asked: list[Priority] = []
    urgent = trio.Event()

    async def fetch(block_id: bytes, priority: Priority) -> bytes:
        asked.append(priority)
        if priority == Priority.READ:
            urgent.set()
        await urgent.wait()
        data = pub.get(block_id)
        assert data is not None
        return data

    reader = BlockReader(store, cap.read_key, fetch)
    got: list[bytes] = []

    async def test(nursery: trio.Nursery) -> None:
        async def read(priority: Priority) -> None:
            got.append(await reader.read(ref, priority))

        with trio.move_on_after(10.0):
            async with trio.open_nursery() as reads:
                reads.start_soon(read, Priority.READAHEAD)
                await wait_for(lambda: asked == [Priority.READAHEAD], "the readahead's fetch")
                reads.start_soon(read, Priority.READ)
        assert asked == [Priority.READAHEAD, Priority.READ]
        assert len(got) == 2 and got[0] == got[1]

    try:
        run(test)
    finally:
        store.close()
        pub.close()


class FakeSeed:
    """A connection to a seed whose every slot for lazy work is taken: a Want below READ
    is never answered, a READ is answered at once (peers serve READs first)."""

    def __init__(self, data: bytes, *, reads_wait: bool = False) -> None:
        self.data = data
        self.closed = False
        self.holding: dict[bytes, None] = {}
        self.whole: frozenset[bytes] = frozenset()
        self.wants: list[Priority] = []
        self.reads_answered = trio.Event()  # with reads_wait, READs are answered once set
        if not reads_wait:
            self.reads_answered.set()

    async def fetch(self, block_id: bytes, priority: Priority) -> bytes:
        self.wants.append(priority)
        if priority > Priority.READ:
            await trio.sleep_forever()
        await self.reads_answered.wait()
        return self.data

    async def have(self, block_ids) -> list[bool]:
        return [True] * len(block_ids)

    async def ping(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        self.closed = True


def fetcher_of(seed: FakeSeed, config: FetchConfig) -> Fetcher:
    """A fetcher whose one provider is `seed` (never dialled: its connect hands it over)."""
    addr = PeerAddr(random_id(), HOST, 9)

    async def connect(*args, **kwargs) -> FakeSeed:
        return seed

    return Fetcher(NodeIdentity.generate(), *new_drive(), lambda: [addr], connect=connect,
                   config=config)


def test_a_parked_request_wanted_at_read_asks_its_seed_again_at_read() -> None:
    """A readahead's attempt at the only peer runs late; its hedge has nobody else to ask
    and is parked. Then a process reads the block: the request goes to that peer again at
    READ (which it answers first), instead of waiting on the readahead's attempt, which
    here never ends (before: the read waited out its timeout, EIO)."""
    bid = random_id()
    seed = FakeSeed(b"x" * 4096)
    config = FetchConfig(hedge_floor=0.05, hedge_factor=1.0, stall_timeout=60.0,
                         default_timeout=60.0, swarm_jitter=0)

    async def test(nursery: trio.Nursery) -> None:
        async with fetcher_of(seed, config) as f:
            async with trio.open_nursery() as waits:
                waits.start_soon(functools.partial(f.fetch, bid, Priority.READAHEAD))
                await wait_for(lambda: bid in f._requests and f._requests[bid].parked,
                               "the hedge to be parked")
                with trio.fail_after(10.0):
                    assert await f.fetch(bid, Priority.READ) == seed.data
                waits.cancel_scope.cancel()
        assert seed.wants == [Priority.READAHEAD, Priority.READ]

    run(test)


def test_reads_are_never_held_up_by_lazier_work_at_a_peer() -> None:
    """A peer's lazy slots full of readahead it is slow to answer: READs still go out at
    once, up to max_in_flight_per_peer READs of their own (the peer answers READs
    first). Before, the readahead's slots counted against READs too: two READs at a time
    went out and the third waited for a slot that only lazier work was holding."""
    config = FetchConfig(max_in_flight_per_peer=6, foreground_reserve=2, hedge_floor=60.0,
                         stall_timeout=60.0, default_timeout=60.0, swarm_jitter=0)
    seed = FakeSeed(b"x" * 4096, reads_wait=True)

    async def test(nursery: trio.Nursery) -> None:
        async with fetcher_of(seed, config) as f:
            async with trio.open_nursery() as waits:
                for _ in range(10):
                    waits.start_soon(functools.partial(f.fetch, random_id(),
                                                       Priority.READAHEAD))
                await wait_for(lambda: len(seed.wants) == 4, "the readahead at the peer")
                reads = [random_id() for _ in range(7)]
                async with trio.open_nursery() as reading:
                    for bid in reads:
                        reading.start_soon(f.fetch, bid, Priority.READ)
                    await wait_for(lambda: seed.wants.count(Priority.READ) == 6,
                                   "six READs at the peer")
                    await trio.sleep(0.2)  # a seventh would have gone out by now
                    assert seed.wants.count(Priority.READ) == 6  # READs keep their own limit
                    assert seed.wants.count(Priority.READAHEAD) == 4
                    seed.reads_answered.set()
                waits.cancel_scope.cancel()
        assert seed.wants.count(Priority.READ) == 7

    run(test)


def test_a_reader_only_fetching_a_block_is_waited_for_briefly_and_by_readahead_alone() -> None:
    """A reader says it is fetching two blocks (Fetching), not that it holds them; its own
    fetch never lands (its server waits on it forever). A READ of one asks it (the block
    is on its way there) but is hedged to the seed after `fetching_hedge`, long before the
    usual hedge time here (60 s). A readahead of the other holds back for the reader's
    Holding and then takes the block from it: the seed never sends it. (Before, "fetching"
    and "holding" were one announcement: a READ waited up to 2 s for such a reader, the
    readahead the same, then asked the seed.)"""
    blocks = make_blocks(2, 4096)
    (urgent, urgent_data), (ahead, ahead_data) = blocks.items()
    dk, secret = new_drive()
    config = FetchConfig(swarm_jitter=0, fetching_hold=30.0, fetching_hedge=0.1,
                         default_timeout=60.0, hedge_floor=60.0, stall_timeout=60.0)

    async def fetch_never_lands(discovery_key: bytes, block_id: bytes,
                                timeout: float) -> bytes | None:
        if timeout > 0:
            await trio.sleep_forever()
        return None

    async def test(nursery: trio.Nursery) -> None:
        seed_source = RecordingSource(dict(blocks))
        _seed, seed_addr = await start_server(nursery, seed_source, {dk: secret})
        reader_source = RecordingSource({})
        reader, reader_addr = await start_server(nursery, reader_source, {dk: secret},
                                                 in_flight=fetch_never_lands)
        async with Fetcher(NodeIdentity.generate(), dk, secret,
                           lambda: [seed_addr, reader_addr], config=config) as f:
            def conn(addr: PeerAddr):
                return f._peers[addr.node_id].conn

            await wait_for(lambda: conn(seed_addr) is not None
                           and reader.connected_clients(dk) == 1, "both connections")
            assert reader.announce_fetching(dk, [urgent, ahead]) == 1
            await wait_for(lambda: conn(reader_addr) is not None
                           and len(conn(reader_addr).fetching) == 2, "the Fetching frame")
            with trio.fail_after(20.0):
                assert await f.fetch(urgent, Priority.READ) == urgent_data
            assert reader.stats.wants_received == 1  # asked first: it was fetching it
            assert seed_source.order == [urgent]  # then the seed, by the short hedge
            got: list[bytes] = []

            async def read_ahead() -> None:
                got.append(await f.fetch(ahead, Priority.READAHEAD))

            async with trio.open_nursery() as reading:
                reading.start_soon(read_ahead)
                await wait_for(lambda: ahead in f._requests
                               and f._requests[ahead].fetching_since < 1e300,
                               "the readahead held back")
                reader_source.blocks[ahead] = ahead_data
                assert reader.announce_holding(dk, [ahead]) == 1
            assert got == [ahead_data]
            assert list(conn(reader_addr).fetching) == [urgent]  # held now: no longer fetching
        assert seed_source.order == [urgent]  # the seed never sent `ahead`
        assert ahead in reader_source.order

    run(test)
