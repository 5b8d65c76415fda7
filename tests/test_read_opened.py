"""Fetched blocks decrypted in the fetch's own thread (issue 12): `BlockReader.open_verified`
through the fetch's `open_with` hook. A block decrypted there is not decrypted again on the
event loop; one that fails there fails its read (IntegrityError: EIO) and is not kept;
a plaintext made for another ref of the same id is never handed out."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import trio

from dht.types import Priority
from tests.helpers import run_trio
from tests.inprocess import FakeNetwork, running_drive
from tests.test_read_path import DEADLINE, KiB, open_file, world  # noqa: F401 (a fixture)
from vfs import blocks as blocks_module
from vfs.drive import Drive
from vfs.errors import IntegrityError


class FetchOpening:
    """The fake network's fetch, with `open_with` as vfs.network.DriveFetch: each block
    goes to the hook in a worker thread (as a connection's receive thread would call it,
    with bytes checked against the id) before the fetch returns it; with `ahead`."""

    def __init__(self, net: FakeNetwork) -> None:
        self.net = net
        self.opener = None
        self.opened: list[bytes] = []  # ids handed to the hook

    def open_with(self, opener) -> None:
        self.opener = opener

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        ct = await self.net.fetch(block_id, priority)
        if self.opener is not None:
            self.opened.append(block_id)
            await trio.to_thread.run_sync(self.opener, block_id, ct)
        return ct

    async def ahead(self, block_ids: list[bytes], priority: Priority, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:  # fetched now, read from memory later
            for block_id in block_ids:
                nursery.start_soon(self, block_id, priority)


def loop_decryptions(monkeypatch) -> list[bytes]:
    """Ids of blocks decrypted on the event loop (the main thread) from now on."""
    on_loop: list[bytes] = []
    decrypt = blocks_module.decrypt_checked_block

    def counting(read_key, ref, ct):
        if threading.current_thread() is threading.main_thread():
            on_loop.append(ref.block_id)
        return decrypt(read_key, ref, ct)

    monkeypatch.setattr(blocks_module, "decrypt_checked_block", counting)
    return on_loop


def opening_drive(drive: Drive, net: FakeNetwork) -> tuple[Drive, FetchOpening]:
    fetch = FetchOpening(net)
    return Drive(drive.cap, drive.storage, drive.head, fetch=fetch), fetch


def test_a_block_decrypted_in_the_fetch_thread_is_not_decrypted_again_on_the_loop(
        world, monkeypatch) -> None:  # noqa: F811
    """A cold sequential read of 8 MiB (READs and readahead): every chunk comes from the
    network, is decrypted in the fetch's thread, and none on the event loop."""
    old, net, big, _, _ = world
    drive, fetch = opening_drive(old, net)
    on_loop = loop_decryptions(monkeypatch)

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            size = 128 * KiB
            got = bytearray()
            for k in range(len(big) // size):
                got += await drive.read(of, k * size, size)
            assert got == big
            chunks = {c.block_id for c in of.map.chunks}
            assert chunks <= set(fetch.opened)
            assert not chunks & set(on_loop), "fetched chunks were decrypted on the loop"
            # and the root folder's block, looked up through the same path
            assert drive.blocks.opened_in_thread == len(chunks) + 1

    run_trio(main, DEADLINE)


def test_a_block_that_fails_to_decrypt_in_the_fetch_thread_fails_its_read_and_is_not_kept(
        world) -> None:  # noqa: F811
    old, net, _, reader, bad_ids = world
    drive, fetch = opening_drive(old, net)

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            for name in (b"bad.txt", b"badbig.bin"):
                of = await open_file(drive, name)
                for _ in range(2):  # and again: not served from memory either
                    with pytest.raises(IntegrityError):
                        await drive.read(of, 0, 100)
        assert set(bad_ids) <= set(fetch.opened)  # the hook was given them, and kept nothing
        assert reader.missing(bad_ids) == bad_ids
        assert sum(1 for b in net.asked() if b in bad_ids) == 4
        assert not set(bad_ids) & set(drive.blocks._opened)

    run_trio(main, DEADLINE)


def test_a_plaintext_made_for_another_ref_of_the_same_block_is_not_handed_out(
        world) -> None:  # noqa: F811
    """A file record naming a block with the wrong chunk hash (a forged or broken ref)
    gets IntegrityError, even when the thread decrypted that block for the right ref."""
    old, net, big, _, _ = world
    drive, _ = opening_drive(old, net)
    blocks = drive.blocks

    async def main(nursery: trio.Nursery) -> None:
        of = await open_file(drive, b"big.bin")
        good = of.map.chunks[3]
        forged = replace(good, chunk_hash=bytes(32))
        opened = blocks.opened_in_thread  # the root folder's block
        ct = await net.fetch(good.block_id, Priority.READ)
        blocks._expect([good])
        await trio.to_thread.run_sync(blocks.open_verified, good.block_id, ct)
        assert good.block_id in blocks._opened
        with pytest.raises(IntegrityError):
            await blocks.read(forged, Priority.READ)
        assert blocks.opened_in_thread == opened

    run_trio(main, DEADLINE)


def test_what_the_fetch_thread_decrypts_is_bounded_and_dropped_when_its_load_ends(
        world, monkeypatch) -> None:  # noqa: F811
    """Plaintexts no load takes (a readahead nobody reads) stay within their bound; a load
    that ends (here: its fetch fails) no longer expects its block.

    The bound is the last three chunks' plaintext, whatever their sizes: big.bin is
    random and a chunk may be up to CDC_MAX (1 MiB), so a fixed 768 KiB bound let a
    large tenth chunk push out everything, itself included (about 1 run in 100).
    """
    old, net, _, _, _ = world
    drive, _ = opening_drive(old, net)
    blocks = drive.blocks

    async def main(nursery: trio.Nursery) -> None:
        of = await open_file(drive, b"big.bin")
        chunks = of.map.chunks[:10]
        limit = sum(r.length for r in chunks[-3:])
        monkeypatch.setattr(blocks_module, "OPENED_LIMIT_BYTES", limit)
        blocks._expect(chunks)
        for ref in chunks:
            ct = await net.fetch(ref.block_id, Priority.READ)
            await trio.to_thread.run_sync(blocks.open_verified, ref.block_id, ct)
        # the newest that fit, the oldest dropped first
        assert blocks._opened_bytes == limit
        assert list(blocks._opened) == [r.block_id for r in chunks[-3:]]
        last = of.map.chunks[11]
        net.unavailable.add(last.block_id)
        with pytest.raises(Exception):  # noqa: B017, PT011 - BlockUnavailable, as the net says
            await blocks.read(last, Priority.READ)
        assert last.block_id not in blocks._expected
        ct = net.source.get(last.block_id)
        blocks.open_verified(last.block_id, ct)  # late: its load has ended
        assert last.block_id not in blocks._opened

    run_trio(main, DEADLINE)
