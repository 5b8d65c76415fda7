"""ThreadBatches: jobs queued while the workers are busy share one thread call."""

from __future__ import annotations

import functools
import threading

import pytest
import trio
import trio.testing

from vfs.threadbatch import ThreadBatches


def test_waiting_jobs_share_thread_calls_and_each_gets_its_own_outcome() -> None:
    gate = threading.Event()
    threads: set[int] = set()

    def job(i: int) -> int:
        gate.wait(10)
        threads.add(threading.get_ident())
        if i == 7:
            raise ValueError("seven")
        return i * i

    async def main() -> None:
        tb = ThreadBatches(lanes=2, batch_cost=10**9)
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            try:
                results[i] = await tb.call(job, i, cost=1)
            except ValueError as exc:
                results[i] = exc

        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            async with trio.open_nursery() as callers:
                for i in range(40):
                    callers.start_soon(one, i)
                    await trio.sleep(0)  # the first jobs start while the others queue
                await trio.sleep(0.05)
                gate.set()
            nursery.cancel_scope.cancel()
        assert {i: v for i, v in results.items() if i != 7} == {
            i: i * i for i in range(40) if i != 7}
        assert isinstance(results[7], ValueError)
        assert tb.jobs == 40
        assert tb.batches <= 4  # two lanes: the first job each, then the rest together
        assert len(threads) <= 2

    trio.run(main)


def test_batches_respect_their_cost_and_run_without_the_service() -> None:
    async def main() -> None:
        tb = ThreadBatches(lanes=1, batch_cost=3)
        # not running: a job is its own thread call
        assert await tb.call(lambda x: x + 1, 1, cost=100) == 2
        gate = threading.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            async with trio.open_nursery() as callers:
                callers.start_soon(tb.call, gate.wait, 10)  # holds the one lane
                await trio.sleep(0.05)
                for _ in range(6):
                    callers.start_soon(functools.partial(tb.call, len, b"x", cost=1))
                await trio.sleep(0.05)
                gate.set()
            nursery.cancel_scope.cancel()
        assert tb.jobs == 7
        assert tb.batches == 3  # the gate, then 3 + 3 within the cost

    trio.run(main)


def test_jobs_queued_when_the_service_stops_are_run_by_their_callers() -> None:
    async def main() -> None:
        tb = ThreadBatches(lanes=1)
        gate = threading.Event()
        got: list[int] = []
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as service:
                await service.start(tb.run)
                outer.start_soon(tb.call, gate.wait, 10)
                await trio.sleep(0.05)

                async def late() -> None:
                    got.append(await tb.call(lambda: 5))

                outer.start_soon(late)
                await trio.sleep(0.05)
                service.cancel_scope.cancel()  # the lane waits for its thread, then stops
                gate.set()
        assert got == [5]

    trio.run(main)


def test_a_cancelled_caller_gets_cancelled_and_the_service_goes_on() -> None:
    async def main() -> None:
        tb = ThreadBatches(lanes=1)
        gate = threading.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            with trio.move_on_after(0.05) as scope:
                await tb.call(gate.wait, 10)
            assert scope.cancelled_caught
            gate.set()
            assert await tb.call(sum, [1, 2]) == 3
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_lanes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ThreadBatches(lanes=0)


def test_a_few_jobs_with_idle_lanes_run_in_parallel_one_a_thread() -> None:
    """Batches form only behind busy lanes: four jobs and four idle lanes meet at a barrier,
    which four jobs run one after another in one thread would never pass."""
    barrier = threading.Barrier(4, timeout=10)

    async def main() -> None:
        tb = ThreadBatches(lanes=4, batch_cost=10**9)
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            async with trio.open_nursery() as callers:
                for _ in range(4):
                    callers.start_soon(functools.partial(tb.call, barrier.wait, cost=1))
            nursery.cancel_scope.cancel()
        assert (tb.batches, tb.jobs) == (4, 4)

    trio.run(main)


def test_an_urgent_job_goes_ahead_of_the_jobs_queued_before_it() -> None:
    """A READ's job (urgent) queued behind a readahead's jobs runs first: a random read
    does not wait for the sequential readahead's decryptions. Urgent jobs keep their
    order among themselves, and the others theirs."""
    gate = threading.Event()
    order: list[str] = []

    def job(name: str) -> str:
        if name == "busy":
            gate.wait(10)
        order.append(name)
        return name

    async def main() -> None:
        tb = ThreadBatches(lanes=1, batch_cost=1)  # one job a thread call
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            async with trio.open_nursery() as callers:
                callers.start_soon(functools.partial(tb.call, job, "busy", cost=1))
                while tb._busy == 0:  # the lane is taken by the gated job
                    await trio.sleep(0.001)
                for name in ("ahead1", "ahead2", "ahead3"):
                    callers.start_soon(functools.partial(tb.call, job, name, cost=1))
                    await trio.sleep(0)
                for name in ("read1", "read2"):
                    callers.start_soon(functools.partial(tb.call, job, name, cost=1,
                                                         urgent=True))
                    await trio.sleep(0)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            nursery.cancel_scope.cancel()
        assert order == ["busy", "read1", "read2", "ahead1", "ahead2", "ahead3"]

    trio.run(main)


class _Passes(trio.abc.Instrument):
    """Counts the passes of trio's scheduler (one I/O wait each)."""

    def __init__(self) -> None:
        self.n = 0

    def before_io_wait(self, timeout: float) -> None:
        self.n += 1


def test_an_urgent_job_with_a_lane_idle_is_its_callers_own_thread_call() -> None:
    """A READ's job (a random read's store lookup) with nothing queued and a lane idle
    runs in a thread call of the READ's task: it returns on the third pass of the
    scheduler (trio's thread limiter, the thread's report, the caller), not the fifth
    (through a lane task and back). Queued behind other jobs, it still takes its
    turn in a lane (the test above); it counts as a busy lane meanwhile."""
    busy_inside: list[int] = []

    async def main() -> None:
        tb = ThreadBatches(lanes=2, batch_cost=1)
        passes = _Passes()
        async with trio.open_nursery() as nursery:
            await nursery.start(tb.run)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(passes)
            try:
                asked = passes.n
                assert await tb.call(lambda: busy_inside.append(tb._busy) or 7, cost=1,
                                     urgent=True) == 7
                took = passes.n - asked
            finally:
                trio.lowlevel.remove_instrument(passes)
            nursery.cancel_scope.cancel()
        assert took == 3
        assert busy_inside == [1]
        assert (tb.batches, tb.jobs, tb._busy) == (1, 1, 0)

    trio.run(main)
