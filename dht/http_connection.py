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
  that closed it, or sent bytes nobody asked for; a blocking connection idle
  for less than a second is not looked at); a request that fails on
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

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import h11
import trio

from .errors import DhtError, PeerGoneError
from .http_pipeline import (
    BodyTooLongError,
    Response,
    ResponseDecoder,
    Unframeable,
    build_gets,
    head_end,
)
from .tlsstream import TlsStream

RECEIVE_SIZE = 1024 * 1024  # one socket read: a whole block often arrives in one or two
MAX_HEADER_BYTES = 64 * 1024  # a response head longer than this is refused (h11 enforces it)
_HEAD_PEEK = 16 * 1024  # bytes looked at (MSG_PEEK) for the end of a response's head
_FRESH_IDLE = 1.0  # seconds: a blocking connection idle less long is reused unchecked
_DISCARD_LIMIT = 64 * 1024  # the body of a non-200 answer is read (to keep the connection) up to this
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "peerdrive"


class _Stalled(PeerGoneError):
    """A blocking connection's read or write timed out: the server is there but stalls."""


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


class Exchange:
    """One request and its response on an h11 connection (sans-io: fed bytes, asked to advance).

    The rules of a response are the same whether its bytes come from a trio
    stream (`HttpConnection`) or a blocking socket in a worker thread
    (`BlockingHttpConnection`): a 200's body is kept up to `limit` bytes
    (BodyTooLongError past it, announced or not), any other status's up to
    64 KiB (a longer one is dropped, and the connection with it), a HEAD,
    204 or 304 has none. `answer` is (status, headers, body, body kept).
    """

    def __init__(self, conn: h11.Connection, origin: Origin, method: str, target: str,
                 headers: Sequence[tuple[str, str]], limit: int) -> None:
        self._h = conn
        self.origin = origin
        self._method = method
        self._limit = limit
        self.outgoing = conn.send(h11.Request(method=method, target=target, headers=[
            ("Host", origin.host_header), ("User-Agent", _USER_AGENT),
            ("Accept-Encoding", "identity"), *headers])) + conn.send(h11.EndOfMessage())
        self.answered = False  # some byte of the response arrived
        self.keeps_alive = False  # the response's head lets the connection be used again
        self._status: int | None = None
        self._headers: dict[str, str] = {}
        self._cap = 0
        self._got = 0
        self._size: int | None = None  # the body's announced length (Content-Length)
        self._parts: list[bytes] = []
        self.answer: tuple[int, dict[str, str], bytes, bool] | None = None

    @property
    def body_left(self) -> int:
        """Bytes of the body still to come when its length is known (0: unknown or none).

        Read when `advance` asks for more: h11 has handed up every body byte
        it had, so this many arrive before the response is complete.
        """
        if self._size is None or self.answer is not None:
            return 0
        return max(0, self._size - self._got)

    def feed(self, data: bytes) -> None:
        """Bytes from the server (b"" when it closed the connection)."""
        if data:
            self.answered = True
        self._h.receive_data(data)

    def advance(self) -> bool:
        """Take the events the bytes fed so far make; True once the answer is complete."""
        try:
            return self._advance()
        except h11.ProtocolError as exc:
            raise PeerGoneError(f"{self.origin}: broken HTTP response: {exc}") from exc

    def _advance(self) -> bool:
        h = self._h
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                return False
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise PeerGoneError(f"{self.origin}: the server closed the connection "
                                    "before answering")
            self.answered = True
            if self._status is None:
                if isinstance(event, h11.InformationalResponse):
                    continue
                if not isinstance(event, h11.Response):
                    raise PeerGoneError(f"{self.origin}: unexpected {type(event).__name__} "
                                        "before the response")
                if self._start(event):
                    return True
            elif isinstance(event, h11.Data):
                self._got += len(event.data)
                if self._got > self._cap:
                    if self._status == 200:
                        raise BodyTooLongError(f"{self.origin}: the body is longer than "
                                               f"{self._limit} bytes; refused")
                    return self._drop()
                self._parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                # one copy into the bytes handed up (often of a single part: a whole
                # block tends to come in one socket read); no buffer in between
                self.answer = (self._status, self._headers, b"".join(self._parts), True)
                self._parts = []
                if h.our_state is h11.DONE and h.their_state is h11.DONE:
                    h.start_next_cycle()
                return True
            else:
                raise PeerGoneError(f"{self.origin}: unexpected {type(event).__name__} "
                                    "in a response body")

    def _start(self, event: h11.Response) -> bool:
        status = self._status = event.status_code
        self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        # RFC 9112 9.3 (h11's own rule): a 1.1 response keeps the connection unless it says close
        self.keeps_alive = event.http_version >= b"1.1" and not any(
            name == b"connection" and b"close" in value.lower() for name, value in event.headers)
        if self._method == "HEAD" or status in (204, 304):  # no body, whatever the headers say
            return False
        self._cap = self._limit if status == 200 else _DISCARD_LIMIT
        length = self._headers.get("content-length")
        size = int(length) if length is not None and length.isdigit() else None
        self._size = size
        if size is not None and size > self._cap:
            if status == 200:
                raise BodyTooLongError(f"{self.origin}: a body of {size} bytes is longer than "
                                       f"{self._limit}; refused unread")
            return self._drop()  # a big error page: not worth reading
        return False

    def direct_body_size(self) -> int | None:
        """The length of a 200's body that the caller may receive itself, past h11, into the
        bytes handed up (`take_direct_body`); None: the body goes through h11.

        Only for a response whose head h11 has parsed and nothing of whose body
        it has seen, framed by a Content-Length alone (no Transfer-Encoding),
        already checked against the limit (`_start`): the framing h11 would
        apply. Why: h11 copies a body twice (into its receive buffer, out as
        a Data event) and this module once more (joining the parts); a block
        of 256 KiB then cost about 1 ms of CPU in the mirror source, its
        copies and page faults the most of it (docs/benchmarks.md, issue 10).
        """
        if (self._status != 200 or self._method != "GET" or self._size is None
                or self._got or self.answer is not None
                or "transfer-encoding" in self._headers or self._h.trailing_data[0]):
            return None
        return self._size

    def take_direct_body(self, body: bytes) -> None:
        """The body `direct_body_size` announced, received whole by the caller: the answer.
        h11 never saw it, so the connection's h11 state is spent (`_H11Connection`)."""
        assert self._status is not None and len(body) == self._size
        self._got = len(body)
        self.answer = (self._status, self._headers, body, True)

    def _drop(self) -> bool:
        """A non-200 body too long to keep: answered without it (the connection is not
        reusable: h11 still expects the rest of the body)."""
        assert self._status is not None
        self.answer = (self._status, self._headers, b"", False)
        return True


class _H11Connection:
    """What both kinds of connection keep: the h11 state machine and its exchange."""

    def __init__(self, origin: Origin, timeouts: HttpTimeouts) -> None:
        self.origin = origin
        self._timeouts = timeouts
        self._h11 = _new_h11()
        self.closed = False
        self.requests = 0
        self._exchange: Exchange | None = None

    @property
    def answered(self) -> bool:
        """Some byte of the current request's response arrived (so it is not repeated)."""
        return self._exchange is not None and self._exchange.answered

    @property
    def reusable(self) -> bool:
        """Whether the last exchange ended cleanly and the server keeps the connection."""
        return (not self.closed and self._h11.our_state is h11.IDLE
                and self._h11.their_state is h11.IDLE)

    def _begin(self, method: str, target: str, headers: Sequence[tuple[str, str]],
               limit: int) -> Exchange:
        if self.closed:
            raise PeerGoneError(f"{self.origin}: connection closed")
        self.requests += 1
        self._exchange = Exchange(self._h11, self.origin, method, target, headers, limit)
        return self._exchange


class HttpConnection(_H11Connection):
    """One HTTP/1.1 connection: a trio stream and the h11 state machine that frames it."""

    def __init__(self, stream: trio.abc.Stream, origin: Origin, timeouts: HttpTimeouts) -> None:
        super().__init__(origin, timeouts)
        self._stream = stream

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
        exchange = self._begin(method, target, headers, limit)
        ok = False
        try:
            await self._send(exchange.outgoing)
            while not exchange.advance():
                exchange.feed(await self._receive())
            ok = True
            return exchange.answer
        finally:
            if not ok or not self.reusable:
                self.close()

    async def _receive(self) -> bytes:
        with trio.move_on_after(self._timeouts.read):
            try:
                return await self._stream.receive_some(RECEIVE_SIZE)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGoneError(f"{self.origin}: {_describe(exc)}") from exc
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


class BlockingHttpConnection(_H11Connection):
    """One HTTP/1.1 connection over a blocking socket, for a worker thread.

    The same exchange (`Exchange`) and the same bounds as `HttpConnection`:
    connect (TCP and TLS handshake), each send, and each receive are bounded
    by the socket's timeout. `abort` may be called from any thread (the event
    loop, when the caller is cancelled): it shuts the socket down, so a
    thread blocked in a read returns at once with an error.
    """

    def __init__(self, sock: socket.socket, origin: Origin, timeouts: HttpTimeouts) -> None:
        """Over a connected socket (TLS already set up for https)."""
        super().__init__(origin, timeouts)
        self._sock = sock
        self._decoder: ResponseDecoder | None = None  # of the GETs `send_gets` sent
        self.response_started = False  # some byte of the response `next_response` reads came
        self.idle_since = -1e9  # when it last went back to its pool (time.monotonic)
        self._plain = not isinstance(sock, ssl.SSLSocket)
        if self._plain:
            # blocking, the kernel bounding each wait: a body is then read in one call
            # (`_receive`), not a call (and a GIL hand-off) per segment that arrives
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeouts.read))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeouts.write))
        else:
            sock.settimeout(timeouts.read)

    @classmethod
    def open(cls, origin: Origin, timeouts: HttpTimeouts,
             ssl_context: ssl.SSLContext | None = None) -> BlockingHttpConnection:
        """A new connection to `origin` (TLS for https), within the connect timeout."""
        deadline = time.monotonic() + timeouts.connect
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=timeouts.connect)
        except TimeoutError:
            raise PeerGoneError(f"{origin}: timed out connecting (after "
                                f"{timeouts.connect:g} s)") from None
        except OSError as exc:
            raise PeerGoneError(f"{origin}: cannot connect: {_describe(exc)}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock = (ssl_context or default_ssl_context()).wrap_socket(
                    sock, server_hostname=origin.host)
            return cls(sock, origin, timeouts)
        except TimeoutError:
            sock.close()
            raise PeerGoneError(f"{origin}: timed out connecting (after "
                                f"{timeouts.connect:g} s)") from None
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            raise PeerGoneError(f"{origin}: cannot connect: {_describe(exc)}") from exc

    def looks_stale(self) -> bool:
        """An idle connection with something to read: closed by the server, or dirty."""
        try:
            if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                return True
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def abort(self) -> None:
        """Make a read or write blocked in another thread fail now (thread-safe)."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # not the TLS layer's

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()

    def request(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                limit: int) -> tuple[int, dict[str, str], bytes, bool]:
        """As `HttpConnection.request`, blocking."""
        exchange = self._begin(method, target, headers, limit)
        ok = False
        try:
            self._send(exchange.outgoing)
            if not (self._plain and self._direct(exchange)):
                while not exchange.advance():
                    exchange.feed(self._receive(exchange.body_left))
            ok = True
            return exchange.answer
        finally:
            if not ok or not self.reusable:
                self.close()

    def _direct(self, exchange: Exchange) -> bool:
        """A block's response the short way; False: the rest goes through h11 as usual.

        The head is peeked at (MSG_PEEK), and only its bytes are taken off the
        socket and parsed by h11; a 200 body of known length is then received
        in one call straight into the bytes handed up (`Exchange.direct_body_size`):
        one copy, from the kernel, and one buffer. h11's state of this
        connection is spent by that; a response that keeps the connection
        alive leaves it with a fresh one, so the next request starts clean.
        A head that is not all in the socket's buffer yet is left there for
        the usual way (nothing taken).
        """
        peeked = self._recv(_HEAD_PEEK, socket.MSG_PEEK)
        end = peeked.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self._recv(end + 4, socket.MSG_WAITALL)
        exchange.feed(head)
        if len(head) != end + 4:  # cannot happen: the bytes were there
            return False
        if exchange.advance():
            return True  # no body (HEAD, 204, 304) or one dropped unread
        size = exchange.direct_body_size()
        if size is None:
            return False
        body = self._recv(size, socket.MSG_WAITALL) if size else b""
        if len(body) != size:
            raise PeerGoneError(f"{self.origin}: the response ended {size - len(body)} bytes "
                                "short of its Content-Length (closed or timed out)")
        exchange.take_direct_body(body)
        if exchange.keeps_alive:
            self._h11 = _new_h11()
        return True

    def send_gets(self, targets: Sequence[str], limit: int) -> None:
        """Send GETs for `targets` back to back (pipelined, one send); their responses are
        then read in order with `next_response`, each body up to `limit` bytes."""
        if self.closed:
            raise PeerGoneError(f"{self.origin}: connection closed")
        self.requests += len(targets)
        self._decoder = ResponseDecoder(limit, str(self.origin))
        self.response_started = False
        self._send(build_gets(self.origin.host_header, targets))

    def next_response(self) -> Response:
        """The next response to the GETs `send_gets` sent (blocking); `response_started`
        says whether any byte of it came. A response that does not keep the connection
        closes it; so does any exception (the caller asks for the rest elsewhere)."""
        decoder = self._decoder
        assert decoder is not None
        self.response_started = decoder.started
        ok = False
        try:
            response = self._next_response(decoder)
            ok = True
            return response
        finally:
            if not ok or decoder.done:
                self.close()

    def _next_response(self, decoder: ResponseDecoder) -> Response:
        while True:
            response = decoder.next()
            if response is not None:
                return response
            missing = decoder.body_missing()
            if self._plain:
                if missing:
                    # the rest of the body in one call, into the bytes handed up: one copy,
                    # from the kernel (none when nothing of it was buffered)
                    body = self._recv(missing, socket.MSG_WAITALL)
                    if len(body) != missing:
                        raise PeerGoneError(f"{self.origin}: the response ended "
                                            f"{missing - len(body)} bytes short of its "
                                            "Content-Length (closed or timed out)")
                    return decoder.take_body(body)
                if not decoder.started:
                    # the head only, as far as it is there: its body is then received whole
                    peeked = self._recv(_HEAD_PEEK, socket.MSG_PEEK)
                    end = head_end(peeked) if peeked else -1
                    if end > 0:
                        self.response_started = True
                        decoder.feed(self._recv(end, socket.MSG_WAITALL))
                        continue
                data = self._recv(_HEAD_PEEK, 0)
            else:
                data = self._recv(RECEIVE_SIZE, 0)
            if data:
                self.response_started = True
            decoder.feed(data)

    def end_pipeline(self) -> None:
        """Every response to the GETs sent was read: the connection is clean again (for
        `request` too), unless bytes nobody asked for came with them (then it is closed)."""
        decoder, self._decoder = self._decoder, None
        if decoder is not None and decoder.buffered:
            self.close()
        self._h11 = _new_h11()

    def _recv(self, size: int, flags: int) -> bytes:
        """One recv of up to `size` bytes on the plain socket (b"" at its end), its
        timeout and errors as `_receive`'s."""
        try:
            return self._sock.recv(size, flags)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO
            raise _Stalled(f"{self.origin}: timed out (nothing received for "
                           f"{self._timeouts.read:g} s)") from None
        except OSError as exc:
            raise PeerGoneError(f"{self.origin}: {_describe(exc)}") from exc

    def _receive(self, body_left: int) -> bytes | bytearray | memoryview:
        """The next bytes: the rest of a body of known length in one call on a plain
        socket (MSG_WAITALL; what came before a timeout or the end is returned
        as it is), else one read of up to RECEIVE_SIZE."""
        try:
            if self._plain and body_left > 0:
                buf = bytearray(body_left)
                got = self._sock.recv_into(buf, body_left, socket.MSG_WAITALL)
                return buf if got == body_left else memoryview(buf)[:got]
            return self._sock.recv(RECEIVE_SIZE)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO, settimeout
            raise _Stalled(f"{self.origin}: timed out (nothing received for "
                           f"{self._timeouts.read:g} s)") from None
        except OSError as exc:
            raise PeerGoneError(f"{self.origin}: {_describe(exc)}") from exc

    def _send(self, data: bytes) -> None:
        try:
            if self._plain:
                self._sock.sendall(data)
            else:
                self._sock.settimeout(self._timeouts.write)
                self._sock.sendall(data)
                self._sock.settimeout(self._timeouts.read)
        except (TimeoutError, BlockingIOError):
            raise _Stalled(f"{self.origin}: timed out sending a request (after "
                           f"{self._timeouts.write:g} s)") from None
        except OSError as exc:
            raise PeerGoneError(f"{self.origin}: {_describe(exc)}") from exc


class Abort:
    """Lets the event loop stop a worker thread's requests: `abort()` fails the one under
    way at once (its socket is shut down) and every later one before it starts.

    The thread lets go of a connection (`using(None)`) before it pools it, and the
    two sides take turns (a lock): an abort that comes as a request ends (a run's last
    block dropped by a hedge that won) shuts down that connection only while this run
    holds it, never once it is idle, where another run may already be sending on it
    (that run's block then failed, and the mirror was backed off for it).
    """

    def __init__(self) -> None:
        self.aborted = False
        self._conn: BlockingHttpConnection | None = None
        self._lock = threading.Lock()

    def using(self, conn: BlockingHttpConnection | None) -> None:
        """The worker thread says which connection it is about to use (None: none)."""
        with self._lock:
            self._conn = conn
            if conn is not None and self.aborted:
                conn.abort()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._conn is not None:
                self._conn.abort()


class BlockingPool:
    """Keep-alive blocking connections shared by worker threads (`HttpPool`'s rules).

    Worker threads call `request`; the caller bounds how many run at once
    (a `trio.CapacityLimiter` around the thread calls). Idle connections are
    kept per origin, at most `max_idle` in all, and checked before reuse; a
    request that fails on a reused connection before any byte of its answer
    came is tried once more on a new one; redirects are followed.
    """

    def __init__(self, max_idle: int = 16, timeouts: HttpTimeouts | None = None,
                 max_redirects: int = 4, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_idle = max_idle
        self.timeouts = timeouts or HttpTimeouts()
        self.max_redirects = max_redirects
        self.ssl_context = ssl_context
        self.stats = PoolStats()
        self.closed = False
        self._lock = threading.Lock()
        self._idle: dict[Origin, list[BlockingHttpConnection]] = {}
        self._unpipelined: set[Origin] = set()  # origins that sent a response `get_run` cannot frame

    def request(self, method: str, url: str, *, limit: int, abort: Abort,
                headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
        """The response to `method url` after redirects (blocking; call it in a worker thread)."""
        for _ in range(self.max_redirects + 1):
            status, names, body, kept = self._request_once(method, url, headers, limit, abort)
            location = names.get("location")
            if status in _REDIRECTS and location:
                url = urljoin(url, location.strip())
                continue
            return HttpResponse(status, names, body, url, kept)
        raise PeerGoneError(f"{url}: too many redirects (a redirect loop?)")

    def get_run(self, urls: Sequence[str], *, limit: int, abort: Abort,
                wanted: Callable[[int], bool],
                on_turn: Callable[[int], None]) -> Iterator[tuple[int, HttpResponse | DhtError]]:
        """GET `urls` (one origin), pipelined on one connection; yields (index, the response
        or its error: PeerGoneError or BodyTooLongError) in order as each comes.

        Blocks `wanted(i)` says are not wanted any more when their turn to be sent comes
        are not asked for; `on_turn(i)` is called as a block's response becomes the next
        to be read (until then it waits behind another). A connection the server ends
        (`Connection: close`, nginx's `keepalive_requests`) or breaks before a byte of a
        block's response came, after answering others (or reused from the pool), costs
        nothing but a new connection: the blocks not answered are asked again there,
        the one whose response broke as well (a reset drops what had arrived unread).
        A block fails when it stalls, is too long, or its response breaks as the first
        of a connection (the blocks after it are then asked again on a new one; a
        connect that fails fails them all): so a block is asked at most once more for
        each connection that answered others before breaking on it. A
        response this client does not frame (`Unframeable`) sends the rest the general
        way (`request`, h11), and so does every later run to that origin. Redirects are
        followed for their block alone (`request`). Blocking; call it in a worker thread.
        """
        origin, _ = Origin.split(urls[0])
        targets = []
        for url in urls:
            where, target = Origin.split(url)
            if where != origin:
                raise ValueError("one origin per run")
            targets.append(target)
        left = list(range(len(urls)))  # not answered yet, in order
        fresh = False  # the next connection must be a new one
        while left:
            if abort.aborted or self.closed:
                raise PeerGoneError(f"{origin}: cancelled")
            left = [i for i in left if wanted(i)]
            if not left:
                return
            if origin in self._unpipelined:
                for i in left:
                    if not wanted(i):
                        continue
                    on_turn(i)
                    try:
                        answer: HttpResponse | DhtError = self.request(
                            "GET", urls[i], limit=limit, abort=abort)
                    except (PeerGoneError, BodyTooLongError) as exc:
                        if abort.aborted:
                            raise PeerGoneError(f"{origin}: cancelled") from None
                        answer = exc
                    yield i, answer
                return
            conn = None if fresh else self._take_idle(origin)
            reused = conn is not None
            if conn is None:
                try:
                    conn = BlockingHttpConnection.open(origin, self.timeouts, self.ssl_context)
                except PeerGoneError as exc:
                    for i in left:
                        yield i, exc
                    return
                with self._lock:
                    self.stats.connections_opened += 1
            with self._lock:
                self.stats.requests += len(left)
            fresh = False
            answered = 0
            pooled = False
            try:
                abort.using(conn)
                try:
                    conn.send_gets([targets[i] for i in left], limit)
                except PeerGoneError as exc:
                    if abort.aborted:
                        raise PeerGoneError(f"{origin}: cancelled") from None
                    if not reused:
                        yield left.pop(0), exc
                    fresh = True
                    continue
                for i in list(left):
                    on_turn(i)
                    try:
                        response = conn.next_response()
                    except BodyTooLongError as exc:  # its own; the connection is closed
                        left.remove(i)
                        yield i, exc
                        fresh = True
                        break
                    except PeerGoneError as exc:
                        if abort.aborted:
                            raise PeerGoneError(f"{origin}: cancelled") from None
                        if isinstance(exc, Unframeable):
                            with self._lock:
                                self._unpipelined.add(origin)
                            break
                        if isinstance(exc, _Stalled) or not (
                                answered or (reused and not conn.response_started)):
                            # it stalled, or the first answer of this connection broke
                            left.remove(i)
                            yield i, exc
                        else:
                            # the server ended or reset a connection that answered others
                            # (a reset also drops what had come and was not read yet), or a
                            # reused one before answering: this block and the rest again
                            with self._lock:
                                self.stats.retried += 1
                        fresh = True
                        break
                    left.remove(i)
                    answered += 1
                    answer = self._followed(urls[i], response, limit, abort)
                    abort.using(conn)  # a redirect followed used (and let go of) another
                    yield i, answer
                    if conn.closed:
                        break
                else:
                    conn.end_pipeline()
                    abort.using(None)
                    if not abort.aborted and not conn.closed:
                        self._put_idle(conn)
                        pooled = True
            finally:
                abort.using(None)
                if not pooled:
                    conn.close()

    def _followed(self, url: str, response: Response, limit: int,
                  abort: Abort) -> HttpResponse | DhtError:
        """A pipelined response as `request` gives it: a redirect followed on its own."""
        location = response.headers.get("location")
        if response.status in _REDIRECTS and location:
            try:
                return self.request("GET", urljoin(url, location.strip()), limit=limit,
                                    abort=abort)
            except (PeerGoneError, BodyTooLongError) as exc:
                return exc
        return HttpResponse(response.status, response.headers, response.body, url,
                            response.kept)

    def close(self) -> None:
        """Close the idle connections (thread-safe); busy ones close as their request ends."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _request_once(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                      limit: int, abort: Abort) -> tuple[int, dict[str, str], bytes, bool]:
        origin, target = Origin.split(url)
        conn = self._take_idle(origin)
        reused = conn is not None
        with self._lock:
            self.stats.requests += 1
        try:
            while True:
                if abort.aborted or self.closed:
                    raise PeerGoneError(f"{url}: cancelled")
                if conn is None:
                    conn = BlockingHttpConnection.open(origin, self.timeouts, self.ssl_context)
                    with self._lock:
                        self.stats.connections_opened += 1
                abort.using(conn)
                try:
                    answer = conn.request(method, target, headers, limit)
                except PeerGoneError:
                    if abort.aborted:
                        raise PeerGoneError(f"{url}: cancelled") from None
                    if reused and not conn.answered:
                        # the server closed it while idle, and we wrote first: once more, new
                        with self._lock:
                            self.stats.retried += 1
                        conn, reused = None, False
                        continue
                    raise
                abort.using(None)
                if abort.aborted:  # it may have been shut down under the answer: not reused
                    conn.close()
                else:
                    self._put_idle(conn)
                return answer
        finally:
            abort.using(None)

    def _take_idle(self, origin: Origin) -> BlockingHttpConnection | None:
        while True:
            with self._lock:
                conns = self._idle.get(origin)
                if not conns:
                    return None
                conn = conns.pop()
            # one that was in use a moment ago is taken as it is: a poll per request is
            # a syscall and a GIL hand-off per block, and a server that closed it since
            # is answered by the retry on a new connection (`_request_once`)
            if conn.reusable and (time.monotonic() - conn.idle_since < _FRESH_IDLE
                                  or not conn.looks_stale()):
                return conn
            with self._lock:
                self.stats.stale_dropped += 1
            conn.close()

    def _put_idle(self, conn: BlockingHttpConnection) -> None:
        drop: list[BlockingHttpConnection] = []
        conn.idle_since = time.monotonic()
        with self._lock:
            if conn.reusable and not self.closed:
                self._idle.setdefault(conn.origin, []).append(conn)
                total = sum(len(c) for c in self._idle.values())
                for conns in self._idle.values():
                    while conns and total > self.max_idle:
                        drop.append(conns.pop(0))
                        total -= 1
            else:
                drop.append(conn)
        for old in drop:
            old.close()


def _new_h11() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)


def default_ssl_context() -> ssl.SSLContext:
    """The system's trust store, certificate and host name checked, HTTP/1.1 by ALPN."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _timeval(seconds: float) -> bytes:
    """struct timeval for SO_RCVTIMEO / SO_SNDTIMEO (0 would mean "no limit": at least 1 us)."""
    whole = int(seconds)
    return struct.pack("@ll", whole, max(1, int((seconds - whole) * 1e6)) if whole == 0
                       else int((seconds - whole) * 1e6))


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
