"""A cold file's readahead costs the event loop a task per window, not per chunk (issue 10).

With a fetch that takes batches (`batch`, as vfs.network.DriveFetch), the
chunks of a readahead window missing from the store are asked for in one
`batch` call from the window's own task (`BlockReader.fetch_window`): no
task, load, event wait, `fetch` call or fetcher request per chunk. Each
delivered block's plaintext goes straight into the plaintext cache, its
ciphertext to the store writer. The guarantees of the per-chunk readahead
hold here too: a READ catching up with a chunk of the batch waits for it and
hurries its fetch (`hurry`), an evict wins over the batch in flight, a
failed batch fails no READ by itself, and a block that does not decrypt is
not kept. The evict tests of tests/test_evict_readahead.py run here again
over the batch fetch. In process, over a real store and a fake network
(tests/test_read_path.py's world).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dht.types import Priority
from tests import test_evict_readahead, test_read_path
from tests.helpers import run_trio
from tests.inprocess import FakeNetwork, running_drive
from tests.test_read_path import DEADLINE, KiB, open_file
from tests.test_readahead_steps import read_catching_up_with_the_readahead
from vfs.drive import READAHEAD_CHUNKS
from vfs.errors import BlockUnavailable

SIZE = 128 * KiB


class FetchWithBatch:
    """The fake network's fetch with `batch` and `hurry` (as vfs.network.DriveFetch).

    A batch fetches its blocks concurrently from the fake network and hands each
    to `deliver` as it comes; the first failure ends it with BlockUnavailable (a
    fetcher's stall). `fail_batches` makes every batch fail that way at once.
    Single fetches (`__call__`), batches and hurries are recorded.
    """

    def __init__(self, net: FakeNetwork) -> None:
        self.net = net
        self.calls: list[tuple[bytes, Priority]] = []
        self.batches: list[tuple[list[bytes], Priority]] = []
        self.hurried: list[tuple[bytes, Priority]] = []
        self.in_flight: set[bytes] = set()
        self.fail_batches = False

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        self.calls.append((block_id, priority))
        return await self.net.fetch(block_id, priority)

    async def batch(self, block_ids, priority, deliver) -> None:
        self.batches.append((list(block_ids), priority))
        if self.fail_batches:
            await trio.sleep(0)
            raise BlockUnavailable("the batch stalled")
        send, receive = trio.open_memory_channel(len(block_ids))

        async def one(block_id: bytes) -> None:
            self.in_flight.add(block_id)
            try:
                await send.send((block_id, await self.net.fetch(block_id, priority)))
            finally:
                self.in_flight.discard(block_id)

        async with trio.open_nursery() as nursery:
            for block_id in block_ids:
                nursery.start_soon(one, block_id)
            for _ in block_ids:
                await deliver([await receive.receive()])

    def hurry(self, block_id: bytes, priority: Priority) -> bool:
        if block_id not in self.in_flight:
            return False
        self.hurried.append((block_id, priority))
        return True

    def probe_now(self) -> bool:
        return True


@pytest.fixture
def world(tmp_path, monkeypatch):
    """tests/test_read_path.py's world, its drive's fetch taking batches."""
    gen = test_read_path.world.__wrapped__(tmp_path, monkeypatch)
    drive, net, big, reader, bad_ids = next(gen)
    drive.blocks.fetch = FetchWithBatch(net)
    drive._probe_now = drive.blocks.fetch.probe_now
    yield drive, net, big, reader, bad_ids
    next(gen, None)


# the evict guarantees, over the batch fetch
test_batched_readahead_fetch_in_flight_at_an_evict_is_neither_stored_nor_kept = (
    test_evict_readahead.test_a_readahead_fetch_in_flight_at_an_evict_is_neither_stored_nor_kept)
test_batched_readahead_planned_before_an_evict_fetches_nothing_after_it = (
    test_evict_readahead.test_a_readahead_planned_before_an_evict_fetches_nothing_after_it)


class TaskCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


def test_a_cold_readahead_is_one_batch_and_no_task_per_chunk(world) -> None:
    """Read the whole cold file 128 KiB at a time: every chunk the readahead fetched came
    through a `batch` call (no `fetch` call per chunk at READAHEAD), the file's bytes are
    right, each chunk is asked for once, and the tasks spawned for the whole read are
    fewer than the chunks fetched ahead (a task per chunk made more than one each)."""
    drive, net, big, reader, _ = world
    fetch = drive.blocks.fetch
    counter = TaskCounter()

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            assert len(of.map.chunks) > READAHEAD_CHUNKS + 4  # 8 MiB: 24-32 chunks
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(counter)
            try:
                for k in range(len(big) // SIZE):
                    got = await drive.read(of, k * SIZE, SIZE)
                    assert bytes(got) == big[k * SIZE:(k + 1) * SIZE]
                    while of.pending:
                        await trio.sleep(0.01)
            finally:
                trio.lowlevel.remove_instrument(counter)
            ahead = set(net.asked(Priority.READAHEAD))
            assert len(ahead) > READAHEAD_CHUNKS  # the readahead fetched most of the file
            # the fake's own tasks (one per block of a batch) are the fetcher's work
            mine = counter.spawned - sum(len(ids) for ids, _ in fetch.batches)
            assert mine < len(ahead), (counter.spawned, len(ahead))
            assert [b for b, p in fetch.calls if p == Priority.READAHEAD] == []
            assert ahead <= {b for ids, p in fetch.batches if p == Priority.READAHEAD
                             for b in ids}
            asked = net.asked()
            assert len(asked) == len(set(asked))  # each block fetched once
            await drive.blocks._store_unstored()
            ids = [c.block_id for c in of.map.chunks]
            assert reader.missing(ids) == []  # all on the device
            for c in of.map.chunks:
                drive.blocks.forget(c.block_id)
            assert bytes(await drive.read(of, 0, len(big))) == big  # from the store
            assert net.asked() == asked

    run_trio(main, DEADLINE)


def test_a_read_that_catches_up_with_a_batched_chunk_hurries_it_and_waits(world) -> None:
    """A READ of a chunk the batch is fetching waits for that fetch, moved up to READ
    (`hurry`): the network is asked for the block once, at READAHEAD."""
    drive, net, big, _, _ = world
    fetch = drive.blocks.fetch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            held = await read_catching_up_with_the_readahead(drive, net, fetch, big, nursery)
            assert held.block_id not in {b for b, _ in fetch.calls}  # no fetch of its own

    run_trio(main, DEADLINE)


def test_a_failed_batch_fails_no_read_and_is_remembered(world) -> None:
    """A batch that stalls ends its chunks' loads: READs waiting for them and READs after
    it ask the network themselves and get their bytes; the chunks are remembered as
    unavailable (a READ of one asks once more, `_recheck`) and none is left pending."""
    drive, net, big, _, _ = world
    fetch = drive.blocks.fetch
    fetch.fail_batches = True

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            for k in range(2):  # the second sequential read starts the readahead
                await drive.read(of, k * SIZE, SIZE)
            while of.pending:
                await trio.sleep(0.01)
            assert fetch.batches
            ids, _ = fetch.batches[0]
            assert all(b in drive._unavailable for b in ids)
            assert not of.absent
            for k in range(2, len(big) // SIZE):
                got = await drive.read(of, k * SIZE, SIZE)
                assert bytes(got) == big[k * SIZE:(k + 1) * SIZE]
            assert {b for b, p in fetch.calls if p == Priority.READ} >= set(ids)

    run_trio(main, DEADLINE)


def test_a_batched_block_that_does_not_decrypt_is_not_kept(world) -> None:
    """A block of the batch that fails to decrypt is neither kept in memory nor stored;
    the READ of it fails with IntegrityError (fetched again, never wrong bytes)."""
    from vfs.errors import IntegrityError

    drive, net, _, reader, bad_ids = world
    fetch = drive.blocks.fetch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"badbig.bin")
            bad = [c for c in of.map.chunks if c.block_id in bad_ids]
            assert bad
            fetch.in_flight.clear()
            await drive.blocks.fetch_window(of.map.chunks, Priority.READAHEAD,
                                            lambda block_id: None, lambda ids, why: None)
            assert fetch.batches
            for c in bad:
                assert not drive.blocks.has_plain(c.block_id)
                with pytest.raises(IntegrityError):
                    await drive.read(of, 0, 100)
            await drive.blocks._store_unstored()
        assert reader.missing([c.block_id for c in bad]) == [c.block_id for c in bad]

    run_trio(main, DEADLINE)
