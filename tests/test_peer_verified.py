"""The `on_verified` hook of peer connections and the fetcher (issue 12): each block
whose bytes hash to the id its request asked for is handed over in the connection's
receive thread, before the fetch returns; nothing else ever is (real TLS on 127.0.0.1)."""

from __future__ import annotations

import functools
import hashlib
import os
import threading

import pytest
import trio

from dht.client import PeerConnection
from dht.errors import BadBlockError, FetchTimeout, PeerGoneError
from dht.fetch import Fetcher
from dht.http_source import HttpSource
from dht.identity import NodeIdentity
from dht.mirror_layout import block_path
from dht.types import Priority
from tests.helpers import run_trio
from tests.test_fetch import CALM, FAST, fixed
from tests.test_http_source import SHORT, mirror  # noqa: F401 (a fixture)
from tests.test_http_source import blocks as http_blocks
from tests.test_peer_support import CorruptSource, make_blocks, new_drive, start_server

TEST_DEADLINE = 60.0  # no test may hang: each runs under this bound

run = functools.partial(run_trio, deadline=TEST_DEADLINE)  # run(test): test(nursery)


class Recorder:
    """An `on_verified` hook that records what it was given, in which thread, and
    whether the fetch of that block had already returned."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, bool, bool]] = []
        self.returned: set[bytes] = set()
        self._lock = threading.Lock()

    def __call__(self, block_id: bytes, data: bytes) -> None:
        with self._lock:
            self.calls.append((block_id, bytes(data),
                               threading.current_thread() is threading.main_thread(),
                               block_id in self.returned))


def test_each_block_goes_to_on_verified_in_the_receive_thread_before_its_fetch_returns(
        ) -> None:
    blocks = make_blocks(40, 64 * 1024)
    dk, secret = new_drive()
    hook = Recorder()

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, blocks, {dk: secret})
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            conn.on_verified = hook

            async def one(bid: bytes) -> None:
                assert await conn.fetch(bid) == blocks[bid]
                hook.returned.add(bid)

            async with trio.open_nursery() as fetches:
                for bid in blocks:
                    fetches.start_soon(one, bid)

    run(test)
    assert sorted(c[0] for c in hook.calls) == sorted(blocks)  # each block once
    for block_id, data, on_main, after in hook.calls:
        assert data == blocks[block_id]
        assert not on_main, "the hook ran on the event loop, not in the receive thread"
        assert not after, "the fetch returned before the hook had the block"


def test_on_verified_never_sees_bytes_that_do_not_hash_to_the_id_asked_for() -> None:
    """A peer that sends wrong bytes for every block: the fetch fails, the connection
    drops, and the hook is never called (with them or with anything)."""
    blocks = make_blocks(10)
    dk, secret = new_drive()
    hook = Recorder()

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, CorruptSource(blocks), {dk: secret})
        results: list[object] = []
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            conn.on_verified = hook

            async def one(bid: bytes) -> None:
                try:
                    results.append(await conn.fetch(bid))
                except (BadBlockError, PeerGoneError) as exc:
                    results.append(exc)

            async with trio.open_nursery() as fetches:
                for bid in blocks:
                    fetches.start_soon(one, bid)
        assert any(isinstance(r, BadBlockError) for r in results)
        assert not any(isinstance(r, bytes) for r in results)

    run(test)
    assert hook.calls == []


def test_a_failing_hook_neither_ends_the_connection_nor_changes_what_is_delivered() -> None:
    blocks = make_blocks(8, 32 * 1024)
    dk, secret = new_drive()
    called = []

    def broken(block_id: bytes, data: bytes) -> None:
        called.append(block_id)
        raise RuntimeError("a hook that fails")

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, blocks, {dk: secret})
        async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
            conn.on_verified = broken
            for bid, data in blocks.items():
                assert await conn.fetch(bid) == data
            assert not conn.closed

    run(test)
    assert called == list(blocks)


def test_the_fetcher_hands_its_hook_to_the_connections_it_dials() -> None:
    blocks = make_blocks(30, 16 * 1024)
    dk, secret = new_drive()
    hook = Recorder()

    async def test(nursery: trio.Nursery) -> None:
        started = [await start_server(nursery, blocks, {dk: secret}) for _ in range(2)]
        addrs = [a for _, a in started]
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed(addrs), config=CALM,
                           on_verified=hook) as f:
            for bid, data in blocks.items():
                assert await f.fetch(bid, Priority.READ) == data

    run(test)
    assert {c[0] for c in hook.calls} == set(blocks)
    assert all(hashlib.sha256(data).digest() == bid for bid, data, _, _ in hook.calls)
    assert not any(on_main for _, _, on_main, _ in hook.calls)


def test_a_mirror_source_gets_the_fetchers_hook_and_never_passes_on_a_corrupt_file(
        mirror) -> None:  # noqa: F811
    """The same hook for HTTP mirrors (`Fetcher.set_sources`): each good block goes to it
    in the source's fetch thread; a corrupt file never does."""
    root, server = mirror
    want = http_blocks(root, 6)
    corrupt = next(iter(want))
    path = root / block_path(corrupt)
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    hook = Recorder()

    async def test(nursery: trio.Nursery) -> None:
        async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                           lambda: [], config=FAST, on_verified=hook) as f:
            f.set_sources([HttpSource(server.url, timeouts=SHORT)])
            with pytest.raises(FetchTimeout):
                await f.fetch(corrupt, timeout=2.0)
            for bid, data in want.items():
                if bid != corrupt:
                    assert await f.fetch(bid, Priority.READ, timeout=20.0) == data

    run(test)
    assert sorted(c[0] for c in hook.calls) == sorted(b for b in want if b != corrupt)
    for block_id, data, on_main, _ in hook.calls:
        assert data == want[block_id]
        assert not on_main
