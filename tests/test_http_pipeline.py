"""dht/http_pipeline.py: pipelined GETs and the decoder of back-to-back responses (sans-io).

Properties: any split of a valid sequence of responses gives exactly those
responses, in order (fed to the decoder, or received by a blocking
connection over a socket pair, its bodies received past the decoder);
arbitrary bytes give responses or this package's errors, never another
exception, never a 200 body past the limit. And the strictness of the
narrow case, one rule at a time.
"""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht.errors import PeerGoneError
from dht.http_connection import BlockingHttpConnection, HttpTimeouts, Origin
from dht.http_pipeline import (
    DISCARD_LIMIT,
    MAX_HEAD_BYTES,
    BodyTooLongError,
    Response,
    ResponseDecoder,
    Unframeable,
    build_gets,
)

LIMIT = 5000
REASONS = {200: b"OK", 404: b"Not Found", 410: b"Gone", 204: b"No Content",
           304: b"Not Modified", 500: b"Internal Server Error", 301: b"Moved Permanently"}


def wire(status: int, body: bytes, *, close: bool = False, version: bytes = b"1.1",
         extra: bytes = b"") -> bytes:
    """One response as a static server sends it."""
    head = b"HTTP/%s %d %s\r\nServer: nginx\r\n" % (version, status, REASONS[status])
    if status not in (204, 304):
        head += b"Content-Length: %d\r\n" % len(body)
    else:
        body = b""
    if close:
        head += b"Connection: close\r\n"
    return head + extra + b"\r\n" + body


responses = st.lists(st.tuples(st.sampled_from([200, 200, 200, 404, 410, 204, 304, 500, 301]),
                               st.binary(max_size=LIMIT)), min_size=1, max_size=6)


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def decode_all(chunks: list[bytes], count: int, limit: int = LIMIT) -> list[Response]:
    decoder = ResponseDecoder(limit)
    out: list[Response] = []
    for chunk in [*chunks, b""]:
        decoder.feed(chunk)
        while len(out) < count:
            response = decoder.next()
            if response is None:
                break
            out.append(response)
    return out


def expected(status: int, body: bytes) -> tuple[int, bytes]:
    return status, b"" if status in (204, 304) else body


@settings(max_examples=150, deadline=None)
@given(answers=responses, close_last=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=10))
def test_any_split_of_back_to_back_responses_gives_each_exactly(answers, close_last, cuts):
    data = b"".join(wire(s, b, close=close_last and i == len(answers) - 1)
                    for i, (s, b) in enumerate(answers))
    got = decode_all(_splits(data, cuts), len(answers))
    assert [(r.status, r.body) for r in got] == [expected(s, b) for s, b in answers]
    assert all(r.kept for r in got)
    assert [r.keeps_alive for r in got] == [not (close_last and i == len(answers) - 1)
                                            for i in range(len(answers))]


@settings(max_examples=100, deadline=None)
@given(answers=responses, cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=6),
       taken=st.integers(min_value=0, max_value=40))
def test_a_body_received_past_the_decoder_is_the_same_body(answers, cuts, taken):
    """The caller's short way (`body_missing`, `take_body`) after any part of a body was
    buffered gives what the decoder alone gives."""
    data = b"".join(wire(s, b) for s, b in answers)
    decoder = ResponseDecoder(LIMIT)
    pos = 0
    got = []
    chunks = _splits(data, cuts)
    while len(got) < len(answers):
        response = decoder.next()
        if response is not None:
            got.append(response)
            continue
        missing = decoder.body_missing()
        if missing and decoder.buffered <= taken:
            got.append(decoder.take_body(data[pos:pos + missing]))
            pos += missing
            continue
        chunk = chunks.pop(0) if chunks and sum(map(len, chunks)) == len(data) - pos else \
            data[pos:pos + 1000]
        decoder.feed(chunk)
        pos += len(chunk)
    assert [(r.status, r.body) for r in got] == [expected(s, b) for s, b in answers]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from([b"", wire(200, b"abc"), wire(404, b"x") + b"HTTP/1.1 200 OK\r\n",
                               b"HTTP/1.1 200 OK\r\nContent-Length: ",
                               b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: "]),
       junk=st.binary(max_size=300), limit=st.integers(min_value=0, max_value=400))
def test_arbitrary_server_bytes_give_responses_or_our_errors(prefix, junk, limit):
    decoder = ResponseDecoder(limit)
    try:
        decoder.feed(prefix + junk)
        decoder.feed(b"")
        for _ in range(50):
            response = decoder.next()
            assert response is not None  # the end was fed: a response or an error
            assert 200 <= response.status <= 999
            if response.status == 200:
                assert len(response.body) <= limit
            else:
                assert len(response.body) <= DISCARD_LIMIT
            if decoder.done:
                return
    except (PeerGoneError, BodyTooLongError):
        return


# ---- the narrow case, rule by rule ------------------------------------------------------

def one(data: bytes, limit: int = LIMIT) -> Response:
    decoder = ResponseDecoder(limit)
    decoder.feed(data)
    response = decoder.next()
    assert response is not None
    return response


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX-A: b\r\n\r\nok",
])
def test_what_the_narrow_case_does_not_frame_is_unframeable(data: bytes) -> None:
    with pytest.raises(Unframeable):
        one(data)


@pytest.mark.parametrize("data", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Evil: a\x00b\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Evil: a\x1bb\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nno colon here\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab",  # then the end: cut short
])
def test_malformed_or_cut_responses_are_peer_gone(data: bytes) -> None:
    decoder = ResponseDecoder(LIMIT)
    decoder.feed(data)
    decoder.feed(b"")
    with pytest.raises(PeerGoneError):
        decoder.next()


def test_lengths_limits_and_connection_rules() -> None:
    assert one(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc").body \
        == b"abc"  # the same length twice is one
    with pytest.raises(BodyTooLongError, match="refused unread"):
        one(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n", limit=5)
    big_error = one(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % (DISCARD_LIMIT + 1))
    assert (big_error.status, big_error.body, big_error.kept, big_error.keeps_alive) == (
        404, b"", False, False)
    assert not one(wire(200, b"x", version=b"1.0")).keeps_alive
    assert not one(wire(200, b"x", extra=b"Connection: keep-alive, Close\r\n")).keeps_alive
    assert one(wire(200, b"x", extra=b"Connection: keep-alive\r\n")).keeps_alive
    # after a response that ends the connection, nothing more is taken from it
    decoder = ResponseDecoder(LIMIT)
    decoder.feed(wire(200, b"a", close=True) + wire(200, b"b"))
    assert decoder.next().body == b"a" and decoder.done
    with pytest.raises(PeerGoneError):
        decoder.next()
    # a head that never ends within the bound
    decoder = ResponseDecoder(LIMIT)
    decoder.feed(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * MAX_HEAD_BYTES)
    with pytest.raises(PeerGoneError, match="longer than"):
        decoder.next()
    # a server that closes before answering, and one that closes in the middle
    for data, match in ((b"", "before answering"), (b"HTTP/1.1 200", "in the middle")):
        decoder = ResponseDecoder(LIMIT)
        decoder.feed(data)
        decoder.feed(b"")
        with pytest.raises(PeerGoneError, match=match):
            decoder.next()


def test_requests_are_back_to_back_gets_and_refuse_what_would_inject() -> None:
    data = build_gets("h:8080", ["/m/blocks/ab/abcd", "/x?y=1"])
    assert data == (b"GET /m/blocks/ab/abcd HTTP/1.1\r\nHost: h:8080\r\nUser-Agent: peerdrive\r\n"
                    b"Accept-Encoding: identity\r\n\r\n"
                    b"GET /x?y=1 HTTP/1.1\r\nHost: h:8080\r\nUser-Agent: peerdrive\r\n"
                    b"Accept-Encoding: identity\r\n\r\n")
    for bad in ("/a b", "/a\r\nX-Evil: 1", "x", "/\x00", "/é"):
        with pytest.raises(PeerGoneError):
            build_gets("h", [bad])


# ---- a blocking connection: pipelined GETs over a socket pair ---------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=responses, cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=8))
def test_a_blocking_connection_reads_any_split_of_pipelined_responses(answers, cuts) -> None:
    """The socket path (head peeked at, body received past the decoder in one call, or
    taken piecewise when the head came split) gives each response exactly."""
    data = b"".join(wire(s, b) for s, b in answers)
    ours, theirs = socket.socketpair()
    conn = BlockingHttpConnection(ours, Origin("http", "h", 80),
                                  HttpTimeouts(connect=5.0, read=5.0, write=5.0, pool=5.0))
    asked = []

    def serve() -> None:
        with theirs:
            theirs.settimeout(10.0)
            request = b""
            while request.count(b"\r\n\r\n") < len(answers):
                request += theirs.recv(65536)
            asked.append(request)
            for chunk in _splits(data, cuts):
                theirs.sendall(chunk)
            theirs.recv(1)  # until the client closes its end

    server = threading.Thread(target=serve)
    server.start()
    try:
        conn.send_gets([f"/b{i}" for i in range(len(answers))], LIMIT)
        got = [conn.next_response() for _ in answers]
        conn.end_pipeline()
        assert [(r.status, r.body) for r in got] == [expected(s, b) for s, b in answers]
        assert not conn.closed and conn.reusable
    finally:
        conn.close()
        server.join(10)
    assert asked[0].count(b"GET /b") == len(answers)
