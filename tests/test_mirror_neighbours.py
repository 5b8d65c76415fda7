"""A good block at an HTTP mirror, whatever happened to the blocks around it (issue 10).

Seen once in a whole-suite run (tests/test_mirror.py, a mirror with corrupt,
truncated and missing files): right after the reads of the damaged files had
failed as they should, a read of an untouched file failed too, its block
"not fetched within 3s: tried 1 of 1 known peer(s)". Two ways a good block
could wait past the fetch timeout with its mirror the only source, each
reproduced here against a loopback HTTP server this test controls:

- every corrupt, truncated or too long file backed the whole mirror off, a
  backoff growing with each (0.5 s, 1, 2, 4 ... 60 s) until a block came:
  after a few damaged files nothing at all was asked of it;
- blocks handed to a mirror as one run are asked for one after the other on
  one connection: a block queued behind a file that stalls waited for that
  read's timeout, and was never asked again (the mirror already had it
  under way, and nobody else was there to hedge to).

And one way a run's end could break its neighbour's: an abort landing as a
request ended shut down the connection after it went back to the pool.

The fetcher runs with the mount's configuration; the bounds on the fetches
of good blocks (30 s) are far above what a loaded machine needs and far
below the waits of the defects (a 60 s backoff, a 60 s read timeout).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import pytest
import trio

from dht.errors import FetchTimeout
from dht.fetch import FetchConfig, Fetcher
from dht.http_connection import Abort, BlockingPool
from dht.http_source import HttpSource, HttpTimeouts
from dht.identity import NodeIdentity
from dht.mirror_layout import MAX_BLOCK, block_path
from dht.types import Priority

DEADLINE = 120.0
GOOD_WITHIN = 30.0  # a good block's fetch timeout: only a hang (or a long backoff) exceeds it
BAD_WITHIN = 2.0  # a bad block's: it fails whatever the bound
# the mount's fetcher, its fetch timeout long; a read that stalls is cut by the source only
# after a minute, so a block queued behind one is delivered only if it is asked again
MOUNT = FetchConfig(default_timeout=GOOD_WITHIN)
PATIENT = HttpTimeouts(connect=10.0, read=60.0, write=10.0, pool=60.0)

KINDS = ("corrupt", "truncated", "too_long", "cut", "missing", "stalled", "slow")
# a slow file comes after its fetch gave up (BAD_WITHIN) and after the blocks behind it
# were asked again on other connections (the first hedge, 0.5 s), whose answers take longer.
# The run's GETs are pipelined: the server reads the goods' requests on the first connection
# only after its slow answer, by when the fetch that gave up has shut that connection; the
# 4 s between the two keep a loop that runs late under load from counting them asked twice.
SLOW = 6.0
HEDGE_ANSWERED_AFTER = 7.0


class Mirror:
    """A keep-alive HTTP/1.1 server of blocks by id, each answered as its kind says."""

    def __init__(self, later_connections_wait: float = 0.0) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}  # target -> (kind, true bytes)
        self.asked: list[str] = []
        self.connections = 0
        # good files asked on any connection but the first wait this long (a hedge's)
        self.later_connections_wait = later_connections_wait

    def add(self, kind: str, size: int = 200_000) -> bytes:
        data = os.urandom(size)
        block_id = hashlib.sha256(data).digest()
        self.files[f"/{block_path(block_id)}"] = (kind, data)
        return block_id

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        later = self.connections > 0
        self.connections += 1
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    target = event.target.decode()
                    self.asked.append(target)
                    kind, data = self.files.get(target, ("", b""))
                    if later and kind == "good":
                        await trio.sleep(self.later_connections_wait)
                    if not await self._answer(stream, conn, kind, data):
                        return
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, kind: str,
                      data: bytes) -> bool:
        """Answer one request; False when the connection is to end here."""
        if kind == "stalled":
            await trio.sleep_forever()
        if kind == "slow":  # and damaged
            await trio.sleep(SLOW)
            kind = "corrupt"
        if kind in ("missing", ""):
            await stream.send_all(conn.send(h11.Response(
                status_code=404, headers=[("Content-Length", "0")])) + conn.send(h11.EndOfMessage()))
            return True
        if kind == "cut":  # half the body of its announced length, then the connection closes
            await stream.send_all(conn.send(h11.Response(
                status_code=200, headers=[("Content-Length", str(len(data)))]))
                + conn.send(h11.Data(data=data[: len(data) // 2])))
            return False
        if kind == "too_long":  # a length no block may have (refused unread), a little sent
            await stream.send_all(conn.send(h11.Response(
                status_code=200, headers=[("Content-Length", str(MAX_BLOCK + 1))]))
                + conn.send(h11.Data(data=data)))
            return False
        if kind == "corrupt":
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        elif kind == "truncated":
            data = data[:-100]
        await stream.send_all(conn.send(h11.Response(
            status_code=200, headers=[("Content-Length", str(len(data)))]))
            + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
        return True


def with_mirror(test: Callable[[Mirror, Fetcher], Awaitable[None]], mirror: Mirror) -> None:
    """Run `test` with a Fetcher (the mount's configuration) whose only source is `mirror`."""

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as outer:
                [listener] = await outer.start(partial(trio.serve_tcp, mirror.serve, 0,
                                                       host="127.0.0.1"))
                url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
                async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32),
                                   list, config=MOUNT) as fetcher:
                    fetcher.set_sources([HttpSource(url, timeouts=PATIENT)])
                    await test(mirror, fetcher)
                outer.cancel_scope.cancel()

    trio.run(main)


async def fails(fetcher: Fetcher, block_id: bytes) -> None:
    with pytest.raises(FetchTimeout):
        await fetcher.fetch(block_id, Priority.READ, timeout=BAD_WITHIN)


async def all_at_once(fetcher: Fetcher, block_ids: list[bytes],
                      *calls: Callable[[], Awaitable[None]]) -> None:
    """Ask for `block_ids` in one step, in this order (the READs a kernel sends at once, or
    a reader's readahead), so they go to the mirror as runs; then make `calls` (fetches
    that join those requests) and wait for them."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(fetcher.fetch_ahead, block_ids, Priority.READ,
                                    timeout=BAD_WITHIN))
        for call in calls:
            nursery.start_soon(call)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "too_long"])
def test_a_good_block_comes_after_a_dozen_damaged_files_failed(kind: str) -> None:
    """Damaged files are a fact about each file, not about the mirror: twelve of them
    (three runs) fail, and so does a retry of one; the next good block still comes."""
    mirror = Mirror()
    bad = [mirror.add(kind) for _ in range(12)]
    good = mirror.add("good")

    async def test(mirror: Mirror, fetcher: Fetcher) -> None:
        await all_at_once(fetcher, bad, *[partial(fails, fetcher, b) for b in bad])
        await fails(fetcher, bad[0])  # the kernel asks again
        assert await fetcher.fetch(good, Priority.READ) == mirror.files[
            f"/{block_path(good)}"][1]
        [stats] = fetcher.peer_stats()
        assert stats.bad_blocks >= 12 and stats.blocks == 1

    with_mirror(test, mirror)


@pytest.mark.parametrize("kind", KINDS)
def test_a_good_block_queued_behind_a_bad_one_in_a_run_comes(kind: str) -> None:
    """Reads wanted at once go to the mirror as one run, fetched in order on one
    connection: a good block right behind a bad one (which fails, is refused, breaks
    the connection, never answers or answers late) is delivered all the same, its bytes
    exact, and asked for once."""
    mirror = Mirror(HEDGE_ANSWERED_AFTER if kind == "slow" else 0.0)
    bad = mirror.add(kind)
    goods = [mirror.add("good") for _ in range(2)]
    got: dict[bytes, bytes] = {}

    async def read(fetcher: Fetcher, block_id: bytes) -> None:
        got[block_id] = await fetcher.fetch(block_id, Priority.READ)

    async def test(mirror: Mirror, fetcher: Fetcher) -> None:
        await all_at_once(fetcher, [bad, *goods], partial(fails, fetcher, bad),
                          *[partial(read, fetcher, g) for g in goods])
        assert got == {g: mirror.files[f"/{block_path(g)}"][1] for g in goods}
        # each asked for once: a block moved out of its run is not fetched there as well
        assert [mirror.asked.count(f"/{block_path(g)}") for g in goods] == [1, 1]
        # and the block after them, alone
        last = mirror.add("good")
        assert await fetcher.fetch(last, Priority.READ) == mirror.files[
            f"/{block_path(last)}"][1]

    with_mirror(test, mirror)


def test_an_abort_as_a_request_ends_spares_the_connection_another_run_takes_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's abort (its last block dropped: a hedge won) may come just as its request
    ends. It must not reach the connection once that is back in the pool: the next run
    takes it there (a reused connection is not looked at if it went idle a moment ago),
    and its block failed with the shut-down socket, or was asked again on a new one."""
    mirror = Mirror()
    first, second = mirror.add("good"), mirror.add("good")

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as outer:
                [listener] = await outer.start(partial(trio.serve_tcp, mirror.serve, 0,
                                                       host="127.0.0.1"))
                url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
                pool = BlockingPool(timeouts=PATIENT)
                dropped = Abort()
                put_idle = pool._put_idle

                def pooled_then_aborted(conn) -> None:  # the loop's abort lands right here
                    put_idle(conn)
                    dropped.abort()

                monkeypatch.setattr(pool, "_put_idle", pooled_then_aborted)
                resp = await trio.to_thread.run_sync(partial(
                    pool.request, "GET", f"{url}/{block_path(first)}", limit=MAX_BLOCK,
                    abort=dropped))
                assert resp.status == 200
                monkeypatch.undo()
                resp = await trio.to_thread.run_sync(partial(
                    pool.request, "GET", f"{url}/{block_path(second)}", limit=MAX_BLOCK,
                    abort=Abort()))
                assert resp.status == 200
                assert resp.body == mirror.files[f"/{block_path(second)}"][1]
                stats = pool.stats
                assert (stats.connections_opened, stats.retried, stats.stale_dropped) == (1, 0, 0)
                pool.close()
                outer.cancel_scope.cancel()

    trio.run(main)
