"""Attacks on the peer protocol, performed: hostile clients against a real PeerServer
(issue 11 item 4) and hostile servers against a real PeerConnection / Fetcher (item 5).

Everything runs over TLS on 127.0.0.0/8; a second loopback address
(127.0.0.2, ...) stands for another host.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import trio
import trio.testing

from dht.client import PeerConnection
from dht.errors import FetchTimeout, PeerProtocolError
from dht.fetch import FetchConfig, Fetcher
from dht.frames import Cancel, Have, NotFound, Ping, Want, encode
from dht.identity import NodeIdentity
from dht.server import HANDSHAKING_PER_ADDRESS, MAX_HANDSHAKING, PeerServer
from dht.streams import MAX_CONTROL_BACKLOG
from dht.tls import client_context, server_context
from dht.tlsstream import TlsStream
from dht.types import PeerAddr, Priority
from tests.helpers import run_trio
from tests.hostile import LOCAL, FrameConn, HostilePeerServer, hostile_client
from tests.test_peer_support import make_blocks, new_drive, random_id, wants_in

TEST_DEADLINE = 60.0


def run(test) -> None:
    run_trio(test, TEST_DEADLINE)


async def serve(nursery, source, secrets, **kwargs) -> tuple[PeerServer, int]:
    server = PeerServer(NodeIdentity.generate(), source, secrets, **kwargs)
    port = await nursery.start(server.serve, LOCAL, 0)
    return server, port


async def wait_for(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


class GatedSource:
    """A block source whose reads wait until the test opens the gate (a slow disk)."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.blocks = blocks
        self.gate = threading.Event()

    def get(self, block_id: bytes) -> bytes | None:
        self.gate.wait(30)
        return self.blocks.get(block_id)

    def has(self, block_id: bytes) -> bool:
        """Presence is an index lookup, not a read: it does not wait for the gate. (Without
        it the server checked a Have with get(), which held the event loop for the gate's
        30 s timeout: the flood test took 31 s, 30 of them waiting.)"""
        return block_id in self.blocks


# ---- item 4: a hostile client against the server -----------------------------------------


def test_want_then_cancel_flood_keeps_the_server_queue_bounded() -> None:
    """Want then Cancel used to leave every entry in the server's heap: 20,000 pairs, 20,000 entries."""
    blocks = make_blocks(4)
    dk, secret = new_drive()
    source = GatedSource(blocks)

    async def test(nursery) -> None:
        server, port = await serve(nursery, source, {dk: secret}, max_wants=64)
        ident = NodeIdentity.generate()
        async with hostile_client(port, server.identity.node_id, ident, dk, secret) as (_, conn):
            bid = next(iter(blocks))
            # the loader takes the first wants and waits on the gate; the rest queue
            for batch in range(100):
                msgs = []
                for i in range(200):
                    req = batch * 200 + i
                    msgs += [Want(req, bid, Priority.PREFETCH), Cancel(req)]
                await conn.send(*msgs)
            await conn.send(Have(1, (bid,)))  # answered only once the reader got this far
            await conn.receive()
            (sconn,) = server._clients[dk]
            assert server.stats.cancels_received == 20_000
            assert len(sconn._queue) <= 2 * 64 + 16, len(sconn._queue)
            source.gate.set()

    try:
        run(test)
    finally:
        source.gate.set()


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout() -> None:
    """Nothing timed out a connection that stopped reading: the writer waited for ever."""
    blocks = make_blocks(8, 4 * 1024 * 1024)
    dk, secret = new_drive()

    async def test(nursery) -> None:
        server, port = await serve(nursery, blocks, {dk: secret}, send_timeout=2.0)
        ident = NodeIdentity.generate()
        async with hostile_client(port, server.identity.node_id, ident, dk, secret) as (_, conn):
            ids = list(blocks)
            await conn.send(*(Want(i, ids[i % len(ids)], Priority.READ) for i in range(64)))
            # 256 MiB asked for, nothing read: the kernel buffers fill, the writer blocks
            await wait_for(lambda: server.stats.send_timeouts == 1)
            await wait_for(lambda: server.stats.connections_active == 0)
            assert server.connected_clients() == 0

    run(test)


def test_one_address_cannot_take_every_connection_slot() -> None:
    """512 connections in all and no limit per address: one host could take them all."""
    blocks = make_blocks(2)
    dk, secret = new_drive()

    async def other_host(nursery) -> None:
        server, port = await serve(nursery, blocks, {dk: secret}, max_per_address=4)
        ident = NodeIdentity.generate()
        async with contextlib.AsyncExitStack() as held, trio.open_nursery() as inner:
            for _ in range(4):
                await held.enter_async_context(
                    hostile_client(port, server.identity.node_id, ident, dk, secret))
            assert server.stats.connections_active == 4
            tcp = await trio.open_tcp_stream(LOCAL, port)
            assert await tcp.receive_some(10) == b""  # the fifth from this host: closed at once
            await trio.aclose_forcefully(tcp)
            # a client on another address (127.0.0.2) completes the handshake and is served
            tcp = await trio.open_tcp_stream(LOCAL, port, local_address="127.0.0.2")
            tls = TlsStream(tcp, client_context())
            await tls.do_handshake()
            conn = FrameConn(tls, 1 << 20)
            assert (await conn.receive()).TYPE == "challenge"
            await trio.aclose_forcefully(tls)
            inner.cancel_scope.cancel()
        assert server.stats.connections_rejected == 1

    run(other_host)


def test_a_slow_handshake_flood_does_not_lock_out_an_honest_client() -> None:
    """Pre-handshake connections held their slots for 10 s: a flood of them shut everyone out."""
    blocks = make_blocks(2)
    dk, secret = new_drive()

    async def test(nursery) -> None:
        server, port = await serve(nursery, blocks, {dk: secret}, max_connections=100,
                                   handshake_timeout=30.0)
        flood = []
        # 12 "hosts" (127.0.1.x) each open more silent connections than allowed: per address
        # at most HANDSHAKING_PER_ADDRESS are kept, in all at most MAX_HANDSHAKING
        for host in range(12):
            for _ in range(HANDSHAKING_PER_ADDRESS + 2):
                flood.append(await trio.open_tcp_stream(LOCAL, port,
                                                        local_address=f"127.0.1.{host + 1}"))
        await wait_for(lambda: server.stats.connections_accepted == len(flood))
        assert server.stats.connections_active <= MAX_HANDSHAKING
        assert server.stats.connections_rejected >= 12 * 2
        assert server.stats.handshakes_evicted >= 12 * HANDSHAKING_PER_ADDRESS - MAX_HANDSHAKING
        addr = PeerAddr(server.identity.node_id, LOCAL, port)
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            bid = next(iter(blocks))
            assert await conn.fetch(bid) == blocks[bid]
        for tcp in flood:
            await trio.aclose_forcefully(tcp)

    run(test)


def test_a_have_flood_is_answered_at_the_connection_rate_not_at_line_rate() -> None:
    """Each Have is up to 240 store reads on the server's event loop (which also serves FUSE);
    a client reading the answers could ask for them as fast as the link carries 4 KiB frames.

    On a frozen clock (trio's MockClock), so what is counted is the connection's token
    bucket, not how fast this machine answers: with no time passing exactly the burst is
    answered and the next Have waits, still after 0.99/rate; each 1/rate seconds the test
    moves the clock lets exactly one more through (a limiter off, or at twice the rate,
    fails at the 21st). On the wall clock a server that takes longer than 1/rate per
    Have by itself (a loaded machine; a has() of 0.3 ms per id does it) never has to
    delay one, and the old `haves_delayed > 0` failed.
    """
    blocks = make_blocks(4)
    dk, secret = new_drive()
    ids = tuple(random_id() for _ in range(120))
    rate, burst = 50.0, 20
    # the clock moves only when the test moves it, or when every task has idled a whole
    # TEST_DEADLINE of real time (a hang): then it jumps, and fail_after below fires
    clock = trio.testing.MockClock(autojump_threshold=TEST_DEADLINE)

    async def main() -> None:
        with trio.fail_after(TEST_DEADLINE):
            async with trio.open_nursery() as nursery:
                server, port = await serve(nursery, blocks, {dk: secret}, have_rate=rate,
                                           have_burst=burst)
                stats = server.stats
                ident = NodeIdentity.generate()
                async with hostile_client(port, server.identity.node_id, ident, dk,
                                          secret) as (_, conn):
                    start = trio.current_time()

                    async def flood() -> None:
                        for i in range(120):
                            await conn.send(Have(i, ids))

                    async def held(answered: int) -> None:
                        """Until the server answered more, or holds the next Have for its
                        token (frozen time: whatever the loopback's delay, it must)."""
                        delayed = answered - burst + 1
                        while stats.haves_received == answered and stats.haves_delayed < delayed:
                            await trio.sleep(0)
                        assert (stats.haves_received, stats.haves_delayed) == (answered, delayed)

                    async with trio.open_nursery() as inner:
                        inner.start_soon(flood)
                        for _ in range(burst):
                            assert (await conn.receive()).TYPE == "have_reply"
                        # no time passed: the burst went out, the next Have waits its token
                        await held(burst)
                        clock.jump(0.99 / rate)  # a token is 1/rate: not yet
                        await trio.testing.wait_all_tasks_blocked()
                        assert (stats.haves_received, stats.haves_delayed) == (burst, 1)
                        clock.jump(0.02 / rate)  # past it (0.99 + 0.01 may round short)
                        for answered in range(burst + 1, 121):
                            if answered > burst + 1:
                                clock.jump(1 / rate)
                            assert (await conn.receive()).TYPE == "have_reply"
                            if answered < 120:
                                await held(answered)  # one per 1/rate, not more
                    # 20 at once, then 50 a second: the 100 others took 2 s
                    assert trio.current_time() - start == pytest.approx((120 - burst) / rate,
                                                                        abs=0.1 / rate)
                    assert stats.haves_delayed == 120 - burst
                nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


def test_tls_receive_some_honours_max_bytes() -> None:
    """`TlsStream.receive_some` ignored max_bytes: a server took whatever a read decrypted."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    ident = NodeIdentity.generate()

    async def test(nursery) -> None:
        left, right = trio.testing.memory_stream_pair()
        server = TlsStream(left, server_context(ident), server_side=True)
        client = TlsStream(right, client_context())
        async with trio.open_nursery() as inner:
            inner.start_soon(server.do_handshake)
            await client.do_handshake()
        nursery.start_soon(server.send_all, payload)
        got = bytearray()
        sizes = []
        while len(got) < len(payload):
            chunk = await client.receive_some(1000)
            sizes.append(len(chunk))
            got += chunk
        assert bytes(got) == payload and max(sizes) <= 1000
        assert max(sizes) == 1000  # not one record at a time either

    run(test)


# ---- item 5: a hostile server against the client -----------------------------------------


def test_a_ping_flood_from_a_server_that_never_reads_is_dropped_not_queued() -> None:
    """Every Ping appended a Pong to an unbounded queue while the server read nothing."""
    ping = Ping(7)

    async def flood(conn: FrameConn) -> None:
        frame = b"".join([encode(ping)] * 10_000)
        try:
            for _ in range(400):  # up to 4 M pings (~60 MB); never reads a byte
                await conn.stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def test(nursery) -> None:
        hostile = HostilePeerServer(NodeIdentity.generate(), flood)
        await nursery.start(hostile.run)
        dk, secret = new_drive()
        most = 0
        async with trio.open_nursery() as inner:
            conn = await PeerConnection.connect(hostile.addr(), NodeIdentity.generate(), dk,
                                                secret, nursery=inner)
            while not conn.closed:
                most = max(most, len(conn._outgoing))
                await trio.sleep(0.005)
            error = await conn.wait_closed()
        assert isinstance(error, PeerProtocolError), error
        assert "pings faster" in str(error)
        assert most <= MAX_CONTROL_BACKLOG + 1

    run(test)


def test_a_server_answering_decoys_with_not_found_is_still_caught_stalling() -> None:
    """A NotFound counted as a delivery, so a server that answered NotFound to some wants
    and sat on the others was never declared stalled."""
    real = random_id()

    async def decoy_server(conn: FrameConn) -> None:
        while True:
            msg = await conn.receive()
            if msg is None:
                return
            for want in wants_in([msg]):
                if want.block_id != real:
                    await conn.send(NotFound(want.req_id))  # at once; the real one: never

    config = FetchConfig(hedge_floor=0.2, stall_timeout=1.5, connect_timeout=2.0,
                         backoff_base=0.1, backoff_max=1.0, default_timeout=10.0,
                         provider_refresh_min_interval=0.05)

    async def test(nursery) -> None:
        hostile = HostilePeerServer(NodeIdentity.generate(), decoy_server)
        await nursery.start(hostile.run)
        dk, secret = new_drive()

        async def providers():
            return [hostile.addr()]

        async with Fetcher(NodeIdentity.generate(), dk, secret, providers, config=config) as f:
            async def decoys() -> None:
                while True:
                    try:
                        await f.fetch(random_id(), Priority.PREFETCH, timeout=0.3)
                    except FetchTimeout:
                        pass
                    await trio.sleep(0.1)

            async with trio.open_nursery() as inner:
                inner.start_soon(decoys)
                try:
                    await f.fetch(real, Priority.READ, timeout=6.0)
                except FetchTimeout:
                    pass
                inner.cancel_scope.cancel()
            (stats,) = f.peer_stats()
            assert stats.not_found > 0
            assert stats.stalls >= 1

    run(test)
