"""cache.mapread: where a value of LMDB's map lives in data.mdb, and readahead on in-order reads."""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import lmdb
import pytest

from cache.mapread import StoreReadahead, buffer_address, overflow_extent
from cache.store import BlockStore

KiB = 1024


def test_buffer_address_of_a_writable_buffer() -> None:
    buf = bytearray(b"x" * 100)
    want = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert buffer_address(memoryview(buf)) == want
    assert buffer_address(memoryview(buf)[10:]) == want + 10


@pytest.fixture
def env(tmp_path: Path):
    e = lmdb.open(str(tmp_path), map_size=64 * 1024 * 1024, readahead=False)
    yield e
    e.close()


def fill(env: lmdb.Environment, count: int, size: int) -> list[bytes]:
    keys = []
    with env.begin(write=True) as txn:
        for i in range(count):
            key = i.to_bytes(4, "big")
            txn.put(key, bytes([i % 251]) * size)
            keys.append(key)
    return keys


def test_offset_of_names_the_bytes_of_the_value_in_the_file(env, tmp_path: Path) -> None:
    keys = fill(env, 8, 200 * KiB)
    ra = StoreReadahead(str(tmp_path / "data.mdb"))
    try:
        with env.begin(buffers=True) as txn, open(tmp_path / "data.mdb", "rb") as f:
            for key in keys:
                view = txn.get(key)
                offset = ra.offset_of(view)
                assert offset is not None
                f.seek(offset)
                assert f.read(len(view)) == bytes(view)
    finally:
        ra.close()


def test_a_view_of_another_file_has_no_offset(env, tmp_path: Path) -> None:
    fill(env, 1, 100 * KiB)
    other = tmp_path / "other"
    other.write_bytes(b"\0" * 4096)
    ra = StoreReadahead(str(other))
    try:
        with env.begin(buffers=True) as txn:
            assert ra.offset_of(txn.get((0).to_bytes(4, "big"))) is None
        assert ra.offset_of(memoryview(bytearray(10))) is None  # not a file mapping
    finally:
        ra.close()


def test_reads_in_file_order_ask_for_windows_and_random_ones_do_not(env, tmp_path: Path) -> None:
    keys = fill(env, 64, 256 * KiB)  # 16 MiB, stored one after another
    ra = StoreReadahead(str(tmp_path / "data.mdb"), window=2 * 1024 * KiB, slack=512 * KiB)
    try:
        with env.begin(buffers=True) as txn:
            for key in keys[:32]:
                ra.note_read(txn.get(key))
            in_order = ra.windows
            # about one window per 2 MiB read (each asked for when half of the last is used)
            assert 3 <= in_order <= 16
            for key in keys[63:32:-7]:  # backwards, 7 values apart: never in order
                ra.note_read(txn.get(key))
            assert ra.windows == in_order
    finally:
        ra.close()
    ra.note_read(memoryview(b"closed is harmless"))


def test_store_reads_in_stored_order_use_the_readahead(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path / "s"), sync=False)
    try:
        blocks = []
        for _ in range(40):
            data = os.urandom(128 * KiB)
            blocks.append((hashlib.sha256(data).digest(), data))
        store.put_many(blocks)
        for block_id, data in blocks:
            assert store.get(block_id) == data
        assert store.readahead_windows >= 1
    finally:
        store.close()


def rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_pages_read_are_unmapped_now_and_then_and_reads_stay_right(env, tmp_path: Path) -> None:
    keys = fill(env, 48, 1024 * KiB)  # 48 MiB
    ra = StoreReadahead(str(tmp_path / "data.mdb"))
    ra.release_every = 4 * 1024 * KiB
    try:
        with env.begin(buffers=True) as txn:
            before = rss_file_kib()
            for i, key in enumerate(keys):
                view = txn.get(key)
                ra.note_read(view)
                # a view stays readable (and right) after its pages were unmapped
                assert bytes(view[:4096]) == bytes([i % 251]) * 4096
                assert bytes(view[-1:]) == bytes([i % 251])
            grown = rss_file_kib() - before
        assert ra.releases >= 10
        assert grown < 16 * 1024, f"{grown} KiB of the store still mapped after reading 48 MiB"
    finally:
        ra.close()


def test_a_store_can_unmap_what_it_touched(tmp_path: Path) -> None:
    store = BlockStore(str(tmp_path / "s"), sync=False)
    try:
        blocks = []
        for _ in range(24):
            data = os.urandom(1024 * KiB)
            blocks.append((hashlib.sha256(data).digest(), data))
        store.put_many(blocks)
        before = rss_file_kib()
        with store._read() as txn:  # touch every page of the blocks through the map
            for block_id, data in blocks:
                view = txn.get(block_id, db=store._dbs.blocks)
                assert bytes(view[-1024:]) == data[-1024:]
        mapped = rss_file_kib() - before
        assert mapped > 16 * 1024  # the blocks are mapped into this process now
        store.release_mapped_pages()
        assert rss_file_kib() - before < mapped / 4
        for block_id, data in blocks[:3]:
            assert store.get(block_id) == data  # and read back the same
    finally:
        store.close()


def test_the_mapping_released_is_looked_up_again_after_every_remap(tmp_path: Path) -> None:
    """`release` keeps the mapping of data.mdb it found in /proc/self/maps (parsing it on
    every release cost a hot read dearly); the store forgets it whenever it maps the
    file anew (a map resize), so MADV_DONTNEED only ever lands on the current map."""
    store = BlockStore(str(tmp_path / "s"), sync=False, initial_map_bytes=2 * 1024 * KiB)
    try:
        ra = store._readahead
        assert ra is not None
        ra.release_every = 1  # every large read releases
        blocks = []
        for _ in range(12):
            data = os.urandom(1024 * KiB)
            blocks.append((hashlib.sha256(data).digest(), data))
        store.put_many(blocks[:1])
        assert store.get(blocks[0][0]) == blocks[0][1]
        first = ra._mapping
        assert first is not None and ra.releases >= 1
        maps_before = ra.releases
        store.put_many(blocks[1:])  # the map grows (2 MiB -> 16 MiB): mapped anew
        assert store._live_env().info()["map_size"] > 2 * 1024 * KiB
        assert ra._mapping is None
        for block_id, data in blocks:
            assert store.get(block_id) == data
        current = ra._mapping
        assert current is not None and ra.releases > maps_before
        with store._read() as txn:  # the cached range is exactly the current map's
            view = txn.get(blocks[-1][0], db=store._dbs.blocks)
            assert ra._find(buffer_address(view)) == current
    finally:
        store.close()


def test_overflow_extent_names_a_big_value_in_the_file_without_reading_it(
        env, tmp_path: Path) -> None:
    """The extent read from the leaf node is exactly where py-lmdb's view of the value is,
    for values on one or many overflow pages and keys of several lengths; a value kept in
    the leaf has none."""
    sizes = [100, 3 * KiB, 5 * KiB, 64 * KiB, 256 * KiB + 40, 1024 * KiB + 1]
    keys = []
    with env.begin(write=True) as txn:
        for i, size in enumerate(sizes):
            key = bytes([i]) * (1 + 11 * i)
            txn.put(key, os.urandom(size))
            keys.append(key)
    ra = StoreReadahead(str(tmp_path / "data.mdb"))
    psize = env.stat()["psize"]
    try:
        with env.begin(buffers=True) as txn:
            cursor = txn.cursor()
            for key, size in zip(keys, sizes, strict=True):
                assert cursor.set_key(key)
                extent = overflow_extent(cursor.key(), psize)
                view = cursor.value()
                if size < 2 * KiB:
                    assert extent is None  # stored in the leaf page
                    continue
                assert extent == (ra.offset_of(view), len(view)), size
    finally:
        ra.close()


def test_store_gets_ask_for_each_big_block_once_and_read_it_right(tmp_path: Path) -> None:
    """Every way of reading a block goes through the cursor lookup that asks for a big
    value's pages (one WILLNEED each) before py-lmdb touches them; the bytes are the
    stored ones, after a reopen, and in pages freed by an eviction and used again."""
    path = str(tmp_path / "s")

    def make(count: int, size: int) -> list[tuple[bytes, bytes]]:
        out = []
        for _ in range(count):
            data = os.urandom(size)
            out.append((hashlib.sha256(data).digest(), data))
        return out

    big, small = make(6, 256 * KiB), make(4, 1 * KiB)
    store = BlockStore(path, sync=False)
    try:
        store.put_many(big + small)
        ra = store._readahead
        assert ra is not None
        for block_id, data in big + small:
            assert store.get(block_id) == data
        assert ra.hints == len(big)  # small blocks are not asked for
        ids = [b for b, _ in big + small]
        assert store.get_many(ids) == [d for _, d in big + small]
        assert ra.hints == 2 * len(big)
        for block_id, data in big:
            assert store.get_decoded(block_id, bytes) == data
            with store.get_view(block_id) as view:
                assert view is not None and bytes(view) == data
        assert ra.hints == 4 * len(big)
        assert store.get(b"\x01" * 32) is None
    finally:
        store.close()
    store = BlockStore(path, sync=False)
    try:
        for block_id, data in big:
            assert store.get(block_id) == data
        assert store._readahead is not None and store._readahead.hints == len(big)
        store.evict([b for b, _ in big[:4]])
        again = make(4, 200 * KiB)
        store.put_many(again)  # into the pages the evicted blocks freed
        for block_id, data in again + big[4:]:
            assert store.get(block_id) == data
        for block_id, _ in big[:4]:
            assert store.get(block_id) is None
        with store._read() as txn:
            cursor = txn.cursor(db=store._dbs.blocks)
            for block_id, _ in again:
                assert cursor.set_key(block_id)
                extent = overflow_extent(cursor.key(), store._page_size)
                view = cursor.value()
                assert extent == (store._readahead.offset_of(view), len(view))
    finally:
        store.close()
