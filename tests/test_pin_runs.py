"""Pins of many small files fetch in long runs; a server answers a run in one read.

In process, over real sockets on 127.0.0.1: a publisher's LMDB store served
by a real `PeerServer`, a real `Fetcher` in front of a reader `Drive` (its
store writer, pins and folder figures running). Frames are counted at the
client connection, so what is checked is what goes on the wire, never a
time.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cache.store import BlockStore
from dht.client import PeerConnection, RunOfWants
from dht.errors import BlockNotFound, FetchTimeout
from dht.fetch import FetchConfig, Fetcher
from dht.frames import MAX_RUN_IDS, Want, WantRun
from dht.identity import NodeIdentity
from dht.types import Priority
from tests.drive_builder import DriveBuilder, small_tree
from tests.helpers import run_trio
from tests.test_peer_support import new_drive, stall, start_raw_server, start_server
from tests.test_store import corrupt_on_disk
from vfs import xattrs
from vfs.capability import WriteCap
from vfs.drive import Drive
from vfs.errors import BlockUnavailable
from vfs.storage import DriveStorage

run = functools.partial(run_trio, deadline=120.0)  # run(test): test(nursery)

# no hedges, no stalls, no connect timeout a loaded machine reaches: this counts frames,
# and a second attempt (or connection) would be one more
CALM = FetchConfig(hedge_floor=60.0, stall_timeout=60.0, default_timeout=60.0,
                   connect_timeout=60.0, swarm_jitter=0, provider_refresh_min_interval=0.05)


class FetcherFetch:
    """What `vfs.network.DriveFetch` is to a mount: the drive's fetch, with batches.

    A batch fails (BlockUnavailable, the pin's round ends) when `stall` seconds pass
    with no block of it delivered: here the fetcher's default (CALM: 60 s, a hang).
    It was 5 s for every test, so a pin that must complete failed its round whenever
    a loaded machine went 5 s without delivering (the likely cause of the runs-of-120
    test's failure at a load of 24 on 2 cores, which no message was kept of).
    """

    stall: float | None = None

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        return await self.fetcher.fetch(block_id, priority)

    async def batch(self, block_ids, priority, deliver) -> None:
        try:
            await self.fetcher.fetch_batch(block_ids, priority, deliver, timeout=self.stall)
        except FetchTimeout as exc:
            raise BlockUnavailable(str(exc)) from exc

    def stored(self, block_ids) -> None:
        self.fetcher.stored(block_ids)


class QuickStall(FetcherFetch):
    """For a test whose pin must stall: its round ends 5 s after the last delivery (a
    machine's load only makes that later)."""

    stall = 5.0


@asynccontextmanager
async def served_drive(nursery: trio.Nursery, tmp_path: Path, b: DriveBuilder, files: int,
                       dk, secret):
    """A publisher's store holding a tree of `files` small files in folders of 100
    (committed by `b`), served on 127.0.0.1, and an empty reader store beside it;
    yields (publisher store, reader store, head, providers naming the server)."""
    with BlockStore(tmp_path / "pub") as pub, BlockStore(tmp_path / "reader") as reader:
        head = b.commit(pub, small_tree(b, files, per_folder=100))
        _server, addr = await start_server(nursery, pub, {dk: secret})

        async def providers():
            return [addr]

        yield pub, reader, head, providers


@asynccontextmanager
async def running_drive(cap: WriteCap, reader: BlockStore, head, dk, secret, providers,
                        fetch_type: type[FetcherFetch] = FetcherFetch):
    """A reader `Drive` whose fetch is a real `Fetcher` (CALM) asking `providers`, its
    tasks running in a nursery of their own; yields (drive, its fetch, that nursery),
    whose tasks are cancelled when the block ends."""
    async with Fetcher(NodeIdentity.generate(), dk, secret, providers,
                       config=CALM) as fetcher:
        fetch = fetch_type(fetcher)
        drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=fetch)
        async with trio.open_nursery() as inner:
            await inner.start(drive.run)
            yield drive, fetch, inner
            inner.cancel_scope.cancel()


def count_frames(monkeypatch) -> list[object]:
    """Every frame a client connection sends, from now on."""
    sent: list[object] = []
    real = PeerConnection._send

    def send(self, msg) -> None:
        sent.append(msg)
        real(self, msg)

    monkeypatch.setattr(PeerConnection, "_send", send)
    return sent


async def pin_root(drive: Drive, *, until_complete: bool = False) -> xattrs.PinProgress:
    """Pin the drive's root and wait until the pin says it is complete (or failed)."""
    assert drive.pins is not None
    drive.pins.pin([])
    while True:
        raw = await drive.answers.get([], drive.root_entry(), xattrs.PROGRESS)
        progress = xattrs.PinProgress.decode(raw) if raw is not None else None
        if progress is not None and (progress.complete
                                     or (progress.error and not until_complete)):
            return progress
        await trio.sleep(0.05)


def test_a_pin_of_many_small_files_goes_out_in_runs_of_about_120(tmp_path: Path,
                                                                   monkeypatch) -> None:
    files = 3000
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()
    sent = count_frames(monkeypatch)

    async def test(nursery: trio.Nursery) -> None:
        async with served_drive(nursery, tmp_path, b, files, dk,
                                secret) as (pub, reader, head, providers):
            async with running_drive(cap, reader, head, dk, secret, providers) as (drive, _, _):
                progress = await pin_root(drive)
            assert progress.complete, progress.error
            assert progress.blocks == progress.total_blocks == len(b.blocks)
            assert reader.missing(list(b.blocks)) == []
            # verified: the bytes are the publisher's
            assert all(reader.get(i) == pub.get(i) for i in list(b.blocks)[::97])

    run(test)
    nodes = {i for i, ct in b.blocks.items() if len(ct) > 200}  # the root and 30 folders
    file_blocks = set(b.blocks) - nodes
    assert len(nodes) == 31 and len(file_blocks) == files
    asked = Counter(w for m in sent for w in (
        [m.block_id] if isinstance(m, Want) else m.block_ids if isinstance(m, WantRun) else []))
    assert set(asked) == set(b.blocks)
    # each file's block asked for once; a folder's node may be asked twice: at PREFETCH
    # when the root is listed, again at PIN by the pin's walk if that comes while the
    # first is in flight (the same peer is asked at the urgent priority: fetch.py)
    assert all(asked[i] == 1 for i in file_blocks)
    assert all(asked[i] <= 2 for i in nodes)
    # the 3,000 files' blocks go in runs of up to 120 (a few shorter ones while the
    # fetcher learns that the blocks are small): about 3,000 / 120 = 25 frames, not 3,000
    carrying = [m for m in sent if isinstance(m, Want | WantRun) and (
        (m.block_id in file_blocks) if isinstance(m, Want) else file_blocks & set(m.block_ids))]
    assert len(carrying) <= files // MAX_RUN_IDS + 15, [
        len(m.block_ids) if isinstance(m, WantRun) else 1 for m in carrying]
    assert max(len(m.block_ids) for m in carrying if isinstance(m, WantRun)) == MAX_RUN_IDS


def test_a_pin_that_stalls_fails_its_round_and_resumes_with_what_it_stored(
        tmp_path: Path) -> None:
    """No peer answers: the round ends with the pin's error (a bounded wait), the pin
    keeps what it has, and the next round with a peer that serves completes it."""
    cap = WriteCap.generate()
    b = DriveBuilder(cap)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        with BlockStore(tmp_path / "pub") as pub, BlockStore(tmp_path / "reader") as reader:
            head = b.commit(pub, small_tree(b, 500, per_folder=100))
            staller = await start_raw_server(nursery, stall)
            server, addr = await start_server(nursery, pub, {dk: secret})
            # the directory nodes are here already (as after a `find`): only files are missing
            nodes = [(i, pub.get(i)) for i in b.blocks if len(pub.get(i)) > 200]
            reader.put_many(nodes)
            listed = [staller.addr]

            async def providers():
                return list(listed)

            async with running_drive(cap, reader, head, dk, secret,
                                     providers, QuickStall) as (drive, fetch, _):
                progress = await pin_root(drive)
                assert not progress.complete and "missing" in progress.error
                assert progress.blocks == len(nodes)
                listed[:] = [addr]  # a peer that serves comes
                fetch.fetcher.request_provider_refresh()
                progress = await pin_root(drive, until_complete=True)
            assert progress.complete, progress.error
            assert reader.missing(list(b.blocks)) == []

    run(test)


def _block(seed: str, size: int = 100) -> tuple[bytes, bytes]:
    data = hashlib.shake_256(seed.encode()).digest(size)
    return hashlib.sha256(data).digest(), data


def test_a_run_with_held_missing_foreign_and_rotten_blocks_is_read_in_one_transaction(
        tmp_path: Path, monkeypatch) -> None:
    """The server reads a WantRun's blocks with one store read (scope included), answers
    each in order: the held ones with their bytes, the others NotFound; the rotten one
    is dropped from the store, never sent."""
    dk, secret = new_drive()
    other = os.urandom(32)
    held = [_block(f"held {i}") for i in range(8)]
    warm = [_block(f"warm {i}") for i in range(40)]
    foreign = [_block(f"foreign {i}") for i in range(3)]  # stored, for another drive
    rotten = _block("rotten", 300)
    missing = [_block(f"missing {i}")[0] for i in range(3)]
    order = [held[0][0], missing[0], foreign[0][0], held[1][0], rotten[0], held[2][0],
             missing[1], foreign[1][0], *[h for h, _ in held[3:]], foreign[2][0], missing[2]]
    reads: list[int] = []

    async def test(nursery: trio.Nursery) -> None:
        with BlockStore(tmp_path / "store") as store:
            store.put_many([*held, *warm, rotten], tag=dk)
            store.put_many(foreign, tag=other)
            assert corrupt_on_disk(tmp_path / "store", rotten[1]) >= 1
            real_get_many = store.get_many

            def get_many(ids, **kwargs):
                reads.append(len(ids))
                return real_get_many(ids, **kwargs)

            monkeypatch.setattr(store, "get_many", get_many)
            monkeypatch.setattr(store, "get", None)  # a block read alone would fail here
            server, addr = await start_server(
                nursery, store, {dk: secret}, scope_by_tag=True,
                may_serve=lambda key, block_id: store.is_member(key, block_id))
            async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
                # a first run teaches the server that this connection's blocks are small
                # (it reads one block at a time until its running mean says so)
                answers: dict[int, object] = {}

                def on_result(i, data, error) -> None:
                    answers[i] = data if data is not None else error

                with trio.fail_after(30):
                    await conn.fetch_run(RunOfWants([w for w, _ in warm], Priority.PIN),
                                         on_result)
                assert [answers[i] for i in range(len(warm))] == [d for _, d in warm]
                reads.clear()
                answers.clear()

                with trio.fail_after(30):
                    await conn.fetch_run(RunOfWants(order, Priority.PIN), on_result)
            # a block not stored for this drive, absent or another drive's, is out of scope
            assert server.stats.out_of_scope == len(foreign) + len(missing)
            assert not store.has(rotten[0])  # dropped as rot
        blocks = dict(held)
        for i, block_id in enumerate(order):
            if block_id in blocks:
                assert answers[i] == blocks[block_id]
            else:
                assert isinstance(answers[i], BlockNotFound)
        assert reads == [len(order)]  # the whole run: one read transaction

    run(test)


def test_a_store_failing_a_batch_read_is_asked_block_by_block(tmp_path: Path,
                                                                 monkeypatch) -> None:
    dk, secret = new_drive()
    held = [_block(f"held {i}") for i in range(5)]
    lost = _block("lost")[0]

    async def test(nursery: trio.Nursery) -> None:
        with BlockStore(tmp_path / "store") as store:
            store.put_many(held, tag=dk)

            def broken(ids, **kwargs):
                raise OSError("the disk went away for a moment")

            monkeypatch.setattr(store, "get_many", broken)
            server, addr = await start_server(nursery, store, {dk: secret}, scope_by_tag=True,
                                              may_serve=store.is_member)
            async with PeerConnection.open(addr, NodeIdentity.generate(), dk, secret) as conn:
                answers: dict[int, object] = {}

                def on_result(i, data, error) -> None:
                    answers[i] = data if data is not None else error

                ids = [h for h, _ in held] + [lost]
                with trio.fail_after(30):
                    await conn.fetch_run(RunOfWants(ids, Priority.PIN), on_result)
            assert server.stats.source_errors >= 1
        assert [answers[i] for i in range(len(held))] == [d for _, d in held]
        assert isinstance(answers[len(held)], BlockNotFound)

    run(test)


def test_fetch_batch_hands_over_every_block_and_names_the_one_a_stall_left(tmp_path) -> None:
    dk, secret = new_drive()
    blocks = dict(_block(f"b {i}") for i in range(300))
    absent = _block("absent")[0]

    async def test(nursery: trio.Nursery) -> None:
        server, addr = await start_server(nursery, blocks, {dk: secret})

        async def providers():
            return [addr]

        async with Fetcher(NodeIdentity.generate(), dk, secret, providers,
                           config=CALM) as fetcher:
            got: dict[bytes, bytes] = {}
            groups: list[int] = []

            async def deliver(group) -> None:
                groups.append(len(group))
                got.update(group)
                await trio.sleep(0)

            await fetcher.fetch_batch(list(blocks), Priority.PIN, deliver)
            assert got == blocks
            assert len(groups) < len(blocks)  # handed over in groups, not one by one
            got.clear()
            with pytest.raises(FetchTimeout, match=absent.hex()[:16]):
                await fetcher.fetch_batch([*list(blocks)[:5], absent], Priority.PIN, deliver,
                                          timeout=2.0)
            assert len(got) == 5  # what came was handed over before the error

    run(test)
