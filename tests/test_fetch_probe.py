"""A lone source's hiccup costs a retry, not its backoff (issue 10's fetch path).

A drive whose only reachable source is one HTTP mirror (or one peer): a stall
or a broken connection there put the source in exponential backoff, shared
with peers (0.5 s doubling up to `backoff_max`, 60 s; every attempt in flight
at a stalled mirror added a failure, so one stall of a streaming read reached
the 60 s at once, until one incident counted once: tests/test_fetch_incidents.py). While it lasted every READ of an uncached block parked and
failed with EIO at its fetch timeout, though the source was healthy again a
moment later. Now a request with no other eligible source probes the backed-off
source (`Fetcher._probe_target`): one attempt at a time, `probe_interval` after
the failure, doubling up to `probe_max` while it keeps failing; a probe that
answers ends the backoff.

The fetcher runs against fake sources on trio's MockClock (autojump): every
bound here is virtual time or a count, never the wall clock, so a loaded
machine cannot pass or fail them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

from dht.errors import BadBlockError, BlockNotFound, FetchTimeout, PeerGoneError
from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.types import Priority

MOUNT = FetchConfig()  # what a mount runs with (its fetch timeout is the default, 30 s)
READ_TIMEOUT = 10.0  # an HTTP source's read timeout: a stalled request fails after this
VIRTUAL_DEADLINE = 3600.0  # virtual seconds: a hang jumps here and fails the test


def run_virtual(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(VIRTUAL_DEADLINE):
            await test()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def make_blocks(n: int, size: int = 4096) -> dict[bytes, bytes]:
    blocks = {}
    for _ in range(n):
        data = os.urandom(size)
        blocks[hashlib.sha256(data).digest()] = data
    return blocks


class FakeSource:
    """A static source (as an HTTP mirror) whose health the test sets.

    `stalled_until`: a request made before then gets no answer for READ_TIMEOUT and
    fails (a frozen server, as HttpSource sees one). `dead_until`: a request made
    before then fails at once (refused, reset). `lies_about`: blocks answered with
    wrong bytes. Blocks it does not hold are NotFound.
    """

    def __init__(self, name: str, blocks: dict[bytes, bytes]) -> None:
        self.source_id = hashlib.sha256(name.encode()).digest()
        self.label = name
        self.closed = False
        self.blocks = blocks
        self.stalled_until = -math.inf
        self.dead_until = -math.inf
        self.lies_about: set[bytes] = set()
        self.calls: list[float] = []  # virtual time of every request
        self.served = 0
        self.on_call: Callable[[], None] | None = None

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        now = trio.current_time()
        self.calls.append(now)
        if self.on_call is not None:
            self.on_call()
        if now < self.stalled_until:
            await trio.sleep(READ_TIMEOUT)
            raise PeerGoneError(f"{self.label}: read timed out")
        if now < self.dead_until:
            raise PeerGoneError(f"{self.label}: connection refused")
        if block_id not in self.blocks:
            raise BlockNotFound(f"{self.label}: 404")
        if block_id in self.lies_about:
            raise BadBlockError(f"{self.label}: sent bytes that are not the block")
        self.served += 1
        return self.blocks[block_id]

    async def have(self, block_ids: Sequence[bytes]) -> list[bool]:
        return [b in self.blocks for b in block_ids]

    async def ping(self) -> float:
        return 0.01

    async def aclose(self) -> None:
        self.closed = True

    def calls_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.calls if start <= t < end)


def fetcher(config: FetchConfig = MOUNT) -> Fetcher:
    return Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32), list, config=config)


async def read_all(f: Fetcher, block_ids: Sequence[bytes]) -> dict[bytes, bytes]:
    """READs of `block_ids` at once (a reader's READs and readahead), each with the mount's
    fetch timeout; FetchTimeout if any is not delivered within it."""
    got: dict[bytes, bytes] = {}

    async def one(block_id: bytes) -> None:
        got[block_id] = await f.fetch(block_id, Priority.READ)

    async with trio.open_nursery() as nursery:
        for block_id in block_ids:
            nursery.start_soon(one, block_id)
    return got


def test_one_stall_at_the_only_source_costs_a_probe_not_the_backoff() -> None:
    blocks = make_blocks(24)
    ids = list(blocks)
    source = FakeSource("mirror", blocks)

    async def test() -> None:
        async with fetcher() as f:
            f.set_sources([source])
            # A streaming read: 8 blocks asked at once while the server froze a moment;
            # every one of them stalls, its attempt fails at the read timeout, and the
            # failures back the source off (to 60 s by the old rule: 16 failures).
            source.stalled_until = trio.current_time() + 1.0
            start = trio.current_time()
            got = await read_all(f, ids[:8])
            assert got == {b: blocks[b] for b in ids[:8]}  # not FetchTimeout at 30 s
            failed_at = start + READ_TIMEOUT  # the stalled requests all failed here
            assert source.calls_between(start, failed_at) == 8
            # the reads came back one probe after the failures, not a backoff later (one
            # stall is one incident now, tests/test_fetch_incidents.py: its 0.5 s backoff
            # ends before a probe is due, so the retry is no probe at all)
            assert trio.current_time() - failed_at <= 2 * MOUNT.probe_interval
            assert f.stats.probes <= 1
            [stats] = f.peer_stats()
            assert stats.backoff_remaining == 0  # the probe's answer ended the backoff
            # the next reads go straight to the source: one request each, no wait
            before, asked = trio.current_time(), len(source.calls)
            got = await read_all(f, ids[8:])
            assert got == {b: blocks[b] for b in ids[8:]}
            assert trio.current_time() == before
            assert len(source.calls) - asked == len(ids) - 8

    run_virtual(test)


def test_a_dead_lone_source_is_probed_a_bounded_number_of_times_then_serves_at_once() -> None:
    blocks = make_blocks(2)
    [first, second] = blocks
    source = FakeSource("mirror", blocks)
    dead_for = 600.0
    backoff_seen: list[float] = []

    async def test() -> None:
        async with fetcher() as f:
            f.set_sources([source])

            def note_backoff() -> None:
                [stats] = f.peer_stats()
                backoff_seen.append(stats.backoff_remaining)

            source.on_call = note_backoff
            source.dead_until = trio.current_time() + math.inf
            start = trio.current_time()
            # a read waiting the whole time keeps asking for the source (a probe each time)
            with pytest.raises(FetchTimeout, match="1 failed"):
                await f.fetch(first, Priority.READ, timeout=dead_for)
            calls, probes = len(source.calls), f.stats.probes
            assert trio.current_time() - start == pytest.approx(dead_for)

            # It comes back just after a failed request: the next read waits at most one
            # probe spacing (the old rule: the rest of a 60 s backoff, past the fetch timeout).
            revived = trio.Event()

            def revive() -> None:
                source.dead_until = trio.current_time() + 1e-9
                source.on_call = None
                revived.set()

            source.on_call = revive
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(f.fetch, first, Priority.READ, timeout=1e9))
                await revived.wait()
                came_back = trio.current_time()
            assert trio.current_time() - came_back <= MOUNT.probe_max
            assert await f.fetch(second, Priority.READ) == blocks[second]

            # While it was dead: never hammered, the probes doubled their spacing up to
            # probe_max (one per probe_interval would be dead_for / probe_interval = 600
            # requests), and yet asked all along (the old rule: one per backoff_max, 16)
            assert dead_for / MOUNT.probe_max - 4 <= calls <= dead_for / MOUNT.probe_max + 16
            assert probes >= calls - 16
            # and the backoff itself still grew to its bound (several sources keep spreading)
            assert max(backoff_seen) >= MOUNT.backoff_max - MOUNT.probe_max

    run_virtual(test)


def test_two_sources_spread_as_before_and_probe_only_for_a_block_one_lacks() -> None:
    blocks = make_blocks(40)
    ids = list(blocks)
    only_at_a = ids[-1]
    a = FakeSource("a", blocks)
    b = FakeSource("b", {k: v for k, v in blocks.items() if k != only_at_a})
    # a long first backoff, so "was a backed off" is plain: the old rule waits it out
    config = FetchConfig(backoff_base=40.0, default_timeout=30.0)

    async def test() -> None:
        async with fetcher(config) as f:
            f.set_sources([a, b])
            a.dead_until = trio.current_time() + 1.0  # a fails once, at once, then is well
            got = await read_all(f, ids[:8])
            assert got == {k: blocks[k] for k in ids[:8]}
            assert a.calls and a.served == 0  # a was asked and failed: backed off 40 s
            stats = {s.node_id: s for s in f.peer_stats()}
            assert stats[a.source_id].backoff_remaining > 30.0
            # Unchanged while b can serve: every block goes to b, a is never asked (not
            # even probed) during its backoff.
            asked_a = len(a.calls)
            got = await read_all(f, ids[8:-1])
            assert got == {k: blocks[k] for k in ids[8:-1]}
            assert len(a.calls) == asked_a
            assert f.stats.probes == 0
            # A block b does not hold (404): a is its only eligible source, so a is probed
            # and serves it well inside the 30 s fetch timeout (old: FetchTimeout).
            start = trio.current_time()
            assert await f.fetch(only_at_a, Priority.READ) == blocks[only_at_a]
            assert trio.current_time() - start <= config.probe_interval
            assert f.stats.probes == 1
            assert len(a.calls) == asked_a + 1

    run_virtual(test)


def test_a_lone_pushed_source_that_lied_is_not_probed() -> None:
    """A guard on the hostile rule: a peer that sent a corrupt block stays shunned for
    `bad_block_backoff`, lone or not (a probe rule ignoring that fails here)."""
    blocks = make_blocks(3)
    [lie, good, other] = blocks
    source = FakeSource("pushing peer", blocks)
    source.lies_about = {lie}

    async def test() -> None:
        async with fetcher() as f:
            gone = trio.Event()
            f.add_source(source, gone.wait)  # a peer's push connection: a peer, not a mirror
            with pytest.raises(FetchTimeout):
                await f.fetch(lie, Priority.READ)
            asked = len(source.calls)
            with pytest.raises(FetchTimeout, match="backing off"):
                await f.fetch(good, Priority.READ, timeout=MOUNT.bad_block_backoff / 2)
            assert len(source.calls) == asked  # never probed while shunned
            assert f.stats.probes == 0
            gone.set()

    run_virtual(test)


def test_a_mirrors_rotten_files_still_exclude_only_those_blocks() -> None:
    """A guard: a mirror's corrupt files are no failure of the mirror (no backoff, so
    nothing to probe); a good block asked right after a dozen of them is asked at once
    (a backoff per rotten file fails here, probes or not)."""
    blocks = make_blocks(13)
    *rotten, good = blocks
    source = FakeSource("mirror", blocks)
    source.lies_about = set(rotten)

    async def test() -> None:
        async with fetcher() as f:
            f.set_sources([source])

            async def fails(block_id: bytes) -> None:
                with pytest.raises(FetchTimeout, match="corrupt"):
                    await f.fetch(block_id, Priority.READ)

            async with trio.open_nursery() as nursery:
                for block_id in rotten:
                    nursery.start_soon(fails, block_id)
                await trio.testing.wait_all_tasks_blocked()
                assert len(source.calls) == len(rotten)  # all answered, each once
                start = trio.current_time()
                assert await f.fetch(good, Priority.READ) == blocks[good]
                assert trio.current_time() == start
            assert len(source.calls) == len(blocks)  # never asked for a rotten one again
            assert f.stats.probes == 0

    run_virtual(test)
