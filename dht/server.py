"""The peer server: accepts connections, runs the handshake, serves blocks to each client.

Transport is TCP + TLS 1.3 (tls.py, tlsstream.py); on top run frames.py's
length-prefixed frames. The handshake's decisions are handshake.py's
(`ServerHandshake`); each client past it is a `ServerConnection`
(server_connection.py), which asks this server for blocks through its public
lookups: `lookup`, `holds` and `in_flight`. Rules this module keeps:

1. Admission: at most `max_connections` in all and `max_per_address` from one
   IP; of those still in their handshake at most HANDSHAKING_PER_ADDRESS per
   IP and MAX_HANDSHAKING in all, the oldest dropped for a newcomer (an honest
   handshake takes milliseconds; one that idles is what a flood is).
2. A handshake has `handshake_timeout` seconds, TLS included.
3. Scope: `may_serve(discovery_key, block_id)` decides what a client of one
   drive may read or learn of; a block out of scope is answered exactly as a
   block this node lacks.
4. A failing block source or scope check answers "not here" for that block
   and never takes the server down.
5. A Push greeting (push.py) is accepted only while `on_push` is set; the
   connection then runs as our client (`PeerConnection`) the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from .client import OnNotice, PeerConnection
from .errors import PeerGoneError, PeerProtocolError
from .frames import (
    MAX_BLOCK,
    MAX_CLIENT_FRAME,
    MAX_FRAME,
    MAX_HAVE_IDS,
    MAX_WANTS_LIMIT,
    MAX_WHOLE_IDS,
    Fetching,
    Holding,
    Notice,
    Welcome,
    Whole,
    encode,
)
from .handshake import Accepted, ServerHandshake
from .identity import NodeIdentity
from .server_connection import ServerConnection
from .streams import (
    GOODBYE_GRACE,
    HANDSHAKE_TIMEOUT,
    MAX_CONTROL_BACKLOG,
    SEND_TIMEOUT,
    FrameStream,
    close_quietly,
    peer_host,
    peer_name,
    set_keepalive,
)
from .tls import server_context
from .tlsstream import TlsStream
from .types import PeerAddr

log = logging.getLogger(__name__)

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
SERVER_RECEIVE_SIZE = 64 * 1024  # a server buffers at most this much of a client's frames


class BlockSource(Protocol):
    """Where a server finds blocks: the local cache store, or anything with this `get`.

    A source may also have `has(block_id) -> bool` (the store does), which
    answers Have without reading the block; without it `get` is used.
    """

    def get(self, block_id: bytes) -> bytes | None: ...


SecretLookup = Callable[[bytes], bytes | None] | Mapping[bytes, bytes]
MayServe = Callable[[bytes, bytes], bool]
"""(discovery key of the connection, block id) -> may that client have (or learn of) it?"""
InFlightLookup = Callable[[bytes, bytes, float], Awaitable[bytes | None]]


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
    wants_received: int = 0  # blocks asked for, one by one or in runs
    runs_received: int = 0  # WantRun frames among them
    cancels_received: int = 0
    haves_received: int = 0
    blocks_served: int = 0
    bytes_served: int = 0
    not_found: int = 0
    source_errors: int = 0
    notices_sent: int = 0
    pushes_accepted: int = 0  # push connections: the dialer serves, we fetch (see dht/push.py)
    holdings_sent: int = 0  # Holding frames pushed (one per client per announcement)
    fetchings_sent: int = 0  # Fetching frames pushed (likewise)
    served_in_flight: int = 0  # blocks served from the node's own fetch (in flight or just landed)


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
        scope_by_tag: bool = False,
        on_client_lost: Callable[[bytes], None] | None = None,
        on_client_joined: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        """`in_flight(discovery_key, block_id, timeout)`, if given, is asked for a block the
        source lacks: the node may be fetching it right now (it announced it with
        `announce_fetching`, or holds it unstored), and its answer, bytes or None, is what the client gets.
        `scope_by_tag`: `may_serve` is the source's `is_member(discovery_key, id)`, so a
        source with `get_many` checks it in the transaction that reads a run.
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
        self._clients: dict[bytes, set[ServerConnection]] = {}
        # discovery key -> the Whole frame this node says now (sent to each new client too)
        self._whole: dict[bytes, bytes] = {}
        # A push connection (a dialer serving us a drive, dht/push.py) is accepted only when
        # the layer above takes it: on_push gets the running client connection.
        self.on_push: Callable[[PeerConnection], Awaitable[None]] | None = None
        self.push_notice: OnNotice | None = None  # notices arriving on push connections
        self._per_address: dict[str, int] = {}  # open connections by client IP
        # connections in their handshake, oldest first: (IP, the scope that ends it)
        self._handshaking: dict[trio.CancelScope, str] = {}
        self.in_flight = in_flight  # asked by ServerConnection for blocks the source lacks
        self.scope_by_tag = scope_by_tag
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
        sent = self._announce(discovery_key, block_ids, Holding)
        self.stats.holdings_sent += sent
        return sent

    def announce_fetching(self, discovery_key: bytes, block_ids: Sequence[bytes]) -> int:
        """Push Fetching(block_ids) to every client of that key (as `announce_holding`): our
        node is fetching them now and will announce holding each one it gets."""
        sent = self._announce(discovery_key, block_ids, Fetching)
        self.stats.fetchings_sent += sent
        return sent

    def _announce(self, discovery_key: bytes, block_ids: Sequence[bytes],
                  kind: type[Holding] | type[Fetching]) -> int:
        sent = 0
        clients = self._clients.get(discovery_key)
        if not clients or not block_ids:
            return 0
        ids = list(block_ids)
        frames = [encode(kind(tuple(ids[i : i + MAX_HAVE_IDS])))
                  for i in range(0, len(ids), MAX_HAVE_IDS)]
        for conn in list(clients):
            if conn.control_backlog + len(frames) > MAX_CONTROL_BACKLOG // 2:
                continue
            for frame in frames:
                conn.push_control(None, frame)
            sent += 1
        return sent

    def announce_whole(self, discovery_key: bytes, node_ids: Sequence[bytes]) -> int:
        """Say which trees this node keeps whole (Whole, up to MAX_WHOLE_IDS node ids): to
        every client of that key now, and to each client that connects later. It replaces
        what was said before. Returns how many clients got it now."""
        frame = encode(Whole(tuple(node_ids[:MAX_WHOLE_IDS])))
        if self._whole.get(discovery_key) == frame:
            return 0
        self._whole[discovery_key] = frame
        sent = 0
        for conn in list(self._clients.get(discovery_key, ())):
            if conn.push_control(None, frame):
                sent += 1
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

    # ---- lookups (asked by handshakes and by ServerConnection) ---------------

    def secret_for(self, discovery_key: bytes) -> bytes | None:
        """The drive secret behind `discovery_key` if this node serves that drive, else None."""
        if isinstance(self._secrets, Mapping):
            return self._secrets.get(discovery_key)
        return self._secrets(discovery_key)

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

    def lookup(self, discovery_key: bytes, block_id: bytes) -> bytes | None:
        """The block for a client of `discovery_key`, or None (absent, out of scope, or the
        source failed: all answered alike). Blocking: run it in a worker thread."""
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
        return self._checked(data)

    def _checked(self, data: object) -> bytes | None:
        """A block as the source gave it, as bytes; None (and counted) if it is too big."""
        if data is None:
            return None
        if type(data) is not bytes:
            data = bytes(data)  # type: ignore[call-overload]
        if len(data) > MAX_BLOCK:
            self.stats.source_errors += 1
            return None
        return data

    def lookup_many(self, discovery_key: bytes, block_ids: list[bytes],
                    budget: int) -> list[bytes | None]:
        """`lookup` for several blocks in turn, in one worker-thread call (many small blocks
        cost one thread hand-off, not one each); it stops once what it read reaches
        `budget` bytes, so it may answer only the first few (the rest are not read).

        A source with `get_many` (the store) reads them all in one transaction,
        scope included when `scope_by_tag` says the scope is its tags; should
        that fail, each block is looked up on its own (rule 4)."""
        get_many = getattr(self.block_source, "get_many", None)
        if get_many is not None and (self.may_serve is None or self.scope_by_tag):
            refused: list[bytes] = []
            try:
                found = get_many(block_ids, budget=budget,
                                 tag=discovery_key if self.scope_by_tag else None,
                                 not_members=refused)
            except Exception:
                self.stats.source_errors += 1
                log.exception("block source failed on a batch of %d", len(block_ids))
            else:
                self.stats.out_of_scope += len(refused)
                return [self._checked(data) for data in found]
        out: list[bytes | None] = []
        total = 0
        for block_id in block_ids:
            data = self.lookup(discovery_key, block_id)
            out.append(data)
            total += len(data) if data is not None else 0
            if total >= budget:
                break
        return out

    def holds(self, discovery_key: bytes, block_ids: tuple[bytes, ...]) -> list[bool]:
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

    # ---- internals ----------------------------------------------------------

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
        host = peer_host(tcp)
        if not self._admit(host):
            stats.connections_rejected += 1
            await trio.aclose_forcefully(tcp)
            return
        stats.connections_active += 1
        self._per_address[host] = self._per_address.get(host, 0) + 1
        set_keepalive(tcp)
        peer = peer_name(tcp)
        ssl_stream = TlsStream(tcp, self._ssl_context, server_side=True)
        conn: ServerConnection | None = None
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
            await close_quietly(ssl_stream)

    async def serve_connection(self, conn: ServerConnection) -> None:
        """Serve one client past its handshake (accepted, or dialled by a push) until it ends."""
        self._clients.setdefault(conn.discovery_key, set()).add(conn)
        whole = self._whole.get(conn.discovery_key)
        if whole is not None:
            conn.push_control(None, whole)  # ahead of any answer: before a first pong
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
            await nursery.start(conn.run)
            assert self.on_push is not None
            await self.on_push(conn)
            await conn.wait_closed()

    async def _handshake(self, ssl_stream: TlsStream, peer: str
                         ) -> ServerConnection | _PushAccepted | None:
        try:
            await ssl_stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGoneError(f"TLS handshake with {peer} failed: {exc}") from None
        frames = FrameStream(ssl_stream, peer, MAX_CLIENT_FRAME, self.send_timeout,
                             SERVER_RECEIVE_SIZE)
        handshake = ServerHandshake(self.identity.node_id, self.secret_for, self.max_wants,
                                    takes_push=self.on_push is not None)
        await frames.send(handshake.challenge())
        decision = handshake.receive(await frames.receive())
        if not isinstance(decision, Accepted):
            if decision.protocol_error:
                self.stats.protocol_errors += 1
            else:
                self.stats.handshakes_refused += 1
            await frames.send(decision.reply)
            return None
        await frames.send(decision.reply)
        if decision.push:
            return _PushAccepted(frames, decision.discovery_key, decision.client_pubkey,
                                 decision.client_id)
        return ServerConnection(self, frames, decision.discovery_key, decision.client_id)


@dataclass
class _PushAccepted:
    """A push handshake that passed: the dialer will serve, we will fetch."""

    frames: FrameStream
    discovery_key: bytes
    client_pubkey: bytes
    client_id: bytes
