"""HTTP mirrors as a source of the fetch scheduler, against a real nginx on 127.0.0.1.

Bad mirrors (corrupt, truncated or missing files, a redirect loop, an
endless body, a server that never answers) must never yield wrong bytes and
never hold a fetch past its deadline; a good mirror beside a bad one serves
everything. Timing bounds here only turn a hang into a failure.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from dht.client import RunOfWants
from dht.errors import BadBlockError, BlockNotFound, DhtError, FetchTimeout, PeerGoneError
from dht.fetch import FetchConfig, Fetcher
from dht.http_source import HttpSource, HttpTimeouts
from dht.identity import NodeIdentity
from dht.mirror_layout import HEAD_PATH, MirrorUrlError, block_path, check_base_url
from dht.types import Priority
from tests.nginx_helpers import Nginx

DEADLINE = 30.0
FAST = FetchConfig(hedge_floor=0.2, stall_timeout=1.0, backoff_base=0.1, backoff_max=1.0,
                   default_timeout=5.0, provider_refresh_min_interval=0.05)
SHORT = HttpTimeouts(connect=2.0, read=2.0, write=2.0, pool=5.0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE):
            await test()

    trio.run(main)


def put_block(root: Path, data: bytes) -> bytes:
    block_id = hashlib.sha256(data).digest()
    path = root / block_path(block_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return block_id


def blocks(root: Path, n: int, size: int = 200_000) -> dict[bytes, bytes]:
    out = {}
    for _ in range(n):
        data = os.urandom(size)
        out[put_block(root, data)] = data
    return out


@pytest.fixture
def mirror(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    extra = f"""
        location = /loop/head {{ return 302 /loop/head; }}
        location /loop/ {{ return 302 $uri; }}
        location /slow/ {{ limit_rate 1; alias {root}/; }}
    """
    with Nginx(root, tmp_path / "nginx", extra=extra) as server:
        yield root, server


def _no_providers():
    return []


def test_fetches_every_block_from_a_mirror(mirror) -> None:
    root, server = mirror
    want = blocks(root, 40)

    async def test() -> None:
        async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                           _no_providers, config=FAST) as f:
            f.set_sources([HttpSource(server.url, timeouts=SHORT)])
            async with f.fetch_many(list(want), Priority.READ) as results:
                got = {bid: data async for bid, data in results}
            assert got == want
            [stats] = f.peer_stats()
            assert stats.addr == server.url and stats.blocks == 40 and stats.failures == 0

    run(test)


def test_corrupt_truncated_and_missing_files_never_yield_bytes(mirror) -> None:
    root, server = mirror
    want = blocks(root, 4)
    corrupt, truncated, missing, truncated_ok = list(want)
    path = root / block_path(corrupt)
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    path = root / block_path(truncated)
    path.write_bytes(path.read_bytes()[:-10])
    (root / block_path(missing)).unlink()

    async def test() -> None:
        src = HttpSource(server.url, timeouts=SHORT)
        try:
            with pytest.raises(BadBlockError):
                await src.fetch(corrupt)
            with pytest.raises(BadBlockError):
                await src.fetch(truncated)
            with pytest.raises(BlockNotFound):
                await src.fetch(missing)
            assert await src.have(list(want)) == [True, True, False, True]
        finally:
            await src.aclose()
        async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                           _no_providers, config=FAST) as f:
            f.set_sources([HttpSource(server.url, timeouts=SHORT)])
            for bid in (missing, corrupt):
                start = trio.current_time()
                with pytest.raises(FetchTimeout):
                    await f.fetch(bid, timeout=2.0)
                assert trio.current_time() - start < 4.0
            [stats] = f.peer_stats()
            assert stats.bad_blocks == 1 and stats.not_found == 1
            assert stats.failures == 0  # never asked for it again, and not backed off
            # one rotten file does not cost the mirror's other blocks
            assert await f.fetch(truncated_ok, timeout=5.0) == want[truncated_ok]

    run(test)


def test_good_mirror_beside_bad_ones_serves_everything(mirror, tmp_path: Path) -> None:
    root, server = mirror
    want = blocks(root, 12)
    bad_root = tmp_path / "bad"
    for bid, data in want.items():  # every block corrupt on the second mirror
        p = bad_root / block_path(bid)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    async def stalled(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await trio.sleep_forever()  # headers never come

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, stalled, 0, host="127.0.0.1"))
            stall_url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
            with Nginx(bad_root, tmp_path / "nginx-bad") as bad:
                async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                                   _no_providers, config=FAST) as f:
                    f.set_sources([HttpSource(u, timeouts=SHORT)
                                   for u in (bad.url, stall_url, server.url)])
                    for bid, data in want.items():
                        assert await f.fetch(bid, Priority.READ, timeout=8.0) == data
            nursery.cancel_scope.cancel()

    run(test)


def test_redirect_loop_endless_body_and_stall_end_in_time(mirror) -> None:
    root, server = mirror
    want = blocks(root, 1)
    [bid] = list(want)

    sent: list[int] = []

    async def endless(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
        try:
            for _ in range(1000):  # 64 MiB at most, bounded
                await stream.send_all(chunk)
                sent.append(len(chunk))
        except trio.BrokenResourceError:
            pass  # the client hung up, as it should

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, endless, 0, host="127.0.0.1"))
            endless_url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
            src = HttpSource(endless_url, timeouts=SHORT)
            with pytest.raises(BadBlockError, match="longer than"):
                await src.fetch(bid)
            await src.aclose()
            assert sum(sent) < 16 * 1024 * 1024  # it stopped reading at the block limit
            loop = HttpSource(server.url + "/loop", timeouts=SHORT)
            with pytest.raises(PeerGoneError, match="redirect"):
                await loop.fetch(bid)
            with pytest.raises(PeerGoneError, match="redirect"):
                await loop.fetch_record()
            await loop.aclose()
            slow = HttpSource(server.url + "/slow", timeouts=SHORT)
            async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                               _no_providers, config=FAST) as f:
                f.set_sources([slow])
                start = trio.current_time()
                with pytest.raises(FetchTimeout):
                    await f.fetch(bid, timeout=3.0)
                assert trio.current_time() - start < 5.0
            nursery.cancel_scope.cancel()

    run(test)


def test_head_record_and_not_modified(mirror) -> None:
    root, server = mirror
    (root / HEAD_PATH).write_bytes(b"signed head bytes")

    async def test() -> None:
        src = HttpSource(server.url, timeouts=SHORT)
        try:
            assert await src.fetch_record() == b"signed head bytes"
            before = src.bytes
            assert await src.fetch_record() == b"signed head bytes"  # a 304: no body
            assert src.bytes == before
            (root / HEAD_PATH).write_bytes(b"x" * 10_000)  # longer than any head record
            with pytest.raises(PeerGoneError, match="longer than"):
                await src.fetch_record()
            (root / HEAD_PATH).unlink()
            assert await src.fetch_record() is None
        finally:
            await src.aclose()
        gone = HttpSource(f"http://127.0.0.1:{server.port + 0}/nothing-here", timeouts=SHORT)
        assert await gone.fetch_record() is None
        await gone.aclose()

    run(test)


@pytest.mark.parametrize("url", [
    "ftp://example.org/x", "http://", "http://user:pw@host/x", "http://h/x?q=1", "http://h/x#f",
    "http://h/a b", "http://h:0/", "http://h:99999/", "h/x", "", "http://h/" + "a" * 600,
    "http://h/\x00", "https://h/é",
])
def test_bad_mirror_urls_are_refused(url: str) -> None:
    with pytest.raises(MirrorUrlError):
        check_base_url(url)


def test_mirror_url_canonical_form() -> None:
    assert check_base_url("https://cdn.example.org/drives/x/") == "https://cdn.example.org/drives/x"
    assert check_base_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


@given(st.text(max_size=80))
def test_url_checker_never_raises_anything_else(text: str) -> None:
    try:
        out = check_base_url(text)
    except MirrorUrlError:
        return
    assert out.startswith(("http://", "https://")) and check_base_url(out) == out


def test_a_run_is_fetched_by_one_worker_thread_and_each_block_answered_alone(mirror) -> None:
    """A run's blocks go one after the other on one keep-alive connection in one worker
    thread; each gets its own answer (bytes, BlockNotFound, BadBlockError), and a block
    dropped before its turn is answered (None, None) and never asked for."""
    root, server = mirror
    want = blocks(root, 4)
    good1, missing, corrupt, dropped = list(want)
    (root / block_path(missing)).unlink()
    path = root / block_path(corrupt)
    path.write_bytes(path.read_bytes()[:-1] + b"?")

    async def test() -> None:
        src = HttpSource(server.url, timeouts=SHORT)
        assert src.max_wants >= 4 and not src.prioritises
        run_ = RunOfWants([good1, missing, corrupt, dropped], Priority.READAHEAD)
        run_.cancel(3)
        got: dict[int, tuple] = {}

        def on_result(i: int, data: bytes | None, error: Exception | None) -> None:
            assert i not in got
            got[i] = (data, type(error) if error is not None else None)

        await src.fetch_run(run_, on_result)
        assert got == {0: (want[good1], None), 1: (None, BlockNotFound),
                       2: (None, BadBlockError), 3: (None, None)}
        assert src.requests == 3 and src._blocking.stats.connections_opened == 1
        with pytest.raises(DhtError):
            await src.fetch_run(RunOfWants([good1] * (src.max_wants + 1), Priority.READ),
                                on_result)
        await src.aclose()
        with pytest.raises(PeerGoneError):
            await src.fetch(good1)

    run(test)


def test_runs_share_the_sources_fetch_threads_and_none_outlives_aclose(mirror) -> None:
    """Runs at once go to the source's own fetch threads, at most `max_connections` of
    them, started once and kept between runs (no thread per run), and every one has
    ended when `aclose` returns."""
    root, server = mirror
    want = blocks(root, 24, size=50_000)
    ids = list(want)
    before = set(threading.enumerate())

    def fetch_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate()
                if t not in before and t.name.startswith("mirror-fetch")}

    async def test() -> None:
        src = HttpSource(server.url, max_connections=3, timeouts=SHORT)
        got: dict[bytes, bytes | None] = {}

        def answer(base: int, i: int, data: bytes | None, error: Exception | None) -> None:
            assert error is None
            got[ids[base + i]] = data

        for _ in range(2):
            got.clear()
            async with trio.open_nursery() as nursery:
                for base in range(0, len(ids), 4):
                    nursery.start_soon(src.fetch_run,
                                       RunOfWants(ids[base:base + 4], Priority.READAHEAD),
                                       partial(answer, base))
            assert got == want
            threads = fetch_threads()
            assert 1 <= len(threads) <= 3 and all(t.is_alive() for t in threads)
        assert fetch_threads() == threads  # the same threads took the second round
        await src.aclose()
        assert not any(t.is_alive() for t in threads)

    run(test)


def test_a_dropped_or_cancelled_run_at_a_stalled_mirror_ends_at_once(mirror) -> None:
    """Timeouts of a minute; a run whose every block is dropped, or whose caller is
    cancelled, ends within seconds (its connection is shut down under the worker
    thread), with no answer after the caller left."""
    root, server = mirror
    want = blocks(root, 2)
    patient = HttpTimeouts(connect=5.0, read=60.0, write=60.0, pool=60.0)

    async def stalled(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await trio.sleep_forever()

    async def test() -> None:
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, stalled, 0, host="127.0.0.1"))
            src = HttpSource(f"http://127.0.0.1:{listener.socket.getsockname()[1]}",
                             timeouts=patient)
            run_ = RunOfWants(list(want), Priority.READ)
            got: list[tuple] = []

            async def drop_all() -> None:
                await trio.sleep(0.3)
                run_.cancel(1)
                run_.cancel(0)

            start = trio.current_time()
            nursery.start_soon(drop_all)
            await src.fetch_run(run_, lambda i, d, e: got.append((i, d, e)))
            assert sorted(got) == [(0, None, None), (1, None, None)]
            assert trio.current_time() - start < 10.0
            got.clear()
            start = trio.current_time()
            with trio.move_on_after(0.3):
                await src.fetch_run(RunOfWants(list(want), Priority.READ),
                                    lambda i, d, e: got.append((i, d, e)))
            assert trio.current_time() - start < 10.0 and got == []
            await src.aclose()
            nursery.cancel_scope.cancel()

    run(test)


def test_a_block_under_way_at_a_mirror_is_not_asked_again_when_a_read_needs_it(
        tmp_path: Path) -> None:
    """A web server answers in arrival order: a READ for a block the readahead is
    fetching waits for that fetch (one request per block), it does not send a second."""
    root = tmp_path / "www"
    root.mkdir()
    want = blocks(root, 6)
    patient = FetchConfig(hedge_floor=20.0, stall_timeout=20.0, default_timeout=20.0)
    asked: list[str] = []

    async def slow_static(stream: trio.SocketStream) -> None:
        """Serves files under root, each 0.3 s after it is asked for (keep-alive)."""
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                asked.append(event.target.decode())
                await trio.sleep(0.3)
                body = (root / event.target.decode().lstrip("/")).read_bytes()
                await stream.send_all(conn.send(h11.Response(
                    status_code=200, headers=[("Content-Length", str(len(body)))]))
                    + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            elif isinstance(event, h11.EndOfMessage):
                conn.start_next_cycle()

    async def test() -> None:
        async with trio.open_nursery() as outer:
            [listener] = await outer.start(partial(trio.serve_tcp, slow_static, 0,
                                                   host="127.0.0.1"))
            src = HttpSource(f"http://127.0.0.1:{listener.socket.getsockname()[1]}",
                             timeouts=SHORT)
            async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                               _no_providers, config=patient) as f:
                f.set_sources([src])
                ids = list(want)
                got: dict[bytes, bytes] = {}

                async def read(bid: bytes) -> None:
                    got[bid] = await f.fetch(bid, Priority.READ)

                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(f.fetch_ahead, ids, Priority.READAHEAD))
                    while not asked:  # the first block under way (0.3 s), the rest behind it
                        await trio.sleep(0.01)
                    for bid in ids:  # each wanted now, while under way or queued
                        nursery.start_soon(read, bid)
                assert got == want
            assert sorted(asked) == sorted(f"/{block_path(bid)}" for bid in ids)
            outer.cancel_scope.cancel()

    run(test)
