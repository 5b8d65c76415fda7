"""dht.tlsstream.TlsStream against itself and against trio.SSLStream, over real loopback TCP."""

from __future__ import annotations

import functools
import hashlib
import os

import pytest
import trio

from dht.identity import NodeIdentity
from dht.tls import client_context, pinned_public_key, server_context
from dht.tlsstream import TlsStream
from tests.helpers import run_trio

DEADLINE = 20


async def _pair(nursery: trio.Nursery, server_kind: str, client_kind: str):
    """(server stream, client stream) connected through a real listener on 127.0.0.1."""
    identity = NodeIdentity.generate()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: trio.MemoryChannel = trio.open_memory_channel(1)
    send, receive = accepted

    async def handler(tcp: trio.SocketStream) -> None:
        if server_kind == "ours":
            stream = TlsStream(tcp, server_context(identity), server_side=True)
        else:
            stream = trio.SSLStream(tcp, server_context(identity), server_side=True)
        await stream.do_handshake()
        await send.send(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, handler, listeners)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    if client_kind == "ours":
        client = TlsStream(tcp, client_context())
    else:
        client = trio.SSLStream(tcp, client_context(), server_hostname=None)
    await client.do_handshake()
    pinned_public_key(client.getpeercert(binary_form=True), identity.node_id)
    server = await receive.receive()
    return server, client


run = functools.partial(run_trio, deadline=DEADLINE)  # run(test): test(nursery)


async def _receive_exactly(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = await stream.receive_some(65536)
        assert data, "the stream ended early"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


@pytest.mark.parametrize("server_kind,client_kind",
                         [("ours", "ours"), ("ours", "trio"), ("trio", "ours")])
def test_bytes_cross_both_ways_intact_while_both_sides_send(server_kind, client_kind) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 12345)

    async def test(nursery: trio.Nursery) -> None:
        server, client = await _pair(nursery, server_kind, client_kind)
        results = {}

        async def pump(name, src, dst) -> None:
            async with trio.open_nursery() as inner:
                async def sender() -> None:
                    for i in range(0, len(payload), 70000):  # sizes that cut across records
                        await src.send_all(payload[i:i + 70000])

                inner.start_soon(sender)
                results[name] = await _receive_exactly(dst, len(payload))

        async with trio.open_nursery() as both:
            both.start_soon(pump, "to server", client, server)
            both.start_soon(pump, "to client", server, client)
        want = hashlib.sha256(payload).digest()
        assert hashlib.sha256(results["to server"]).digest() == want
        assert hashlib.sha256(results["to client"]).digest() == want
        await client.aclose()
        assert await server.receive_some(100) == b""  # close_notify: the end, not a hang
        assert await server.receive_some(100) == b""
        await server.aclose()

    run(test)


def test_a_peer_that_drops_the_connection_ends_the_stream() -> None:
    async def test(nursery: trio.Nursery) -> None:
        server, client = await _pair(nursery, "ours", "ours")
        await client.send_all(b"last words")
        await client.transport.aclose()  # no close_notify
        assert await _receive_exactly(server, 10) == b"last words"
        try:
            assert await server.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass  # an unclean end may also be reported as broken
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some(10)

    run(test)


def test_garbage_instead_of_a_handshake_is_a_broken_stream() -> None:
    async def test(nursery: trio.Nursery) -> None:
        identity = NodeIdentity.generate()
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        outcome: list[BaseException | None] = []

        async def handler(tcp: trio.SocketStream) -> None:
            stream = TlsStream(tcp, server_context(identity), server_side=True)
            try:
                await stream.do_handshake()
                outcome.append(None)
            except trio.BrokenResourceError as exc:
                outcome.append(exc)
            await stream.aclose()

        nursery.start_soon(trio.serve_listeners, handler, listeners)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        while await tcp.receive_some(4096):
            pass  # the server answers with an alert, then closes
        await tcp.aclose()
        while not outcome:
            await trio.sleep(0.01)
        assert isinstance(outcome[0], trio.BrokenResourceError)

    run(test)


class _RecordingTls:
    """Stands in for a TlsStream's SSLObject: passes every call on, records what `write`
    was given."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self._inner = inner
        self.written: list[object] = []

    def write(self, data):  # type: ignore[no-untyped-def]
        self.written.append(data)
        return self._inner.write(data)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._inner, name)


def test_send_parts_sends_the_joined_bytes_and_hands_large_parts_over_as_they_are() -> None:
    """A served block goes to the TLS object as the very object given (not copied behind
    its frame header, issue 12); small parts next to each other share one write (one
    TLS record, not one each); the peer receives exactly the parts joined."""

    async def test(nursery: trio.Nursery) -> None:
        server, client = await _pair(nursery, "ours", "ours")
        recording = _RecordingTls(server._ssl)
        server._ssl = recording
        block = os.urandom(256 * 1024)
        parts = [b"head-1", b"x" * 100, block, b"head-2", os.urandom(64 * 1024), b"tail"]
        nursery.start_soon(server.send_parts, parts)  # the client reads meanwhile
        expected = b"".join(parts)
        got = await _receive_exactly(client, len(expected))
        assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
        assert recording.written[1] is block
        assert recording.written[3] is parts[4]
        assert recording.written == [b"head-1" + b"x" * 100, block, b"head-2", parts[4], b"tail"]
        nursery.cancel_scope.cancel()

    run(test)


def test_receiving_never_waits_for_a_send_under_way() -> None:
    """While a send holds the stream (the peer reads nothing, so it may hold it for good),
    records the TLS object holds for it are that sender's to send: a receive must not
    wait for the send lock to flush them. It did, and a server whose client had stopped
    reading never read that client's Cancels
    (tests/test_peer.py::test_server_answers_in_priority_order_when_backlogged). What a
    sender finds pending when its send ends goes out too."""

    async def test(nursery: trio.Nursery) -> None:
        server, client = await _pair(nursery, "ours", "ours")
        holding = trio.Event()
        release = trio.Event()

        async def a_send_under_way() -> None:
            async with server._send_lock:
                holding.set()
                await release.wait()

        nursery.start_soon(a_send_under_way)
        await holding.wait()
        with server._tls_lock:
            server._ssl.write(b"written while the lock was held")  # pending, unsent
        await client.send_all(b"a cancel")
        with trio.fail_after(10):
            assert await server.receive_some() == b"a cancel"
        release.set()
        await server.send_all(b"; and after")  # the next send takes what was pending too
        expected = b"written while the lock was held; and after"
        with trio.fail_after(10):
            assert await _receive_exactly(client, len(expected)) == expected
        nursery.cancel_scope.cancel()

    run(test)
