"""BlockStore.put_pinned: pin and store a batch in one transaction (publish's bulk put).

Real LMDB files in temporary directories; the full-disk case on a real 8 MiB
tmpfs like tests/test_store_diskfull.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.errors import CorruptBlock, DiskFull, InvalidArgument
from cache.store import BlockStore
from tests.test_store import make_block
from tests.test_store_diskfull import small_disk  # noqa: F401 - a fixture

KIB = 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    s = BlockStore(tmp_path / "store", sync=False)
    try:
        yield s
    finally:
        s.close()


def test_blocks_are_stored_and_pinned_and_new_ones_named(store: BlockStore) -> None:
    old = make_block("old", 3 * KIB)
    store.put(*old)
    blocks = [make_block(i, 500 + i) for i in range(20)]
    new = store.put_pinned("publish-pending:x", [*blocks, old], ids_checked=True)
    assert new == [block_id for block_id, _ in blocks]
    for block_id, data in [*blocks, old]:
        assert store.get(block_id) == data
        assert store.is_pinned(block_id)
    assert store.pin_ids("publish-pending:x") == sorted(b for b, _ in [*blocks, old])
    assert store.pinned_bytes == sum(len(d) for _, d in [*blocks, old])
    assert store.eviction_order() == []  # pinned blocks are outside the LRU
    assert store.check_consistency(deep=True) == []
    # again: nothing new, nothing counted twice
    assert store.put_pinned("publish-pending:x", blocks, ids_checked=True) == []
    assert store.count == 21
    assert store.pin_progress("publish-pending:x") == (21, store.pinned_bytes, 21)
    assert store.check_consistency(deep=True) == []


def test_the_same_as_add_to_pin_then_put_many(tmp_path: Path) -> None:
    blocks = [make_block(i, 100 * i) for i in range(1, 30)]
    with BlockStore(tmp_path / "a", sync=False, limit_bytes=64 * KIB) as a, \
            BlockStore(tmp_path / "b", sync=False, limit_bytes=64 * KIB) as b:
        for s in (a, b):  # some cache blocks first, some of them the same as ours
            s.put_many([make_block(f"c{i}", 4 * KIB) for i in range(10)] + blocks[:3])
        a.add_to_pin("p", [block_id for block_id, _ in blocks])
        assert a.put_many(blocks) == len(blocks) - 3
        assert len(b.put_pinned("p", blocks)) == len(blocks) - 3
        for key in ("count", "total_bytes", "pinned_bytes", "pins"):
            assert a.stats()[key] == b.stats()[key]
        assert a.eviction_order() == b.eviction_order()
        assert a.pin_ids("p") == b.pin_ids("p")
        assert b.check_consistency(deep=True) == []


def test_pinned_blocks_push_cache_blocks_out_under_the_limit(store: BlockStore) -> None:
    store.set_limit(16 * KIB)
    cached = [make_block(f"c{i}", 4 * KIB) for i in range(4)]
    store.put_many(cached)
    ours = [make_block(f"p{i}", 4 * KIB) for i in range(3)]
    assert len(store.put_pinned("p", ours)) == 3
    assert store.total_bytes <= 16 * KIB
    assert store.missing([b for b, _ in ours]) == []
    assert len(store.missing([b for b, _ in cached])) == 3  # the oldest went
    assert store.check_consistency(deep=True) == []


def test_a_bad_block_stores_and_pins_nothing(store: BlockStore) -> None:
    good = make_block(1, 100)
    bad = (make_block(2, 100)[0], b"not these bytes")
    with pytest.raises(CorruptBlock):
        store.put_pinned("p", [good, bad])
    assert store.count == 0
    assert not store.has_pin("p")
    assert not store.is_pinned(good[0])


def test_checked_ids_take_bytes_only(store: BlockStore) -> None:
    block_id, data = make_block(1, 100)
    with pytest.raises(InvalidArgument):
        store.put_pinned("p", [(block_id, bytearray(data))], ids_checked=True)
    with pytest.raises(InvalidArgument):
        store.put_pinned("p", [(block_id[:5], data)])
    with pytest.raises(InvalidArgument):
        store.put_pinned("p", [(block_id, "text")])  # type: ignore[list-item]
    assert store.count == 0


def test_unchecked_views_are_hashed_and_stored(store: BlockStore) -> None:
    data = bytes(range(256)) * 8
    block_id = hashlib.sha256(data).digest()
    assert store.put_pinned("p", [(block_id, memoryview(data))]) == [block_id]
    assert store.get(block_id) == data


def test_nothing_to_put_is_a_no_op(store: BlockStore) -> None:
    assert store.put_pinned("p", []) == []
    assert not store.has_pin("p")


def test_duplicates_in_one_batch_count_once(store: BlockStore) -> None:
    block = make_block(1, 1000)
    assert store.put_pinned("p", [block, block, block]) == [block[0]]
    assert (store.count, store.total_bytes, store.pinned_bytes) == (1, 1000, 1000)
    assert store.check_consistency(deep=True) == []


def test_a_full_disk_leaves_nothing_half_done(small_disk: Path) -> None:  # noqa: F811
    blocks = [make_block(f"pub{i}", 64 * KIB + i) for i in range(200)]  # 12.5 MiB > 8 MiB
    with BlockStore(small_disk / "store") as store:
        done = 0
        with pytest.raises(DiskFull):
            for i in range(0, len(blocks), 10):
                store.put_pinned("p", blocks[i:i + 10], ids_checked=True)
                done = i + 10
        assert 0 < done < len(blocks)
        failed = [block_id for block_id, _ in blocks[done:done + 10]]
        assert store.missing(failed) == failed
        assert not any(store.is_pinned(block_id) for block_id in failed)
        assert store.pin_progress("p").present_count == done
        assert store.check_consistency(deep=True) == []


@pytest.mark.parametrize("put", ["put_pinned", "put_many"])
def test_a_batch_larger_than_the_map_is_written_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, put: str) -> None:
    """A write that cannot fit in the map grows it first: growing only on MapFullError
    threw the transaction away and ran it again (a publish's first commit of 20,000
    small files' blocks into a new store inserted 35,524 blocks for 20,201)."""
    import cache.writer

    inserted: list[bytes] = []
    insert = cache.writer.Writer.insert

    def counted(self: cache.writer.Writer, block_id: bytes, *args: object) -> bool:
        inserted.append(block_id)
        return insert(self, block_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cache.writer.Writer, "insert", counted)
    # 1,600 blocks of 4.3 KiB: 6.6 MiB of bytes, in two pages each, through a 1 MiB map
    blocks = [make_block(i, 4300 + i % 7) for i in range(1600)]
    with BlockStore(tmp_path / "s", sync=False, initial_map_bytes=1 << 20) as store:
        if put == "put_pinned":
            assert len(store.put_pinned("p", blocks, ids_checked=True)) == len(blocks)
        else:
            assert store.put_many(blocks, ids_checked=True) == len(blocks)
        assert len(inserted) == len(blocks)  # every block once: no pass was redone
        assert store.count == len(blocks)
        assert store.check_consistency(deep=True) == []
        assert all(store.get(block_id) == data for block_id, data in blocks[::97])

