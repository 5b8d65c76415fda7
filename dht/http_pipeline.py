"""HTTP/1.1 pipelining of GETs to a static server: the requests and the responses (sans-io).

An HTTP mirror's fetch thread asks for a run of up to 8 blocks. One request
after the other costs a round trip each; pipelined (RFC 9112 9.3.2: the
run's GETs sent back to back, the responses read in order) it costs one.
h11 cannot pipeline (a client connection sends its next request only once
the last response ended), and parsing a response head with it cost about
80 us of the fetch thread's Python per block (docs/benchmarks.md, issue 10).
So this module frames the narrow case a static file server answers with,
and nothing else:

- a request is `GET target HTTP/1.1` with Host, User-Agent and
  `Accept-Encoding: identity`; the target is printable ASCII without spaces
  (`build_gets` refuses anything else: no header injection);
- a response head is `HTTP/1.0` or `HTTP/1.1`, a three-digit status, header
  lines `name: value` ending in CRLF, names of token characters, values
  without CR, LF or NUL, at most 64 KiB in all; a malformed head is
  `PeerGoneError`;
- its body is framed by Content-Length alone (one value, digits only; the
  same value repeated is one): a 1xx, a Transfer-Encoding (chunked), a body
  without a length (until the close), an obsolete folded line or a bare LF
  is `Unframeable`: the caller closes the connection and asks for the
  blocks left the general way, one at a time through h11
  (`dht.http_connection.BlockingPool.request`), which handles them;
- a 200's body is kept up to `limit` bytes (a longer announced length is
  `BodyTooLongError`, unread), any other status's up to 64 KiB (a longer one
  is answered without its body, and the connection cannot go on);
  204 and 304 have none;
- the connection is kept after a response only if it is HTTP/1.1 and does
  not say `Connection: close`.

`ResponseDecoder` is fed the bytes of one connection and hands out its
responses in order; the caller may instead receive a body itself, past the
decoder, straight into the bytes handed up (`body_missing`, `take_body`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BadBlockError, PeerGoneError

MAX_HEAD_BYTES = 64 * 1024  # a response head longer than this is refused
DISCARD_LIMIT = 64 * 1024  # the body of a non-200 answer is kept up to this
_MAX_LENGTH_DIGITS = 18
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_USER_AGENT = "peerdrive"


class BodyTooLongError(BadBlockError):
    """A response body (announced or received) longer than the caller's limit; refused."""


class Unframeable(PeerGoneError):
    """A well-formed response this module does not frame (chunked, no length, 1xx): the
    connection cannot go on here; the general client (h11) can read such answers."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; of a repeated header, the last
    body: bytes
    kept: bool = True  # False: a non-200 body too long to keep; `body` is empty
    keeps_alive: bool = True  # the connection may carry the next response


@dataclass
class _Head:
    status: int
    headers: dict[str, str]
    length: int
    keeps_alive: bool
    kept: bool  # False: a non-200 body past DISCARD_LIMIT, not read


def build_gets(host_header: str, targets: Sequence[str]) -> bytes:
    """The bytes of GET requests for `targets`, back to back (one send)."""
    parts = []
    for target in targets:
        if not _TARGET.fullmatch(target):
            raise PeerGoneError(f"{target!r}: not a request target this client sends")
        parts.append(f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
                     f"User-Agent: {_USER_AGENT}\r\nAccept-Encoding: identity\r\n\r\n")
    return "".join(parts).encode("ascii")


def head_end(data: bytes | bytearray) -> int:
    """Length of the response head at the start of `data` (with its blank line), or -1
    when it is not all there yet; PeerGoneError when it cannot end within the bound."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
    if end < 0:
        if len(data) >= MAX_HEAD_BYTES + 4:
            raise PeerGoneError(f"a response head longer than {MAX_HEAD_BYTES} bytes; refused")
        return -1
    return end + 4


def parse_head(head: bytes | bytearray, limit: int, label: str = "server") -> _Head:
    """The response head `head` (ending with its blank line), checked; see the module."""
    lines = bytes(head[:-4]).split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise PeerGoneError(f"{label}: broken HTTP response: status line {lines[0][:80]!r}")
    minor, status = match.group(1), int(match.group(2))
    if status < 100:
        raise PeerGoneError(f"{label}: broken HTTP response: status {status}")
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    close = minor == b"0"
    chunked = False
    for line in lines[1:]:
        if b"\n" in line or b"\r" in line:
            raise Unframeable(f"{label}: a bare CR or LF in a response head")
        if line[:1] in (b" ", b"\t"):
            raise Unframeable(f"{label}: an obsolete folded header line")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise PeerGoneError(f"{label}: broken HTTP response: header line {line[:80]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise PeerGoneError(f"{label}: broken HTTP response: a control character in "
                                f"header {name[:40]!r}")
        key = name.lower()
        if key == b"content-length":
            lengths.add(value)
        elif key == b"transfer-encoding":
            chunked = True
        elif key == b"connection":
            close = close or any(t.strip(b" \t").lower() == b"close" for t in value.split(b","))
        headers[key.decode("ascii")] = value.decode("latin-1")
    if status < 200:
        raise Unframeable(f"{label}: an informational response ({status})")
    if status in (204, 304):
        return _Head(status, headers, 0, not close, True)
    if chunked:
        raise Unframeable(f"{label}: a Transfer-Encoding body")
    if not lengths:
        raise Unframeable(f"{label}: a body without a Content-Length")
    if len(lengths) > 1:
        raise PeerGoneError(f"{label}: broken HTTP response: Content-Length values disagree")
    [text] = lengths
    if not text.isdigit() or not text.isascii() or len(text) > _MAX_LENGTH_DIGITS:
        raise PeerGoneError(f"{label}: broken HTTP response: Content-Length {text[:40]!r}")
    length = int(text)
    if status == 200:
        if length > limit:
            raise BodyTooLongError(f"{label}: a body of {length} bytes is longer than "
                                   f"{limit}; refused unread")
        return _Head(status, headers, length, not close, True)
    if length > DISCARD_LIMIT:  # a big error page: not worth reading, nor the connection
        return _Head(status, headers, 0, False, False)
    return _Head(status, headers, length, not close, True)


class ResponseDecoder:
    """The responses on one connection, in order (sans-io: fed bytes, asked for the next).

    `next()` is the next complete response, or None until more bytes come.
    Once a head is parsed and its body is not all in the buffer, the caller
    may receive the `body_missing()` bytes itself and hand them to
    `take_body` (one copy from the kernel into the bytes handed up, when
    nothing of the body was buffered). `feed(b"")` says the server closed:
    PeerGoneError if a response was under way. After a response that does
    not keep the connection, nothing more is decoded (`done`).
    """

    def __init__(self, limit: int, label: str = "server") -> None:
        self.limit = limit
        self.label = label
        self._buf = bytearray()
        self._head: _Head | None = None
        self._eof = False
        self.done = False  # a response ended the connection's use

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet handed out."""
        return len(self._buf)

    @property
    def started(self) -> bool:
        """Some byte of the next response has arrived."""
        return self._head is not None or bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
        else:
            self._buf += data

    def head_size(self) -> int:
        """The size of the next head if it is all in the buffer and not parsed yet, else -1."""
        return head_end(self._buf) if self._head is None else -1

    def body_missing(self) -> int:
        """Body bytes of the response under way not in the buffer yet (0: no head yet)."""
        if self._head is None:
            return 0
        return max(0, self._head.length - len(self._buf))

    def next(self) -> Response | None:
        if self.done:
            raise PeerGoneError(f"{self.label}: no more responses on this connection")
        if self._head is None:
            end = head_end(self._buf)
            if end < 0:
                self._check_eof()
                return None
            self._head = parse_head(self._buf[:end], self.limit, self.label)
            del self._buf[:end]
        head = self._head
        if len(self._buf) < head.length:
            self._check_eof()
            return None
        body = bytes(self._buf[:head.length])
        del self._buf[:head.length]
        return self._finish(body)

    def take_body(self, rest: bytes) -> Response:
        """The response under way, `rest` (exactly `body_missing()` bytes, received by the
        caller) completing its body."""
        head = self._head
        assert head is not None and len(rest) == head.length - len(self._buf)
        if self._buf:
            body = bytes(self._buf) + rest
            self._buf.clear()
        else:
            body = rest
        return self._finish(body)

    def _finish(self, body: bytes) -> Response:
        head = self._head
        assert head is not None
        self._head = None
        if not head.keeps_alive:
            self.done = True
        return Response(head.status, head.headers, body, head.kept, head.keeps_alive)

    def _check_eof(self) -> None:
        if self._eof:
            if self.started:
                raise PeerGoneError(f"{self.label}: the server closed the connection in the "
                                    "middle of a response")
            raise PeerGoneError(f"{self.label}: the server closed the connection before "
                                "answering")
