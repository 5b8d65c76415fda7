"""Push connections (dht/push.py): a dialer serves a drive to the node it dials.

Real TLS on 127.0.0.1: the listener (a host) accepts a push only for a drive
it serves and only when it asked for pushes; then it fetches, asks `have`
and receives notices over the dialer's connection, every block checked by
hash; a dialer that cannot reach its target keeps retrying with backoff.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import pytest
import trio

from dht.client import PeerConnection
from dht.errors import PeerIdentityError, PeerRefusedError
from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.push import PushedSource, PushStatus, PushTarget, keep_pushing, push_once
from dht.server import PeerServer
from dht.types import Priority
from tests.helpers import run_trio
from tests.test_peer_support import HOST, make_blocks, new_drive, start_server

TEST_DEADLINE = 30.0


def run(test: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    run_trio(test, TEST_DEADLINE)


class Listener:
    """A host: serves nothing itself, takes push connections and remembers them."""

    def __init__(self) -> None:
        self.conns: list[PeerConnection] = []
        self.arrived = trio.Event()
        self.notices: list[tuple[bytes, bytes]] = []

    async def on_push(self, conn: PeerConnection) -> None:
        self.conns.append(conn)
        self.arrived.set()


def test_a_pushed_connection_serves_the_listener() -> None:
    blocks = make_blocks(20, size=300_000, vary=1)  # big enough for the client's hashing thread
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        host, host_addr = await start_server(nursery, {}, {dk: secret})
        listener = Listener()
        host.on_push = listener.on_push
        host.push_notice = lambda k, r: listener.notices.append((k, r))
        dialer = PeerServer(NodeIdentity.generate(), blocks, {dk: secret})
        status = PushStatus(PushTarget(HOST, host_addr.port))
        nursery.start_soon(lambda: keep_pushing(dialer, status, dk, secret,
                                                notice=lambda: b"head v1"))
        await listener.arrived.wait()
        conn = listener.conns[0]
        assert conn.addr.node_id == dialer.identity.node_id
        assert status.connected and status.node_id == host.identity.node_id
        for block_id, data in blocks.items():
            assert await conn.fetch(block_id, Priority.PIN) == data
        assert await conn.have([*blocks, hashlib.sha256(b"no").digest()]) == [True] * 20 + [False]
        assert dialer.stats.blocks_served == 20 and host.stats.pushes_accepted == 1
        # the first notice, and later ones through notify, like any client's
        assert await dialer.notify(dk, b"head v2") == 1
        with trio.fail_after(5):
            while len(listener.notices) < 2:
                await trio.sleep(0.01)
        assert listener.notices == [(dk, b"head v1"), (dk, b"head v2")]
        # the listener hangs up: the dialer notices and dials again
        await conn.aclose()
        with trio.fail_after(10):
            while len(listener.conns) < 2:
                await trio.sleep(0.05)
        assert status.sessions == 2

    run(test)


@pytest.mark.parametrize("case", ["no on_push", "unknown drive", "wrong secret"])
def test_pushes_are_refused_unless_asked_for_and_proven(case: str) -> None:
    dk, secret = new_drive()
    other_dk, other_secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        host, addr = await start_server(nursery, {}, {dk: secret})
        if case != "no on_push":
            host.on_push = Listener().on_push
        dialer = PeerServer(NodeIdentity.generate(), {}, {})
        key, sec = {"no on_push": (dk, secret), "unknown drive": (other_dk, other_secret),
                    "wrong secret": (dk, other_secret)}[case]
        with pytest.raises(PeerRefusedError, match="does not serve that drive"):
            await push_once(dialer, PushTarget(HOST, addr.port), key, sec)
        assert host.stats.pushes_accepted == 0

    run(test)


def test_a_push_pinned_to_another_node_id_is_refused_before_anything_is_sent() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        host, addr = await start_server(nursery, {}, {dk: secret})
        host.on_push = Listener().on_push
        dialer = PeerServer(NodeIdentity.generate(), {}, {})
        with pytest.raises(PeerIdentityError):
            await push_once(dialer, PushTarget(HOST, addr.port, b"\x01" * 32), dk, secret)
        assert host.stats.handshakes_refused == 0 and host.stats.pushes_accepted == 0
        # the right pin passes
        done = trio.Event()

        async def push() -> None:
            with pytest.raises(Exception):  # noqa: B017 - ends when the test cancels
                await push_once(dialer, PushTarget(HOST, addr.port, addr.node_id), dk, secret,
                                on_connected=lambda _: done.set())

        nursery.start_soon(push)
        await done.wait()

    run(test)


def test_an_unreachable_target_is_retried_with_backoff_until_it_appears() -> None:
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        # a port nobody listens on yet: bind, note it, close
        probe = trio.socket.socket()
        await probe.bind((HOST, 0))
        port = probe.getsockname()[1]
        probe.close()
        dialer = PeerServer(NodeIdentity.generate(), {}, {dk: secret})
        status = PushStatus(PushTarget(HOST, port))
        nursery.start_soon(lambda: keep_pushing(dialer, status, dk, secret,
                                                backoff_first=0.1, backoff_max=0.4))
        with trio.fail_after(10):
            while status.failures < 4:
                await trio.sleep(0.02)
        assert not status.connected and "cannot connect" in (status.last_error or "")
        assert status.retry_in <= 0.4
        listener = Listener()
        host = PeerServer(NodeIdentity.generate(), {}, {dk: secret})
        host.on_push = listener.on_push
        await nursery.start(host.serve, HOST, port)
        with trio.fail_after(10):
            await listener.arrived.wait()
        assert status.sessions == 1

    run(test)


def test_a_fetcher_fetches_over_a_pushed_connection_and_forgets_it_when_it_ends() -> None:
    blocks = make_blocks(30, size=50_000, vary=1)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        host, host_addr = await start_server(nursery, {}, {dk: secret})
        fetcher = Fetcher(host.identity, dk, secret, lambda: [],
                          config=FetchConfig(default_timeout=10))
        await nursery.start(fetcher.run)

        async def on_push(conn: PeerConnection) -> None:
            source = PushedSource(conn)
            fetcher.add_source(source, source.wait_closed)

        host.on_push = on_push
        dialer = PeerServer(NodeIdentity.generate(), blocks, {dk: secret})
        status = PushStatus(PushTarget(HOST, host_addr.port))
        pusher = trio.CancelScope()

        async def push() -> None:
            with pusher:
                await keep_pushing(dialer, status, dk, secret)

        nursery.start_soon(push)
        async with fetcher.fetch_many(list(blocks), Priority.PIN) as results:
            got = {block_id: data async for block_id, data in results}
        assert got == blocks
        assert await fetcher.count_holders(list(blocks)) == 1
        [peer] = fetcher.peer_stats()
        assert peer.node_id == dialer.identity.node_id and peer.blocks == 30
        pusher.cancel()  # the publisher goes away: the source goes with it
        with trio.fail_after(10):
            while fetcher.peer_stats():
                await trio.sleep(0.05)

    run(test)
