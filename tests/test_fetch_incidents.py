"""One freeze of a busy source is one failure for its backoff, not one per request.

A source that goes silent (a frozen mirror, a peer whose connection broke)
fails every request in flight there, each on its own verdict: a hedge or the
stall watchdog declaring it stalled, then its own error. Counted one by one, a
mirror frozen with 16 requests in flight reached 16-32 failures, the 60 s
`backoff_max` at once; beside a peer (which took the work) it was never probed
and stayed unused a minute after a hiccup of a second. Now the failures of the
requests in flight when the incident was counted are that incident: one failure
(`Fetcher._penalise`, `since`), while each request is still retried at once. A
retry or probe that fails afterwards is a new incident, and a block with a wrong
hash still shuns its source per lie.

The fetcher runs against the fake sources of tests/test_fetch_probe.py on trio's
MockClock (autojump): virtual time and counts only, never the wall clock.
"""

from __future__ import annotations

import trio
import trio.testing

from dht.errors import FetchTimeout
from dht.fetch import FetchConfig
from dht.types import Priority
from tests.test_fetch_probe import (
    MOUNT,
    READ_TIMEOUT,
    FakeSource,
    fetcher,
    make_blocks,
    read_all,
    run_virtual,
)

IN_FLIGHT = 16  # a streaming reader's READs and readahead at one source: its slots


def test_one_freeze_of_a_lone_source_with_16_in_flight_counts_one_failure() -> None:
    """16 requests stall at once (each counted twice by the old rule: the watchdog and
    the read timeout: 32 failures, 60 s) and back the source off by one failure: 0.5 s."""
    blocks = make_blocks(IN_FLIGHT)
    ids = list(blocks)
    source = FakeSource("mirror", blocks)

    async def test() -> None:
        async with fetcher() as f:
            f.set_sources([source])
            start = trio.current_time()
            source.stalled_until = start + 1.0  # frozen for the requests in flight now
            got = await read_all(f, ids)
            assert got == blocks
            asked = sorted({t - start for t in source.calls})
            # asked at once, every request failed at the read timeout, and all were asked
            # again one failure's backoff later (old rule: a probe 1 s later, then all)
            assert asked == [0.0, READ_TIMEOUT + MOUNT.backoff_base]
            assert len(source.calls) == 2 * IN_FLIGHT
            assert f.stats.probes == 0  # no backoff long enough to need one
            [stats] = f.peer_stats()
            # every request failed there (stalled, then timed out), one incident counted
            assert stats.failures >= IN_FLIGHT and stats.incidents == 1

    run_virtual(test)


def test_two_freezes_count_two_failures() -> None:
    """The retry after the first incident's backoff meets the source still frozen: a
    second incident (1 s), then served; never more than two for 32 failed requests."""
    blocks = make_blocks(IN_FLIGHT)
    ids = list(blocks)
    source = FakeSource("mirror", blocks)
    first_retry = READ_TIMEOUT + MOUNT.backoff_base

    async def test() -> None:
        async with fetcher() as f:
            f.set_sources([source])
            start = trio.current_time()
            source.stalled_until = start + first_retry + 0.5  # the first retry stalls too
            got = await read_all(f, ids)
            assert got == blocks
            asked = sorted({t - start for t in source.calls})
            second_retry = first_retry + READ_TIMEOUT + 2 * MOUNT.backoff_base
            assert asked == [0.0, first_retry, second_retry]
            assert len(source.calls) == 3 * IN_FLIGHT
            [stats] = f.peer_stats()
            assert stats.failures >= 2 * IN_FLIGHT and stats.incidents == 2

    run_virtual(test)


def test_a_mirror_frozen_beside_a_peer_is_used_again_a_moment_later() -> None:
    """The case that hurt: a mirror and a peer share a reader's requests; the mirror
    freezes once. Its requests are hedged to the peer at once, and the mirror is backed
    off one failure (0.5 s), not the 60 s its stalled requests added up to: the next
    reads go to both again."""
    blocks = make_blocks(2 * IN_FLIGHT)
    ids = list(blocks)
    mirror = FakeSource("mirror", blocks)
    peer = FakeSource("peer", blocks)

    async def test() -> None:
        async with fetcher() as f:
            f.set_sources([mirror, peer])
            start = trio.current_time()
            mirror.stalled_until = start + 1.0
            got = await read_all(f, ids[:IN_FLIGHT])
            assert got == {b: blocks[b] for b in ids[:IN_FLIGHT]}
            stalled_at_mirror = len(mirror.calls)
            assert stalled_at_mirror >= 4  # the work was spread: several froze there
            # each was retried at the peer at once (its hedge time), not after a stall
            assert trio.current_time() - start <= 1.0
            await trio.testing.wait_all_tasks_blocked()  # the mirror's attempts cancelled
            stats = {s.node_id: s for s in f.peer_stats()}[mirror.source_id]
            assert stats.stalls == stats.failures == stalled_at_mirror
            assert stats.incidents == 1
            # one failure's backoff (the old rule: 0.5 s x 2^(stalls - 1), up to 60 s)
            assert 0 < stats.backoff_remaining <= MOUNT.backoff_base
            await trio.sleep(MOUNT.backoff_base)
            stats = {s.node_id: s for s in f.peer_stats()}[mirror.source_id]
            assert stats.backoff_remaining == 0  # eligible again (old rule: seconds to a minute)
            got = await read_all(f, ids[IN_FLIGHT:])
            assert got == {b: blocks[b] for b in ids[IN_FLIGHT:]}

    run_virtual(test)


class GatedLiar(FakeSource):
    """Answers nothing until `together` requests are in flight: they fail together."""

    def __init__(self, name: str, blocks: dict[bytes, bytes], together: int) -> None:
        super().__init__(name, blocks)
        self.together = together
        self.all_in = trio.Event()
        self.arrived = 0

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        self.arrived += 1
        if self.arrived >= self.together:
            self.all_in.set()
        await self.all_in.wait()
        return await super().fetch(block_id, priority)


def test_a_lying_source_is_still_shunned_per_bad_block() -> None:
    """A guard: a peer that sends 4 wrong blocks in flight together is shunned for each
    (4 incidents, never folded into one), and stays shunned `bad_block_backoff`."""
    blocks = make_blocks(5)
    *lies, good = blocks
    source = GatedLiar("pushing peer", blocks, together=len(lies))
    source.lies_about = set(lies)

    async def test() -> None:
        async with fetcher(FetchConfig(default_timeout=5.0)) as f:
            gone = trio.Event()
            f.add_source(source, gone.wait)  # a peer's push connection: a peer
            async with trio.open_nursery() as nursery:
                async def fails(block_id: bytes) -> None:
                    try:
                        await f.fetch(block_id, Priority.READ)
                    except FetchTimeout:
                        pass
                    else:
                        raise AssertionError("a corrupt block was delivered")

                for block_id in lies:
                    nursery.start_soon(fails, block_id)
            [stats] = f.peer_stats()
            assert stats.bad_blocks == len(lies)
            assert stats.incidents == len(lies) and stats.failures == len(lies)
            assert stats.backoff_remaining >= MOUNT.bad_block_backoff - 10.0
            asked = len(source.calls)
            try:
                await f.fetch(good, Priority.READ)
            except FetchTimeout:
                pass
            assert len(source.calls) == asked  # shunned: not asked, not probed
            gone.set()

    run_virtual(test)
