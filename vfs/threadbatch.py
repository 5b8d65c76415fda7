"""Synchronous jobs run in worker threads, all that are waiting in one thread call.

The read path's per-block work (a store read, AES-GCM, SHA-256) releases the
GIL, so it belongs in worker threads; but every trip from the event loop to
a worker thread and back is a GIL hand-off, and on a busy machine a thread
that gave the GIL away may wait a whole scheduler slice to get it back. A
profile of a cold 128 MiB read with the machine at load 20 (py-spy of the
mount, docs/benchmarks.md) had a third of the event loop's busy samples
waiting for the GIL right after handing a job to a thread, one job per
block. `ThreadBatches` takes everything queued meanwhile in the next call
instead: one hand-off per batch, not per block.

Rules:
- `call(fn, *args, cost=n)` queues a job and waits for its outcome (its
  value, or its exception raised in the caller). Until `run` is started (or
  after it ended) a job runs in a thread call of its own, as before.
- `lanes` batches run at once, each at most `batch_cost` worth of jobs (at
  least one job), taken oldest first. Waiting jobs are shared out among the
  idle lanes: a few jobs and many idle lanes run one job a thread, in
  parallel, as separate thread calls would; batches form only when jobs
  queue up behind busy lanes, where they save the hand-offs.
- A caller cancelled while its job waits or runs gets Cancelled; the job
  still runs if it was taken (its result is dropped), so a job must leave
  nothing half-done when nobody reads its result.
- `urgent=True` (a READ: someone waits in read(2) for it) queues a job
  ahead of every job that is not, in order among urgent ones: a random
  read that arrives behind a sequential readahead's queued decryptions
  does not wait for them. With nothing queued and a lane idle, an urgent
  job is a thread call of its caller's own (it counts as a busy lane): a
  hand-off to a lane task and back is two more passes of the scheduler
  between the READ and its thread (a random read's store lookup, issue
  12). Its caller, cancelled, waits for the job's end, then gets Cancelled.
- When `run` ends, jobs still queued are handed back to their callers,
  which run them themselves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")

LANES = 8
BATCH_COST = 1024 * 1024  # about 4 blocks of 256 KiB


class _Job(Generic[T]):
    __slots__ = ("fn", "args", "cost", "done", "result")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...], cost: int) -> None:
        self.fn = fn
        self.args = args
        self.cost = cost
        self.done = trio.Event()
        self.result: outcome.Outcome[T] | None = None  # None when done: run it yourself


def _run_jobs(jobs: list[_Job[Any]]) -> None:
    """The worker thread's side: every job, each outcome kept for its caller."""
    for job in jobs:
        job.result = outcome.capture(job.fn, *job.args)


class ThreadBatches:
    """Worker-thread calls shared by many jobs (see the module's rules)."""

    def __init__(self, lanes: int = LANES, batch_cost: int = BATCH_COST) -> None:
        if lanes < 1:
            raise ValueError("need at least one lane")
        self.lanes = lanes
        self.batch_cost = batch_cost
        self._queue: deque[_Job[Any]] = deque()
        self._urgent: deque[_Job[Any]] = deque()  # taken before anything in _queue
        self._added = trio.Event()
        self._running = False
        self._busy = 0  # lanes running a batch
        self.batches = 0  # thread calls made (for tests and profiles)
        self.jobs = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve jobs until cancelled."""
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.lanes):
                    nursery.start_soon(self._lane)
                task_status.started()
        finally:
            self._running = False
            for queue in (self._urgent, self._queue):
                while queue:
                    job = queue.popleft()
                    job.done.set()  # no result: its caller runs it

    async def call(self, fn: Callable[..., T], *args: Any, cost: int = 0,
                   urgent: bool = False) -> T:
        if not self._running:
            return await trio.to_thread.run_sync(fn, *args)
        if urgent and self._busy < self.lanes and not self._urgent and not self._queue:
            self._busy += 1
            try:
                return await trio.to_thread.run_sync(fn, *args)
            finally:
                self._busy -= 1
                self.batches += 1
                self.jobs += 1
        job: _Job[T] = _Job(fn, args, cost)
        (self._urgent if urgent else self._queue).append(job)
        self._added.set()
        await job.done.wait()
        if job.result is None:
            return await trio.to_thread.run_sync(fn, *args)
        return job.result.unwrap()

    def _waiting(self) -> int:
        return len(self._urgent) + len(self._queue)

    def _take(self) -> list[_Job[Any]]:
        idle = max(1, self.lanes - self._busy)  # this lane included
        share = -(-self._waiting() // idle)
        batch: list[_Job[Any]] = []
        cost = 0
        while True:
            queue = self._urgent or self._queue
            if not queue or (batch and (len(batch) >= share
                                        or cost + queue[0].cost > self.batch_cost)):
                return batch
            job = queue.popleft()
            batch.append(job)
            cost += job.cost

    async def _lane(self) -> None:
        while True:
            while not self._waiting():
                if self._added.is_set():
                    self._added = trio.Event()
                await self._added.wait()
            batch = self._take()
            self._busy += 1
            try:
                # not abandoned on cancel: the jobs run to their end either way
                await trio.to_thread.run_sync(_run_jobs, batch)
            finally:
                self._busy -= 1
                self.batches += 1
                self.jobs += len(batch)
                for job in batch:
                    job.done.set()  # a job the thread never started: its caller runs it
