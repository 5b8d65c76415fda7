"""HTTP/1.1 keep-alive connections on h11 over trio streams, and a small pool of them.

The HTTP mirror source (`dht.http_source`) asks one static server for many
blocks of a few hundred KiB each, many at once. A general client pays per
request for layers this needs none of (auth, cookies, proxies, model
objects, a pool that polls every idle connection); here a request is a
few h11 calls and a socket read of up to 1 MiB at a time (over TLS,
`dht.tlsstream.TlsStream`: every record a read brought decrypted at once,
the name checked against the system's trust store). h11 does all the
parsing and framing (sans-io: it is fed bytes and asked for events); this
module only moves bytes between h11 and a trio stream and decides when a
connection may be used again.

Rules:

- One request at a time per connection (no pipelining). A connection goes
  back to the pool only when h11 says both sides finished the exchange and
  the server did not ask to close; anything else (an error, a cancel in the
  middle of a response, a body refused for its length) closes it at once.
- Every wait is bounded: the connect (TCP and TLS handshake), each send,
  and each receive (the time between two reads, so a stalled body fails
  here), and waiting for a free slot of the pool.
- A body is read up to `limit` bytes and no further: a Content-Length above
  it is refused unread, a body without one is refused as soon as it grows
  past it. A body is copied once, from h11's parts into the bytes handed
  up. A body cut short of its Content-Length is an error (h11), never
  a short answer.
- Before an idle connection is reused it must not be readable (a server
  that closed it, or sent bytes nobody asked for); a request that fails on
  a reused connection before any byte of its response came back is tried
  once more on a new connection (only GET and HEAD are sent: both safe to
  repeat). Redirects are followed (at most `max_redirects`, http and https
  only), on the pool's connections to the new origin.
- Every failure of the transport or of the server's side of the protocol is
  a `PeerGoneError`; a body over its limit is a `BodyTooLongError`. The
  caller decides what a status code means.

Not supported, on purpose: proxies, cookies, authentication, compression
(we ask for `identity`: blocks are ciphertext, they do not compress).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import h11
import trio

from .errors import BadBlockError, PeerGoneError
from .tlsstream import TlsStream

RECEIVE_SIZE = 1024 * 1024  # one socket read: a whole block often arrives in one or two
MAX_HEADER_BYTES = 64 * 1024  # a response head longer than this is refused (h11 enforces it)
_DISCARD_LIMIT = 64 * 1024  # the body of a non-200 answer is read (to keep the connection) up to this
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "peerdrive"


class BodyTooLongError(BadBlockError):
    """A response body (announced or received) longer than the caller's limit; refused."""


@dataclass(frozen=True)
class HttpTimeouts:
    connect: float = 5.0  # TCP connect plus TLS handshake
    read: float = 10.0  # between two reads of one response: a stalled body fails here
    write: float = 5.0  # sending one request
    pool: float = 30.0  # waiting for a free connection of the pool (the fetcher bounds it too)


@dataclass(frozen=True)
class Origin:
    """Where a connection goes: scheme, host and port of a URL."""

    scheme: str
    host: str
    port: int

    @classmethod
    def split(cls, url: str) -> tuple[Origin, str]:
        """(origin, request target) of an absolute http(s) URL; PeerGoneError if it is not one."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise PeerGoneError(f"{url}: not a usable URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PeerGoneError(f"{url}: not an http or https URL")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default), target

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}"


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]  # names in lower case; of a repeated header, the last
    body: bytes
    url: str  # after redirects
    body_kept: bool = True  # False: a non-200 body too long to keep; `body` is empty


@dataclass
class PoolStats:
    requests: int = 0
    connections_opened: int = 0
    retried: int = 0  # requests repeated on a new connection after a reused one failed
    stale_dropped: int = 0  # idle connections found closed (or dirty) before reuse


class HttpConnection:
    """One HTTP/1.1 connection: a trio stream and the h11 state machine that frames it."""

    def __init__(self, stream: trio.abc.Stream, origin: Origin, timeouts: HttpTimeouts) -> None:
        self.origin = origin
        self._stream = stream
        self._timeouts = timeouts
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.closed = False
        self.requests = 0
        self.answered = False  # some byte of the current request's response arrived

    @classmethod
    async def open(cls, origin: Origin, timeouts: HttpTimeouts,
                   ssl_context: ssl.SSLContext | None = None) -> HttpConnection:
        """A new connection to `origin` (TLS for https), within the connect timeout."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.move_on_after(timeouts.connect):
                stream = await trio.open_tcp_stream(origin.host, origin.port)
                if origin.scheme == "https":
                    stream = TlsStream(stream, ssl_context or default_ssl_context(),
                                       server_hostname=origin.host)
                    await stream.do_handshake()
                return cls(stream, origin, timeouts)
        except (OSError, trio.BrokenResourceError) as exc:
            if stream is not None:
                _close_stream(stream)
            raise PeerGoneError(f"{origin}: cannot connect: {_describe(exc)}") from exc
        except BaseException:  # cancelled from outside: the half-open socket goes too
            if stream is not None:
                _close_stream(stream)
            raise
        if stream is not None:
            _close_stream(stream)
        raise PeerGoneError(f"{origin}: timed out connecting (after {timeouts.connect:g} s)")

    @property
    def reusable(self) -> bool:
        """Whether the last exchange ended cleanly and the server keeps the connection."""
        return (not self.closed and self._h11.our_state is h11.IDLE
                and self._h11.their_state is h11.IDLE)

    def looks_stale(self) -> bool:
        """An idle connection with something to read: closed by the server, or dirty."""
        sock = _socket_of(self._stream)
        try:
            return sock is None or sock.is_readable()
        except OSError:
            return True

    def close(self) -> None:
        """Close at once (synchronous, so it is safe in any cleanup, cancelled or not)."""
        if not self.closed:
            self.closed = True
            _close_stream(self._stream)

    async def request(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                      limit: int) -> tuple[int, dict[str, str], bytes, bool]:
        """Send one request, read its response: (status, headers, body, body kept).

        The body of a 200 is read up to `limit` (BodyTooLongError past it);
        of any other status up to 64 KiB, else dropped with the connection.
        The connection is left reusable or closed; on any exception, closed.
        """
        if self.closed:
            raise PeerGoneError(f"{self.origin}: connection closed")
        self.requests += 1
        self.answered = False
        ok = False
        try:
            h = self._h11
            request = h11.Request(method=method, target=target, headers=[
                ("Host", self.origin.host_header), ("User-Agent", _USER_AGENT),
                ("Accept-Encoding", "identity"), *headers])
            await self._send(h.send(request) + h.send(h11.EndOfMessage()))
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Response):
                    break
                if not isinstance(event, h11.InformationalResponse):
                    raise PeerGoneError(f"{self.origin}: unexpected {type(event).__name__} "
                                        "before the response")
            status = event.status_code
            names = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            if method == "HEAD" or status in (204, 304):  # no body, whatever the headers say
                body, kept = await self._read_body(status, {"content-length": "0"}, 0)
            else:
                body, kept = await self._read_body(status, names, limit)
            if h.our_state is h11.DONE and h.their_state is h11.DONE:
                h.start_next_cycle()
            ok = True
            return status, names, body, kept
        except h11.ProtocolError as exc:
            raise PeerGoneError(f"{self.origin}: broken HTTP response: {exc}") from exc
        finally:
            if not ok or not self.reusable:
                self.close()

    async def _read_body(self, status: int, headers: dict[str, str],
                         limit: int) -> tuple[bytes, bool]:
        cap = limit if status == 200 else _DISCARD_LIMIT
        length = headers.get("content-length")
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None and size > cap and status == 200:
            raise BodyTooLongError(f"{self.origin}: a body of {size} bytes is longer than "
                                   f"{limit}; refused unread")
        if size is not None and size > cap:  # a big error page: not worth reading
            self.close()
            return b"", False
        parts: list[bytes] = []
        got = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                got += len(event.data)
                if got > cap:
                    if status == 200:
                        raise BodyTooLongError(f"{self.origin}: the body is longer than "
                                               f"{limit} bytes; refused")
                    self.close()
                    return b"", False
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                # one copy into the bytes handed up (often of a single part: a whole
                # block tends to come in one socket read); no buffer in between
                return b"".join(parts), True
            else:
                raise PeerGoneError(f"{self.origin}: unexpected {type(event).__name__} "
                                    "in a response body")

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        h = self._h11
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self._receive())
                continue
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise PeerGoneError(f"{self.origin}: the server closed the connection "
                                    "before answering")
            self.answered = True
            return event

    async def _receive(self) -> bytes:
        with trio.move_on_after(self._timeouts.read):
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGoneError(f"{self.origin}: {_describe(exc)}") from exc
            if data:
                self.answered = True
            return data
        raise PeerGoneError(f"{self.origin}: timed out (nothing received for "
                            f"{self._timeouts.read:g} s)")

    async def _send(self, data: bytes) -> None:
        with trio.move_on_after(self._timeouts.write):
            try:
                await self._stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGoneError(f"{self.origin}: {_describe(exc)}") from exc
            return
        raise PeerGoneError(f"{self.origin}: timed out sending a request "
                            f"(after {self._timeouts.write:g} s)")


@dataclass
class HttpPool:
    """Keep-alive connections to a few origins; at most `max_connections` requests at a time.

    Idle connections are kept per origin (at most `max_connections` of them
    in all) and reused newest first. `aclose` closes the idle ones; a busy
    one is closed when its request ends.
    """

    max_connections: int = 16
    timeouts: HttpTimeouts = field(default_factory=HttpTimeouts)
    max_redirects: int = 4
    ssl_context: ssl.SSLContext | None = None
    stats: PoolStats = field(default_factory=PoolStats)

    def __post_init__(self) -> None:
        self._slots = trio.Semaphore(self.max_connections)
        self._idle: dict[Origin, list[HttpConnection]] = {}
        self.closed = False

    async def request(self, method: str, url: str, *, limit: int,
                      headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
        """The response to `method url` after redirects; its body read up to `limit` bytes."""
        for _ in range(self.max_redirects + 1):
            status, names, body, kept = await self._request_once(method, url, headers, limit)
            location = names.get("location")
            if status in _REDIRECTS and location:
                url = urljoin(url, location.strip())
                continue
            return HttpResponse(status, names, body, url, kept)
        raise PeerGoneError(f"{url}: too many redirects (a redirect loop?)")

    async def aclose(self) -> None:
        self.closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        await trio.lowlevel.checkpoint()

    async def _request_once(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                            limit: int) -> tuple[int, dict[str, str], bytes, bool]:
        if self.closed:
            raise PeerGoneError(f"{url}: closed")
        origin, target = Origin.split(url)
        with trio.move_on_after(self.timeouts.pool) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            raise PeerGoneError(f"{origin}: no free connection within {self.timeouts.pool:g} s")
        try:
            self.stats.requests += 1
            conn = self._take_idle(origin)
            reused = conn is not None
            while True:
                if conn is None:
                    conn = await HttpConnection.open(origin, self.timeouts, self.ssl_context)
                    self.stats.connections_opened += 1
                try:
                    answer = await conn.request(method, target, headers, limit)
                except PeerGoneError:
                    if reused and not conn.answered:
                        # the server closed it while idle, and we wrote first: once more, new
                        self.stats.retried += 1
                        conn, reused = None, False
                        continue
                    raise
                if conn.reusable and not self.closed:
                    self._idle.setdefault(origin, []).append(conn)
                    self._trim_idle()
                else:
                    conn.close()
                return answer
        finally:
            self._slots.release()

    def _take_idle(self, origin: Origin) -> HttpConnection | None:
        conns = self._idle.get(origin)
        while conns:
            conn = conns.pop()
            if conn.reusable and not conn.looks_stale():
                return conn
            self.stats.stale_dropped += 1
            conn.close()
        return None

    def _trim_idle(self) -> None:
        total = sum(len(c) for c in self._idle.values())
        for conns in self._idle.values():
            while conns and total > self.max_connections:
                conns.pop(0).close()
                total -= 1


def default_ssl_context() -> ssl.SSLContext:
    """The system's trust store, certificate and host name checked, HTTP/1.1 by ALPN."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, TlsStream):
        stream = stream.transport
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _close_stream(stream: trio.abc.Stream) -> None:
    sock = _socket_of(stream)
    if sock is not None:
        sock.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
