"""Shared helpers for the peer-protocol and fetch tests (no tests of its own).

Real sockets on 127.0.0.1 only. `RawServer` and `raw_client` speak the wire
protocol by hand so tests can play a peer that stalls, vanishes, lies or
never reads, which the real PeerServer/PeerConnection refuse to do.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable

import trio

from dht.frames import (
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Want,
    WantRun,
    Welcome,
    encode,
)
from dht.handshake import hello_signed_bytes, make_proof
from dht.identity import NodeIdentity
from dht.server import PeerServer
from dht.tls import client_context, pinned_public_key, server_context
from dht.types import PeerAddr

HOST = "127.0.0.1"


def block_id(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def make_blocks(count: int, size: int = 4096, *, vary: int = 0) -> dict[bytes, bytes]:
    """`count` random blocks keyed by id; block i is `size + i * vary` bytes."""
    blocks = {}
    for i in range(count):
        data = os.urandom(size + i * vary)
        blocks[block_id(data)] = data
    return blocks


def new_drive() -> tuple[bytes, bytes]:
    """(discovery key, drive secret) for a made-up drive."""
    return os.urandom(32), os.urandom(32)


async def start_server(
    nursery: trio.Nursery,
    source: object,
    secrets_lookup: object,
    *,
    identity: NodeIdentity | None = None,
    **kwargs: object,
) -> tuple[PeerServer, PeerAddr]:
    identity = identity or NodeIdentity.generate()
    server = PeerServer(identity, source, secrets_lookup, **kwargs)  # type: ignore[arg-type]
    port = await nursery.start(server.serve, HOST, 0)
    return server, PeerAddr(identity.node_id, HOST, port)


class CorruptSource:
    """A block store that returns wrong bytes for every block it holds."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.blocks = blocks
        self.gets = 0

    def get(self, block_id: bytes) -> bytes | None:
        self.gets += 1
        data = self.blocks.get(block_id)
        if data is None:
            return None
        return bytes([data[0] ^ 0xFF]) + data[1:]


class RecordingSource:
    """A dict-backed block store that remembers the order blocks were asked for."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.blocks = blocks
        self.order: list[bytes] = []

    def get(self, block_id: bytes) -> bytes | None:
        self.order.append(block_id)
        return self.blocks.get(block_id)


def wants_in(messages: Iterable[Message]) -> list[Want]:
    """Every block asked for in `messages`, a WantRun being its Wants (in order)."""
    out: list[Want] = []
    for msg in messages:
        if isinstance(msg, Want):
            out.append(msg)
        elif isinstance(msg, WantRun):
            out += [Want(r, b, msg.priority) for r, b in zip(msg.request_ids(), msg.block_ids,
                                                           strict=True)]
    return out


async def read_message(stream: trio.abc.Stream, decoder: FrameDecoder) -> Message | None:
    """The next message, or None at end of stream."""
    while True:
        msg = decoder.next_event()
        if msg is not None:
            return msg
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        decoder.feed(data)


Behaviour = Callable[["RawServer", trio.SSLStream, FrameDecoder], Awaitable[None]]


async def stall(server: RawServer, stream: trio.SSLStream, decoder: FrameDecoder) -> None:
    """Accept every Want and never answer."""
    while (msg := await read_message(stream, decoder)) is not None:
        server.received.append(msg)


def vanish_after(wants: int) -> Behaviour:
    """Read `wants` Want frames, then drop the connection without a word."""

    async def behaviour(server: RawServer, stream: trio.SSLStream, decoder: FrameDecoder) -> None:
        seen = 0
        while seen < wants and (msg := await read_message(stream, decoder)) is not None:
            server.received.append(msg)
            seen += len(wants_in([msg]))
        server.vanished.set()

    return behaviour


class RawServer:
    """A hand-driven peer: real TLS and handshake (any Hello accepted), then `behaviour`."""

    def __init__(self, behaviour: Behaviour, identity: NodeIdentity | None = None) -> None:
        self.identity = identity or NodeIdentity.generate()
        self.behaviour = behaviour
        self.received: list[Message] = []
        self.hellos: list[Hello] = []
        self.connections = 0
        self.vanished = trio.Event()
        self.addr: PeerAddr | None = None
        self._context = server_context(self.identity)

    async def serve(self, *, task_status: trio.TaskStatus[PeerAddr] = trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        port = listeners[0].socket.getsockname()[1]
        self.addr = PeerAddr(self.identity.node_id, HOST, port)
        task_status.started(self.addr)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream = trio.SSLStream(tcp, self._context, server_side=True)
        decoder = FrameDecoder()
        try:
            await stream.do_handshake()
            await stream.send_all(encode(Challenge(self.identity.node_id, os.urandom(32))))
            hello = await read_message(stream, decoder)
            if not isinstance(hello, Hello):
                return
            self.hellos.append(hello)
            await stream.send_all(encode(Welcome(256)))
            await self.behaviour(self, stream, decoder)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def start_raw_server(nursery: trio.Nursery, behaviour: Behaviour) -> RawServer:
    server = RawServer(behaviour)
    await nursery.start(server.serve)
    return server


async def raw_client(
    addr: PeerAddr,
    identity: NodeIdentity,
    discovery_key: bytes,
    drive_secret: bytes,
    *,
    receive_buffer: int | None = None,
    corrupt_signature: bool = False,
) -> tuple[trio.SSLStream, FrameDecoder, Message | None]:
    """Connect and do the client handshake by hand; returns (stream, decoder, reply).

    `receive_buffer` pins SO_RCVBUF (no autotuning), so a client that stops
    reading backs the server up after a known, small amount of data.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect((addr.host, addr.port))
    stream = trio.SSLStream(trio.SocketStream(sock), client_context(), server_hostname=None)
    await stream.do_handshake()
    pinned_public_key(stream.getpeercert(binary_form=True), addr.node_id)
    decoder = FrameDecoder()
    challenge = await read_message(stream, decoder)
    assert isinstance(challenge, Challenge)
    proof = make_proof(drive_secret, challenge.server_id, challenge.nonce)
    signed = hello_signed_bytes(challenge.server_id, challenge.nonce, discovery_key, proof)
    sig = identity.sign(signed)
    if corrupt_signature:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    await stream.send_all(encode(Hello(identity.public_bytes, discovery_key, proof, sig)))
    reply = await read_message(stream, decoder)
    return stream, decoder, reply


def random_id() -> bytes:
    return secrets.token_bytes(32)
