"""The peer protocol on the wire: a block server and a client connection.

Transport is TCP + TLS 1.3 (see tls.py); on top run the length-prefixed
frames of frames.py. The server speaks first:

    server -> Challenge(server_id, nonce)
    client -> Hello(client_pubkey, discovery_key, proof, sig)
    server -> Welcome(max_wants) | Refused(reason)

`proof` shows the client knows the drive secret behind the discovery key
without revealing it; `sig` binds the client's node key to this server and
this nonce, so a Hello cannot be replayed to another server or later. After
Welcome the client pipelines Want frames; the server answers each with Block
or NotFound, most urgent priority first, and pushes Notice frames for the
drive whenever the layer above calls `PeerServer.notify`.

Each side runs one reader task and one writer task per connection, so a slow
send never stops us from reading cancels, and a frame is never interleaved
with another.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import secrets
import socket
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .errors import (
    BadBlockError,
    BlockNotFound,
    DhtError,
    FrameError,
    PeerGoneError,
    PeerIdentityError,
    PeerProtocolError,
    PeerRefusedError,
    PeerStuckError,
)
from .frames import (
    MAX_BLOCK,
    MAX_CLIENT_FRAME,
    MAX_FRAME,
    MAX_HAVE_IDS,
    MAX_REASON,
    MAX_REQ_ID,
    MAX_TOKEN,
    MAX_WANTS_LIMIT,
    NONCE_LEN,
    Block,
    Cancel,
    Challenge,
    FrameDecoder,
    Goodbye,
    Have,
    HaveReply,
    Hello,
    Holding,
    Message,
    NotFound,
    Notice,
    Ping,
    Pong,
    Push,
    Refused,
    Want,
    Welcome,
    encode,
    pack_bitmap,
    unpack_bitmap,
)
from .identity import NodeIdentity
from .tls import client_context, pinned_public_key, server_context
from .tlsstream import TlsStream
from .types import BLOCK_ID_LEN, DISCOVERY_KEY_LEN, PeerAddr, Priority

log = logging.getLogger(__name__)

PROOF_CONTEXT = b"peerdrive proof v1"
HELLO_CONTEXT = b"peerdrive hello v1"
PUSH_CONTEXT = b"peerdrive push v1"
DRIVE_SECRET_LEN = 32

HANDSHAKE_TIMEOUT = 10.0  # seconds for TCP connect + TLS + Challenge/Hello/Welcome
DEFAULT_MAX_WANTS = 256  # outstanding wants a server accepts per connection
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_MAX_PER_ADDRESS = 64  # connections from one IP address (a host, or a NAT)
# Connections still in their handshake: a server keeps at most this many (the oldest is
# dropped for a newcomer, so a slow-handshake flood cannot lock honest clients out), at
# most HANDSHAKING_PER_ADDRESS of them from one IP.
MAX_HANDSHAKING = 64
HANDSHAKING_PER_ADDRESS = 8
HAVE_RATE = 400.0  # Have frames (<= 120 ids each) one connection gets answered per second...
HAVE_BURST = 1024  # ...after a burst of this many (the copies of 120,000 blocks at once)
SEND_TIMEOUT = 30.0  # seconds one frame may take to go out before the peer counts as stuck
MAX_CONTROL_BACKLOG = 256  # queued Notice/Pong/HaveReply frames before a client counts as stuck
MAX_HAVES_IN_FLIGHT = 16  # Have requests one client connection keeps outstanding
MAX_HOLDING_REMEMBERED = 65536  # block ids a client remembers a server announced (Holding)
HOLDING_WAIT = 2.0  # seconds a server waits for its node's own fetch of an announced block
GOODBYE_GRACE = 2.0  # seconds to flush a Goodbye/Refused before closing anyway
RECEIVE_SIZE = MAX_FRAME  # a client takes whatever a socket read decrypted (blocks are big)
SERVER_RECEIVE_SIZE = 64 * 1024  # a server buffers at most this much of a client's frames
HASH_IN_THREAD_MIN = 64 * 1024  # hash blocks at least this big off the event loop
# Blocks a server connection reads from its source ahead of the one it is sending: a cold
# store read is a disk wait, and reading the next block while this one goes out keeps both
# the disk and the connection busy. Small, so a READ that arrives behind a PIN backlog waits
# for at most this many blocks.
LOOKAHEAD_BLOCKS = 2


def make_proof(drive_secret: bytes, server_id: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256(drive_secret, "peerdrive proof v1" || server_id || nonce)."""
    return hmac.new(drive_secret, PROOF_CONTEXT + server_id + nonce, hashlib.sha256).digest()


def hello_signed_bytes(server_id: bytes, nonce: bytes, discovery_key: bytes, proof: bytes) -> bytes:
    """The exact bytes a client signs with its node key in Hello."""
    return HELLO_CONTEXT + server_id + nonce + discovery_key + proof


def push_signed_bytes(server_id: bytes, nonce: bytes, discovery_key: bytes, proof: bytes) -> bytes:
    """The exact bytes a pushing dialer signs with its node key in Push."""
    return PUSH_CONTEXT + server_id + nonce + discovery_key + proof


@asynccontextmanager
async def open_task_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that is an implementation detail of a context manager.

    Errors from the caller's `async with` body (or a lone failing task) come
    out as themselves rather than wrapped in an ExceptionGroup, so callers can
    `except PeerGoneError` around our context managers as they would expect.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class BlockSource(Protocol):
    """Where a server finds blocks: the local cache store, or anything with this `get`.

    A source may also have `has(block_id) -> bool` (the store does), which
    answers Have without reading the block; without it `get` is used.
    """

    def get(self, block_id: bytes) -> bytes | None: ...


SecretLookup = Callable[[bytes], bytes | None] | Mapping[bytes, bytes]
MayServe = Callable[[bytes, bytes], bool]
"""(discovery key of the connection, block id) -> may that client have (or learn of) it?"""
OnNotice = Callable[[bytes, bytes], None]
InFlightLookup = Callable[[bytes, bytes, float], Awaitable[bytes | None]]


def _set_keepalive(stream: trio.SocketStream) -> None:
    """Let the kernel notice a peer that vanished without a FIN on an idle connection."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    except OSError:
        pass  # not fatal: timeouts above us still bound every wait


class _FrameStream:
    """Messages over a byte stream: one task may receive while another sends.

    A send that cannot complete within `send_timeout` (the peer stopped reading
    and its receive window is full) fails with PeerGoneError: a peer that never
    reads must not hold our writer, and the memory queued for it, for ever.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str, max_frame: int = MAX_FRAME,
                 send_timeout: float = SEND_TIMEOUT, receive_size: int = RECEIVE_SIZE) -> None:
        self.stream = stream
        self.peer = peer
        self.send_timeout = send_timeout
        self.receive_size = receive_size
        self._decoder = FrameDecoder(max_frame)

    async def receive(self) -> Message:
        while True:
            try:
                msg = self._decoder.next_event()
            except FrameError as exc:
                raise PeerProtocolError(f"{self.peer} sent a bad frame: {exc}") from None
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(self.receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGoneError(f"connection to {self.peer} broke: {exc}") from None
            if not data:
                raise PeerGoneError(f"{self.peer} closed the connection")
            try:
                self._decoder.feed(data)
            except FrameError as exc:
                raise PeerProtocolError(f"{self.peer} sent a bad frame: {exc}") from None

    def set_max_frame(self, max_frame: int) -> None:
        self._decoder.set_max_frame(max_frame)

    async def send(self, msg: Message) -> None:
        await self.send_bytes(encode(msg))

    async def send_bytes(self, frame: bytes) -> None:
        try:
            with trio.fail_after(self.send_timeout):
                await self.stream.send_all(frame)
        except trio.TooSlowError:
            raise PeerStuckError(
                f"{self.peer} read nothing for {self.send_timeout:g}s; connection dropped"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGoneError(f"connection to {self.peer} broke: {exc}") from None


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close gracefully if the peer lets us within a moment, else drop the socket."""
    with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_GRACE) as scope:
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


# ==== server =================================================================


@dataclass
class ServerStats:
    """Counters for one PeerServer (status output and tests)."""

    connections_accepted: int = 0
    connections_active: int = 0
    connections_rejected: int = 0  # over max_connections or max_per_address
    handshakes_evicted: int = 0  # dropped mid-handshake to make room (MAX_HANDSHAKING)
    send_timeouts: int = 0  # clients dropped because they stopped reading
    out_of_scope: int = 0  # wants for blocks not of the connection's drive (answered NotFound)
    haves_delayed: int = 0  # Have frames that waited for their connection's rate
    handshakes_refused: int = 0
    handshakes_failed: int = 0  # timed out or broke before Welcome
    protocol_errors: int = 0
    wants_received: int = 0
    cancels_received: int = 0
    haves_received: int = 0
    blocks_served: int = 0
    bytes_served: int = 0
    not_found: int = 0
    source_errors: int = 0
    notices_sent: int = 0
    pushes_accepted: int = 0  # push connections: the dialer serves, we fetch (see dht/push.py)
    holdings_sent: int = 0  # Holding frames pushed (one per client per announcement)
    served_in_flight: int = 0  # blocks served once the node's own fetch of them landed


class PeerServer:
    """Serves blocks from `block_source` to clients that prove they know a drive secret.

    `secrets` maps a discovery key to its 32-byte drive secret (a Mapping, or
    a callable returning None for keys this node does not serve); it is
    consulted at every handshake, so the set may change while serving.
    `may_serve(discovery_key, block_id)`, if given, scopes every want and have
    to the connection's drive: a block it refuses is answered exactly as a
    block this node lacks, so a client of one drive can neither read another
    drive's blocks by id nor learn which of them this node holds.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        block_source: BlockSource,
        secrets: SecretLookup,
        *,
        max_wants: int = DEFAULT_MAX_WANTS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        may_serve: MayServe | None = None,
        have_rate: float = HAVE_RATE,
        have_burst: int = HAVE_BURST,
        in_flight: InFlightLookup | None = None,
        on_client_lost: Callable[[bytes], None] | None = None,
        on_client_joined: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        """`in_flight(discovery_key, block_id, timeout)`, if given, is asked for a block the
        source lacks: the node may be fetching it right now (it announced it with
        `announce_holding`), and its answer, bytes or None, is what the client gets.
        `on_client_lost(client node id)` is told of a client whose connection broke
        without a Goodbye: its node may be gone (the DHT then checks its contact).
        `on_client_joined(discovery_key, client node id)` is told of every client past
        the handshake: another reader of the drive, which may serve it too."""
        if not 1 <= max_wants <= MAX_WANTS_LIMIT:
            raise ValueError(f"max_wants must be within 1..{MAX_WANTS_LIMIT}")
        self.identity = identity
        self.block_source = block_source
        self._secrets = secrets
        self.max_wants = max_wants
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.may_serve = may_serve
        self.have_rate = have_rate
        self.have_burst = have_burst
        self.stats = ServerStats()
        self.port: int | None = None
        self._ssl_context = server_context(identity)
        self._clients: dict[bytes, set[_ServerConnection]] = {}
        # A push connection (a dialer serving us a drive, dht/push.py) is accepted only when
        # the layer above takes it: on_push gets the running client connection.
        self.on_push: Callable[[PeerConnection], Awaitable[None]] | None = None
        self.push_notice: OnNotice | None = None  # notices arriving on push connections
        self._per_address: dict[str, int] = {}  # open connections by client IP
        # connections in their handshake, oldest first: (IP, the scope that ends it)
        self._handshaking: dict[trio.CancelScope, str] = {}
        self._in_flight = in_flight
        self._on_client_lost = on_client_lost
        self._on_client_joined = on_client_joined

    # ---- public -------------------------------------------------------------

    async def serve(
        self,
        listen_host: str | None,
        listen_port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until cancelled; reports the bound port through task_status."""
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
        ports = {listener.socket.getsockname()[1] for listener in listeners}
        if len(ports) > 1:
            # Port 0 on a host with several addresses: each got its own port.
            # Rebind them all to the first one so the node has one port.
            port = listeners[0].socket.getsockname()[1]
            for listener in listeners:
                await listener.aclose()
            listeners = await trio.open_tcp_listeners(port, host=listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def notify(self, discovery_key: bytes, record: bytes) -> int:
        """Push Notice(discovery_key, record) to every client of that key; returns how many."""
        notice = Notice(discovery_key, record)
        frame = encode(notice)  # validates: FrameError if the record is too big
        sent = 0
        for conn in list(self._clients.get(discovery_key, ())):
            if conn.push_control(notice, frame):
                sent += 1
        self.stats.notices_sent += sent
        await trio.lowlevel.checkpoint()
        return sent

    def announce_holding(self, discovery_key: bytes, block_ids: Sequence[bytes]) -> int:
        """Push Holding(block_ids) to every client of that key; returns how many got it.

        A hint: a client whose control queue is half full is skipped rather
        than dropped for it.
        """
        sent = 0
        clients = self._clients.get(discovery_key)
        if not clients or not block_ids:
            return 0
        ids = list(block_ids)
        frames = [encode(Holding(tuple(ids[i : i + MAX_HAVE_IDS])))
                  for i in range(0, len(ids), MAX_HAVE_IDS)]
        for conn in list(clients):
            if conn.control_backlog + len(frames) > MAX_CONTROL_BACKLOG // 2:
                continue
            for frame in frames:
                conn.push_control(None, frame)
            sent += 1
        self.stats.holdings_sent += sent
        return sent

    async def say_goodbye(self) -> None:
        """Tell every client this node is leaving (Goodbye), so none waits on it; a clean
        stop calls this before cancelling the server."""
        for clients in list(self._clients.values()):
            for conn in list(clients):
                conn.leave("the node is shutting down")
        with trio.move_on_after(GOODBYE_GRACE):
            while any(self._clients.values()):
                await trio.sleep(0.01)

    def connected_clients(self, discovery_key: bytes | None = None) -> int:
        """Clients past the handshake, for one discovery key or all."""
        if discovery_key is not None:
            return len(self._clients.get(discovery_key, ()))
        return sum(len(conns) for conns in self._clients.values())

    # ---- internals ----------------------------------------------------------

    def _secret_for(self, discovery_key: bytes) -> bytes | None:
        if isinstance(self._secrets, Mapping):
            secret = self._secrets.get(discovery_key)
        else:
            secret = self._secrets(discovery_key)
        if secret is None or len(secret) != DRIVE_SECRET_LEN:
            return None
        return secret

    def _allowed(self, discovery_key: bytes, block_id: bytes) -> bool:
        """Whether a client of `discovery_key` may learn of `block_id` (a failing check: no)."""
        if self.may_serve is None:
            return True
        try:
            return bool(self.may_serve(discovery_key, block_id))
        except Exception:
            self.stats.source_errors += 1
            log.exception("may_serve failed on %s", block_id.hex()[:12])
            return False

    def _lookup(self, discovery_key: bytes, block_id: bytes) -> bytes | None:
        if not self._allowed(discovery_key, block_id):
            self.stats.out_of_scope += 1
            return None  # the same NotFound as a block we lack: nothing to learn from it
        try:
            data = self.block_source.get(block_id)
        except Exception:
            # A store failure must not take the server down for every other
            # block; the client hears NotFound and asks someone else.
            self.stats.source_errors += 1
            log.exception("block source failed on %s", block_id.hex()[:12])
            return None
        if data is None:
            return None
        if type(data) is not bytes:
            data = bytes(data)
        if len(data) > MAX_BLOCK:
            self.stats.source_errors += 1
            return None
        return data

    def _holds(self, discovery_key: bytes, block_ids: tuple[bytes, ...]) -> list[bool]:
        """Which of these blocks the source holds for this drive (a failing source: none)."""
        source = self.block_source
        has = getattr(source, "has", None)
        out = []
        for block_id in block_ids:
            try:
                held = self._allowed(discovery_key, block_id) and (
                    bool(has(block_id)) if has is not None else source.get(block_id) is not None)
            except Exception:
                self.stats.source_errors += 1
                log.exception("block source failed on %s", block_id.hex()[:12])
                held = False
            out.append(held)
        return out

    def _admit(self, host: str) -> bool:
        """Whether a new connection from `host` may have a slot; makes room among handshakes.

        Limits: `max_connections` in all, `max_per_address` per IP, and of those
        still in their handshake HANDSHAKING_PER_ADDRESS per IP and MAX_HANDSHAKING
        in all, where the oldest handshake is dropped to admit a newcomer (an
        honest handshake takes milliseconds; one that idles is what a flood is).
        """
        if self.stats.connections_active >= self.max_connections:
            return False
        if self._per_address.get(host, 0) >= self.max_per_address:
            return False
        if sum(1 for h in self._handshaking.values() if h == host) >= HANDSHAKING_PER_ADDRESS:
            return False
        if len(self._handshaking) >= MAX_HANDSHAKING:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            oldest.cancel()
            self.stats.handshakes_evicted += 1
        return True

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stats = self.stats
        stats.connections_accepted += 1
        host = _peer_host(tcp)
        if not self._admit(host):
            stats.connections_rejected += 1
            await trio.aclose_forcefully(tcp)
            return
        stats.connections_active += 1
        self._per_address[host] = self._per_address.get(host, 0) + 1
        _set_keepalive(tcp)
        peer = _peer_name(tcp)
        ssl_stream = TlsStream(tcp, self._ssl_context, server_side=True)
        conn: _ServerConnection | None = None
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                self._handshaking[scope] = host
                try:
                    conn = await self._handshake(ssl_stream, peer)
                finally:
                    self._handshaking.pop(scope, None)
            if scope.cancelled_caught:  # timed out, or evicted for a newer handshake
                stats.handshakes_failed += 1
                return
            if conn is None:
                return
            if isinstance(conn, _PushAccepted):
                await self._run_pushed(conn, tcp)
                return
            await self.serve_connection(conn)
        except PeerProtocolError:
            stats.protocol_errors += 1
        except PeerGoneError:
            if conn is None:
                stats.handshakes_failed += 1
        finally:
            stats.connections_active -= 1
            left = self._per_address.get(host, 1) - 1
            if left:
                self._per_address[host] = left
            else:
                self._per_address.pop(host, None)
            await _close_quietly(ssl_stream)

    async def serve_connection(self, conn: _ServerConnection) -> None:
        """Serve one client past its handshake (accepted, or dialled by a push) until it ends."""
        self._clients.setdefault(conn.discovery_key, set()).add(conn)
        if self._on_client_joined is not None:
            self._on_client_joined(conn.discovery_key, conn.client_id)
        try:
            await conn.run()
        finally:
            clients = self._clients.get(conn.discovery_key)
            if clients is not None:
                clients.discard(conn)
                if not clients:
                    del self._clients[conn.discovery_key]
            if not conn.client_left and self._on_client_lost is not None:
                self._on_client_lost(conn.client_id)

    async def _run_pushed(self, accepted: _PushAccepted, tcp: trio.SocketStream) -> None:
        """A dialer serves us a drive over its connection: be its client until it ends."""
        frames = accepted.frames
        frames.set_max_frame(MAX_FRAME)  # blocks come this way now
        with trio.move_on_after(self.handshake_timeout):
            welcome = await frames.receive()
        if not isinstance(welcome, Welcome):
            return  # timed out, or not the Welcome a pushing dialer sends: drop it
        try:
            host, port = tcp.socket.getpeername()[:2]
        except OSError:
            host, port = "pushed", 0
        addr = PeerAddr(accepted.client_id, str(host), int(port))
        conn = PeerConnection(addr, accepted.discovery_key, frames, accepted.client_pubkey,
                              welcome.max_wants, self.push_notice)
        self.stats.pushes_accepted += 1
        async with trio.open_nursery() as nursery:
            await nursery.start(conn._run)
            assert self.on_push is not None
            await self.on_push(conn)
            await conn.wait_closed()

    async def _handshake(self, ssl_stream: TlsStream, peer: str
                         ) -> _ServerConnection | _PushAccepted | None:
        try:
            await ssl_stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGoneError(f"TLS handshake with {peer} failed: {exc}") from None
        frames = _FrameStream(ssl_stream, peer, MAX_CLIENT_FRAME, self.send_timeout,
                              SERVER_RECEIVE_SIZE)
        nonce = secrets.token_bytes(NONCE_LEN)
        server_id = self.identity.node_id
        await frames.send(Challenge(server_id, nonce))
        hello = await frames.receive()
        if isinstance(hello, Push):
            return await self._push_handshake(frames, hello, nonce)
        if not isinstance(hello, Hello):
            self.stats.protocol_errors += 1
            await frames.send(Refused(f"expected hello, got {hello.TYPE}"))
            return None
        signed = hello_signed_bytes(server_id, nonce, hello.discovery_key, hello.proof)
        secret = self._secret_for(hello.discovery_key)
        # Compute the proof even for an unknown key, and give one answer for
        # both, so a prober cannot tell which drives this node serves.
        expected = make_proof(secret or bytes(DRIVE_SECRET_LEN), server_id, nonce)
        proof_ok = hmac.compare_digest(expected, hello.proof) and secret is not None
        if not NodeIdentity.verify(hello.client_pubkey, hello.sig, signed):
            reason = "bad hello signature"
        elif not proof_ok:
            reason = "this node does not serve that drive, or the proof is wrong"
        else:
            await frames.send(Welcome(self.max_wants))
            client_id = hashlib.sha256(hello.client_pubkey).digest()
            return _ServerConnection(self, frames, hello.discovery_key, client_id)
        self.stats.handshakes_refused += 1
        await frames.send(Refused(reason))
        return None

    async def _push_handshake(self, frames: _FrameStream, push: Push, nonce: bytes
                              ) -> _PushAccepted | None:
        """Check a Push as a Hello (own signature context); accept it only if on_push is set."""
        server_id = self.identity.node_id
        signed = push_signed_bytes(server_id, nonce, push.discovery_key, push.proof)
        secret = self._secret_for(push.discovery_key)
        expected = make_proof(secret or bytes(DRIVE_SECRET_LEN), server_id, nonce)
        proof_ok = (hmac.compare_digest(expected, push.proof) and secret is not None
                    and self.on_push is not None)
        if not NodeIdentity.verify(push.client_pubkey, push.sig, signed):
            reason = "bad push signature"
        elif not proof_ok:
            reason = "this node does not serve that drive, or the proof is wrong"
        else:
            await frames.send(Welcome(self.max_wants))
            client_id = hashlib.sha256(push.client_pubkey).digest()
            return _PushAccepted(frames, push.discovery_key, push.client_pubkey, client_id)
        self.stats.handshakes_refused += 1
        await frames.send(Refused(reason))
        return None


@dataclass
class _PushAccepted:
    """A push handshake that passed: the dialer will serve, we will fetch."""

    frames: _FrameStream
    discovery_key: bytes
    client_pubkey: bytes
    client_id: bytes


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "client"
    return f"{host}:{port}"


class _Lookup:
    """One wanted block on its way from the source to the wire."""

    __slots__ = ("req_id", "seq", "data", "done")

    def __init__(self, req_id: int, seq: int) -> None:
        self.req_id = req_id
        self.seq = seq
        self.data: bytes | None = None
        self.done = False


def _sha256_each(blocks: list[bytes]) -> list[bytes]:
    return [hashlib.sha256(b).digest() for b in blocks]


class _ServerConnection:
    """One accepted client: a priority queue of wants and a queue of control frames."""

    def __init__(
        self,
        server: PeerServer,
        frames: _FrameStream,
        discovery_key: bytes,
        client_id: bytes,
    ) -> None:
        self.server = server
        self.frames = frames
        self.discovery_key = discovery_key
        self.client_id = client_id
        # heap of (priority, seq, req_id); `wants` maps req_id -> (seq, block_id)
        # and is the truth: heap entries whose seq no longer matches are stale.
        self._queue: list[tuple[int, int, int]] = []
        self._wants: dict[int, tuple[int, bytes]] = {}
        self._seq = 0
        self._control: deque[bytes] = deque()
        # blocks being read from the source or read, in the order they go out
        self._ready: deque[_Lookup] = deque()
        self._wake = trio.Event()  # the writer: a control frame or a looked-up block is ready
        self._load_wake = trio.Event()  # the loader: a new want, or room in `_ready`
        self._scope: trio.CancelScope | None = None
        self._goodbye_sent = False
        self._have_tokens = float(server.have_burst)
        self._have_at = trio.current_time()
        self.client_left = False  # the client said Goodbye

    @property
    def control_backlog(self) -> int:
        return len(self._control)

    def push_control(self, msg: Message | None, frame: bytes | None = None) -> bool:
        """Queue a control frame ahead of blocks; a client that never reads them is dropped."""
        if self._goodbye_sent:
            return False
        if len(self._control) >= MAX_CONTROL_BACKLOG:
            self._protocol_violation("not reading control frames")
            return False
        if frame is None:
            assert msg is not None
            frame = encode(msg)
        self._control.append(frame)
        self._wake.set()
        return True

    def leave(self, reason: str) -> None:
        """Say Goodbye(reason) and close, after a short grace for the frame to go out."""
        if self._goodbye_sent:
            return
        self._control.clear()
        self._control.append(encode(Goodbye(reason[:MAX_REASON])))
        self._goodbye_sent = True
        self._wake.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + GOODBYE_GRACE)

    def _protocol_violation(self, reason: str) -> None:
        """Say Goodbye(reason) and close, giving the writer a short grace to flush it."""
        if self._goodbye_sent:
            return
        self.server.stats.protocol_errors += 1
        self._control.clear()
        self._control.append(encode(Goodbye(reason[:MAX_REASON])))
        self._goodbye_sent = True
        self._wake.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + GOODBYE_GRACE)

    async def run(self) -> None:
        """Serve until the client leaves or misbehaves; errors end the connection, not the server."""
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._writer)
            nursery.start_soon(self._loader, nursery)
            try:
                await self._reader()
            except PeerProtocolError as exc:
                self._protocol_violation(str(exc))
                await trio.sleep_forever()  # until the Goodbye is flushed or the grace ends
            except PeerGoneError:
                nursery.cancel_scope.cancel()

    async def _reader(self) -> None:
        stats = self.server.stats
        max_wants = self.server.max_wants
        while not self._goodbye_sent:
            msg = await self.frames.receive()
            if isinstance(msg, Want):
                if msg.req_id in self._wants:
                    self._protocol_violation(f"duplicate request id {msg.req_id}")
                elif len(self._wants) >= max_wants:
                    self._protocol_violation(f"more than {max_wants} outstanding wants")
                else:
                    stats.wants_received += 1
                    self._seq += 1
                    self._wants[msg.req_id] = (self._seq, msg.block_id)
                    heapq.heappush(self._queue, (int(msg.priority), self._seq, msg.req_id))
                    self._load_wake.set()
            elif isinstance(msg, Cancel):
                stats.cancels_received += 1
                if self._wants.pop(msg.req_id, None) is not None:
                    self._compact_queue()
            elif isinstance(msg, Have):
                # answered at once, ahead of queued blocks: a presence check is cheap, but
                # 240 store reads per 4 KiB frame on the event loop are not free, so a
                # client past its rate waits (we stop reading it: TCP pushes back)
                await self._have_budget()
                stats.haves_received += 1
                bitmap = pack_bitmap(self.server._holds(self.discovery_key, msg.block_ids))
                self.push_control(HaveReply(msg.req_id, bitmap))
                await trio.lowlevel.checkpoint()
            elif isinstance(msg, Ping):
                self.push_control(Pong(msg.token))
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, Goodbye):
                self.client_left = True
                break
            else:
                self._protocol_violation(f"unexpected {msg.TYPE} frame")
        if not self._goodbye_sent:
            # The client said goodbye: nothing more to send.
            assert self._scope is not None
            self._scope.cancel()
        else:
            # Wait for the writer to flush our Goodbye (bounded by the deadline).
            await trio.sleep_forever()

    async def _have_budget(self) -> None:
        """Take one Have from this connection's token bucket, sleeping until there is one."""
        rate, burst = self.server.have_rate, self.server.have_burst
        now = trio.current_time()
        self._have_tokens = min(burst, self._have_tokens + (now - self._have_at) * rate)
        self._have_at = now
        if self._have_tokens < 1:
            self.server.stats.haves_delayed += 1
            await trio.sleep((1 - self._have_tokens) / rate)
            self._have_tokens, self._have_at = 1.0, trio.current_time()
        self._have_tokens -= 1

    def _compact_queue(self) -> None:
        """Drop cancelled entries from the heap once they outnumber the live ones.

        A Cancel only forgets the want; its heap entry stays until popped, so
        want-then-cancel pairs would otherwise grow the heap without bound
        (`max_wants` bounds live wants only). Rebuilding when over half is stale
        keeps the heap under 2 x max_wants + 16 entries at amortised O(1) each.
        """
        if len(self._queue) > 2 * len(self._wants) + 16:
            wants = self._wants
            self._queue = [e for e in self._queue
                           if (w := wants.get(e[2])) is not None and w[0] == e[1]]
            heapq.heapify(self._queue)

    def _next_want(self) -> tuple[int, int, bytes] | None:
        while self._queue:
            _prio, seq, req_id = heapq.heappop(self._queue)
            want = self._wants.get(req_id)
            if want is not None and want[0] == seq:
                return req_id, seq, want[1]
        return None

    async def _loader(self, nursery: trio.Nursery) -> None:
        """Read wanted blocks from the source in worker threads, most urgent first.

        A store read can wait on the disk; in a thread it neither stalls the
        event loop (every other connection, the DHT) nor this connection's
        sends. Up to LOOKAHEAD_BLOCKS reads run at once, so the disk works on
        the next blocks while this one goes out; they are sent in the order
        they were taken.
        """
        while True:
            want = None
            if not self._goodbye_sent and len(self._ready) < LOOKAHEAD_BLOCKS:
                want = self._next_want()
            if want is None:
                self._load_wake = trio.Event()
                await self._load_wake.wait()
                continue
            req_id, seq, block_id = want
            lookup = _Lookup(req_id, seq)
            self._ready.append(lookup)
            nursery.start_soon(self._look_up, lookup, block_id)

    async def _look_up(self, lookup: _Lookup, block_id: bytes) -> None:
        lookup.data = await trio.to_thread.run_sync(self.server._lookup, self.discovery_key,
                                                     block_id)
        in_flight = self.server._in_flight
        if lookup.data is None and in_flight is not None:
            # Perhaps announced by our node and still on its way here: wait for it,
            # out of the send queue, so the blocks wanted after it go out meanwhile.
            self._ready.remove(lookup)
            self._load_wake.set()
            lookup.data = await in_flight(self.discovery_key, block_id, HOLDING_WAIT)
            if lookup.data is not None:
                self.server.stats.served_in_flight += 1
            self._ready.append(lookup)
        lookup.done = True
        self._wake.set()

    async def _writer(self) -> None:
        stats = self.server.stats
        try:
            while True:
                if self._control:
                    frame = self._control.popleft()
                    await self.frames.send_bytes(frame)
                    if self._goodbye_sent and not self._control:
                        assert self._scope is not None
                        self._scope.cancel()
                        return
                    continue
                if self._goodbye_sent or not self._ready or not self._ready[0].done:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                lookup = self._ready.popleft()
                req_id, seq, data = lookup.req_id, lookup.seq, lookup.data
                self._load_wake.set()
                current = self._wants.get(req_id)
                if current is None or current[0] != seq:
                    continue  # cancelled (or its id re-used) while it was being read
                if data is None:
                    stats.not_found += 1
                    reply: Message = NotFound(req_id)
                else:
                    reply = Block(req_id, data)
                await self.frames.send(reply)
                if data is not None:
                    stats.blocks_served += 1
                    stats.bytes_served += len(data)
                # Still outstanding until sent; a Cancel meanwhile already
                # removed it, and a re-used req_id has a newer seq.
                current = self._wants.get(req_id)
                if current is not None and current[0] == seq:
                    del self._wants[req_id]
                await trio.lowlevel.checkpoint()
        except PeerGoneError as exc:
            if isinstance(exc, PeerStuckError):
                stats.send_timeouts += 1
            assert self._scope is not None
            self._scope.cancel()


# ==== client =================================================================


@dataclass
class ConnectionStats:
    """Counters for one PeerConnection."""

    wants_sent: int = 0
    cancels_sent: int = 0
    blocks: int = 0
    bytes: int = 0
    not_found: int = 0
    unsolicited: int = 0  # answers to wants we had already cancelled
    notices: int = 0
    haves_sent: int = 0
    holdings: int = 0  # Holding frames received


class _Pending:
    __slots__ = ("block_id", "done", "result", "error", "sent")

    def __init__(self, block_id: bytes) -> None:
        self.block_id = block_id
        self.done = trio.Event()
        self.result: bytes | None = None
        self.error: DhtError | None = None
        self.sent = False

    def succeed(self, data: bytes) -> None:
        self.result = data
        self.done.set()

    def fail(self, error: DhtError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _PendingHave:
    __slots__ = ("count", "done", "result", "error")

    def __init__(self, count: int) -> None:
        self.count = count
        self.done = trio.Event()
        self.result: list[bool] = []
        self.error: DhtError | None = None

    def succeed(self, flags: list[bool]) -> None:
        self.result = flags
        self.done.set()

    def fail(self, error: DhtError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class PeerConnection:
    """A client connection to one peer for one discovery key, with pipelined fetches.

    Make one with `connect` (its tasks run in a nursery you pass) or `open`
    (an async context manager owning its tasks). Every `fetch` awaits its own
    answer; any number may be in flight (up to the server's announced limit,
    beyond which fetches queue locally). Each block is checked against its id.
    """

    def __init__(
        self,
        addr: PeerAddr,
        discovery_key: bytes,
        frames: _FrameStream,
        peer_public_key: bytes,
        max_wants: int,
        on_notice: OnNotice | None,
    ) -> None:
        self.addr = addr
        self.discovery_key = discovery_key
        self.peer_public_key = peer_public_key
        self.max_wants = max_wants
        self.stats = ConnectionStats()
        self._frames = frames
        self._on_notice = on_notice
        self._slots = trio.Semaphore(max_wants)
        self._pending: dict[int, _Pending] = {}
        self._pings: dict[int, trio.Event] = {}
        self._haves: dict[int, _PendingHave] = {}
        self._have_slots = trio.Semaphore(MAX_HAVES_IN_FLIGHT)
        self._next_id = secrets.randbelow(MAX_REQ_ID + 1)
        self._outgoing: deque[Message] = deque()
        self._wake = trio.Event()
        # large blocks received and waiting for their hash check (see _verifier)
        self._unverified: deque[tuple[_Pending, bytes]] = deque()
        self._unverified_added = trio.Event()
        self._error: DhtError | None = None
        self._scope: trio.CancelScope | None = None
        self._finished = trio.Event()
        self._send_goodbye = False
        self._pongs_queued = 0  # answers to the peer's pings not yet written (bounded)
        # blocks the server announced (Holding), oldest first; a bounded set
        self.holding: OrderedDict[bytes, None] = OrderedDict()

    # ---- construction -------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        addr: PeerAddr,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        *,
        nursery: trio.Nursery,
        on_notice: OnNotice | None = None,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> PeerConnection:
        """Dial `addr`, pin its key, prove the drive secret; the reader/writer run in `nursery`.

        Raises PeerGoneError (unreachable, broke, timed out), PeerIdentityError
        (not the node we pinned) or PeerRefusedError (the peer said no).
        """
        if len(discovery_key) != DISCOVERY_KEY_LEN or len(drive_secret) != DRIVE_SECRET_LEN:
            raise DhtError("discovery key and drive secret must be 32 bytes each")
        conn = await cls._establish(addr, identity, discovery_key, drive_secret, on_notice, timeout)
        await nursery.start(conn._run)
        return conn

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        addr: PeerAddr,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        *,
        on_notice: OnNotice | None = None,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> AsyncIterator[PeerConnection]:
        """`async with PeerConnection.open(...) as conn:` — closed on exit."""
        if len(discovery_key) != DISCOVERY_KEY_LEN or len(drive_secret) != DRIVE_SECRET_LEN:
            raise DhtError("discovery key and drive secret must be 32 bytes each")
        conn = await cls._establish(addr, identity, discovery_key, drive_secret, on_notice, timeout)
        async with open_task_nursery() as nursery:
            await nursery.start(conn._run)
            try:
                yield conn
            finally:
                await conn.aclose()

    @classmethod
    async def _establish(
        cls,
        addr: PeerAddr,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        on_notice: OnNotice | None,
        timeout: float,
    ) -> PeerConnection:
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(timeout):
                tcp = await trio.open_tcp_stream(addr.host, addr.port)
                stream = tcp
                _set_keepalive(tcp)
                ssl_stream = TlsStream(tcp, client_context())
                stream = ssl_stream
                await ssl_stream.do_handshake()
                peer_key = pinned_public_key(ssl_stream.getpeercert(binary_form=True), addr.node_id)
                frames = _FrameStream(ssl_stream, str(addr))
                challenge = await frames.receive()
                if not isinstance(challenge, Challenge):
                    raise PeerProtocolError(f"{addr} sent {challenge.TYPE} instead of a challenge")
                if challenge.server_id != addr.node_id:
                    raise PeerIdentityError(
                        f"{addr} claims to be node {challenge.server_id.hex()[:12]} in its challenge"
                    )
                proof = make_proof(drive_secret, challenge.server_id, challenge.nonce)
                signed = hello_signed_bytes(
                    challenge.server_id, challenge.nonce, discovery_key, proof
                )
                await frames.send(
                    Hello(identity.public_bytes, discovery_key, proof, identity.sign(signed))
                )
                reply = await frames.receive()
                if isinstance(reply, Refused | Goodbye):
                    raise PeerRefusedError(f"{addr} refused the connection: {reply.reason}")
                if not isinstance(reply, Welcome):
                    raise PeerProtocolError(f"{addr} sent {reply.TYPE} instead of welcome")
        except trio.TooSlowError:
            await _abort(stream)
            raise PeerGoneError(f"handshake with {addr} timed out after {timeout:g}s") from None
        except OSError as exc:
            await _abort(stream)
            reason = exc.strerror or str(exc)
            raise PeerGoneError(f"cannot connect to {addr}: {reason}") from None
        except trio.BrokenResourceError as exc:
            await _abort(stream)
            raise PeerGoneError(f"TLS handshake with {addr} failed: {exc}") from None
        except BaseException:
            await _abort(stream)
            raise
        return cls(addr, discovery_key, frames, peer_key, reply.max_wants, on_notice)

    # ---- public -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def in_flight(self) -> int:
        """Fetches awaiting an answer on this connection."""
        return len(self._pending)

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        """The block's bytes, verified against `block_id`.

        Raises BlockNotFound, BadBlockError (the connection is then closed),
        or PeerGoneError. Cancelling the caller sends Cancel to the peer.
        """
        if len(block_id) != BLOCK_ID_LEN:
            raise DhtError(f"block id must be {BLOCK_ID_LEN} bytes, got {len(block_id)}")
        priority = Priority(priority)
        self._raise_if_closed()
        async with self._slots:
            self._raise_if_closed()
            req_id = self._allocate(self._pending)
            pending = _Pending(block_id)
            self._pending[req_id] = pending
            self._send(Want(req_id, block_id, priority))
            try:
                await pending.done.wait()
            except BaseException:
                if self._pending.pop(req_id, None) is not None and pending.sent:
                    if not self.closed:
                        self._send(Cancel(req_id))
                raise
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def have(self, block_ids: Sequence[bytes]) -> list[bool]:
        """Which of `block_ids` the peer holds, in order (it reads no block to answer).

        Asked `MAX_HAVE_IDS` ids per Have frame, at most `MAX_HAVES_IN_FLIGHT`
        frames outstanding. Raises PeerGoneError if the connection dies first
        (PeerProtocolError if the peer answers with a malformed bitmap).
        """
        ids = list(block_ids)
        for block_id in ids:
            if type(block_id) is not bytes or len(block_id) != BLOCK_ID_LEN:
                raise DhtError(f"block ids must be {BLOCK_ID_LEN} bytes")
        self._raise_if_closed()
        flags = [False] * len(ids)
        starts = iter(range(0, len(ids), MAX_HAVE_IDS))
        errors: list[DhtError] = []

        async def worker() -> None:
            for start in starts:
                part = tuple(ids[start : start + MAX_HAVE_IDS])
                try:
                    flags[start : start + len(part)] = await self._have_one(part)
                except DhtError as exc:
                    errors.append(exc)
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(min(MAX_HAVES_IN_FLIGHT, -(-len(ids) // MAX_HAVE_IDS))):
                nursery.start_soon(worker)
        if errors:
            raise errors[0]
        return flags

    async def _have_one(self, part: tuple[bytes, ...]) -> list[bool]:
        async with self._have_slots:
            self._raise_if_closed()
            req_id = self._allocate(self._haves)
            pending = self._haves[req_id] = _PendingHave(len(part))
            self.stats.haves_sent += 1
            self._send(Have(req_id, part))
            try:
                await pending.done.wait()
            finally:
                self._haves.pop(req_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def ping(self) -> float:
        """Round-trip time to the peer in seconds (PeerGoneError if the connection dies)."""
        self._raise_if_closed()
        token = self._allocate(self._pings)
        event = self._pings[token] = trio.Event()
        start = trio.current_time()
        self._send(Ping(token))
        try:
            await event.wait()
        finally:
            self._pings.pop(token, None)
        self._raise_if_closed()
        return trio.current_time() - start

    async def aclose(self) -> None:
        """Say goodbye, close, and fail anything still pending with PeerGoneError."""
        if self._error is None:
            self._error = PeerGoneError(f"connection to {self.addr} was closed")
            self._send_goodbye = True
            if self._scope is not None:
                self._scope.cancel()
        await self._finished.wait()

    async def wait_closed(self) -> DhtError:
        """Wait until the connection ends; returns why."""
        await self._finished.wait()
        assert self._error is not None
        return self._error

    # ---- internals ----------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise self._error

    def _allocate(self, in_use: Mapping[int, Any]) -> int:
        limit = MAX_REQ_ID if in_use is self._pending else MAX_TOKEN
        while True:
            value = self._next_id
            self._next_id = 0 if value >= limit else value + 1
            if value not in in_use:
                return value

    def _send(self, msg: Message) -> None:
        self._outgoing.append(msg)
        self._wake.set()

    def _fail(self, error: DhtError) -> None:
        if self._error is None:
            self._error = error
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                nursery.start_soon(self._verifier)
                task_status.started()
        finally:
            if self._error is None:
                self._error = PeerGoneError(f"connection to {self.addr} ended")
            for pending in self._pending.values():
                pending.fail(self._error)
            self._pending.clear()
            for pending, _ in self._unverified:
                pending.fail(self._error)
            self._unverified.clear()
            for have in self._haves.values():
                have.fail(self._error)
            self._haves.clear()
            for event in self._pings.values():
                event.set()
            stream = self._frames.stream
            if self._send_goodbye:
                with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_GRACE / 4):
                    try:
                        await self._frames.send(Goodbye("closing"))
                    except (DhtError, trio.BusyResourceError):
                        pass
            await trio.aclose_forcefully(stream)
            self._finished.set()

    async def _writer(self) -> None:
        """Send queued requests, everything queued so far in one write.

        A sequential reader asks for several blocks at once (its readahead):
        one TLS record and one system call for all of them, not one each.
        """
        try:
            while True:
                if not self._outgoing:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                frames: list[bytes] = []
                while self._outgoing:
                    msg = self._outgoing.popleft()
                    if isinstance(msg, Want):
                        pending = self._pending.get(msg.req_id)
                        if pending is None:
                            continue  # cancelled before it left: nothing to tell the peer
                        pending.sent = True
                        self.stats.wants_sent += 1
                    elif isinstance(msg, Cancel):
                        self.stats.cancels_sent += 1
                    elif isinstance(msg, Pong):
                        self._pongs_queued -= 1
                    frames.append(encode(msg))
                if frames:
                    await self._frames.send_bytes(b"".join(frames))
        except DhtError as exc:
            self._fail(exc)

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self._frames.receive()
                if isinstance(msg, Block):
                    await self._on_block(msg)
                elif isinstance(msg, NotFound):
                    pending = self._pending.pop(msg.req_id, None)
                    if pending is None:
                        self.stats.unsolicited += 1
                    else:
                        self.stats.not_found += 1
                        pending.fail(
                            BlockNotFound(
                                f"{self.addr} does not have block {pending.block_id.hex()}"
                            )
                        )
                elif isinstance(msg, HaveReply):
                    have = self._haves.pop(msg.req_id, None)
                    if have is None:
                        self.stats.unsolicited += 1  # its asker left
                    else:
                        try:
                            flags = unpack_bitmap(msg.bitmap, have.count)
                        except FrameError as exc:
                            error = PeerProtocolError(
                                f"{self.addr} answered have with a bad bitmap: {exc}; "
                                "connection dropped"
                            )
                            have.fail(error)
                            raise error from None
                        have.succeed(flags)
                elif isinstance(msg, Notice):
                    if msg.discovery_key != self.discovery_key:
                        raise PeerProtocolError(f"{self.addr} sent a notice for another drive")
                    self.stats.notices += 1
                    if self._on_notice is not None:
                        self._on_notice(msg.discovery_key, msg.record)
                elif isinstance(msg, Holding):
                    self.stats.holdings += 1
                    holding = self.holding
                    for block_id in msg.block_ids:
                        holding[block_id] = None
                        holding.move_to_end(block_id)
                    while len(holding) > MAX_HOLDING_REMEMBERED:
                        holding.popitem(last=False)
                elif isinstance(msg, Ping):
                    if self._pongs_queued >= MAX_CONTROL_BACKLOG:
                        raise PeerProtocolError(
                            f"{self.addr} sends pings faster than it reads the answers; "
                            "connection dropped"
                        )
                    self._pongs_queued += 1
                    self._send(Pong(msg.token))
                elif isinstance(msg, Pong):
                    event = self._pings.get(msg.token)
                    if event is not None:
                        event.set()
                elif isinstance(msg, Goodbye):
                    raise PeerGoneError(f"{self.addr} closed the connection: {msg.reason}")
                else:
                    raise PeerProtocolError(f"{self.addr} sent an unexpected {msg.TYPE} frame")
        except DhtError as exc:
            self._fail(exc)

    async def _on_block(self, msg: Block) -> None:
        pending = self._pending.pop(msg.req_id, None)
        if pending is None:
            self.stats.unsolicited += 1
            return
        data = msg.data
        if len(data) < HASH_IN_THREAD_MIN:
            if hashlib.sha256(data).digest() != pending.block_id:
                raise self._bad_block(pending)
            self._delivered(pending, data)
        else:
            # hashed by the verifier: this loop goes straight back to reading the socket
            self._unverified.append((pending, data))
            self._unverified_added.set()
        await trio.lowlevel.checkpoint()

    async def _verifier(self) -> None:
        """Check large blocks against their ids in worker threads, a batch per thread call.

        Hashing in the reader's own loop would leave the socket unread
        while a thread hashes each block; queued here, what arrived
        meanwhile is hashed together in the next call.
        """
        batch: list[tuple[_Pending, bytes]] = []
        try:
            while True:
                if not self._unverified:
                    self._unverified_added = trio.Event()
                    await self._unverified_added.wait()
                    continue
                batch = list(self._unverified)
                self._unverified.clear()
                digests = await trio.to_thread.run_sync(_sha256_each, [d for _, d in batch])
                for (pending, data), digest in zip(batch, digests, strict=True):
                    if digest != pending.block_id:
                        raise self._bad_block(pending)
                    self._delivered(pending, data)
                batch = []
        except DhtError as exc:
            self._fail(exc)
        finally:
            # a bad block or the connection's end: what this batch did not deliver fails
            for pending, _ in batch:
                pending.fail(self._error or PeerGoneError(f"connection to {self.addr} ended"))

    def _bad_block(self, pending: _Pending) -> PeerProtocolError:
        pending.fail(BadBlockError(
            f"{self.addr} sent bytes that do not hash to block {pending.block_id.hex()}: "
            "the peer is faulty or lying; connection dropped"
        ))
        return PeerProtocolError(f"{self.addr} sent a corrupt block; connection dropped")

    def _delivered(self, pending: _Pending, data: bytes) -> None:
        self.stats.blocks += 1
        self.stats.bytes += len(data)
        pending.succeed(data)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.in_flight} in flight"
        return f"PeerConnection({self.addr}, {state})"


async def _abort(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)
