"""The read path in process: Drive.read and BlockReader over a real store and a fake network.

A publisher's store stands in for the peers (tests/inprocess.py); the reader
has its own empty store. What is checked: bytes, which blocks are asked for
and at which priority (readahead in file order, nothing ahead of random
reads), what lands in the store, and what a block that does not decrypt does
(IntegrityError, and it is gone from the store so it is never served again).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from cache import schema
from cache.store import BlockStore
from dht.types import Priority
from tests.helpers import run_trio, small_chunks
from tests.inprocess import (
    FakeNetwork,
    new_cap,
    publish_folder,
    running_drive,
    spy_calls,
    wrong_key_chunks,
)
from vfs import blocks as blocks_module
from vfs.blocks import BlockReader
from vfs.drive import READAHEAD_CHUNKS, UNAVAILABLE_MEMORY, Drive
from vfs.errors import BlockUnavailable, IntegrityError
from vfs.storage import DriveStorage

MiB = 1 << 20
DEADLINE = 120.0  # seconds: generous, only a hang reaches it on a loaded machine
KiB = 1 << 10
MARKER = b"BAD BLOCK MARKER"


@pytest.fixture
def world(tmp_path: Path, monkeypatch):
    """A published drive (big.bin 8 MiB random, small.txt, bad.txt whose block does not
    decrypt), the publisher's store as the network, and an empty reader store. Cut in
    ~256 KiB chunks (`small_chunks`): the tests here count chunks against the window."""
    small_chunks(monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(8 * MiB)
    (src / "big.bin").write_bytes(big)
    (src / "small.txt").write_bytes(b"small\n")
    (src / "bad.txt").write_bytes(MARKER + b"x" * 1000)
    (src / "badbig.bin").write_bytes(MARKER + os.urandom(200 * KiB))
    cap = new_cap()
    pub = BlockStore(tmp_path / "pub", sync=False)
    with wrong_key_chunks(monkeypatch, MARKER) as bad_ids:
        head = publish_folder(pub, src, cap)
    assert len(bad_ids) == 2
    reader = BlockStore(tmp_path / "reader", sync=False)
    net = FakeNetwork(pub)
    drive = Drive(cap.read_cap(), DriveStorage(reader), head, fetch=net.fetch)
    yield drive, net, big, reader, bad_ids
    reader.close()
    pub.close()


async def open_file(drive: Drive, name: bytes):
    entry = await drive.lookup(drive.root_entry(), name)
    assert entry is not None
    return await drive.open(entry)


def test_sequential_reads_fetch_the_next_chunks_ahead_in_file_order(world) -> None:
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks = of.map.chunks
            assert len(chunks) > READAHEAD_CHUNKS + 4  # 8 MiB: ~32 chunks
            size = 128 * KiB
            for k in range(2):  # the second sequential read starts the readahead
                got = await drive.read(of, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
            first = of.map.span(size, size)[-1] + 1
            window = [c.block_id for c in chunks[first:first + READAHEAD_CHUNKS]]
            await net.wait_until(lambda: len(net.asked(Priority.READAHEAD)) >= len(window))
            # exactly the next 16 (started in file order; the store lookups before each
            # fetch run in worker threads, so neighbours may reach the network swapped)
            assert sorted(net.asked(Priority.READAHEAD)) == sorted(window)
            while of.pending:  # the readahead's own reads finish
                await trio.sleep(0.01)
            reads_before = len(net.asked(Priority.READ))
            start = of.map.starts[first]
            end = of.map.starts[first + READAHEAD_CHUNKS - 1]
            got = await drive.read(of, start, end - start)
            assert bytes(got) == big[start:end]
            # everything the reader now asked for was already fetched ahead
            assert len(net.asked(Priority.READ)) == reads_before

    run_trio(main, DEADLINE)


def test_random_reads_fetch_nothing_ahead(world) -> None:
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            for off in (5 * MiB, 1 * MiB, 7 * MiB, 3 * MiB + 17):
                got = await drive.read(of, off, 4096)
                assert bytes(got) == big[off:off + 4096]
            await trio.testing.wait_all_tasks_blocked()
            assert net.asked(Priority.READAHEAD) == []

    run_trio(main, DEADLINE)


def test_a_read_spanning_chunks_returns_exactly_the_bytes_asked(world) -> None:
    drive, net, big, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            s = of.map.starts
            for off, size in ((s[3] - 10, s[5] - s[3] + 20), (0, 8 * MiB), (8 * MiB - 1, 10),
                              (8 * MiB, 10), (s[1], 1)):
                got = await drive.read(of, off, size)
                assert bytes(got) == big[off:off + size], (off, size)
        # the drive stopped (an unmount): every block it fetched is in the store
        ids = [c.block_id for c in of.map.chunks]
        assert set(ids) <= set(net.asked())
        assert reader.missing(ids) == []
        asked = len(net.requests)
        async with running_drive(drive):
            drive.blocks._plain.clear()
            assert bytes(await drive.read(of, 0, 8 * MiB)) == big
        assert net.requests[asked:] == []  # all from the store

    run_trio(main, DEADLINE)


def test_a_read_in_parts_is_views_of_the_chunks_and_the_fuse_reply_uses_them(
        world, monkeypatch) -> None:
    """Drive.read_parts: one view per chunk spanned, no joined copy; vfs.fs.read_reply hands
    pyfuse3 the tuple where it takes one (patches/pyfuse3-*-read-parts.patch), the joined
    bytes where it does not, one view for a read within one chunk, b"" at the end."""
    from vfs import fs as fs_module

    drive, net, big, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            s = of.map.starts
            off, size = s[3] - 10, s[5] - s[3] + 20  # the end of chunk 2, 3 and 4, chunk 5's start
            parts = await drive.read_parts(of, off, size)
            assert isinstance(parts, tuple) and all(isinstance(p, memoryview) for p in parts)
            assert [len(p) for p in parts] == [10, s[4] - s[3], s[5] - s[4], 10]
            assert b"".join(parts) == big[off:off + size]
            assert await drive.read_parts(of, 8 * MiB, 10) == ()
            monkeypatch.setattr(fs_module, "READ_REPLY_PARTS", True)
            reply = await fs_module.read_reply(drive, of, off, size)
            assert type(reply) is tuple and b"".join(reply) == big[off:off + size]
            one = await fs_module.read_reply(drive, of, s[1] + 5, 100)
            assert isinstance(one, memoryview) and bytes(one) == big[s[1] + 5:s[1] + 105]
            assert await fs_module.read_reply(drive, of, 8 * MiB, 10) == b""
            monkeypatch.setattr(fs_module, "READ_REPLY_PARTS", False)  # a plain pyfuse3
            joined = await fs_module.read_reply(drive, of, off, size)
            assert type(joined) is bytes and joined == big[off:off + size]

    run_trio(main, DEADLINE)


def test_concurrent_reads_of_one_block_fetch_it_once(world) -> None:
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            target = of.map.chunks[2].block_id
            net.hold.add(target)
            results: list[bytes] = []

            async def reader(off: int) -> None:
                results.append(bytes(await drive.read(of, off, 100)))

            base = of.map.starts[2]
            async with trio.open_nursery() as inner:
                for k in range(5):
                    inner.start_soon(reader, base + k * 1000)
                await net.wait_until(lambda: target in net.asked())
                await trio.testing.wait_all_tasks_blocked()
                net.release()
            assert sorted(results) == sorted(big[base + k * 1000:base + k * 1000 + 100]
                                             for k in range(5))
            assert net.asked().count(target) == 1

    run_trio(main, DEADLINE)


def test_wrong_key_block_in_the_store_fails_and_is_evicted(world) -> None:
    drive, net, _, reader, bad_ids = world
    for block_id in bad_ids:  # as if fetched earlier: the id matches, so a store takes it
        ct = net.source.get(block_id)
        assert ct is not None
        reader.put(block_id, ct)

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            for name in (b"bad.txt", b"badbig.bin"):
                of = await open_file(drive, name)
                with pytest.raises(IntegrityError):
                    await drive.read(of, 0, 100)
            assert reader.missing(bad_ids) == bad_ids  # both evicted
            assert net.asked() and not set(bad_ids) & set(net.asked())
            # the good files of the same drive still read
            of = await open_file(drive, b"small.txt")
            assert bytes(await drive.read(of, 0, 100)) == b"small\n"

    run_trio(main, DEADLINE)


def test_wrong_key_block_from_the_network_fails_and_is_not_kept(world) -> None:
    drive, net, _, reader, bad_ids = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            for name in (b"bad.txt", b"badbig.bin"):
                of = await open_file(drive, name)
                for _ in range(2):  # and again: not served from memory either
                    with pytest.raises(IntegrityError):
                        await drive.read(of, 0, 100)
        # the drive stopped, so its store writer stored everything it was still holding
        assert reader.missing(bad_ids) == bad_ids
        # fetched afresh each time, never served from memory nor from the store (where a
        # writer batch in flight may have put it for a moment before evicting it)
        assert sum(1 for b in net.asked() if b in bad_ids) == 4

    run_trio(main, DEADLINE)


def test_a_bad_block_a_writer_batch_stored_for_a_moment_is_not_read_from_the_store(
        world) -> None:
    """The store writer took a batch holding a fetched block that then failed to decrypt:
    the batch stores it, then evicts it (two transactions). A read in between must not
    take it from the store (it used to: the CI race behind the wrong-key test's count)
    but fetch it afresh, and fail the same way."""
    drive, net, _, reader, bad_ids = world
    blocks = drive.blocks
    in_batch, failed, stored, release = (threading.Event() for _ in range(4))
    target: list[bytes] = []
    ciphertext_of, decrypt, store_batch, evict_bad = (
        blocks.ciphertext_of, blocks._decrypt, blocks._store_batch, blocks._evict_undecryptable)

    async def slow_ciphertext_of(block_id, *args, **kwargs):
        # a fetched block is decrypted at once on the event loop; the writer can still take
        # it first when the fetch waits (the unstored bytes' bound): that moment, here
        ct = await ciphertext_of(block_id, *args, **kwargs)
        if block_id in target:
            assert await trio.to_thread.run_sync(in_batch.wait, 60), "the writer never took it"
        return ct

    def slow_decrypt(ref, ct):
        try:
            return decrypt(ref, ct)
        finally:
            if ref.block_id in target:
                failed.set()

    def slow_store_batch(batch):
        if any(block_id in target for block_id, _ in batch):
            in_batch.set()
            assert failed.wait(60), "the block never failed to decrypt"
        return store_batch(batch)

    def slow_evict_bad(batch):
        if any(block_id in target for block_id, _ in batch):
            stored.set()
            assert release.wait(60), "the test never released the writer"
        return evict_bad(batch)

    blocks.ciphertext_of = slow_ciphertext_of
    blocks._decrypt = slow_decrypt
    blocks._store_batch = slow_store_batch
    blocks._evict_undecryptable = slow_evict_bad

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            try:  # the writer's thread is released before the drive stops, even on failure
                of = await open_file(drive, b"badbig.bin")
                chunk = of.map.chunks[0]  # the one that starts with the marker
                assert chunk.block_id in bad_ids and chunk.length >= 64 * KiB
                target.append(chunk.block_id)
                with pytest.raises(IntegrityError):
                    # the readahead's load (vfs/blocks.py `_load`)
                    await drive.blocks.read(chunk, Priority.READAHEAD)
                await trio.to_thread.run_sync(stored.wait, 60)
                assert reader.has(chunk.block_id)  # the moment: stored, not yet evicted
                with pytest.raises(IntegrityError):
                    await drive.read(of, 0, 100)
                assert net.asked().count(chunk.block_id) == 2  # fetched afresh
            finally:
                release.set()
        assert not reader.has(target[0])

    run_trio(main, DEADLINE)


def test_a_stored_block_changed_in_place_is_never_read_as_wrong_bytes(world) -> None:
    """The read path decrypts stored blocks without hashing them (docs/security.md): the
    GCM tag is the check. A stored block whose bytes rotted (its xxh3 fails too), or
    were rewritten with a matching xxh3 (only the tag sees it), never reads as other
    bytes: the first is fetched again at once, the second fails (EIO) and is dropped,
    and the next read fetches it afresh. Chunks of 256 KiB and of 6 bytes (the small
    one is decrypted on the event loop, the large ones in worker threads)."""
    drive, net, big, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            small = await open_file(drive, b"small.txt")
            assert bytes(await drive.read(of, 0, 8 * MiB)) == big
            assert bytes(await drive.read(small, 0, 100)) == b"small\n"
        rot, rewritten = of.map.chunks[2], of.map.chunks[5]
        tiny = small.map.chunks[0]
        assert reader.missing([rot.block_id, rewritten.block_id, tiny.block_id]) == []
        env = reader._env  # behind the store's back, as a disk or a stray writer would
        assert env is not None
        with env.begin(write=True) as txn:
            for ref, keep_digest in ((rot, True), (rewritten, False), (tiny, False)):
                value = bytearray(txn.get(ref.block_id, db=reader._dbs.blocks))
                value[len(value) // 2 + 4] ^= 0x5A
                if not keep_digest:  # rewrite the checksum to match the new bytes
                    value[:schema.DIGEST_LEN] = schema.encode_u64(
                        schema.digest_of(bytes(value[schema.DIGEST_LEN:])))
                txn.put(ref.block_id, bytes(value), db=reader._dbs.blocks)
        drive.blocks._plain.clear()
        asked = len(net.asked())
        async with running_drive(drive):
            s = of.map.starts
            # rot: dropped as missing and fetched again, the read never fails
            assert bytes(await drive.read(of, s[2], 4096)) == big[s[2]:s[2] + 4096]
            for f, ref, off, want in ((of, rewritten, s[5], big[s[5]:s[5] + 4096]),
                                      (small, tiny, 0, b"small\n")):
                with pytest.raises(IntegrityError):
                    await drive.read(f, off, 4096)
                assert not reader.has(ref.block_id)
                assert bytes(await drive.read(f, off, 4096)) == want  # fetched afresh
            assert bytes(await drive.read(of, 0, 8 * MiB)) == big
        assert sorted(net.asked()[asked:]) == sorted(
            [rot.block_id, rewritten.block_id, tiny.block_id])
        assert reader.check_consistency(deep=True) == []

    run_trio(main, DEADLINE)


def test_an_unavailable_block_fails_and_fails_at_once_for_a_moment(world) -> None:
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            missing = of.map.chunks[4]
            net.unavailable.add(missing.block_id)
            off = of.map.starts[4]
            with pytest.raises(BlockUnavailable):
                await drive.read(of, off, 100)
            asked = net.asked().count(missing.block_id)
            with pytest.raises(BlockUnavailable):  # remembered: no second wait on the network
                await drive.read(of, off, 100)
            assert net.asked().count(missing.block_id) == asked
            # a read of other chunks is not affected
            assert bytes(await drive.read(of, 0, 100)) == big[:100]
            net.unavailable.clear()
            await trio.sleep(UNAVAILABLE_MEMORY)
            assert bytes(await drive.read(of, off, 100)) == big[off:off + 100]

    run_trio(main, DEADLINE)


def test_block_reader_without_network_says_so(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "s", sync=False)
    cap = new_cap()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    pub = BlockStore(tmp_path / "pub", sync=False)
    head = publish_folder(pub, src, cap)
    reader = BlockReader(store, cap.read_key)

    async def main(nursery: trio.Nursery) -> None:
        assert head.root is not None and head.root.node is not None
        with pytest.raises(BlockUnavailable, match="no network"):
            await reader.read(head.root.node)

    run_trio(main, DEADLINE)
    store.close()
    pub.close()


def test_an_evicted_block_is_fetched_again_not_served_from_memory(world) -> None:
    """Mutation survivor (docs/testing.md): BlockReader.forget must drop the plaintext."""
    drive, net, _, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            entry = await drive.lookup(drive.root_entry(), b"small.txt")
            of = await drive.open(entry)
            block = of.map.chunks[0].block_id
            assert bytes(await drive.read(of, 0, 100)) == b"small\n"
            await drive.blocks._store_unstored()
            assert reader.has(block)
            await drive.answers.evict(entry)
            assert not reader.has(block) and drive.blocks.cached_plain(block) is None
            asked = net.asked().count(block)
            assert bytes(await drive.read(of, 0, 100)) == b"small\n"
            assert net.asked().count(block) == asked + 1

    run_trio(main, DEADLINE)


def test_an_evict_while_the_writer_stores_a_batch_is_not_undone(world) -> None:
    """The store writer took a batch of fetched blocks and is putting it in its thread
    when `evict` runs: the blocks must end up evicted, not stored again by the
    batch committing after the evict (seen as a folder reading 'partial' right after
    `peerdrive evict`)."""
    drive, _, _, reader, _ = world
    blocks = drive.blocks
    in_thread = threading.Event()
    release = threading.Event()
    batch_stored = threading.Event()
    store_batch = blocks._store_batch
    target: list[bytes] = []

    def slow_store_batch(batch):
        if target and any(block_id == target[0] for block_id, _ in batch):
            in_thread.set()
            assert release.wait(60), "the test never released the batch"
            try:
                return store_batch(batch)
            finally:
                batch_stored.set()
        return store_batch(batch)

    blocks._store_batch = slow_store_batch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            entry = await drive.lookup(drive.root_entry(), b"small.txt")
            of = await drive.open(entry)
            target.append(of.map.chunks[0].block_id)
            assert bytes(await drive.read(of, 0, 100)) == b"small\n"
            await trio.to_thread.run_sync(in_thread.wait, 60)  # the writer holds its batch
            evicted = trio.Event()

            async def evict() -> None:
                await drive.answers.evict(entry)
                evicted.set()

            nursery.start_soon(evict)
            # the evict either finished (and the batch would undo it) or waits its turn
            while not evicted.is_set() and not blocks._evicts_waiting:
                await trio.sleep(0.005)
            release.set()
            await evicted.wait()
            await trio.to_thread.run_sync(batch_stored.wait, 60)
            assert not reader.has(target[0]), "the batch stored the evicted block again"
            assert blocks.cached_plain(target[0]) is None

    run_trio(main, DEADLINE)


def test_the_plaintext_cache_keeps_to_its_bound(world) -> None:
    """Mutation survivors (docs/testing.md): the plaintext LRU's byte count and its bound."""
    drive, net, big, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks = of.map.chunks
            limit = chunks[0].length + chunks[1].length
            small = BlockReader(reader, drive.cap.read_key, net.fetch,
                                plaintext_cache_bytes=limit)
            assert await small.read(chunks[0]) == big[:chunks[0].length]
            assert await small.read(chunks[1])
            assert small._plain_bytes == limit  # exactly at the bound: both kept
            assert small.cached_plain(chunks[0].block_id) is not None  # now the most recent
            await small.read(chunks[2])
            assert small._plain_bytes == sum(len(p) for p in small._plain.values()) <= limit
            if chunks[2].length <= limit:  # it is kept, and the least recently used went first
                assert small.cached_plain(chunks[2].block_id) is not None
                assert small.cached_plain(chunks[1].block_id) is None
            else:  # larger than the whole cache: not kept, nothing pushed out
                assert small.cached_plain(chunks[2].block_id) is None
            small.forget(chunks[2].block_id)
            assert small._plain_bytes == sum(len(p) for p in small._plain.values())
            exact = BlockReader(reader, drive.cap.read_key, net.fetch,
                                plaintext_cache_bytes=chunks[3].length)
            await exact.read(chunks[3])
            assert exact.cached_plain(chunks[3].block_id) is not None  # as large as the bound

    run_trio(main, DEADLINE)


def test_a_read_loads_only_the_chunks_not_already_in_memory(world) -> None:
    """A hot read's chunks are mostly decrypted ahead: the request takes those from the
    plaintext cache and loads (one task each, on the event loop that answers FUSE) only
    the others; the bytes are exactly those asked for either way."""
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            s = of.map.starts
            off, end = s[3] + 5, s[7] - 3  # chunks 3-6, partly at both ends
            assert bytes(await drive.read(of, off, end - off)) == big[off:end]
            loaded: list[bytes] = []
            real = drive.blocks.read

            async def counting(ref, priority=Priority.READ, **kwargs):
                loaded.append(ref.block_id)
                return await real(ref, priority, **kwargs)

            drive.blocks.read = counting  # type: ignore[method-assign]
            chunks = of.map.chunks
            for n, dropped in ((0, []), (1, [5]), (2, [3, 6]), (4, [3, 4, 5, 6])):
                for i in dropped:
                    drive.blocks.forget(chunks[i].block_id)  # still in the store
                loaded.clear()
                assert bytes(await drive.read(of, off, end - off)) == big[off:end], dropped
                assert sorted(loaded) == sorted(chunks[i].block_id for i in dropped), n
            one = s[5] + 100  # a read inside one chunk, from memory and after a load
            assert bytes(await drive.read(of, one, 1000)) == big[one:one + 1000]
            drive.blocks.forget(chunks[5].block_id)
            assert bytes(await drive.read(of, one, 1000)) == big[one:one + 1000]

    run_trio(main, DEADLINE)


def test_a_hot_readahead_loads_stored_chunks_in_runs_not_one_by_one(world) -> None:
    """A sequential read of a file whose blocks are all in the store: the readahead reads
    and decrypts them a run of about a MiB per worker-thread job (one task, event and
    thread hand-off per chunk were much of a hot read's event-loop work), asks the
    network for nothing, and every byte read is right."""
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks = of.map.chunks
            assert bytes(await drive.read(of, 0, 8 * MiB)) == big
            while any(drive.blocks.is_unstored(c.block_id) for c in chunks):
                await trio.sleep(0.01)
            for c in chunks:
                drive.blocks.forget(c.block_id)  # in the store only
            asked = len(net.requests)
            workers = drive.blocks.workers
            jobs = workers.jobs
            of2 = await open_file(drive, b"big.bin")
            size = 128 * KiB
            for k in range(2):  # the second sequential read starts the readahead
                got = await drive.read(of2, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
            while of2.pending:
                await trio.sleep(0.01)
            first = of2.map.span(size, size)[-1] + 1
            window = chunks[first:first + READAHEAD_CHUNKS]
            assert all(drive.blocks.has_plain(c.block_id) for c in window)
            # the reads' own chunks, then the window in runs of up to a MiB (each at least
            # half full but the last); one job per chunk and a store lookup made 19 here
            runs = 2 * sum(c.length for c in window) // workers.batch_cost + 1
            assert workers.jobs - jobs <= 2 + runs < 2 + READAHEAD_CHUNKS
            got = await drive.read(of2, 2 * size, 8 * MiB - 2 * size)
            assert bytes(got) == big[2 * size:]
            assert net.requests[asked:] == []  # all from the store

    run_trio(main, DEADLINE)


class FetchWithAhead:
    """The fake network's fetch, with `ahead` (as vfs.network.DriveFetch) recording what a
    reader asks for together."""

    def __init__(self, net: FakeNetwork) -> None:
        self.net = net
        self.together: list[tuple[list[bytes], Priority]] = []

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        return await self.net.fetch(block_id, priority)

    async def ahead(self, block_ids: list[bytes], priority: Priority, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.together.append((list(block_ids), priority))
        task_status.started()


def test_a_readahead_asks_for_the_missing_chunks_together_in_file_order(world) -> None:
    """The readahead's missing chunks reach the fetcher in one call, in file order (it
    sends them to a peer as runs); chunks already on the device are left out."""
    drive, net, big, _, _ = world
    fetch = FetchWithAhead(net)
    drive.blocks.fetch = fetch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks = of.map.chunks
            local = chunks[6]  # fetched before: on the device, never asked for again
            await drive.blocks.read(local, Priority.READ)
            while drive.blocks.is_unstored(local.block_id):
                await trio.sleep(0.01)
            drive.blocks.forget(local.block_id)  # not in memory, only in the store
            assert drive.blocks.store.has(local.block_id)
            size = 128 * KiB
            for k in range(2):  # the second sequential read starts the readahead
                got = await drive.read(of, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
            first = of.map.span(size, size)[-1] + 1
            window = [c.block_id for c in chunks[first:first + READAHEAD_CHUNKS]]
            await net.wait_until(lambda: len(net.asked(Priority.READAHEAD)) >= len(window) - 1)
            assert len(fetch.together) == 1
            ids, priority = fetch.together[0]
            assert priority == Priority.READAHEAD
            assert ids == [b for b in window if b != local.block_id]  # file order
            while of.pending:
                await trio.sleep(0.01)
            # read it all from the start again: every chunk is on the device now (in the
            # store, not in memory)
            while any(drive.blocks.is_unstored(c.block_id) for c in chunks):
                await trio.sleep(0.01)
            for c in chunks:
                drive.blocks.forget(c.block_id)
            fetch.together.clear()
            asked = len(net.requests)
            of2 = await open_file(drive, b"big.bin")
            for k in range(8):
                await drive.read(of2, k * size, size)
            while of2.pending:
                await trio.sleep(0.01)
            # the readahead slides past what the first pass fetched; nothing fetched
            # before is asked for again, together or alone
            fetched = set(window) | {local.block_id} | {c.block_id for c in chunks[:first]}
            assert not fetched & {b for b, _ in net.requests[asked:]}
            assert not fetched & {b for ids, _ in fetch.together for b in ids}

    run_trio(main, DEADLINE)


def test_store_lookups_of_the_read_path_stay_off_the_event_loop_and_happen_once(
        world, monkeypatch) -> None:
    """A large block missing from the store is looked up once (in the worker thread that
    would have read it), not again on the event loop before it is fetched; the
    readahead's look for what is missing runs in a worker thread too. Every store
    read the event loop makes there gives the GIL away and waits for it back."""
    drive, net, big, reader, _ = world
    fetch = FetchWithAhead(net)
    drive.blocks.fetch = fetch
    loop_thread = threading.current_thread()
    on_loop: list[tuple[str, object]] = []
    lookups: list[bytes] = []
    def record(name: str, args: tuple) -> None:
        if threading.current_thread() is loop_thread:
            on_loop.append((name, args[0]))
        if name in ("get", "get_decoded"):
            lookups.append(args[0])

    spy_calls(monkeypatch, reader, ("get", "get_decoded", "has", "missing"), record)

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            size = 128 * KiB
            for k in range(4):  # sequential: the readahead starts and asks ahead
                got = await drive.read(of, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
            while of.pending:
                await trio.sleep(0.01)
            assert fetch.together  # the readahead did look for what is missing
            first = of.map.chunks[0]
            assert lookups.count(first.block_id) == 1  # missing: looked up once, fetched
            # (small blocks, the folder's node here, are read on the event loop by design)
            chunks = {c.block_id for c in of.map.chunks}
            assert [(n, a) for n, a in on_loop if n == "missing" or a in chunks] == []

    run_trio(main, DEADLINE)


def test_a_chunk_on_the_device_is_read_from_it_whatever_the_readahead_found_before(
        world) -> None:
    """A file read from the start, where nothing is stored, and then further on, where
    its chunks are on the device (read before, or stored by another reader): those are
    read from the store, not fetched, so they read with no source at all. (A READ
    ahead of a "cold" file's readahead once went to the network without a store
    lookup: with the source gone, a chunk on the device gave EIO.)"""
    drive, net, big, reader, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks, starts = of.map.chunks, of.map.starts
            stored_from = READAHEAD_CHUNKS + 6
            assert stored_from + 1 < len(chunks)
            for c in chunks[stored_from:]:
                reader.put(c.block_id, net.source.get(c.block_id))
                net.unavailable.add(c.block_id)  # on the device only
            size = 128 * KiB
            for k in range(2):  # sequential: the readahead starts, finds nothing stored
                got = await drive.read(of, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
            while of.pending:
                await trio.sleep(0.01)
            assert of.readahead_until <= stored_from
            for i in (stored_from + 1, stored_from):  # ahead of the readahead's window
                got = await drive.read(of, starts[i], 4096)
                assert bytes(got) == big[starts[i]:starts[i] + 4096]
            assert not {c.block_id for c in chunks[stored_from:]} & set(net.asked())

    run_trio(main, DEADLINE)


def test_a_fetched_block_is_decrypted_at_once_and_looked_up_in_the_store_once(
        world, monkeypatch) -> None:
    """A fetched block is decrypted on the event loop as it arrives, whoever asked for it
    (a READ, the readahead): a trip to a worker thread and back waits for two wakeups,
    several ms each on a loaded machine, against ~0.05-0.1 ms of AES-GCM. A READ's block
    costs one worker-thread call (the store lookup that found it missing); the
    readahead's blocks, found missing together by `load_ahead` (about a MiB of blocks per
    call), go to the network without a second lookup each."""
    drive, net, big, _, _ = world
    loop_thread = threading.current_thread()
    on_loop: dict[bytes, list[bool]] = {}
    real = blocks_module.decrypt_checked_block

    def spy(key, ref, ct):
        on_loop.setdefault(ref.block_id, []).append(threading.current_thread() is loop_thread)
        return real(key, ref, ct)

    monkeypatch.setattr(blocks_module, "decrypt_checked_block", spy)

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks, starts = of.map.chunks, of.map.starts
            for i in (len(chunks) // 2, len(chunks) - 3, 5):  # random reads, large chunks
                assert chunks[i].length >= 64 * KiB
                jobs = drive.blocks.workers.jobs
                got = await drive.read(of, starts[i] + 7, 4096)
                assert bytes(got) == big[starts[i] + 7:starts[i] + 7 + 4096]
                assert on_loop[chunks[i].block_id] == [True]
                assert drive.blocks.workers.jobs - jobs == 1  # the store lookup only
            size = 128 * KiB
            jobs = drive.blocks.workers.jobs
            for k in range(3):  # sequential from the start: the readahead fetches ahead
                got = await drive.read(of, k * size, size)
                assert bytes(got) == big[k * size:(k + 1) * size]
            await net.wait_until(lambda: len(net.asked(Priority.READAHEAD)) >= 4)
            while of.pending:
                await trio.sleep(0.01)
            ahead = set(net.asked(Priority.READAHEAD))
            assert ahead and all(on_loop[b] == [True] for b in ahead)
            # the READs' own lookups, and load_ahead's about a MiB a call: fewer calls than
            # the readahead fetched blocks (one each more when each was looked up again)
            assert drive.blocks.workers.jobs - jobs < len(ahead), (
                drive.blocks.workers.jobs - jobs, len(ahead))

    run_trio(main, DEADLINE)


def test_a_read_waiting_on_the_network_does_not_hold_up_other_reads(world) -> None:
    """FUSE serves requests from many tasks (pyfuse3 starts another whenever none is
    waiting for the kernel), so the read path must not serialise them: while one read
    waits for a block from the network, a random read and a sequential stream of the
    same file's local blocks, and a read of another file, are answered."""
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks, s = of.map.chunks, of.map.starts
            local = len(chunks) // 2  # the first half on the device, then out of memory
            assert bytes(await drive.read(of, 0, s[local])) == big[:s[local]]
            while any(drive.blocks.is_unstored(c.block_id) for c in chunks[:local]):
                await trio.sleep(0.01)
            for c in chunks[:local]:
                drive.blocks.forget(c.block_id)
            stalled = chunks[-1]
            net.hold.add(stalled.block_id)
            done = trio.Event()

            async def slow() -> None:
                got = await drive.read(of, s[-1], 4096)
                assert bytes(got) == big[s[-1]:s[-1] + 4096]
                done.set()

            nursery.start_soon(slow)
            await net.wait_until(lambda: stalled.block_id in net.asked())
            of2 = await open_file(drive, b"big.bin")
            for k in range(4):  # sequential (readahead starts), all local
                got = await drive.read(of2, k * 128 * KiB, 128 * KiB)
                assert bytes(got) == big[k * 128 * KiB:(k + 1) * 128 * KiB]
            got = await drive.read(of, s[local - 1] + 5, 4096)  # random, local
            assert bytes(got) == big[s[local - 1] + 5:s[local - 1] + 5 + 4096]
            small = await open_file(drive, b"small.txt")
            assert bytes(await drive.read(small, 0, 100)) == b"small\n"
            assert not done.is_set()  # all of it answered while the first read waited
            net.release()
            await done.wait()

    run_trio(main, DEADLINE)


def test_fetched_blocks_are_stored_without_hashing_them_again(world, monkeypatch) -> None:
    """The fetch hands over ciphertext it checked against its id (the `Fetch` contract):
    the store writer stores it with `ids_checked`, not through a second SHA-256 per
    block (a tenth of a cold read's store writes, issue 12). A fetch that hands over a
    bytearray still gets its blocks stored."""
    drive, net, big, reader, _ = world
    hashed: list[int] = []
    block_id_of = schema.block_id_of

    def counting_block_id_of(data):  # type: ignore[no-untyped-def]
        hashed.append(len(data))
        return block_id_of(data)

    monkeypatch.setattr(schema, "block_id_of", counting_block_id_of)
    fetch = net.fetch

    async def fetch_bytearray(block_id: bytes, priority: Priority) -> bytes:
        return bytearray(await fetch(block_id, priority))  # type: ignore[return-value]

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            assert bytes(await drive.read(of, 0, 2 * MiB)) == big[:2 * MiB]
            drive.blocks.fetch = fetch_bytearray
            entry = await drive.lookup(drive.root_entry(), b"small.txt")
            small = await drive.open(entry)
            assert bytes(await drive.read(small, 0, 100)) == b"small\n"
            await drive.blocks._store_unstored()
            fetched = [ref.block_id for ref in of.map.chunks if reader.has(ref.block_id)]
            assert len(fetched) >= 2, "the read stored nothing it fetched"
            assert reader.has(small.map.chunks[0].block_id)
            assert hashed == [], f"the store hashed {len(hashed)} fetched block(s) again"

    run_trio(main, DEADLINE)


def test_the_store_writer_is_one_thread_that_ends_with_the_drive(world) -> None:
    """The store writer is one long-lived thread of its own, not a worker-thread call per
    batch (each a thread hand-off and a task wake-up for the event loop): every batch of
    fetched blocks is stored from it, and it has returned once the drive stopped, with
    everything fetched stored (an unmount keeps every block it fetched)."""
    drive, _, big, reader, _ = world
    blocks = drive.blocks
    writer_threads: list[threading.Thread] = []
    batch_threads: list[threading.Thread] = []
    ended = threading.Event()
    writer_main, store_batch = blocks._writer_main, blocks._store_batch

    def spy_writer_main(token):
        writer_threads.append(threading.current_thread())
        try:
            return writer_main(token)
        finally:
            ended.set()

    def spy_store_batch(batch):
        batch_threads.append(threading.current_thread())
        return store_batch(batch)

    blocks._writer_main = spy_writer_main
    blocks._store_batch = spy_store_batch

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            for k in range(4):
                assert bytes(await drive.read(of, k * MiB, MiB)) == big[k * MiB:(k + 1) * MiB]
                await blocks._store_unstored()  # its batch is stored before the next read
        assert ended.is_set(), "the writer's thread still runs after the drive stopped"
        assert len(writer_threads) == 1 and len(batch_threads) >= 2
        assert set(batch_threads) == set(writer_threads)
        assert not blocks._unstored
        starts = of.map.starts
        assert all(reader.has(ref.block_id) for ref, start in zip(of.map.chunks, starts,
                                                                   strict=True)
                   if start < 4 * MiB)

    run_trio(main, DEADLINE)


def test_a_read_of_a_chunk_the_readahead_found_missing_does_not_look_again(world) -> None:
    """A READ that gets to a chunk before the readahead's load of it does, after the
    readahead found it missing from the store (`OpenFile.absent`), fetches it without a
    store lookup of its own (a worker-thread job each, on a cold sequential read)."""
    drive, net, big, _, _ = world

    async def main(nursery: trio.Nursery) -> None:
        async with running_drive(drive):
            of = await open_file(drive, b"big.bin")
            chunks, starts = of.map.chunks, of.map.starts
            i = len(chunks) // 2
            assert chunks[i].length >= 64 * KiB
            of.absent.add(i)  # as _prefetch_in_order leaves it until its load starts
            jobs = drive.blocks.workers.jobs
            got = await drive.read(of, starts[i], 4096)
            assert bytes(got) == big[starts[i]:starts[i] + 4096]
            assert drive.blocks.workers.jobs == jobs, "the READ looked into the store"
            assert net.asked().count(chunks[i].block_id) == 1

    run_trio(main, DEADLINE)
