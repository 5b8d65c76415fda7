"""A READ catching up with a lazier fetch in flight follows the backoff rules.

`Fetcher._upgrade` (a `fetch` or `hurry` at READ joining a READAHEAD request
already under way) asked the peer holding the lazier attempt again at once, at
the urgent priority: it answers that first, and no second source sends the same
bytes. It did so whether or not that peer was backing off. A peer fails one
request (a broken connection, a stall) and is backed off while another of its
attempts is still in flight; the READ that caught up with that attempt went to
it anyway, past a healthy source; and that second attempt filled the request's
last slot (`max_parallel_attempts`, 2), so it was never hedged to the healthy
source either: the READ waited out the failing peer (here its 5 s answer; a
dead one, its stall timeout). With no other source it was a second request at
the backed-off peer outside the probe rule (one probe at a time,
`probe_interval` apart). Now a backed-off
peer is not asked again by an upgrade: the request goes back to the dispatcher,
which chooses a source as for a new attempt (another source, or a probe, or it
waits for the attempt in flight).

MockClock (autojump), fake sources of tests/test_fetch_probe.py: virtual time and
counts only.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dht.errors import FetchTimeout, PeerGoneError
from dht.types import Priority
from tests.test_fetch_probe import MOUNT, FakeSource, fetcher, make_blocks, run_virtual

SLOW = 5.0  # virtual seconds the backed-off source takes to answer the block under way


class UnevenSource(FakeSource):
    """Answers `slow` blocks after SLOW seconds, fails `broken` ones at once (a reset)."""

    def __init__(self, name: str, blocks: dict[bytes, bytes]) -> None:
        super().__init__(name, blocks)
        self.slow: set[bytes] = set()
        self.broken: set[bytes] = set()
        self.asked: list[tuple[bytes, Priority]] = []

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        self.asked.append((block_id, priority))
        if block_id in self.broken:
            self.calls.append(trio.current_time())
            raise PeerGoneError(f"{self.label}: connection reset")
        if block_id in self.slow:
            await trio.sleep(SLOW)
        return await super().fetch(block_id, priority)


async def back_off_with_readahead_in_flight(
        f, source: UnevenSource, ahead: bytes, failing: bytes,
        nursery: trio.Nursery) -> None:
    """`ahead` under way at `source` as READAHEAD, then `source` backed off by the failure
    of another request (`failing`) while that attempt is still in flight."""
    source.slow.add(ahead)
    source.broken.add(failing)
    nursery.start_soon(f.fetch, ahead, Priority.READAHEAD)
    await trio.testing.wait_all_tasks_blocked()
    assert source.asked == [(ahead, Priority.READAHEAD)]
    with pytest.raises(FetchTimeout):
        await f.fetch(failing, Priority.READ, timeout=0.1)
    [stats] = [s for s in f.peer_stats() if s.node_id == source.source_id]
    assert stats.backoff_remaining > 0  # backed off, its READAHEAD attempt still running
    assert source.asked == [(ahead, Priority.READAHEAD), (failing, Priority.READ)]


def test_a_read_catching_up_goes_to_the_healthy_source_not_the_backed_off_one() -> None:
    blocks = make_blocks(2)
    ahead, failing = blocks
    backed_off = UnevenSource("peer-a", blocks)
    healthy = FakeSource("peer-b", blocks)

    async def test() -> None:
        async with fetcher() as f, trio.open_nursery() as nursery:
            f.set_sources([backed_off])
            await back_off_with_readahead_in_flight(f, backed_off, ahead, failing, nursery)
            f.set_sources([backed_off, healthy])
            upgraded = trio.current_time()
            assert await f.fetch(ahead, Priority.READ) == blocks[ahead]
            # asked of the healthy source at once (before: of the backed-off one, beside
            # its READAHEAD attempt, two attempts, no hedge: the READ waited SLOW)
            assert trio.current_time() == upgraded
            assert healthy.served == 1
            assert (ahead, Priority.READ) not in backed_off.asked

    run_virtual(test)


def test_a_read_catching_up_at_a_lone_backed_off_source_keeps_to_the_probe_rule() -> None:
    """No other source: the READ is not sent to the backed-off source beside the attempt
    in flight there (that was a second request outside the probe rule); it takes that
    attempt's answer, and the source's backoff is not made longer."""
    blocks = make_blocks(2)
    ahead, failing = blocks
    source = UnevenSource("mirror", blocks)

    async def test() -> None:
        async with fetcher() as f, trio.open_nursery() as nursery:
            f.set_sources([source])
            await back_off_with_readahead_in_flight(f, source, ahead, failing, nursery)
            start = trio.current_time()
            assert f.hurry(ahead, Priority.READ)
            await trio.testing.wait_all_tasks_blocked()
            assert (ahead, Priority.READ) not in source.asked  # nothing sent at the upgrade
            assert await f.fetch(ahead, Priority.READ) == blocks[ahead]
            assert trio.current_time() - start <= SLOW
            [stats] = f.peer_stats()
            assert stats.incidents == 1
            assert f.stats.probes <= 1 and MOUNT.probe_interval < SLOW

    run_virtual(test)
