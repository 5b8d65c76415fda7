"""dht/http_connection.py: keep-alive connections on h11, the pool, and what bad servers send.

Against a real nginx on 127.0.0.1 (reuse, redirects, limits) and against
small trio servers on 127.0.0.1 that misbehave on purpose (close an idle
keep-alive connection, cut a body short, stall, announce too much). The
property tests drive one connection over an in-memory stream: any split of
a valid response gives its exact body, and arbitrary bytes from a server
give an answer, PeerGoneError or BodyTooLongError, never anything else and
never a hang. Timing bounds only turn a hang into a failure.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht.errors import PeerGoneError
from dht.http_connection import (
    Abort,
    BlockingHttpConnection,
    BlockingPool,
    BodyTooLongError,
    HttpConnection,
    HttpPool,
    HttpTimeouts,
    Origin,
)
from tests.nginx_helpers import Nginx, free_port

DEADLINE = 30.0
SHORT = HttpTimeouts(connect=2.0, read=1.0, write=2.0, pool=3.0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE):
            await test()

    trio.run(main)


@pytest.fixture
def www(tmp_path: Path):
    root = tmp_path / "www"
    (root / "dir").mkdir(parents=True)
    files = {f"dir/f{i}": os.urandom(1000 + i * 50_000) for i in range(8)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    extra = """
        location = /moved { return 301 /dir/f1; }
    """
    with Nginx(root, tmp_path / "nginx", extra=extra) as server:
        yield server, files


async def serve(nursery: trio.Nursery, handler) -> str:
    """A one-off server on 127.0.0.1 running `handler(stream)` per connection; its base URL."""
    [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}"


async def read_request(stream: trio.SocketStream) -> bool:
    """Read one request head (no body: only GET and HEAD are sent); False at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buf += data
    return True


def test_keep_alive_reuses_few_connections_for_many_requests(www) -> None:
    server, files = www

    async def test() -> None:
        pool = HttpPool(max_connections=4, timeouts=SHORT)
        got: dict[str, bytes] = {}

        async def get(name: str) -> None:
            resp = await pool.request("GET", f"{server.url}/{name}", limit=1 << 20)
            assert resp.status == 200
            got[name] = resp.body

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                for name in files:
                    nursery.start_soon(get, name)
        assert got == files
        assert pool.stats.requests == 40 and pool.stats.connections_opened <= 4
        head = await pool.request("HEAD", f"{server.url}/dir/f3", limit=0)
        assert head.status == 200 and head.body == b""
        missing = await pool.request("GET", f"{server.url}/dir/nothing", limit=1 << 20)
        assert missing.status == 404
        moved = await pool.request("GET", f"{server.url}/moved", limit=1 << 20)
        assert moved.status == 200 and moved.body == files["dir/f1"]
        assert moved.url.endswith("/dir/f1")
        assert pool.stats.connections_opened <= 4  # a 404 and a 301 kept their connection
        await pool.aclose()
        with pytest.raises(PeerGoneError):
            await pool.request("GET", f"{server.url}/dir/f0", limit=1 << 20)

    run(test)


def test_body_limits_refuse_announced_and_endless_bodies(www) -> None:
    server, files = www

    async def chunked(stream: trio.SocketStream) -> None:
        if await read_request(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(1000):  # bounded: the client hangs up long before
                    await stream.send_all(b"10000\r\n" + b"x" * 65536 + b"\r\n")

    async def test() -> None:
        pool = HttpPool(timeouts=SHORT)
        with pytest.raises(BodyTooLongError, match="refused unread"):
            await pool.request("GET", f"{server.url}/dir/f7", limit=100_000)
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, chunked)
            with pytest.raises(BodyTooLongError, match="longer than"):
                await pool.request("GET", url + "/x", limit=300_000)
            nursery.cancel_scope.cancel()
        # the refused bodies' connections were dropped; the pool still works
        resp = await pool.request("GET", f"{server.url}/dir/f7", limit=1 << 20)
        assert resp.body == files["dir/f7"]
        await pool.aclose()

    run(test)


def test_idle_connection_closed_by_the_server_is_replaced(www) -> None:
    """A server that drops keep-alive connections between requests costs a reconnect, not
    an error: the stale connection is noticed before reuse, or the request is tried once
    more on a new one when the server closed it just as it was sent."""
    answered = []

    async def one_per_connection(stream: trio.SocketStream) -> None:
        if await read_request(stream):
            answered.append(1)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await stream.aclose()  # no "Connection: close": the client believes it is kept

    async def test() -> None:
        pool = HttpPool(max_connections=1, timeouts=SHORT)
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, one_per_connection)
            for _ in range(5):
                resp = await pool.request("GET", url + "/x", limit=100)
                assert resp.body == b"hello"
            nursery.cancel_scope.cancel()
        assert len(answered) == 5 and pool.stats.connections_opened == 5
        assert pool.stats.stale_dropped + pool.stats.retried == 4
        await pool.aclose()

    run(test)


async def truncated(stream: trio.SocketStream) -> None:
    if await read_request(stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)


async def stalled(stream: trio.SocketStream) -> None:
    if await read_request(stream):
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await trio.sleep_forever()


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def garbage(stream: trio.SocketStream) -> None:
    if await read_request(stream):
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")


# bad servers and what the error a request to each must say
BAD_SERVERS = ((truncated, "without sending complete|closed"), (stalled, "timed out"),
               (silent, "timed out"), (garbage, "broken HTTP"))


def test_truncated_stalled_and_garbage_answers_fail_in_time() -> None:
    async def test() -> None:
        pool = HttpPool(timeouts=SHORT)
        async with trio.open_nursery() as nursery:
            for handler, match in BAD_SERVERS:
                url = await serve(nursery, handler)
                start = trio.current_time()
                with pytest.raises(PeerGoneError, match=match):
                    await pool.request("GET", url + "/x", limit=1 << 20)
                assert trio.current_time() - start < 5 * SHORT.read
            # a TLS handshake that never gets an answer ends at the connect timeout
            url = await serve(nursery, silent)
            start = trio.current_time()
            with pytest.raises(PeerGoneError, match="timed out connecting"):
                await pool.request("GET", url.replace("http:", "https:") + "/x", limit=100)
            assert trio.current_time() - start < 5 * SHORT.connect
            nursery.cancel_scope.cancel()
        with pytest.raises(PeerGoneError, match="cannot connect|timed out"):
            await pool.request("GET", "http://127.0.0.1:1/x", limit=100)
        await pool.aclose()

    run(test)


def test_a_cancelled_request_frees_its_slot_and_drops_its_connection(www) -> None:
    server, files = www

    async def stalled(stream: trio.SocketStream) -> None:
        if await read_request(stream):
            await trio.sleep_forever()

    async def test() -> None:
        pool = HttpPool(max_connections=1, timeouts=HttpTimeouts(read=60.0, pool=60.0))
        async with trio.open_nursery() as nursery:
            url = await serve(nursery, stalled)
            with trio.move_on_after(0.5) as scope:
                await pool.request("GET", url + "/x", limit=100)
            assert scope.cancelled_caught
            nursery.cancel_scope.cancel()
        # the only slot is free again, and the half-read connection was not kept
        resp = await pool.request("GET", f"{server.url}/dir/f2", limit=1 << 20)
        assert resp.body == files["dir/f2"]
        assert sum(len(c) for c in pool._idle.values()) == 1
        await pool.aclose()

    run(test)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peerdrive test mirror")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_mirror_is_verified_and_kept_alive(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    files = {f"b{i}": os.urandom(300_000 + i) for i in range(6)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    cert, key = self_signed(tmp_path)
    port = free_port()
    extra = f"""
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
    """
    with Nginx(root, tmp_path / "nginx", extra=extra):
        base = f"https://127.0.0.1:{port}"

        async def test() -> None:
            trusting = ssl.create_default_context(cafile=str(cert))
            pool = HttpPool(max_connections=2, timeouts=SHORT, ssl_context=trusting)
            for _ in range(3):
                for name, data in files.items():
                    resp = await pool.request("GET", f"{base}/{name}", limit=1 << 20)
                    assert resp.status == 200 and resp.body == data
            assert pool.stats.connections_opened == 1
            await pool.aclose()
            # the system's trust store does not know this certificate: refused
            default = HttpPool(timeouts=SHORT)
            with pytest.raises(PeerGoneError, match="cannot connect"):
                await default.request("GET", f"{base}/b0", limit=1 << 20)
            await default.aclose()

        run(test)
        # the blocking connections of worker threads alike
        blocking = BlockingPool(max_idle=2, timeouts=SHORT,
                                ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(3):
            for name, data in files.items():
                assert blocking.request("GET", f"{base}/{name}", limit=1 << 20,
                                        abort=Abort()).body == data
        assert blocking.stats.connections_opened == 1
        blocking.close()
        with pytest.raises(PeerGoneError, match="cannot connect"):
            BlockingPool(timeouts=SHORT).request("GET", f"{base}/b0", limit=100, abort=Abort())


def test_origin_of_urls() -> None:
    assert Origin.split("http://h:8080/a/b?q") == (Origin("http", "h", 8080), "/a/b?q")
    origin, target = Origin.split("https://[::1]/x")
    assert origin == Origin("https", "::1", 443) and target == "/x"
    assert origin.host_header == "[::1]" and str(origin) == "https://[::1]"
    assert Origin("http", "h", 80).host_header == "h"
    for bad in ("ftp://h/x", "http:///x", "http://h:99999/"):
        with pytest.raises(PeerGoneError):
            Origin.split(bad)


# ---- one connection over an in-memory stream: property tests ---------------------------

async def _exchange(chunks: list[bytes], limit: int,
                    method: str = "GET") -> tuple[int, dict[str, str], bytes, bool]:
    """One request on a connection whose server side sends `chunks`, then closes."""
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConnection(client, Origin("http", "h", 80),
                          HttpTimeouts(connect=1.0, read=1.0, write=1.0, pool=1.0))

    async def serve_chunks() -> None:
        await server.receive_some()
        for chunk in chunks:
            await server.send_all(chunk)
        await server.send_eof()

    answer: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_chunks)
        try:
            answer.append(await conn.request(method, "/x", [], limit))
        except (PeerGoneError, BodyTooLongError) as exc:
            answer.append(exc)  # raised below as it is, not in the nursery's group
        finally:
            nursery.cancel_scope.cancel()
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


def _blocking_exchange(chunks: list[bytes], limit: int,
                       method: str = "GET") -> tuple[int, dict[str, str], bytes, bool]:
    """The same over a blocking connection on one end of a socket pair."""
    ours, theirs = socket.socketpair()
    conn = BlockingHttpConnection(ours, Origin("http", "h", 80),
                                  HttpTimeouts(connect=1.0, read=1.0, write=1.0, pool=1.0))

    def serve_chunks() -> None:
        with theirs:
            theirs.settimeout(5.0)
            try:
                theirs.recv(65536)
                for chunk in chunks:
                    theirs.sendall(chunk)
                theirs.shutdown(socket.SHUT_WR)
                theirs.recv(1)  # until the client closes its end
            except OSError:
                pass

    server = threading.Thread(target=serve_chunks)
    server.start()
    try:
        return conn.request(method, "/x", [], limit)
    finally:
        conn.close()
        server.join(10)


def exchange(kind: str, chunks: list[bytes], limit: int,
             method: str = "GET") -> tuple[int, dict[str, str], bytes, bool]:
    if kind == "trio":
        return trio.run(_exchange, chunks, limit, method)
    return _blocking_exchange(chunks, limit, method)


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@pytest.mark.parametrize("kind", ["trio", "blocking"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=3000), chunked=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_any_split_of_a_valid_response_gives_its_exact_body(kind: str, body: bytes,
                                                             chunked: bool,
                                                             cuts: list[int]) -> None:
    if chunked:
        wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in _splits(body, cuts) if p)
                + b"0\r\n\r\n")
    else:
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    got = exchange(kind, _splits(wire, cuts), 3000)
    assert got[0] == 200 and got[2] == body and got[3]


@pytest.mark.parametrize("kind", ["trio", "blocking"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: ",
                               b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"]),
       junk=st.binary(max_size=400), limit=st.integers(min_value=0, max_value=500))
def test_arbitrary_server_bytes_give_an_answer_or_our_errors(kind: str, prefix: bytes,
                                                             junk: bytes, limit: int) -> None:
    try:
        status, _headers, body, kept = exchange(kind, [prefix + junk], limit)
    except (PeerGoneError, BodyTooLongError):
        return
    assert 100 <= status <= 999
    assert len(body) <= max(limit, 64 * 1024)
    if status == 200:
        assert len(body) <= limit and kept


# ---- blocking connections for worker threads (BlockingPool) ----------------------------

def test_blocking_pool_keeps_alive_follows_redirects_and_refuses_long_bodies(www) -> None:
    server, files = www
    pool = BlockingPool(max_idle=2, timeouts=SHORT)
    for _ in range(3):
        for name, data in files.items():
            resp = pool.request("GET", f"{server.url}/{name}", limit=1 << 20, abort=Abort())
            assert resp.status == 200 and resp.body == data
    assert pool.stats.requests == 24 and pool.stats.connections_opened == 1
    assert pool.request("HEAD", f"{server.url}/dir/f3", limit=0, abort=Abort()).body == b""
    assert pool.request("GET", f"{server.url}/dir/none", limit=100, abort=Abort()).status == 404
    moved = pool.request("GET", f"{server.url}/moved", limit=1 << 20, abort=Abort())
    assert moved.body == files["dir/f1"] and moved.url.endswith("/dir/f1")
    assert pool.stats.connections_opened == 1  # a 404 and a 301 kept their connection
    with pytest.raises(BodyTooLongError, match="refused unread"):
        pool.request("GET", f"{server.url}/dir/f7", limit=100_000, abort=Abort())
    assert pool.request("GET", f"{server.url}/dir/f7", limit=1 << 20,
                        abort=Abort()).body == files["dir/f7"]
    pool.close()
    with pytest.raises(PeerGoneError):
        pool.request("GET", f"{server.url}/dir/f0", limit=1 << 20, abort=Abort())


def test_blocking_pool_bad_servers_fail_in_time_and_abort_ends_a_stalled_read() -> None:
    """Truncated, stalled, silent and garbage answers fail within the read timeout; an
    idle connection the server closed is replaced; `Abort.abort` from the event loop ends
    a read blocked in a worker thread at once, whatever the timeouts."""

    async def one_per_connection(stream: trio.SocketStream) -> None:
        if await read_request(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await stream.aclose()

    async def test() -> None:
        pool = BlockingPool(timeouts=SHORT)
        async with trio.open_nursery() as nursery:
            for handler, match in BAD_SERVERS:
                url = await serve(nursery, handler)
                start = trio.current_time()
                with pytest.raises(PeerGoneError, match=match):
                    await trio.to_thread.run_sync(partial(
                        pool.request, "GET", url + "/x", limit=1 << 20, abort=Abort()))
                assert trio.current_time() - start < 5 * SHORT.read
            url = await serve(nursery, one_per_connection)
            for _ in range(4):
                resp = await trio.to_thread.run_sync(partial(
                    pool.request, "GET", url + "/x", limit=100, abort=Abort()))
                assert resp.body == b"hello"
            assert pool.stats.stale_dropped + pool.stats.retried >= 3
            patient = BlockingPool(timeouts=HttpTimeouts(read=60.0, write=60.0))
            url = await serve(nursery, stalled)
            abort = Abort()
            start = trio.current_time()
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.to_thread.run_sync, partial(
                    _expect_gone, patient, url + "/x", abort))
                await trio.sleep(0.3)
                abort.abort()
            assert trio.current_time() - start < 10.0  # not the 60 s read timeout
            with pytest.raises(PeerGoneError, match="cancelled"):  # and nothing after it
                await trio.to_thread.run_sync(partial(
                    patient.request, "GET", url + "/x", limit=100, abort=abort))
            nursery.cancel_scope.cancel()
        with pytest.raises(PeerGoneError, match="cannot connect|timed out"):
            pool.request("GET", "http://127.0.0.1:1/x", limit=100, abort=Abort())
        pool.close()
        patient.close()

    run(test)


def _expect_gone(pool: BlockingPool, url: str, abort: Abort) -> None:
    with pytest.raises(PeerGoneError):
        pool.request("GET", url, limit=1 << 20, abort=abort)


def test_blocking_connection_answers_in_turn_and_closes_when_told() -> None:
    """Responses of every framing one after another on one blocking connection (a 200 of
    known length is received past h11, the others through it): each body exact, the
    connection reusable after each, and closed after a response that says close (HTTP/1.1
    `Connection: close`, or HTTP/1.0)."""
    body = os.urandom(300_000)
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive, Close\r\n\r\nlast",
    ]
    expected = [(200, body), (404, b"not found"), (200, b"hello"), (200, b""), (200, body),
                (200, b"last")]
    for final, last in ((answers[-1], b"last"),
                        (b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold.", b"old.")):
        ours, theirs = socket.socketpair()
        conn = BlockingHttpConnection(ours, Origin("http", "h", 80), SHORT)

        def serve(final: bytes = final, theirs: socket.socket = theirs) -> None:
            with theirs:
                theirs.settimeout(10.0)
                for answer in [*answers[:-1], final]:
                    request = b""
                    while not request.endswith(b"\r\n\r\n"):
                        request += theirs.recv(65536)
                    theirs.sendall(answer)
                theirs.recv(1)  # until the client closes its end

        server = threading.Thread(target=serve)
        server.start()
        try:
            for (status, data), _ in zip([*expected[:-1], (200, last)], answers, strict=True):
                assert conn.request("GET", "/x", [], 1 << 20)[:3:2] == (status, data)
                if data != last:
                    assert conn.reusable
            assert conn.closed and not conn.reusable
        finally:
            conn.close()
            server.join(10)
            assert not server.is_alive()
