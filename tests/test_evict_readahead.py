"""An evict wins over the readahead started before it.

A user who evicts a file expects it to be `cloud` afterwards, whatever the
readahead of an earlier read was doing: a fetch of it in flight at the evict
neither stores nor keeps its block, and a chunk the readahead had planned but
not yet started is not fetched at all (tests/test_fs_ops.py's status test saw
the file `partial` after its evict in 3-6 runs of 15). Deterministic: the fetch, or the readahead's store lookup, is held until after
the evict. In process, over a real store and a fake network (tests/test_read_path.py's
world).
"""

from __future__ import annotations

import trio
import trio.testing

from dht.types import Priority
from tests import test_read_path
from tests.helpers import run_trio
from tests.inprocess import running_drive
from tests.test_read_path import DEADLINE, KiB

world = test_read_path.world  # the fixture: a published drive over a fake network

SIZE = 128 * KiB


async def _start_readahead(drive, of) -> None:
    for k in range(2):  # the second sequential read starts the readahead
        await drive.read(of, k * SIZE, SIZE)


async def _settle(drive, of) -> None:
    """The readahead's tasks end and what was fetched is committed (the store writer's
    next step, as tests/test_fs_ops.py does it)."""
    while of.pending:
        await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    await drive.blocks._store_unstored()


def test_a_readahead_fetch_in_flight_at_an_evict_is_neither_stored_nor_kept(world) -> None:
    drive, net, _, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            entry = await drive.lookup(drive.root_entry(), b"big.bin")
            of = await drive.open(entry)
            ids = [c.block_id for c in of.map.chunks]
            first = of.map.span(SIZE, SIZE)[-1] + 1
            held = of.map.chunks[first].block_id
            net.hold.add(held)
            await _start_readahead(drive, of)
            await net.wait_until(lambda: held in net.asked(Priority.READAHEAD))
            await drive.answers.evict(entry)
            net.release()  # the held fetch answers after the evict
            await _settle(drive, of)
            assert set(reader.missing(ids)) == set(ids)  # `cloud`: nothing on the device
            assert not drive.blocks.has_plain(held)

    run_trio(main, DEADLINE)


def test_a_readahead_planned_before_an_evict_fetches_nothing_after_it(world) -> None:
    drive, net, _, reader, _ = world
    gate = trio.Event()
    real = drive.blocks.load_ahead

    async def held_lookup(refs):
        await gate.wait()  # the readahead's store lookup: held until after the evict
        return await real(refs)

    drive.blocks.load_ahead = held_lookup

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            entry = await drive.lookup(drive.root_entry(), b"big.bin")
            of = await drive.open(entry)
            ids = [c.block_id for c in of.map.chunks]
            await _start_readahead(drive, of)
            assert of.pending  # planned, waiting on its store lookup
            await drive.answers.evict(entry)
            asked = len(net.requests)
            gate.set()
            await _settle(drive, of)
            assert net.requests[asked:] == []  # dropped, not fetched
            assert set(reader.missing(ids)) == set(ids)

    run_trio(main, DEADLINE)

