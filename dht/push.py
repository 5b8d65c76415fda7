"""Push connections: serve a drive to a node we dial, for nodes that cannot be dialled.

A node behind NAT (a laptop at home publishing a drive) can open connections
but not accept them, so a host on the internet could never fetch from it. A
push turns one outbound connection around:

    dialer (behind NAT)                         listener (the host)
    TCP connect, TLS 1.3 (the dialer is the TLS client; it pins the
        listener's key if it knows the node id, else learns it)
                            <- challenge(server_id, nonce)
    push(client_pubkey, discovery_key, proof, sig)  ->
                            <- welcome(max_wants) | refused(reason)
    welcome(max_wants)      ->                   roles reverse here:
    serves wants, sends notices                  sends wants, cancels, haves

`push` is `hello` with its own signature context ("peerdrive push v1"), so
neither can be replayed as the other; the proof is the same proof of the
drive secret, and the listener accepts a push only for a drive it serves and
only if the layer above asked for pushes. After the swap each side runs the
ordinary code of its new role (`ServerConnection` here, `PeerConnection`
at the listener) with the frame limits of that role, so every rule of the
peer protocol holds unchanged; see docs/protocol.md, "Push connections".

`keep_pushing` holds one such connection open per (target, drive), dials
again with exponential backoff whenever it cannot connect or the connection
ends, and records what happened in a `PushStatus` the node reports. Nothing
here waits on anything but the network: publishing never blocks on a push.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from .client import OnRunResult, PeerConnection, RunOfWants
from .dial import dial
from .errors import DhtError, PeerGoneError
from .frames import Notice
from .handshake import DRIVE_SECRET_LEN
from .server import PeerServer
from .server_connection import ServerConnection
from .streams import HANDSHAKE_TIMEOUT, close_quietly
from .types import Priority

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0  # seconds before the first redial
BACKOFF_MAX = 60.0
STABLE_SESSION = 30.0  # a session that lasted this long resets the backoff


@dataclass(frozen=True, slots=True)
class PushTarget:
    """Where to push: `HOST:PORT`, optionally pinned as `NODEID@HOST:PORT` (hex node id)."""

    host: str
    port: int
    node_id: bytes | None = None

    def __str__(self) -> str:
        pin = f"{self.node_id.hex()[:12]}@" if self.node_id else ""
        return f"{pin}{self.host}:{self.port}"


@dataclass
class PushStatus:
    """What one push (target, drive) is doing, for status output and tests."""

    target: PushTarget
    connected: bool = False
    node_id: bytes | None = None  # learnt from the listener's key
    sessions: int = 0  # connections that got past the handshake
    failures: int = 0  # dials or sessions that failed
    last_error: str | None = None
    retry_in: float = 0.0  # seconds until the next dial, when waiting


class PushedSource:
    """The listener's side of a push connection, as a `Fetcher` source (`Fetcher.add_source`).

    The pushing node cannot be dialled, so the fetcher must not try: it asks
    over this connection while it lasts and forgets it when it ends.
    """

    def __init__(self, conn: PeerConnection) -> None:
        self.conn = conn
        self.source_id = conn.addr.node_id
        self.label = f"{conn.addr} (pushed)"

    @property
    def closed(self) -> bool:
        return self.conn.closed

    async def fetch(self, block_id: bytes, priority: Priority) -> bytes:
        return await self.conn.fetch(block_id, priority)

    @property
    def max_wants(self) -> int:
        return self.conn.max_wants

    @property
    def whole(self) -> frozenset[bytes]:
        """The trees the pushing node keeps whole (its Whole frames, sent over this
        connection like any server's): a host counts the publisher pushing to it as a
        copy although it cannot dial it."""
        return self.conn.whole

    async def fetch_run(self, run: RunOfWants, on_result: OnRunResult) -> None:
        await self.conn.fetch_run(run, on_result)

    async def have(self, block_ids: Sequence[bytes]) -> list[bool]:
        return await self.conn.have(block_ids)

    async def ping(self) -> float:
        return await self.conn.ping()

    async def aclose(self) -> None:
        await self.conn.aclose()

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()


async def push_once(server: PeerServer, target: PushTarget, discovery_key: bytes,
                    drive_secret: bytes, *, notice: Callable[[], bytes | None] | None = None,
                    on_connected: Callable[[bytes], None] | None = None,
                    timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Dial `target` and serve it `discovery_key` from `server`'s block source until it ends.

    `notice()` gives a signed record (the current head) sent as the first
    Notice; later ones reach the listener through `server.notify` like any
    client's. `on_connected(node_id)` is called once the roles have swapped.
    Raises PeerGoneError, PeerRefusedError or PeerIdentityError.
    """
    if len(drive_secret) != DRIVE_SECRET_LEN:
        raise DhtError("the drive secret must be 32 bytes")
    name = str(target)
    dialled = await dial(target.host, target.port, target.node_id, server.identity,
                         discovery_key, drive_secret, peer=name, timeout=timeout,
                         push_max_wants=server.max_wants)
    node_id = dialled.node_id
    conn = ServerConnection(server, dialled.frames, discovery_key, node_id)
    try:
        record = notice() if notice is not None else None
        if record is not None:
            conn.push_control(Notice(discovery_key, record))
        if on_connected is not None:
            on_connected(node_id)
        await server.serve_connection(conn)
    finally:
        await close_quietly(dialled.frames.stream)
    raise PeerGoneError(f"{name} ended the push connection")


async def keep_pushing(server: PeerServer, status: PushStatus, discovery_key: bytes,
                       drive_secret: bytes, *, notice: Callable[[], bytes | None] | None = None,
                       on_connected: Callable[[bytes], None] | None = None,
                       backoff_first: float = BACKOFF_FIRST, backoff_max: float = BACKOFF_MAX,
                       ) -> None:
    """Keep a push connection to `status.target` open until cancelled; redial with backoff."""
    backoff = backoff_first
    while True:
        started = trio.current_time()

        def connected(node_id: bytes) -> None:
            status.connected = True
            status.node_id = node_id
            status.sessions += 1
            status.last_error = None
            if on_connected is not None:
                on_connected(node_id)

        try:
            await push_once(server, status.target, discovery_key, drive_secret, notice=notice,
                            on_connected=connected)
        except DhtError as exc:
            status.failures += 1
            status.last_error = str(exc)
            log.info("push to %s: %s", status.target, exc)
        finally:
            status.connected = False
        if trio.current_time() - started >= STABLE_SESSION:
            backoff = backoff_first
        status.retry_in = backoff
        deadline = trio.current_time() + backoff
        while (left := deadline - trio.current_time()) > 0:
            status.retry_in = left
            await trio.sleep(min(left, 1.0))
        status.retry_in = 0.0
        backoff = min(backoff * 2, backoff_max) if math.isfinite(backoff) else backoff_max
