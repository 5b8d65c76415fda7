"""What a pin and an evict of a large folder hold and do is bounded by what is in flight.

In process, over real sockets on 127.0.0.1, as in tests/test_pin_runs.py: a
publisher's store served by a real `PeerServer`, a real `Fetcher` in front of
a reader `Drive` (its store writer, pins and folder figures running). What is
counted is store transactions and which tasks still run, never a time.
"""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from cache.store import BlockStore
from dht.fetch import Fetcher
from tests.drive_builder import DriveBuilder
from tests.helpers import run_trio
from tests.test_peer_support import new_drive
from tests.test_pin_runs import FetcherFetch, pin_root, running_drive, served_drive
from vfs import pins as pins_module
from vfs.capability import WriteCap
from vfs.pins import BUILDING, pin_name

run = functools.partial(run_trio, deadline=120.0)  # run(test): test(nursery)


class StallingFetch(FetcherFetch):
    """Serves the pin's first window, then stalls every later one (a peer gone quiet)
    and notes when a stalled window is given up."""

    def __init__(self, fetcher: Fetcher) -> None:
        super().__init__(fetcher)
        self.windows = 0
        self.stalled = trio.Event()
        self.given_up = trio.Event()

    async def batch(self, block_ids, priority, deliver) -> None:
        self.windows += 1
        if self.windows == 1:
            await super().batch(block_ids, priority, deliver)
            return
        self.stalled.set()
        try:
            await trio.sleep_forever()
        finally:
            self.given_up.set()


def test_an_unpin_ends_the_pins_running_round(tmp_path: Path, monkeypatch) -> None:
    """Unpinning a folder whose pin is still fetching stops that fetch.

    The round used to go on after the unpin, fetching the whole folder into a
    pin being built (`<name>~next`, made anew by its next chunk) that nobody
    keeps; a following `evict` then found those blocks held and fought the
    fetches for the store (the growth bench's evict of 10^6 files did not end).
    """
    monkeypatch.setattr(pins_module, "HOLD_CHUNK", 300)  # several windows for 2,000 files
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        async with served_drive(nursery, tmp_path, b, 2000, dk,
                                secret) as (pub, reader, head, providers):
            async with running_drive(cap, reader, head, dk, secret, providers,
                                     fetch_type=StallingFetch) as (drive, fetch, inner):
                assert drive.pins is not None
                drive.pins.pin([])
                with trio.fail_after(60):  # only a hang breaks these
                    await fetch.stalled.wait()
                name = pin_name(drive.cap, [])
                drive.pins.unpin([])
                with trio.fail_after(60):
                    await fetch.given_up.wait()
                    while drive.pins._rounds:
                        await trio.sleep(0.01)
                # nothing of the round is left held: neither the pin nor one being built
                assert not reader.has_pin(name)
                assert not reader.has_pin(name + BUILDING)
                windows = fetch.windows
                await trio.sleep(0.2)
                assert fetch.windows == windows  # and no window is asked for any more

    run(test)


def test_a_pin_can_be_unpinned_and_pinned_again_while_it_runs(tmp_path: Path,
                                                              monkeypatch) -> None:
    """An unpin then a pin of the same folder: the new pin completes and holds it all."""
    monkeypatch.setattr(pins_module, "HOLD_CHUNK", 300)
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        async with served_drive(nursery, tmp_path, b, 1000, dk,
                                secret) as (pub, reader, head, providers):
            async with running_drive(cap, reader, head, dk, secret,
                                     providers) as (drive, fetch, inner):
                assert drive.pins is not None
                drive.pins.pin([])
                drive.pins.unpin([])
                progress = await pin_root(drive, until_complete=True)
            assert progress.complete, progress.error
            assert reader.missing(list(b.blocks)) == []
            assert sorted(reader.pin_ids(pin_name(cap.read_cap(), []))) == sorted(b.blocks)
            assert not reader.has_pin(pin_name(cap.read_cap(), []) + BUILDING)

    run(test)


def test_a_pins_store_transactions_are_bounded_by_the_window_not_the_folder(
        tmp_path: Path, monkeypatch) -> None:
    """Every store transaction of a pin of 6,000 files names about 2,048 blocks at most
    (what one directory or one group of delivered blocks adds past it; 4,096 and
    8,192 before).

    LMDB copies each page a transaction changes into memory and keeps those
    copies allocated for the life of the process, and a block id is a random
    key: a transaction of B blocks into a store of 10^6 leaves about B pages per
    index in the mount's heap for good (commits of 8,192 blocks held ~90 MB at
    10^6 files). So what one transaction takes is the pin's memory bound, and it
    must not follow the folder's size.
    """
    sizes: list[int] = []
    real_put, real_add = BlockStore.put_many, BlockStore.add_to_pin

    def put_many(self, items, **kw):
        items = list(items)
        sizes.append(len(items))
        return real_put(self, items, **kw)

    def add_to_pin(self, name, ids):
        ids = list(ids)
        sizes.append(len(ids))
        return real_add(self, name, ids)

    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        async with served_drive(nursery, tmp_path, b, 6000, dk,
                                secret) as (pub, reader, head, providers):
            async with running_drive(cap, reader, head, dk, secret,
                                     providers) as (drive, fetch, inner):
                monkeypatch.setattr(BlockStore, "put_many", put_many)
                monkeypatch.setattr(BlockStore, "add_to_pin", add_to_pin)

                async def sample() -> None:
                    while True:
                        in_flight.append(len(fetch.fetcher._requests))
                        batched.append(len(drive.blocks._batched))
                        await trio.sleep(0.005)

                inner.start_soon(sample)
                progress = await pin_root(drive, until_complete=True)
                monkeypatch.undo()
                # nothing is kept per file once the pin is done
                assert len(fetch.fetcher._requests) == 0
                assert len(drive.blocks._batched) == 0
            assert progress.complete, progress.error
            assert reader.missing(list(b.blocks)) == []

    in_flight: list[int] = []
    batched: list[int] = []
    run(test)
    # the fetcher's requests: the two windows in flight at most (PIN_WINDOWS), not the folder
    assert 0 < max(in_flight) <= 2 * 2048 + 200, max(in_flight)
    assert max(batched) <= 2 * 2048 + 200, max(batched)
    assert sum(sizes) >= 2 * len(b.blocks)  # every block was added and stored, counted here
    assert max(sizes) <= 3000, sorted(sizes)[-5:]


def test_an_evict_of_a_large_folder_is_a_few_large_transactions(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Evicting a folder of 6,000 files reads each directory once and commits a few times.

    Each commit rewrites about a page per block in every id-keyed index plus a
    large fixed part, so steps of 256 blocks made evict of a large drive write
    ~180 KB to disk per 64-byte block (36 GB for 200,000 blocks); steps of 2,048
    a few times less.
    """
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()
    writes: list[int] = []
    walks: list[int] = []

    async def test(nursery: trio.Nursery) -> None:
        async with served_drive(nursery, tmp_path, b, 6000, dk,
                                secret) as (pub, reader, head, providers):
            async with running_drive(cap, reader, head, dk, secret,
                                     providers) as (drive, fetch, inner):
                assert drive.pins is not None
                await pin_root(drive, until_complete=True)
                drive.pins.unpin([])
                assert reader.missing(list(b.blocks)) == []
                real_write, real_of = BlockStore._write, type(drive.figures).of

                def write(self, op, **kw):
                    writes.append(1)
                    return real_write(self, op, **kw)

                async def of(self, node, priority=None):
                    walks.append(1)
                    return await real_of(self, node, priority)

                monkeypatch.setattr(BlockStore, "_write", write)
                monkeypatch.setattr(type(drive.figures), "of", of)
                await drive.answers.evict(drive.root_entry())
                monkeypatch.undo()
            assert len(reader.missing(list(b.blocks))) == len(b.blocks)

    run(test)
    assert len(walks) == 61  # the root and its 60 folders, once each
    # 6,061 blocks: in 2,048-block steps, within EVICT_BATCH (8,192) calls: 3 or 4
    assert len(writes) <= 4, len(writes)


def test_a_pins_blocks_leave_the_fetchers_cache_once_stored(tmp_path: Path) -> None:
    """The fetcher keeps delivered blocks for other readers until the store has them;
    once a window is committed its blocks go, so during a pin of 6,000 files the cache
    holds about the two windows in flight, and nothing once it is done (it kept every
    block before, up to 16 MiB by bytes: ~57,000 small blocks, ~20 MB of the mount)."""
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()
    kept: list[int] = []

    async def test(nursery: trio.Nursery) -> None:
        async with served_drive(nursery, tmp_path, b, 6000, dk,
                                secret) as (pub, reader, head, providers):
            async with running_drive(cap, reader, head, dk, secret,
                                     providers) as (drive, fetch, inner):

                async def sample() -> None:
                    while True:
                        kept.append(len(fetch.fetcher._recent))
                        await trio.sleep(0.005)

                inner.start_soon(sample)
                progress = await pin_root(drive, until_complete=True)
                assert progress.complete, progress.error
                assert reader.missing(list(b.blocks)) == []
                assert len(fetch.fetcher._recent) == 0, len(fetch.fetcher._recent)

    run(test)
    assert 0 < max(kept) <= 2 * 2048 + 200, max(kept)
