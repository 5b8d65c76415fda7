"""A sequential reader's readahead costs the event loop per step, not per chunk (issue 10).

A cold read through a mirror spent most of its loop on work done once per
readahead top-up, per run of blocks and per READ that caught up with the
readahead: here the readahead is topped up in steps of READAHEAD_REFILL
chunks (one store lookup, one `ahead` call, one run each), a READ that
catches up with the readahead's fetch moves that fetch up (`hurry`) instead
of fetching a second time, and a READ that gets to a chunk the readahead has
just found missing from the store does not look it up again. In process, over
a real store and a fake network (tests/test_read_path.py's world).
"""

from __future__ import annotations

import os

import trio
import trio.testing

from cache.store import BlockStore
from dht.types import Priority
from tests import test_read_path
from tests.helpers import run_trio
from tests.inprocess import FakeNetwork, new_cap, publish_folder, running_drive, spy_calls
from tests.test_read_path import DEADLINE, FetchWithAhead, KiB, open_file
from vfs.blocks import PLAINTEXT_CACHE_BYTES
from vfs.chunker import CDC_MAX
from vfs.drive import READAHEAD_BYTES, READAHEAD_CHUNKS, READAHEAD_REFILL, Drive
from vfs.storage import DriveStorage

world = test_read_path.world  # the fixture: a published drive over a fake network


class FetchWithHurry(FetchWithAhead):
    """The fake network's fetch with `ahead` and `hurry` (as vfs.network.DriveFetch): a
    hurry of a block whose fetch is in flight is recorded and says True."""

    def __init__(self, net: FakeNetwork) -> None:
        super().__init__(net)
        self.hurried: list[tuple[bytes, Priority]] = []
        self.in_flight: set[bytes] = set()

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        self.in_flight.add(block_id)
        try:
            return await self.net.fetch(block_id, priority)
        finally:
            self.in_flight.discard(block_id)

    def hurry(self, block_id: bytes, priority: Priority) -> bool:
        if block_id not in self.in_flight:
            return False
        self.hurried.append((block_id, priority))
        return True


def test_the_readahead_is_topped_up_in_steps_and_asked_for_together(world) -> None:
    """Read through a file 128 KiB at a time: every chunk the readahead fetches was asked
    for in one `ahead` call of at least READAHEAD_REFILL chunks (the file's tail may be
    fewer), none alone (topped up at each READ, a chunk at a time went out alone)."""
    drive, net, big, _, _ = world
    fetch = FetchWithAhead(net)
    drive.blocks.fetch = fetch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            size = 128 * KiB
            assert len(of.map.chunks) > READAHEAD_CHUNKS + 4  # 8 MiB: 24-32 chunks
            for k in range(len(big) // size):
                got = await drive.read(of, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
                while of.pending:  # the readahead's loads (worker threads among them) end
                    await trio.sleep(0.01)
            calls = [ids for ids, p in fetch.together if p == Priority.READAHEAD]
            assert len(calls) >= 2
            assert all(len(ids) >= READAHEAD_REFILL for ids in calls[:-1]), [
                len(ids) for ids in calls]
            together = {b for ids in calls for b in ids}
            assert set(net.asked(Priority.READAHEAD)) <= together

    run_trio(main, DEADLINE)


def test_a_read_that_catches_up_with_the_readaheads_fetch_hurries_it_once(world) -> None:
    """A READ of a chunk whose readahead fetch is in flight moves that fetch up to READ
    (`hurry`) and waits for it: the network is asked for the block once, not a second
    time at READ priority."""
    drive, net, big, _, _ = world
    fetch = FetchWithHurry(net)
    drive.blocks.fetch = fetch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            await read_catching_up_with_the_readahead(drive, net, fetch, big, nursery)

    run_trio(main, DEADLINE)


async def read_catching_up_with_the_readahead(drive, net: FakeNetwork, fetch, big: bytes,
                                              nursery: trio.Nursery):
    """Hold the chunk after the first READ's, start the readahead (two sequential READs),
    and READ 4 KiB of the held chunk once the readahead's fetch of it is on the network:
    that READ hurries the fetch (`fetch.hurried`), waits for it, and gets the bytes once
    the chunk is let go; the network is asked for it once, at READAHEAD. Returns the
    held chunk's ref."""
    of = await open_file(drive, b"big.bin")
    size = 128 * KiB
    first = of.map.span(size, size)[-1] + 1
    held = of.map.chunks[first]
    net.hold.add(held.block_id)
    for k in range(2):  # the second sequential read starts the readahead
        await drive.read(of, k * size, size)
    await net.wait_until(lambda: held.block_id in net.asked(Priority.READAHEAD))
    start = of.map.starts[first]
    got: list[bytes] = []

    async def read() -> None:
        got.append(bytes(await drive.read(of, start, 4096)))

    nursery.start_soon(read)
    while not fetch.hurried:
        await trio.testing.wait_all_tasks_blocked()
    assert not got  # it waits for the held fetch
    net.release()
    while not got:
        await trio.sleep(0.01)
    assert got == [big[start:start + 4096]]
    assert fetch.hurried == [(held.block_id, Priority.READ)]
    assert [p for b, p in net.requests if b == held.block_id] == [Priority.READAHEAD]
    return held


def test_a_read_of_a_chunk_the_readahead_found_missing_does_not_look_again(
        world, monkeypatch) -> None:
    """`load_ahead` found the block missing from the store; a READ that starts its load
    before the readahead's own goes to the network without a second store lookup (the
    kernel's READs run ahead of the readahead on a cold read: a worker-thread trip each)."""
    drive, net, big, reader, _ = world
    lookups: list[bytes] = []
    spy_calls(monkeypatch, reader, ("get", "get_decoded", "has"),
              lambda _name, args: lookups.append(args[0]))

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            ref = of.map.chunks[3]
            asked = len(net.requests)
            assert await drive.blocks.load_ahead([ref]) == [ref]
            assert lookups.count(ref.block_id) == 1
            plain = await drive.blocks.read(ref, Priority.READ)
            start = of.map.starts[3]
            assert plain == big[start:start + ref.length]
            assert lookups.count(ref.block_id) == 1  # no second look
            assert net.requests[asked:] == [(ref.block_id, Priority.READ)]

    run_trio(main, DEADLINE)


def test_a_window_of_large_chunks_stays_within_the_plaintext_cache(tmp_path) -> None:
    """At ~1 MiB chunks (vfs/chunker.py) 16 of them are ~18 MiB, more than the 16 MiB
    plaintext cache the readahead fills: the window pushed out its own front, and the
    READs read those chunks back from the store and decrypted them a second time. The
    window is at most READAHEAD_BYTES: a cold sequential read takes no chunk back from
    the store, and no `ahead` call asks for more than the window's bytes."""
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(40 * 1024 * KiB)
    (src / "big.bin").write_bytes(big)
    cap = new_cap()
    pub = BlockStore(tmp_path / "pub", sync=False)
    reader = BlockStore(tmp_path / "reader", sync=False)
    try:
        head = publish_folder(pub, src, cap)
        net = FakeNetwork(pub)
        fetch = FetchWithAhead(net)
        drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch)
        from_store: list[bytes] = []
        open_local = drive.blocks._open_local

        def opened(ref):
            plain = open_local(ref)
            if plain is not None:
                from_store.append(ref.block_id)
            return plain

        drive.blocks._open_local = opened

        async def main(nursery: trio.Nursery) -> None:
            async with running_drive(drive):
                of = await open_file(drive, b"big.bin")
                lengths = [r.length for r in of.map.chunks]
                # the window of 16 chunks would not fit the plaintext cache
                assert max(sum(lengths[i:i + READAHEAD_CHUNKS])
                           for i in range(len(lengths))) > PLAINTEXT_CACHE_BYTES
                size = 128 * KiB
                for k in range(len(big) // size):
                    got = await drive.read(of, k * size, size)
                    assert bytes(got) == big[k * size:(k + 1) * size]
                    while of.pending:
                        await trio.sleep(0.01)
                by_id = {r.block_id: r.length for r in of.map.chunks}
                for ids, _ in fetch.together:
                    assert sum(by_id[b] for b in ids) <= READAHEAD_BYTES + CDC_MAX
                assert from_store == [], f"{len(from_store)} chunks read back from the store"

        run_trio(main, DEADLINE)
    finally:
        reader.close()
        pub.close()
