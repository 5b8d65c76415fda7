"""The fetch scheduler against real peer servers on 127.0.0.1.

Every test is about counts and order, never speed: the only timing in here
are generous upper bounds that turn a hang into a failure.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import socket
import weakref
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

from dht.client import PeerConnection
from dht.errors import DhtError, FetchTimeout
from dht.fetch import FetchConfig, Fetcher
from dht.frames import Cancel, Want, WantRun
from dht.identity import NodeIdentity
from dht.types import PeerAddr, Priority
from tests.helpers import run_trio
from tests.test_peer_support import (
    CorruptSource,
    make_blocks,
    new_drive,
    random_id,
    stall,
    start_raw_server,
    start_server,
    wants_in,
)

TEST_DEADLINE = 60.0  # a bound only a hang breaks

# Test-sized timings: hedge quickly, back off briefly.
FAST = FetchConfig(
    hedge_floor=0.2,
    stall_timeout=1.0,
    connect_timeout=2.0,
    backoff_base=0.1,
    backoff_max=1.0,
    default_timeout=10.0,
    provider_refresh_min_interval=0.05,
)


# FAST without its timings: no hedge, no stall, no connect timeout a loaded machine
# reaches (at a load of 20-24 on 2 cores a request outlived the 0.2 s hedge floor, and
# a TLS dial can outlive 2 s). For tests that count attempts, connections or failures,
# which any of those adds to.
CALM = dataclasses.replace(FAST, hedge_floor=60.0, stall_timeout=60.0, connect_timeout=60.0,
                           default_timeout=60.0)


run = functools.partial(run_trio, deadline=TEST_DEADLINE)  # run(test): test(nursery)


def fixed(addrs: Sequence[PeerAddr]) -> Callable[[], Awaitable[list[PeerAddr]]]:
    async def providers() -> list[PeerAddr]:
        return list(addrs)

    return providers


async def fetch_all(fetcher: Fetcher, ids: list[bytes], priority: Priority) -> dict[bytes, bytes]:
    got: dict[bytes, bytes] = {}
    async with fetcher.fetch_many(ids, priority, concurrency=16) as results:
        async for bid, data in results:
            got[bid] = data
    return got


def test_blocks_spread_over_all_three_providers() -> None:
    blocks = make_blocks(100, 8192)
    dk, secret = new_drive()
    # CALM: at a load average of 20 a request took over FAST's 0.2 s hedge floor, both
    # attempts delivered and the count below was 101 (a hedge is not what this tests; a
    # stall or a connect timeout would also open a second connection).
    config = CALM

    async def test(nursery: trio.Nursery) -> None:
        started = [await start_server(nursery, blocks, {dk: secret}) for _ in range(3)]
        servers = [s for s, _ in started]
        addrs = [a for _, a in started]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=config) as f:
            got = await fetch_all(f, list(blocks), Priority.READ)
            stats = {s.node_id: s for s in f.peer_stats()}
        assert got == blocks
        served = [s.stats.blocks_served for s in servers]
        assert all(n > 0 for n in served), served
        assert sum(s.blocks for s in stats.values()) == 100
        # One pooled connection per peer for the whole run.
        assert [s.stats.connections_accepted for s in servers] == [1, 1, 1]

    run(test)


def test_stalling_peer_is_hedged_and_every_block_arrives() -> None:
    blocks = make_blocks(60, 4096)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        staller = await start_raw_server(nursery, stall)
        assert staller.addr is not None
        good = [await start_server(nursery, blocks, {dk: secret}) for _ in range(2)]
        addrs = [staller.addr] + [a for _, a in good]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=FAST) as f:
            # every peer connected first (the staller never answers the pings: the
            # connections are what is waited for): requests go to connected peers, and
            # with the staller's dial finished last, the good peers took all 60 blocks
            # before it was asked (hedges == 0; the faster a fetch, the likelier)
            async with trio.open_nursery() as dials:
                dials.start_soon(functools.partial(f.have_map, [], timeout=TEST_DEADLINE))
                while sum(p.connected for p in f.peer_stats()) < 3:
                    await trio.sleep(0.01)
                dials.cancel_scope.cancel()
            got = await fetch_all(f, list(blocks), Priority.READ)
            stats = {s.node_id: s for s in f.peer_stats()}
            assert f.stats.hedges > 0
        assert got == blocks
        wants_to_staller = len(wants_in(staller.received))
        assert wants_to_staller > 0, "the staller was never tried; the test proves nothing"
        assert stats[staller.addr.node_id].blocks == 0
        assert stats[staller.addr.node_id].late > 0
        # Losers of a hedge are cancelled on the wire.
        assert any(isinstance(m, Cancel) for m in staller.received)

    run(test)


def test_corrupt_peer_never_yields_wrong_bytes_and_is_penalised() -> None:
    blocks = make_blocks(40, 4096)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        liar, liar_addr = await start_server(nursery, CorruptSource(blocks), {dk: secret})
        _honest, honest_addr = await start_server(nursery, blocks, {dk: secret})
        config = FetchConfig(**{**FAST.__dict__, "bad_block_backoff": 60.0})
        addrs = [liar_addr, honest_addr]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=config) as f:
            # both connected first: requests go to connected peers, and a liar whose
            # dial finished last might otherwise never be asked at all
            await f.have_map([], timeout=10)
            got = await fetch_all(f, list(blocks), Priority.READ)
            stats = {s.node_id: s for s in f.peer_stats()}
        assert got == blocks  # every byte verified
        liar_stats = stats[liar_addr.node_id]
        assert liar_stats.bad_blocks >= 1
        assert liar_stats.blocks == 0
        assert liar_stats.backoff_remaining > 0
        assert liar.stats.connections_accepted == 1  # dropped and not re-dialled

    run(test)


def test_only_liars_means_timeout_not_wrong_bytes() -> None:
    blocks = make_blocks(1)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        liars = [await start_server(nursery, CorruptSource(blocks), {dk: secret}) for _ in range(2)]
        addrs = [a for _, a in liars]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=FAST) as f:
            [bid] = blocks
            with pytest.raises(FetchTimeout, match="tried 2 of 2") as info:
                await f.fetch(bid, timeout=1.5)
        assert "corrupt" in str(info.value)
        assert info.value.tried == 2

    run(test)


def test_all_servers_gone_gives_fetch_timeout() -> None:
    blocks = make_blocks(10)
    dk, secret = new_drive()
    ids = list(blocks)

    async def test(nursery: trio.Nursery) -> None:
        async with trio.open_nursery() as servers_nursery:
            addrs = [
                (await start_server(servers_nursery, blocks, {dk: secret}))[1] for _ in range(3)
            ]
            async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=FAST) as f:
                assert await f.fetch(ids[0]) == blocks[ids[0]]
                servers_nursery.cancel_scope.cancel()  # every server goes away
                await trio.sleep(0)
                timeout = 2.0
                start = trio.current_time()
                with pytest.raises(FetchTimeout) as info:
                    await f.fetch(ids[1], timeout=timeout)
                assert trio.current_time() - start < timeout + 5  # bounded, not a hang
                assert "of 3 known peer" in str(info.value)
                assert f.stats.timeouts == 1

    run(test)


def test_no_providers_gives_fetch_timeout() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([]), config=FAST) as f:
            with pytest.raises(FetchTimeout, match="no peers are known") as info:
                await f.fetch(random_id(), timeout=0.5)
            assert info.value.tried == 0

    run(test)


def test_read_overtakes_a_queued_pin_backlog() -> None:
    """Count order, not time: READs issued mid-pin finish long before the pin does."""
    pin_blocks = make_blocks(300, 16384)
    read_blocks = make_blocks(5, 16384)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, pin_blocks | read_blocks, {dk: secret})
        order: list[str] = []
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([addr]), config=FAST) as f:

            async def read(bid: bytes) -> None:
                assert await f.fetch(bid, Priority.READ) == read_blocks[bid]
                order.append("read")

            async with trio.open_nursery() as readers:
                # All 300 PIN requests queued at once: a real backlog.
                async with f.fetch_many(list(pin_blocks), Priority.PIN, concurrency=300) as pins:
                    async for _bid, _data in pins:
                        order.append("pin")
                        if order.count("pin") == 20:
                            for bid in read_blocks:
                                readers.start_soon(read, bid)
        assert order.count("read") == 5 and order.count("pin") == 300
        last_read = max(i for i, kind in enumerate(order) if kind == "read")
        pins_before_last_read = order[:last_read].count("pin")
        # The reads wait at most for what was already in flight (the peer's
        # background slots), not for the 280 PIN blocks queued behind them.
        assert pins_before_last_read < 20 + 2 * FAST.max_in_flight_per_peer, order

    run(test)


def test_not_found_at_one_peer_is_served_by_another() -> None:
    blocks = make_blocks(10)
    dk, secret = new_drive()
    # CALM: under load a want to the empty peer outlived FAST's 0.2 s hedge floor, the
    # full peer's copy won, the losing attempt was cancelled, and the NotFound the empty
    # peer had already sent arrived for no live attempt: counted by the server, not by the
    # fetcher (8 against 5). Only a NotFound may end an attempt at the empty peer (and a
    # connect timeout would count as a failure).
    config = CALM

    async def test(nursery: trio.Nursery) -> None:
        empty, empty_addr = await start_server(nursery, {}, {dk: secret})
        full, full_addr = await start_server(nursery, blocks, {dk: secret})
        addrs = [empty_addr, full_addr]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=config) as f:
            got = await fetch_all(f, list(blocks), Priority.READ)
            stats = {s.node_id: s for s in f.peer_stats()}
        assert got == blocks
        assert full.stats.blocks_served == 10
        assert empty.stats.not_found > 0, "the empty peer was never asked: this proves nothing"
        # NotFound is an honest answer: no failure, no backoff.
        assert stats[empty_addr.node_id].failures == 0
        assert stats[empty_addr.node_id].not_found == empty.stats.not_found

    run(test)


def test_new_providers_are_picked_up_while_waiting() -> None:
    blocks = make_blocks(3)
    dk, secret = new_drive()
    known: list[PeerAddr] = []

    async def providers() -> list[PeerAddr]:
        return list(known)

    async def test(nursery: trio.Nursery) -> None:
        async with Fetcher(NodeIdentity.generate(), dk, secret, providers, config=FAST) as f:
            results: dict[bytes, bytes] = {}

            async def get(bid: bytes) -> None:
                results[bid] = await f.fetch(bid, timeout=10)

            async with trio.open_nursery() as waiting:
                for bid in blocks:
                    waiting.start_soon(get, bid)
                await trio.sleep(0.2)  # the fetches are parked: nobody to ask
                assert not results
                _server, addr = await start_server(nursery, blocks, {dk: secret})
                known.append(addr)  # the DHT found someone
        assert results == blocks

    run(test)


def test_concurrent_fetches_of_one_block_share_one_request() -> None:
    blocks = make_blocks(1, 65536)
    dk, secret = new_drive()
    [(bid, data)] = blocks.items()

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, blocks, {dk: secret})
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([addr]), config=FAST) as f:
            results: list[bytes] = []

            async def get(priority: Priority) -> None:
                results.append(await f.fetch(bid, priority))

            async with trio.open_nursery() as many:
                for priority in [Priority.PREFETCH, Priority.PIN, Priority.READ] * 3:
                    many.start_soon(get, priority)
        assert results == [data] * 9
        assert server.stats.wants_received <= 2  # one, plus at most a priority upgrade

    run(test)


def test_abandoned_fetch_is_cancelled_at_the_peer() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        staller = await start_raw_server(nursery, stall)
        assert staller.addr is not None
        config = FetchConfig(**{**FAST.__dict__, "hedge_floor": 5.0, "stall_timeout": 5.0})
        async with Fetcher(
            NodeIdentity.generate(), dk, secret, fixed([staller.addr]), config=config
        ) as f:
            with pytest.raises(FetchTimeout, match="tried 1 of 1"):
                await f.fetch(random_id(), timeout=0.5)
            with trio.fail_after(5):
                while not any(isinstance(m, Cancel) for m in staller.received):
                    await trio.sleep(0.01)
            assert all(s.in_flight == 0 for s in f.peer_stats())

    run(test)


def test_notices_are_delivered_through_pooled_connections() -> None:
    blocks = make_blocks(1)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, blocks, {dk: secret})
        seen: list[tuple[bytes, bytes]] = []
        async with Fetcher(
            NodeIdentity.generate(),
            dk,
            secret,
            fixed([addr]),
            on_notice=lambda k, r: seen.append((k, r)),
            config=FAST,
        ) as f:
            [bid] = blocks
            await f.fetch(bid)  # opens the pooled connection
            assert await server.notify(dk, b"new head") == 1
            with trio.fail_after(5):
                while not seen:
                    await trio.sleep(0.01)
        assert seen == [(dk, b"new head")]

    run(test)


def test_refused_peer_is_skipped() -> None:
    blocks = make_blocks(5)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        stranger, stranger_addr = await start_server(nursery, blocks, {})  # not this drive
        _server, addr = await start_server(nursery, blocks, {dk: secret})
        addrs = [stranger_addr, addr]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=FAST) as f:
            got = await fetch_all(f, list(blocks), Priority.READ)
            stats = {s.node_id: s for s in f.peer_stats()}
        assert got == blocks
        assert stats[stranger_addr.node_id].blocks == 0
        assert stranger.stats.handshakes_refused == 1  # refused once, then left alone

    run(test)


def test_reconnects_after_the_connection_drops() -> None:
    blocks = make_blocks(4)
    dk, secret = new_drive()
    ids = list(blocks)

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, blocks, {dk: secret})
        connections: list[PeerConnection] = []

        async def connect(*args: object, **kwargs: object) -> PeerConnection:
            conn = await PeerConnection.connect(*args, **kwargs)  # type: ignore[arg-type]
            connections.append(conn)
            return conn

        # CALM: a stall or a connect timeout would make a third connection; only the drop
        # below may make the second
        async with Fetcher(
            NodeIdentity.generate(), dk, secret, fixed([addr]), connect=connect, config=CALM
        ) as f:
            assert await f.fetch(ids[0]) == blocks[ids[0]]
            await connections[0].aclose()  # the link drops
            assert await f.fetch(ids[1]) == blocks[ids[1]]
        assert len(connections) == 2
        assert server.stats.connections_accepted == 2

    run(test)


def test_fetch_needs_a_running_fetcher() -> None:
    dk, secret = new_drive()

    async def main() -> None:
        f = Fetcher(NodeIdentity.generate(), dk, secret, fixed([]))
        with pytest.raises(DhtError, match="not running"):
            await f.fetch(random_id())

    trio.run(main)


def test_run_in_a_callers_nursery() -> None:
    blocks = make_blocks(2)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, blocks, {dk: secret})
        f = Fetcher(NodeIdentity.generate(), dk, secret, lambda: [addr], config=FAST)
        async with trio.open_nursery() as own:
            await own.start(f.run)
            for bid, data in blocks.items():
                assert await f.fetch(bid) == data
            own.cancel_scope.cancel()

    run(test)


def test_own_node_is_never_a_provider() -> None:
    dk, secret = new_drive()
    me = NodeIdentity.generate()

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, {}, {dk: secret}, identity=me)
        async with Fetcher(me, dk, secret, fixed([addr]), config=FAST) as f:
            with pytest.raises(FetchTimeout, match="no peers are known"):
                await f.fetch(random_id(), timeout=0.3)
            assert f.peer_stats() == []

    run(test)


def test_requests_queued_together_go_to_a_peer_as_one_run() -> None:
    """A streaming reader's readahead (several blocks asked for at once) is one WantRun and
    one attempt at the peer; a waiter that leaves cancels its own block of the run, on the
    wire too, and the rest of the run stays in flight."""
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        staller = await start_raw_server(nursery, stall)
        assert staller.addr is not None
        config = FetchConfig(**{**FAST.__dict__, "hedge_floor": 60.0, "stall_timeout": 60.0,
                                "default_timeout": 60.0, "swarm_jitter": 0})
        ids = [random_id() for _ in range(6)]
        async with Fetcher(
            NodeIdentity.generate(), dk, secret, fixed([staller.addr]), config=config
        ) as f:
            with trio.fail_after(10):
                while not f.peer_stats() or not f.peer_stats()[0].connected:
                    await trio.sleep(0.01)
            scopes = {bid: trio.CancelScope() for bid in ids}

            async def get(bid: bytes) -> None:
                with scopes[bid]:
                    await f.fetch(bid, Priority.READAHEAD)

            async with trio.open_nursery() as waits:
                for bid in ids:  # started together: queued before the scheduler looks
                    waits.start_soon(get, bid)
                with trio.fail_after(10):
                    while len(wants_in(staller.received)) < len(ids):
                        await trio.sleep(0.01)
                runs = [m for m in staller.received if isinstance(m, WantRun)]
                assert len(runs) == 1 and sorted(runs[0].block_ids) == sorted(ids)
                assert not any(isinstance(m, Want) for m in staller.received)
                assert f.peer_stats()[0].in_flight == len(ids)
                gone = runs[0].block_ids[2]
                scopes[gone].cancel()
                with trio.fail_after(10):
                    while not any(isinstance(m, Cancel) for m in staller.received):
                        await trio.sleep(0.01)
                (cancel,) = [m for m in staller.received if isinstance(m, Cancel)]
                assert cancel.req_id == runs[0].req_id + 2
                assert f.peer_stats()[0].in_flight == len(ids) - 1
                waits.cancel_scope.cancel()
            with trio.fail_after(10):  # every block of the run cancelled at the peer
                while sum(isinstance(m, Cancel) for m in staller.received) < len(ids):
                    await trio.sleep(0.01)
            assert f.peer_stats()[0].in_flight == 0
        cancelled = sorted(m.req_id for m in staller.received if isinstance(m, Cancel))
        assert cancelled == list(runs[0].request_ids())

    run(test)


def test_blocks_fetched_in_runs_arrive_whole_from_a_real_server() -> None:
    blocks = make_blocks(40, 16384)
    blocks_missing = random_id()
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, blocks, {dk: secret})
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([addr]), config=FAST) as f:
            with trio.fail_after(10):
                while not f.peer_stats() or not f.peer_stats()[0].connected:
                    await trio.sleep(0.01)
            got = await fetch_all(f, list(blocks), Priority.READAHEAD)
            with pytest.raises(FetchTimeout, match="does not have it"):
                await f.fetch(blocks_missing, timeout=2.0)
            assert f.stats.attempts == len(blocks) + 1
        assert got == blocks
        assert server.stats.wants_received == len(blocks) + 1

    run(test)


def test_a_connection_that_ends_is_let_go_while_its_peer_stays_listed() -> None:
    """A reader that leaves stays listed as a provider until its record expires (up to an
    hour); its closed connection (stream, decoder, Holding set) must not stay as long.
    Counted: once the server side ends it, nothing in the fetcher holds the connection,
    while the peer's entry (and its statistics) remain."""
    blocks = make_blocks(2)
    dk, secret = new_drive()
    ids = list(blocks)

    async def test(nursery: trio.Nursery) -> None:
        made: list[weakref.ref[PeerConnection]] = []

        async def connect(*args: object, **kwargs: object) -> PeerConnection:
            conn = await PeerConnection.connect(*args, **kwargs)  # type: ignore[arg-type]
            made.append(weakref.ref(conn))
            return conn

        reader = trio.CancelScope()  # the departing reader's server

        async def serve(task_status: trio.TaskStatus[PeerAddr]) -> None:
            with reader:
                async with trio.open_nursery() as inner:
                    _, addr = await start_server(inner, blocks, {dk: secret})
                    task_status.started(addr)

        addr = await nursery.start(serve)
        async with Fetcher(
            NodeIdentity.generate(), dk, secret, fixed([addr]), connect=connect, config=CALM
        ) as f:
            assert await f.fetch(ids[0]) == blocks[ids[0]]
            assert len(made) == 1
            reader.cancel()  # the reader goes: its end of the link closes
            conn = made[0]()
            assert conn is not None
            await conn.wait_closed()
            del conn
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            assert made[0]() is None, "the fetcher still holds the ended connection"
            [stats] = f.peer_stats()
            assert stats.provider and not stats.connected and stats.blocks == 1
            assert len(made) == 1  # not dialled again by itself

    run(test)


def test_a_failed_dial_keeps_no_frames_in_the_peer_entry() -> None:
    """A departed reader's record lists it for up to an hour and every dial of it fails;
    what its entry keeps of the failure is the error, not the failed dial's frames (its
    traceback and context held ~12 kB of trio tasks, cancel scopes and sockets a peer)."""
    dk, secret = new_drive()

    def closed_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    addrs = [PeerAddr(random_id(), "127.0.0.1", closed_port()) for _ in range(3)]

    async def test(nursery: trio.Nursery) -> None:
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs),
                           config=CALM) as f:
            with pytest.raises(FetchTimeout):
                await f.fetch(random_id(), timeout=1.0)
            while len(f._peers) < 3 or any(p.connect_error is None for p in f._peers.values()):
                await trio.sleep(0.05)  # every one dialled (ahead) and failed: the event waited
            kept = [p.connect_error for p in f._peers.values()]
            assert len(kept) == 3 and all(isinstance(e, DhtError) for e in kept)
            assert all("cannot connect" in str(e) for e in kept), kept
            assert [e.__traceback__ for e in kept] == [None] * 3
            assert [e.__context__ for e in kept] == [None] * 3

    run(test)
