"""Hostile network actors for tests: a DHT node and peer-protocol clients and servers that attack.

Each speaks the real wire formats (DHT datagrams; TLS + frames of the peer
protocol) but follows a script instead of the rules: it lies, stalls, floods,
amplifies or forges. Tests drive them against real `Dht`, `PeerServer` and
`PeerConnection` objects and measure what the attack achieved (bytes a victim
received, memory a queue grew to, connections a server kept).

- `HostileDhtNode`: a UDP socket answering DHT requests with a script
  (`answer(name, args, addr) -> body | None`); `endless_contacts(...)` is the
  script of a node that feeds every lookup fresh fake contacts, each nearer to
  the key than the last.
- `dht_request(...)`: the bytes of one DHT request, for forging datagrams from
  a "victim" socket (what a spoofed source address looks like to a node).
- `HostilePeerServer`: a TLS server with a real node identity that completes
  the handshake and then runs a script on the raw frame stream (flood pings,
  answer every want with not_found, stall).
- `hostile_client(...)`: a TLS client that completes the handshake (or stops
  before it) and hands the test the raw frame stream.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

from dht.frames import (
    MAX_CLIENT_FRAME,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Welcome,
    encode,
)
from dht.handshake import hello_signed_bytes, make_proof
from dht.identity import NodeIdentity
from dht.tls import client_context, server_context
from dht.tlsstream import TlsStream
from dht.types import PeerAddr

LOCAL = "127.0.0.1"

# ---- DHT ------------------------------------------------------------------------------

DhtScript = Callable[[str, list, tuple[str, int]], Any]


def dht_request(name: str, args: list, msg_id: bytes | None = None) -> bytes:
    """One DHT request datagram (kind 0, 20-byte message id, msgpack [name, args])."""
    return b"\x00" + (msg_id or os.urandom(20)) + msgpack.packb([name, args], use_bin_type=True)


def parse_reply(datagram: bytes) -> Any:
    """The body of a DHT reply datagram."""
    assert datagram[:1] == b"\x01", "not a reply"
    return msgpack.unpackb(datagram[21:], raw=False)


class HostileDhtNode:
    """A DHT "node" on 127.0.0.1 that answers requests as its script says (None: silence).

    `requests` counts what it was asked, by call name.
    """

    def __init__(self, script: DhtScript, node_id: bytes | None = None) -> None:
        self.script = script
        self.node_id = node_id or os.urandom(32)
        self.port: int | None = None
        self.requests: dict[str, int] = {}
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with self.sock:
            await self.sock.bind((LOCAL, 0))
            self.port = self.sock.getsockname()[1]
            task_status.started(self.port)
            while True:
                data, addr = await self.sock.recvfrom(65536)
                if data[:1] != b"\x00":
                    continue
                try:
                    name, args = msgpack.unpackb(data[21:], raw=False)
                except Exception:
                    continue
                self.requests[name] = self.requests.get(name, 0) + 1
                if name == "ping":
                    body: Any = self.node_id
                else:
                    body = self.script(name, args, addr)
                if body is not None:
                    reply = b"\x01" + data[1:21] + msgpack.packb(body, use_bin_type=True)
                    await self.sock.sendto(reply, addr)


def endless_contacts(port_of: Callable[[], int], per_reply: int = 20) -> DhtScript:
    """Answer every lookup with `per_reply` fresh contacts, each nearer the key than any before.

    The contacts all point back at this node (at `port_of()`), so each one
    "answers" at once and a lookup without a round limit never ends.
    """
    issued = {"n": 0}

    def script(name: str, args: list, addr: tuple[str, int]) -> Any:
        key = args[1]
        target = int.from_bytes(key, "big")
        contacts = []
        for _ in range(per_reply):
            issued["n"] += 1
            distance = (1 << 200) - issued["n"]  # strictly nearer every time
            contacts.append([(target ^ distance).to_bytes(32, "big"), LOCAL, port_of()])
        if name == "find_value":
            return {"values": [], "nodes": contacts}
        return contacts

    return script


# ---- peer protocol ----------------------------------------------------------------------


class FrameConn:
    """Raw frames over a TLS stream: send anything, read what comes (no rules enforced)."""

    def __init__(self, stream: TlsStream, max_frame: int) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)

    async def send(self, *msgs: Message) -> None:
        await self.stream.send_all(b"".join(encode(m) for m in msgs))

    async def receive(self) -> Message | None:
        """The next frame, or None at the end of the stream."""
        while True:
            msg = self.decoder.next_event()
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.decoder.feed(data)


@asynccontextmanager
async def hostile_client(
    port: int,
    server_id: bytes,
    identity: NodeIdentity,
    dk: bytes,
    secret: bytes,
    *,
    handshake: bool = True,
) -> AsyncIterator[tuple[trio.SocketStream, FrameConn | None]]:
    """Connect to a PeerServer on 127.0.0.1:`port`; with `handshake`, prove `secret` for `dk`.

    Yields the TCP stream (to stop reading, or to close abruptly) and the frame
    connection after Welcome (None without the handshake: the connection is left
    before TLS).
    """
    tcp = await trio.open_tcp_stream(LOCAL, port)
    try:
        if not handshake:
            yield tcp, None
            return
        tls = TlsStream(tcp, client_context())
        await tls.do_handshake()
        conn = FrameConn(tls, 4 * 1024 * 1024 + 4096)
        challenge = await conn.receive()
        assert isinstance(challenge, Challenge) and challenge.server_id == server_id
        proof = make_proof(secret, challenge.server_id, challenge.nonce)
        signed = hello_signed_bytes(challenge.server_id, challenge.nonce, dk, proof)
        await conn.send(Hello(identity.public_bytes, dk, proof, identity.sign(signed)))
        welcome = await conn.receive()
        assert isinstance(welcome, Welcome), f"not welcomed: {welcome}"
        yield tcp, conn
    finally:
        await trio.aclose_forcefully(tcp)


ServerScript = Callable[[FrameConn], Awaitable[None]]


class HostilePeerServer:
    """A peer server with a real identity that welcomes anyone, then runs `script(conn)`."""

    def __init__(self, identity: NodeIdentity, script: ServerScript,
                 with_welcome: Callable[[Hello], Sequence[Message]] | None = None) -> None:
        """`with_welcome(hello)`: frames sent in the same write as the Welcome."""
        self.identity = identity
        self.script = script
        self.with_welcome = with_welcome
        self.port: int | None = None
        self._context = server_context(identity)

    def addr(self) -> PeerAddr:
        assert self.port is not None
        return PeerAddr(self.identity.node_id, LOCAL, self.port)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOCAL)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        tls = TlsStream(tcp, self._context, server_side=True)
        try:
            await tls.do_handshake()
            conn = FrameConn(tls, MAX_CLIENT_FRAME)
            await conn.send(Challenge(self.identity.node_id, os.urandom(32)))
            hello = await conn.receive()
            if not isinstance(hello, Hello):
                return
            extra = self.with_welcome(hello) if self.with_welcome is not None else ()
            await conn.send(Welcome(256), *extra)
            await self.script(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)
