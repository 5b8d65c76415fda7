"""HTTP mirrors as a source of the fetch scheduler, against a real nginx on 127.0.0.1.

Bad mirrors (corrupt, truncated or missing files, a redirect loop, an
endless body, a server that never answers) must never yield wrong bytes and
never hold a fetch past its deadline; a good mirror beside a bad one serves
everything. Timing bounds here only turn a hang into a failure.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from dht.errors import BadBlockError, BlockNotFound, FetchTimeout, PeerGoneError
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
            assert stats.failures == 1  # penalised (backoff), and never asked for it again
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


def test_big_blocks_are_hashed_in_batches_and_cancelled_waiters_leave_no_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 256 KiB and more are hashed in worker threads, those that arrived
    meanwhile in one call; a waiter cancelled before or during its batch takes nothing
    from the others."""
    import dht.http_source as hs

    calls: list[int] = []
    real = hs._sha256_each

    def counted(blocks: list[bytes]) -> list[bytes]:
        calls.append(len(blocks))
        return real(blocks)

    monkeypatch.setattr(hs, "_sha256_each", counted)
    datas = [os.urandom(300_000) for _ in range(24)]

    async def test() -> None:
        hasher = hs._BatchHasher()
        got: dict[int, bytes] = {}

        async def one(i: int) -> None:
            got[i] = await hasher.sha256(datas[i])

        async with trio.open_nursery() as nursery:
            scopes = []
            for i in range(len(datas)):
                scope = trio.CancelScope()
                scopes.append(scope)

                async def task(i: int = i, scope: trio.CancelScope = scope) -> None:
                    with scope:
                        await one(i)

                nursery.start_soon(task)
            await trio.sleep(0)
            for i in range(0, len(datas), 5):  # some leave while the first batch runs
                scopes[i].cancel()
        cancelled = set(range(0, len(datas), 5))
        for i, data in enumerate(datas):
            if i in got:
                assert got[i] == hashlib.sha256(data).digest()
            else:
                assert i in cancelled
        assert set(range(len(datas))) - cancelled <= set(got)
        assert not hasher._queue and not hasher._busy
        assert len(calls) < len(datas) - len(cancelled)  # batched, not one call each

    run(test)
