"""A mirror's run of blocks pipelined on one connection (issue 10), against real servers.

A run's GETs go out back to back and the responses are read in order. What
must hold whatever the server does: nginx ending a connection after
`keepalive_requests` (here 3), a server that resets the connection in the
middle of the pipeline or says `Connection: close` there, a body cut short,
a response the pipelining client does not frame (chunked): every block not
answered is asked again on a new connection, not failed; a block fails only
for its own response; damaged or missing files spoil nothing around them.
nginx's `$pipe` in its access log says which requests arrived pipelined.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from dht.client import RunOfWants
from dht.errors import BadBlockError, BlockNotFound, PeerGoneError
from dht.http_source import HttpSource, HttpTimeouts
from dht.mirror_layout import block_path
from dht.types import Priority
from tests.nginx_helpers import Nginx, free_port
from tests.test_http_connection import self_signed

DEADLINE = 60.0
SHORT = HttpTimeouts(connect=5.0, read=10.0, write=5.0, pool=10.0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE):
            await test()

    trio.run(main)


async def fetch_run(src: HttpSource, ids: list[bytes]) -> dict[int, object]:
    """Each block of one run: its bytes, or the type of its error."""
    got: dict[int, object] = {}

    def on_result(i: int, data: bytes | None, error: Exception | None) -> None:
        assert i not in got
        got[i] = data if error is None else type(error)

    await src.fetch_run(RunOfWants(ids, Priority.READAHEAD), on_result)
    return got



def mirror_files(root: Path, count: int, size: int) -> tuple[list[bytes], list[bytes]]:
    """`count` random blocks of about `size` bytes (each a byte longer than the one
    before) as a mirror's files under `root`: their bytes and their ids."""
    datas = [os.urandom(size + i) for i in range(count)]
    ids = [hashlib.sha256(d).digest() for d in datas]
    for block_id, data in zip(ids, datas, strict=True):
        path = root / block_path(block_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return datas, ids

def test_nginx_ending_connections_every_3_requests_spoils_no_block_of_a_run(
        tmp_path: Path) -> None:
    """A run of 8 with a corrupt file, a missing one and a truncated one among them, from
    nginx with `keepalive_requests 3`: each good block exact, each bad one its own error,
    every block asked once, on 3 connections, the requests after the first on each one
    pipelined."""
    root = tmp_path / "www"
    datas, ids = mirror_files(root, 8, 150_000)
    corrupt, missing, truncated = 2, 4, 6
    path = root / block_path(ids[corrupt])
    path.write_bytes(datas[corrupt][:-1] + b"?")
    (root / block_path(ids[missing])).unlink()
    (root / block_path(ids[truncated])).write_bytes(datas[truncated][:-5000])
    log = tmp_path / "access.log"
    with Nginx(root, tmp_path / "nginx",
               http_extra="    log_format pipes '$connection $pipe $status $request_uri';",
               extra=f"        keepalive_requests 3;\n        access_log {log} pipes;") as server:

        async def test() -> None:
            src = HttpSource(server.url, timeouts=SHORT)
            got = await fetch_run(src, ids)
            assert got == {0: datas[0], 1: datas[1], corrupt: BadBlockError, 3: datas[3],
                           missing: BlockNotFound, 5: datas[5], truncated: BadBlockError,
                           7: datas[7]}
            assert src._blocking.stats.connections_opened == 3
            await src.aclose()

        run(test)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(uri for *_, uri in lines) == sorted(f"/{block_path(i)}" for i in ids)
    assert len({conn for conn, *_ in lines}) == 3
    assert [pipe for _, pipe, *_ in lines] == [".", "p", "p"] * 2 + [".", "p"]


class Server:
    """A keep-alive server of files by path that reads pipelined requests and answers each
    in turn; connection k (0, 1, ...) ends after `ends[k]` = (answers, how) responses:
    "reset" (an RST with the requests after them unanswered) or "close" (the last one says
    `Connection: close`, then the server closes). Files are "good", "cut" (half the body
    of its length, then the close) or "chunked"."""

    def __init__(self, ends: list[tuple[int, str]]) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}
        self.ends = ends
        self.connections = 0
        self.answered: list[tuple[int, str]] = []  # (connection, target) per response sent
        self.queued_at_first: list[int] = []  # requests already there behind a connection's first

    def add(self, kind: str) -> tuple[bytes, bytes]:
        data = os.urandom(120_000)
        block_id = hashlib.sha256(data).digest()
        self.files[f"/{block_path(block_id)}"] = (kind, data)
        return block_id, data

    async def serve(self, stream: trio.SocketStream) -> None:
        number = self.connections
        self.connections += 1
        limit, how = self.ends[number] if number < len(self.ends) else (1 << 30, "")
        buf = b""
        count = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                if count == 0:
                    self.queued_at_first.append(buf.count(b"\r\n\r\n"))
                if count == limit and how == "reset":
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                             struct.pack("ii", 1, 0))
                    return
                target = head.split(b" ")[1].decode()
                kind, body = self.files[target]
                self.answered.append((number, target))
                count += 1
                close = b"Connection: close\r\n" if how == "close" and count == limit else b""
                if kind == "chunked":
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                          + close + b"\r\n%x\r\n" % len(body) + body
                                          + b"\r\n0\r\n\r\n")
                    continue
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
                                      + close + b"\r\n"
                                      + (body[:len(body) // 2] if kind == "cut" else body))
                if kind == "cut" or close:
                    return
        except trio.BrokenResourceError:
            return
        finally:
            await stream.aclose()


def with_server(server: Server, test: Callable[[HttpSource], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, server.serve, 0,
                                                     host="127.0.0.1"))
            src = HttpSource(f"http://127.0.0.1:{listener.socket.getsockname()[1]}",
                             timeouts=SHORT)
            await test(src)
            await src.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reset_or_a_close_in_the_middle_of_a_pipeline_only_costs_a_new_connection() -> None:
    """The first connection is reset after 2 answers, the second says close on its 2nd:
    the 7 blocks come on 3 connections, none failed. (The reset may drop the 2nd answer
    before the client read it: that block is then asked again on the second connection.)"""
    server = Server([(2, "reset"), (2, "close")])
    blocks = [server.add("good") for _ in range(7)]

    async def test(src: HttpSource) -> None:
        got = await fetch_run(src, [b for b, _ in blocks])
        assert got == {i: data for i, (_, data) in enumerate(blocks)}
        assert src._blocking.stats.connections_opened == 3

    with_server(server, test)
    assert sorted({t for _, t in server.answered}) == sorted(server.files)
    connections = [c for c, _ in server.answered]
    assert connections.count(0) == connections.count(1) == 2 and set(connections) == {0, 1, 2}
    # the rest of the run arrived with each connection's first request
    assert server.queued_at_first in ([6, 4, 2], [6, 5, 3])


def test_a_body_cut_short_fails_its_block_only() -> None:
    """Cut after another block was answered on its connection, it is asked once more on a
    new one (a reset drops what the client had not read yet): cut there as well, as the
    connection's first answer, it fails; the blocks behind it come."""
    server = Server([])
    good = [server.add("good") for _ in range(3)]
    cut = server.add("cut")
    blocks = [good[0], cut, good[1], good[2]]

    async def test(src: HttpSource) -> None:
        got = await fetch_run(src, [b for b, _ in blocks])
        assert got == {0: good[0][1], 1: PeerGoneError, 2: good[1][1], 3: good[2][1]}

    with_server(server, test)
    assert [c for c, _ in server.answered] == [0, 0, 1, 2, 2]
    assert server.queued_at_first == [3, 2, 1]


def test_a_response_the_pipeline_cannot_frame_sends_the_rest_the_general_way() -> None:
    """A chunked answer in the middle of a run: that block and the ones after it are asked
    one at a time through h11, which reads them; so is every later run there."""
    server = Server([])
    blocks = [server.add("good"), server.add("chunked"), server.add("good"),
              server.add("chunked")]

    async def test(src: HttpSource) -> None:
        got = await fetch_run(src, [b for b, _ in blocks])
        assert got == {i: data for i, (_, data) in enumerate(blocks)}
        again = [server.add("good") for _ in range(3)]
        got = await fetch_run(src, [b for b, _ in again])
        assert got == {i: data for i, (_, data) in enumerate(again)}

    with_server(server, test)
    # pipelined: the 4 requests arrived at once; then one at a time on new connections:
    # the 3 left of the first run (the chunked one again), the 3 of the second
    assert server.queued_at_first[0] == 3 and set(server.queued_at_first[1:]) == {0}
    assert len([c for c, _ in server.answered if c > 0]) == 3 + 3


def test_a_run_over_https_is_pipelined_too(tmp_path: Path) -> None:
    """Over TLS the responses are read record by record through the decoder: every block
    exact, nginx ending each connection after 3 requests, the others pipelined."""
    root = tmp_path / "www"
    datas, ids = mirror_files(root, 5, 100_000)
    cert, key = self_signed(tmp_path)
    port = free_port()
    log = tmp_path / "access.log"
    with Nginx(root, tmp_path / "nginx",
               http_extra="    log_format pipes '$connection $pipe $status $request_uri';",
               extra=f"""
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        keepalive_requests 3;
        access_log {log} pipes;"""):

        async def test() -> None:
            src = HttpSource(f"https://127.0.0.1:{port}", timeouts=SHORT)
            src._blocking.ssl_context = ssl.create_default_context(cafile=str(cert))
            got = await fetch_run(src, ids)
            assert got == dict(enumerate(datas))
            assert src._blocking.stats.connections_opened == 2
            await src.aclose()

        run(test)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [pipe for _, pipe, *_ in lines] == [".", "p", "p", ".", "p"]
