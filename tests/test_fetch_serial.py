"""The fetch scheduler and a source that asks for a run's blocks one after the other.

A static HTTP mirror (`dht.http_source.HttpSource`) fetches each run in one of
its fetch threads, block after block on one connection, and serves in arrival
order whatever the priority. Each run costs the event loop a thread wake-up, a
task and a watchdog, so the fetcher hands it few, long runs (issue 10: a cold
read through a mirror went out as runs of 2.2 blocks on average):

- its readahead slots are refilled a run at a time, not a block as each answer
  lands (`FetchConfig.serial_run_min`);
- a READ's run takes the readahead queued behind it;
- `Fetcher.hurry` moves a fetch in flight up to a READ where it stands.

In process, against a source the test answers by hand: only counts and order,
no timing (hedges, stalls and timeouts are far beyond the test's deadline).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import trio
import trio.testing

from dht.client import OnRunResult, RunOfWants
from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.types import Priority
from tests.helpers import run_trio

DEADLINE = 60.0  # only a hang breaks it
CALM = FetchConfig(hedge_floor=600.0, stall_timeout=600.0, connect_timeout=600.0,
                   default_timeout=600.0, swarm_jitter=0)
RUN = 8  # the source's longest run (max_wants)


class SerialSource:
    """A mirror reduced to what the fetcher sees: runs recorded, blocks answered when the
    test says (`answer`), in each run's order."""

    max_wants = RUN
    prioritises = False

    def __init__(self) -> None:
        self.source_id = os.urandom(32)
        self.label = "serial source"
        self.closed = False
        self.blocks: dict[bytes, bytes] = {}
        self.runs: list[tuple[list[bytes], Priority]] = []
        self._open: list[tuple[RunOfWants, OnRunResult, list[bool], trio.Event]] = []
        self.changed = trio.Event()

    def add(self, count: int) -> list[bytes]:
        ids = []
        for _ in range(count):
            data = os.urandom(64)
            block_id = hashlib.sha256(data).digest()
            self.blocks[block_id] = data
            ids.append(block_id)
        return ids

    async def fetch_run(self, run: RunOfWants, on_result: OnRunResult) -> None:
        done = trio.Event()
        self.runs.append((list(run.block_ids), run.priority))
        self._open.append((run, on_result, [False] * len(run.block_ids), done))
        self.changed.set()
        try:
            await done.wait()
        finally:
            self._open = [o for o in self._open if o[3] is not done]

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        got: list[bytes | None] = []
        await self.fetch_run(RunOfWants([block_id], priority),
                             lambda _i, data, _e: got.append(data))
        assert got[0] is not None
        return got[0]

    def answer(self, count: int = 1) -> int:
        """Answer the next `count` blocks, oldest run first, each run in its order; how many."""
        answered = 0
        for run, on_result, told, done in list(self._open):
            for i, block_id in enumerate(run.block_ids):
                if answered == count:
                    return answered
                if told[i]:
                    continue
                told[i] = True
                if not run.cancelled[i]:
                    on_result(i, self.blocks[block_id], None)
                answered += 1
            done.set()
        return answered

    async def have(self, block_ids: Sequence[bytes]) -> list[bool]:
        return [b in self.blocks for b in block_ids]

    async def ping(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        self.closed = True

    async def wait_runs(self, count: int) -> None:
        while len(self.runs) < count:
            self.changed = trio.Event()
            await self.changed.wait()


async def settle() -> None:
    """Let the fetcher's tasks run until all of them wait (nothing depends on the clock)."""
    await trio.testing.wait_all_tasks_blocked()


def in_fetcher(test) -> None:
    async def main(nursery: trio.Nursery) -> None:
        source = SerialSource()
        async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32), list,
                           config=CALM) as fetcher:
            fetcher.set_sources([source])
            await test(fetcher, source, nursery)

    run_trio(main, DEADLINE)


def test_a_mirrors_readahead_is_refilled_a_run_at_a_time() -> None:
    """A readahead longer than the source's slots goes out as runs of RUN blocks: once the
    first runs fill the slots, the next waits until a run's worth is free instead of going
    out a block at a time as each answer lands (runs of 1 before)."""

    async def test(fetcher: Fetcher, source: SerialSource, nursery: trio.Nursery) -> None:
        ids = source.add(64)
        await nursery.start(fetcher.fetch_ahead, ids, Priority.READAHEAD)
        await settle()
        while source.answer(1):  # one block at a time, as a thread would deliver them
            await settle()
        sizes = [len(run) for run, _ in source.runs]
        assert [b for run, _ in source.runs for b in run] == ids  # each once, in order
        assert all(size == RUN for size in sizes[:-1]), sizes
        assert all(p == Priority.READAHEAD for _, p in source.runs)

    in_fetcher(test)


def test_a_read_at_a_mirror_takes_the_readahead_queued_behind_it_into_its_run() -> None:
    """A READ for a block the readahead has queued (its slots full) goes to the mirror with
    the queued readahead behind it in one run, not alone; those blocks stay READAHEAD in
    the fetcher's accounts (the READ's reserve is not taken)."""

    async def test(fetcher: Fetcher, source: SerialSource, nursery: trio.Nursery) -> None:
        ids = source.add(40)
        await nursery.start(fetcher.fetch_ahead, ids, Priority.READAHEAD)
        await settle()
        assert [len(run) for run, _ in source.runs] == [RUN]  # the slots are taken
        got: list[bytes] = []

        async def read() -> None:
            got.append(await fetcher.fetch(ids[RUN], Priority.READ))

        nursery.start_soon(read)
        await source.wait_runs(2)
        await settle()
        run, priority = source.runs[1]
        assert priority == Priority.READ
        assert run[0] == ids[RUN] and len(run) > 1
        assert run == ids[RUN:RUN + len(run)]  # the readahead right behind it, in order
        [stats] = fetcher.peer_stats()
        assert stats.in_flight == RUN + len(run)
        while source.answer(RUN + len(run)):
            await settle()
        assert got == [source.blocks[ids[RUN]]]

    in_fetcher(test)


def test_hurry_moves_a_queued_fetch_up_to_a_read_without_a_second_fetch() -> None:
    """`hurry` is what a READ's second `fetch` of a block under way did, without the task:
    the request goes to the source next, at READ priority; it says False for a block
    nobody is fetching (the caller then fetches it itself)."""

    async def test(fetcher: Fetcher, source: SerialSource, nursery: trio.Nursery) -> None:
        ids = source.add(40)
        await nursery.start(fetcher.fetch_ahead, ids, Priority.READAHEAD)
        await settle()
        assert len(source.runs) == 1
        assert fetcher.hurry(ids[30], Priority.READ)
        assert not fetcher.hurry(os.urandom(32), Priority.READ)
        await source.wait_runs(2)
        run, priority = source.runs[1]
        assert run[0] == ids[30] and priority == Priority.READ
        assert fetcher.stats.requests == len(ids)  # no second request

    in_fetcher(test)

