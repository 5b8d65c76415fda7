"""Unit tests of cache.store.BlockStore on real LMDB files in temporary directories."""

from __future__ import annotations

import array
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache import schema
from cache.errors import (
    CorruptBlock,
    DiskFull,
    InvalidArgument,
    StoreClosed,
    StoreError,
    StoreFull,
    UnknownPin,
)
from cache.store import BlockStore, PinProgress

KIB = 1024


def make_block(seed: int | str, size: int) -> tuple[bytes, bytes]:
    """(id, data): deterministic pseudo-random bytes, unique per seed."""
    data = hashlib.shake_256(f"block {seed}".encode()).digest(size)
    return hashlib.sha256(data).digest(), data


def corrupt_on_disk(store_dir: str | Path, data: bytes) -> int:
    """Flip one byte in every copy of `data` inside data.mdb (bit rot); returns copies hit.

    Writes through the file while LMDB has it mapped: the page cache is shared,
    so the store sees the change at once, as it would see a disk that rots.
    """
    path = os.path.join(store_dir, "data.mdb")
    with open(path, "r+b") as f:
        content = f.read()
        hits = 0
        start = content.find(data)
        while start != -1:
            offset = start + len(data) // 2
            f.seek(offset)
            f.write(bytes([content[offset] ^ 0x5A]))
            hits += 1
            start = content.find(data, start + 1)
        f.flush()
        os.fsync(f.fileno())
    return hits


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[BlockStore]:
    s = BlockStore(store_dir, sync=False)
    try:
        yield s
    finally:
        s.close()


def fill(store: BlockStore, seeds: range | list[int], size: int) -> list[bytes]:
    ids = []
    for seed in seeds:
        block_id, data = make_block(seed, size)
        store.put(block_id, data)
        ids.append(block_id)
    return ids


# -- put / get ---------------------------------------------------------------------------


def test_put_then_get_returns_the_bytes(store: BlockStore) -> None:
    block_id, data = make_block(1, 70 * KIB)
    assert store.put(block_id, data) is True
    assert store.get(block_id) == data
    assert store.has(block_id)
    assert store.size_of(block_id) == len(data)
    assert (store.count, store.total_bytes) == (1, len(data))
    assert store.check_consistency(deep=True) == []


def test_put_again_is_not_new_and_counts_once(store: BlockStore) -> None:
    block_id, data = make_block(1, 1000)
    assert store.put(block_id, data)
    assert not store.put(block_id, bytearray(data))
    assert (store.count, store.total_bytes) == (1, 1000)


def test_put_refuses_bytes_that_do_not_hash_to_the_id(store: BlockStore) -> None:
    block_id, data = make_block(1, 100)
    with pytest.raises(CorruptBlock):
        store.put(block_id, data + b"x")
    assert not store.has(block_id)
    assert store.count == 0


def test_get_of_absent_block_is_none(store: BlockStore) -> None:
    assert store.get(make_block(5, 10)[0]) is None
    assert store.size_of(make_block(5, 10)[0]) is None


def test_empty_block_round_trips(store: BlockStore) -> None:
    block_id = hashlib.sha256(b"").digest()
    assert store.put(block_id, b"")
    assert store.get(block_id) == b""


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32, 7, None])
def test_bad_ids_are_refused(store: BlockStore, bad: object) -> None:
    with pytest.raises(InvalidArgument):
        store.get(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.put(bad, b"")  # type: ignore[arg-type]


def test_missing_and_count_present(store: BlockStore) -> None:
    present = fill(store, range(3), 500)
    absent = [make_block(i, 500)[0] for i in range(10, 12)]
    query = [absent[0], present[0], absent[0], absent[1], present[2]]
    assert store.missing(query) == [absent[0], absent[1]]
    assert store.count_present(query) == (2, 1000)


def test_put_many_is_one_transaction(store: BlockStore) -> None:
    blocks = [make_block(i, 2000) for i in range(5)]
    assert store.put_many(blocks) == 5
    assert store.put_many(blocks[:2]) == 0
    bad = [make_block(9, 10), (make_block(10, 10)[0], b"wrong")]
    with pytest.raises(CorruptBlock):
        store.put_many(bad)
    assert not store.has(bad[0][0])  # checked before anything was written


def test_get_view_is_zero_copy_and_released(store: BlockStore) -> None:
    block_id, data = make_block(1, 300 * KIB)
    store.put(block_id, data)
    with store.get_view(block_id) as view:
        assert view is not None
        assert view.readonly
        assert bytes(view) == data
    with pytest.raises(ValueError):
        bytes(view)
    with store.get_view(make_block(2, 5)[0]) as nothing:
        assert nothing is None


# -- bit rot ------------------------------------------------------------------------------


def test_rotten_block_is_missing_not_wrong(store: BlockStore, store_dir: Path) -> None:
    keep_id, keep = make_block("keep", 40 * KIB)
    bad_id, bad = make_block("rot", 40 * KIB)
    small_id, small = make_block("small", 300)  # stored inline in a leaf page
    store.put_many([(keep_id, keep), (bad_id, bad), (small_id, small)])
    assert corrupt_on_disk(store_dir, bad) >= 1
    assert corrupt_on_disk(store_dir, small) >= 1
    assert "fails its checksum" in " ".join(store.check_consistency())
    assert store.get(bad_id) is None
    with store.get_view(small_id) as view:
        assert view is None
    assert not store.has(bad_id) and not store.has(small_id)
    assert store.get(keep_id) == keep
    assert (store.count, store.total_bytes) == (1, len(keep))
    assert store.check_consistency(deep=True) == []
    assert store.put(bad_id, bad)  # fetched again
    assert store.get(bad_id) == bad


def test_get_decoded_reads_in_place_and_checks_only_when_decode_fails(
        store: BlockStore, store_dir: Path) -> None:
    """The read path decrypts where a block lies (GCM is the check); a decode that
    fails on rot sees the block dropped (None), on intact bytes its error raised."""
    block_id, data = make_block("dec", 300 * KIB)
    rot_id, rot = make_block("dec-rot", 40 * KIB)
    store.put_many([(block_id, data), (rot_id, rot)])
    seen: list[memoryview] = []

    def keep_view(view: memoryview) -> bytes:
        assert view.readonly
        seen.append(view)
        return hashlib.sha256(view).digest()

    assert store.get_decoded(block_id, keep_view) == block_id
    with pytest.raises(ValueError):
        bytes(seen[0])  # released with its transaction: nothing keeps a view of the map
    assert store.get_decoded(make_block("absent", 5)[0], keep_view) is None

    def refuse(view: memoryview) -> bytes:
        raise KeyError("not what I wanted")

    with pytest.raises(KeyError):
        store.get_decoded(block_id, refuse)  # intact bytes: the caller's error
    assert store.get(block_id) == data  # and the block stays
    assert corrupt_on_disk(store_dir, rot) >= 1

    def authenticate(view: memoryview) -> bytes:
        if hashlib.sha256(view).digest() != rot_id:
            raise ValueError("tag mismatch")
        return bytes(view)

    assert store.get_decoded(rot_id, authenticate) is None  # rot: missing, not wrong
    assert not store.has(rot_id)
    assert store.check_consistency(deep=True) == []


def test_put_replaces_a_rotten_copy(store: BlockStore, store_dir: Path) -> None:
    block_id, data = make_block("rot", 10 * KIB)
    store.put(block_id, data)
    corrupt_on_disk(store_dir, data)
    assert store.put(block_id, data) is True  # the rotten copy did not count as present
    assert store.get(block_id) == data
    assert store.check_consistency(deep=True) == []


def test_scrub_finds_blocks_that_do_not_match_their_id(store: BlockStore) -> None:
    ids = fill(store, range(4), 1000)
    assert store.scrub() == []
    # A block whose bytes *and* checksum changed (e.g. written wrong): only SHA-256 sees it.
    forged = b"forged" * 100
    env = store._env  # reach LMDB directly to forge a record
    assert env is not None
    with env.begin(write=True) as txn:
        txn.put(
            ids[1],
            schema.encode_block_value(schema.digest_of(forged), forged),
            db=store._dbs.blocks,
        )
        txn.put(ids[1], schema.encode_meta(1, len(forged)), db=store._dbs.meta)
    assert any("does not hash" in p for p in store.check_consistency(deep=True))
    assert store.get(ids[1]) == forged  # the fast check cannot see it...
    assert store.scrub() == [ids[1]]  # ...the scrub does
    assert not store.has(ids[1])


# -- limit and LRU eviction ----------------------------------------------------------------


def test_eviction_keeps_total_under_the_limit_least_recent_first(store: BlockStore) -> None:
    store.set_limit(10 * KIB)
    ids = fill(store, range(10), KIB)
    assert store.total_bytes == 10 * KIB
    store.get(ids[0])  # now most recent
    store.put(*make_block(100, KIB))
    assert store.has(ids[0])
    assert not store.has(ids[1])
    assert store.total_bytes == 10 * KIB
    store.put(*make_block(101, 3 * KIB))
    assert store.missing(ids[2:5]) == ids[2:5]
    assert store.total_bytes <= 10 * KIB
    assert store.check_consistency() == []


def test_insert_three_times_the_limit(store: BlockStore) -> None:
    limit = 256 * KIB
    store.set_limit(limit)
    pinned = fill(store, range(2), 16 * KIB)
    store.set_pin("keep", pinned)
    hot_id, hot = make_block("hot", 8 * KIB)
    store.put(hot_id, hot)
    held_id, held = make_block("held", 8 * KIB)
    store.put(held_id, held)
    inserted = 0
    with store.hold([held_id]):
        seed = 0
        while inserted < 3 * limit:
            block_id, data = make_block(f"p{seed}", 4 * KIB + (seed * 733) % (12 * KIB))
            store.put(block_id, data)
            inserted += len(data)
            seed += 1
            assert store.total_bytes <= limit
            if seed % 5 == 0:
                assert store.get(hot_id) == hot  # read often: stays
        assert store.has(held_id)
    assert all(store.has(b) for b in pinned)
    assert store.has(hot_id)
    assert store.check_consistency(deep=True) == []


def test_block_larger_than_the_limit_is_not_stored(store: BlockStore) -> None:
    store.set_limit(4 * KIB)
    small = fill(store, range(2), KIB)
    block_id, data = make_block("big", 5 * KIB)
    with pytest.raises(StoreFull, match="larger than the whole cache limit"):
        store.put(block_id, data)
    assert store.missing(small) == []  # nothing was evicted for it
    assert not store.has(block_id)


def test_store_full_when_everything_is_pinned_or_held(store: BlockStore) -> None:
    store.set_limit(4 * KIB)
    ids = fill(store, range(4), KIB)
    store.set_pin("a", ids[:2])
    with store.hold(ids[2:]):
        with pytest.raises(StoreFull, match="pinned") as info:
            store.put(*make_block("new", KIB))
        assert not hasattr(info.value, "errno")  # errno is made in vfs/fs.py only
        assert store.missing(ids) == []
    store.put(*make_block("new", KIB))  # the hold is gone: ids[2] goes
    assert store.missing(ids) == [ids[2]]


def test_pins_win_over_the_limit(store: BlockStore) -> None:
    store.set_limit(4 * KIB)
    loose = fill(store, range(2), KIB)
    wanted = [make_block(f"w{i}", 2 * KIB) for i in range(4)]
    store.set_pin("big", [b for b, _ in wanted])
    for block_id, data in wanted:
        store.put(block_id, data)
    assert store.missing([b for b, _ in wanted]) == []
    assert store.missing(loose) == loose  # unpinned ones went first
    assert store.total_bytes == 8 * KIB
    assert store.pinned_bytes == 8 * KIB
    with pytest.raises(StoreFull):
        store.put(*make_block("loose", 10))
    store.unpin("big")  # released: the store goes back under its limit at once
    assert store.total_bytes <= 4 * KIB
    assert store.check_consistency() == []


def test_lowering_the_limit_evicts_and_is_persisted(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False) as store:
        assert store.limit_bytes is None
        fill(store, range(8), KIB)
        assert store.set_limit(3 * KIB) == 5 * KIB
        assert store.total_bytes == 3 * KIB
    with BlockStore(store_dir, sync=False) as store:
        assert store.limit_bytes == 3 * KIB
    with BlockStore(store_dir, sync=False, limit_bytes=None) as store:
        assert store.limit_bytes is None
    with BlockStore(store_dir, sync=False, limit_bytes=KIB) as store:
        assert store.total_bytes == KIB


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_bad_limits_are_refused(store: BlockStore, bad: object) -> None:
    with pytest.raises(InvalidArgument):
        store.set_limit(bad)  # type: ignore[arg-type]


def test_evict_removes_only_unpinned_unheld(store: BlockStore) -> None:
    ids = fill(store, range(4), KIB)
    store.set_pin("p", [ids[0]])
    with store.hold([ids[1]]):
        assert store.evict(ids + [make_block("absent", 1)[0]]) == 2 * KIB
    assert store.missing(ids) == ids[2:]
    assert store.check_consistency() == []


def test_evict_to_and_eviction_order(store: BlockStore) -> None:
    ids = fill(store, range(5), KIB)
    store.get(ids[1])
    assert store.eviction_order() == [ids[0], ids[2], ids[3], ids[4], ids[1]]
    store.set_pin("p", [ids[2]])
    assert store.eviction_order() == [ids[0], ids[3], ids[4], ids[1]]
    assert store.evict_to(2 * KIB) == 3 * KIB  # ids[2] is pinned: 0, 3, 4 go
    assert store.missing(ids) == [ids[0], ids[3], ids[4]]


def test_hold_nests_and_releases(store: BlockStore) -> None:
    ids = fill(store, range(2), KIB)
    with store.hold([ids[0]]):
        with store.hold([ids[0]]):
            pass
        assert store.evict([ids[0]]) == 0
        assert store.stats()["held_count"] == 1
    assert store.stats()["held_count"] == 0
    assert store.evict([ids[0]]) == KIB


# -- pins ---------------------------------------------------------------------------------


def test_set_pin_replaces_the_set_and_follows_versions(store: BlockStore) -> None:
    ids = fill(store, range(6), KIB)
    store.set_pin("drive", ids[:4])
    assert all(store.is_pinned(b) for b in ids[:4])
    assert store.pin_ids("drive") == sorted(ids[:4])
    store.set_pin("drive", ids[2:6])  # next version: 0,1 released; 4,5 held
    assert [store.is_pinned(b) for b in ids] == [False, False, True, True, True, True]
    assert store.pinned_bytes == 4 * KIB
    assert store.eviction_order() == ids[:2]
    assert store.check_consistency() == []


def test_move_to_pin_takes_what_the_source_holds_and_releases_the_rest(
        store: BlockStore) -> None:
    ids = fill(store, range(7), KIB)
    store.set_pin("pending", ids[:4])
    store.set_pin("other", [ids[0]])
    absent = hashlib.sha256(b"not stored yet").digest()
    store.move_to_pin("version", "pending", [ids[2], ids[3], ids[4], absent])
    assert store.pin_names() == ["other", "version"]
    assert store.pin_ids("version") == sorted([ids[2], ids[3], ids[4], absent])
    # 0 still held by "other"; 1 released to the LRU at its old place; 4 newly pinned
    assert [store.is_pinned(b) for b in ids] == [True, False, True, True, True, False, False]
    assert store.pinned_bytes == 4 * KIB
    assert store.eviction_order() == [ids[1], ids[5], ids[6]]
    assert store.check_consistency() == []
    # onto an existing pin: its exact set, the source dropped
    store.set_pin("pending", [ids[5]])
    store.move_to_pin("version", "pending", [ids[4], ids[5]])
    assert store.pin_names() == ["other", "version"]
    assert store.pin_ids("version") == sorted([ids[4], ids[5]])
    assert [store.is_pinned(b) for b in ids] == [True, False, False, False, True, True, False]
    # no source: a plain new pin
    store.move_to_pin("fresh", "never-made", [ids[6]])
    assert store.is_pinned(ids[6]) and store.pin_ids("fresh") == [ids[6]]
    store.move_to_pin("fresh", "fresh", [ids[1]])  # onto itself: set_pin
    assert store.pin_ids("fresh") == [ids[1]] and not store.is_pinned(ids[6])
    assert store.check_consistency() == []


def test_replace_pin_takes_the_built_set_and_releases_only_what_it_lacks(
        store: BlockStore) -> None:
    ids = fill(store, range(6), KIB)
    store.set_pin("drive", ids[:4])
    store.add_to_pin("drive~next", ids[2:6])  # built a batch at a time, beside the old set
    store.replace_pin("drive", "drive~next")
    assert [store.is_pinned(b) for b in ids] == [False, False, True, True, True, True]
    assert store.pin_names() == ["drive"]
    assert store.pin_ids("drive") == sorted(ids[2:6])
    assert store.eviction_order() == ids[:2]
    with pytest.raises(UnknownPin):
        store.replace_pin("drive", "drive~next")
    store.replace_pin("drive", "drive")  # onto itself: nothing changes
    assert store.pin_ids("drive") == sorted(ids[2:6])
    # members are released a chunk at a time: more than one chunk's worth
    many = [hashlib.sha256(b"%d" % i).digest() for i in range(9000)]
    store.set_pin("big", many)
    store.set_pin("small~next", many[:10])
    store.replace_pin("big", "small~next")
    assert store.pin_ids("big") == sorted(many[:10])
    assert store.stats()["pins"] == {"big": 10, "drive": 4}
    assert store.check_consistency() == []


def test_merge_pin_keeps_both_sets_under_the_name(store: BlockStore) -> None:
    ids = fill(store, range(5), KIB)
    store.set_pin("drive", ids[:3])
    store.add_to_pin("drive~next", ids[2:5])  # a round cut short: what it fetched so far
    store.merge_pin("drive", "drive~next")
    assert store.pin_names() == ["drive"]
    assert store.pin_ids("drive") == sorted(ids)
    assert store.stats()["pins"] == {"drive": 5}
    store.merge_pin("drive", "drive~next")  # none left: nothing happens
    assert store.unpin("drive") is True
    assert not any(store.is_pinned(b) for b in ids)  # one reference each, not two
    assert store.check_consistency() == []


def test_overlapping_pins_keep_a_block_until_the_last_goes(store: BlockStore) -> None:
    ids = fill(store, range(3), KIB)
    store.set_pin("a", ids[:2])
    store.add_to_pin("b", ids[1:])
    assert store.unpin("a") is True
    assert store.unpin("a") is False
    assert [store.is_pinned(b) for b in ids] == [False, True, True]
    store.remove_from_pin("b", [ids[1]])
    assert [store.is_pinned(b) for b in ids] == [False, False, True]
    assert store.pin_names() == ["b"]
    assert store.stats()["pins"] == {"b": 1}
    assert store.check_consistency() == []


def test_pin_may_name_blocks_not_yet_stored(store: BlockStore) -> None:
    blocks = [make_block(i, 1000 + i) for i in range(3)]
    store.set_pin("want", [b for b, _ in blocks])
    assert store.pin_progress("want") == PinProgress(0, 0, 3)
    store.put(*blocks[0])
    store.put(*blocks[2])
    progress = store.pin_progress("want")
    assert progress == PinProgress(2, 2002, 3)
    assert not progress.complete
    assert store.pinned_bytes == 2002
    assert store.eviction_order() == []


def test_unknown_pin_and_bad_names(store: BlockStore) -> None:
    with pytest.raises(UnknownPin):
        store.pin_ids("nope")
    with pytest.raises(UnknownPin):
        store.pin_progress("nope")
    with pytest.raises(UnknownPin):
        store.remove_from_pin("nope", [])
    with pytest.raises(InvalidArgument):
        store.set_pin("", [])
    with pytest.raises(InvalidArgument):
        store.set_pin(b"bytes", [])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.set_pin("x" * 70000, [])
    assert not store.has_pin("nope")


def test_long_and_odd_pin_names(store: BlockStore) -> None:
    name = "pin:" + "deep/" * 1000 + "caf\u00e9 \udcff"  # a long path, and a raw byte
    ids = fill(store, range(2), 10)
    store.set_pin(name, ids)
    store.set_pin("empty", [])
    assert store.pin_names() == sorted([name, "empty"])
    assert store.pin_ids(name) == sorted(ids)
    assert store.pin_ids("empty") == []


# -- records ------------------------------------------------------------------------------


def test_records(store: BlockStore) -> None:
    store.put_record(b"head:a", b"1")
    store.put_record(b"head:b", b"2")
    store.put_record(b"other", b"3")
    store.put_record(b"head:a", b"10")
    assert store.get_record(b"head:a") == b"10"
    assert store.records(b"head:") == [(b"head:a", b"10"), (b"head:b", b"2")]
    assert len(store.records()) == 3
    assert store.records(b"zzz") == []
    assert store.delete_record(b"head:a") is True
    assert store.delete_record(b"head:a") is False
    assert store.get_record(b"head:a") is None
    with pytest.raises(InvalidArgument):
        store.put_record(b"", b"x")
    with pytest.raises(InvalidArgument):
        store.put_record(b"k" * 512, b"x")


def test_update_record_is_read_modify_write(store: BlockStore) -> None:
    def bump(old: bytes | None) -> bytes:
        return str(int(old or b"0") + 1).encode()

    threads = [
        threading.Thread(target=lambda: [store.update_record(b"n", bump) for _ in range(50)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_record(b"n") == b"200"
    assert store.update_record(b"n", lambda old: None) is None
    assert store.get_record(b"n") is None


# -- recency batching, restart ------------------------------------------------------------


def test_reads_do_not_write_until_flushed(store: BlockStore) -> None:
    ids = fill(store, range(3), KIB)
    env = store._env
    assert env is not None
    before = env.info()["last_txnid"]
    for _ in range(5):
        store.get(ids[0])
    assert env.info()["last_txnid"] == before  # no write transaction for reads
    assert store.pending_touches == 1
    store.flush()
    assert store.pending_touches == 0
    assert env.info()["last_txnid"] == before + 1


def test_touch_batch_is_written_when_full(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, touch_batch=3) as store:
        ids = fill(store, range(4), 100)
        for block_id in ids[:3]:
            store.get(block_id)
        assert store.pending_touches == 0
        assert store.eviction_order() == [ids[3], *ids[:3]]


def test_restart_keeps_total_lru_order_and_pins(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, limit_bytes=6 * KIB) as store:
        ids = fill(store, range(6), KIB)
        store.set_pin("p", [ids[5]])
        store.get(ids[0])
        store.get(ids[2])
        order = store.eviction_order()
        stats = store.stats()
    assert order == [ids[1], ids[3], ids[4], ids[0], ids[2]]
    with BlockStore(store_dir, sync=False) as store:
        assert store.eviction_order() == order
        after = store.stats()
        for key in ("count", "total_bytes", "limit_bytes", "pinned_bytes", "pins"):
            assert after[key] == stats[key]
        store.put(*make_block("n", 2 * KIB))
        assert store.missing(ids) == [ids[1], ids[3]]
        assert store.check_consistency(deep=True) == []


def test_closed_store_refuses_use(store_dir: Path) -> None:
    store = BlockStore(store_dir, sync=False)
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreClosed):
        store.get(make_block(1, 1)[0])
    with pytest.raises(StoreClosed):
        store.put(*make_block(1, 1))


def test_second_open_in_one_process_is_refused(store: BlockStore, store_dir: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        BlockStore(store_dir)


def test_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="cannot open"):
        BlockStore(tmp_path / "file")


def test_other_schema_version_is_refused(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False) as store:
        env = store._env
        assert env is not None
        with env.begin(write=True) as txn:
            txn.put(schema.STATE_SCHEMA, schema.encode_u32(99), db=store._dbs.state)
    with pytest.raises(StoreError, match="schema version 99"):
        BlockStore(store_dir)


# -- map size -----------------------------------------------------------------------------


def test_map_grows_as_blocks_arrive(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, initial_map_bytes=1 << 20) as store:
        fill(store, range(40), 64 * KIB)  # 2.5 MiB through a 1 MiB map
        assert store.stats()["map_bytes"] >= 4 << 20
        assert store.count == 40
        assert store.check_consistency() == []


def test_map_at_its_maximum_is_store_full_and_nothing_half_written(store_dir: Path) -> None:
    with BlockStore(
        store_dir, sync=False, initial_map_bytes=1 << 20, max_map_bytes=2 << 20
    ) as store:
        store.set_pin("all", [make_block(i, 64 * KIB)[0] for i in range(100)])
        stored = []
        with pytest.raises(DiskFull, match="maximum size"):
            for i in range(100):
                block_id, data = make_block(i, 64 * KIB)
                store.put(block_id, data)
                stored.append(block_id)
        assert 10 < len(stored) < 40
        assert store.missing(stored) == []
        assert store.count == len(stored)
        assert store.check_consistency(deep=True) == []
        store.put_record(b"still", b"writable")  # small writes fit in freed pages


def test_full_map_shrinks_the_cache_for_new_blocks(store_dir: Path) -> None:
    with BlockStore(
        store_dir, sync=False, initial_map_bytes=1 << 20, max_map_bytes=2 << 20
    ) as store:
        for i in range(200):  # unlimited cache, far more than fits
            store.put(*make_block(i, 32 * KIB))
        assert store.has(make_block(199, 32 * KIB)[0])
        assert store.check_consistency() == []


def test_stats(store: BlockStore) -> None:
    ids = fill(store, range(3), 100)
    store.set_pin("p", ids[:1])
    stats = store.stats()
    assert stats["count"] == 3
    assert stats["total_bytes"] == 300
    assert stats["pinned_bytes"] == 100
    assert stats["pinned_count"] == 1
    assert stats["evictable_bytes"] == 200
    assert stats["limit_bytes"] is None
    assert stats["pins"] == {"p": 1}
    assert stats["file_bytes"] > 0
    assert stats["map_bytes"] >= stats["file_bytes"]


# -- threads ------------------------------------------------------------------------------


def test_threads_share_one_store(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, limit_bytes=200 * KIB, initial_map_bytes=1 << 20) as s:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(60):
                    block_id, data = make_block(f"t{n}-{i}", 4 * KIB + i)
                    s.put(block_id, data)
                    got = s.get(block_id)
                    assert got is None or got == data
                    with s.get_view(block_id) as view:
                        assert view is None or bytes(view) == data
                    if i % 10 == 0:
                        s.set_pin(f"pin{n}", [block_id])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert s.total_bytes <= 200 * KIB
        assert s.check_consistency(deep=True) == []


def test_view_open_while_the_map_must_grow_is_an_error_not_a_hang(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, initial_map_bytes=1 << 20) as store:
        first_id, first = make_block(0, 10)
        store.put(first_id, first)
        with store.get_view(first_id) as view:
            assert view is not None
            with pytest.raises(StoreError, match="view"):
                fill(store, range(1, 40), 64 * KIB)
        fill(store, range(1, 40), 64 * KIB)  # outside the view it grows fine
        assert store.check_consistency() == []


def test_a_resize_waits_for_views_in_other_threads(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, initial_map_bytes=1 << 20) as store:
        first_id, first = make_block(0, 10)
        store.put(first_id, first)
        grown = threading.Event()
        errors: list[BaseException] = []

        def grow() -> None:
            try:
                fill(store, range(1, 40), 64 * KIB)  # must resize the 1 MiB map
            except BaseException as exc:  # reported below
                errors.append(exc)
            grown.set()

        with store.get_view(first_id) as view:
            worker = threading.Thread(target=grow)
            worker.start()
            # wait for the event itself: the resize queued at the gate, behind this view
            deadline = time.monotonic() + 30
            while store._gate._waiting_exclusive == 0 and not grown.is_set():
                assert time.monotonic() < deadline, "the resize never reached the gate"
                time.sleep(0.01)
            assert not grown.is_set()  # it waits for this view to end
            assert view is not None and bytes(view) == first
        worker.join(timeout=60)
        assert grown.is_set() and errors == []
        assert store.count == 40


def test_a_view_held_too_long_fails_the_resize_instead_of_hanging(store_dir: Path) -> None:
    with BlockStore(store_dir, sync=False, initial_map_bytes=1 << 20) as store:
        store._gate.exclusive_timeout = 0.2  # a minute by default
        first_id, first = make_block(0, 10)
        store.put(first_id, first)
        errors: list[BaseException] = []

        def grow() -> None:
            try:
                fill(store, range(1, 40), 64 * KIB)
            except BaseException as exc:  # reported below
                errors.append(exc)

        with store.get_view(first_id):
            worker = threading.Thread(target=grow)
            worker.start()
            worker.join(timeout=60)
        assert len(errors) == 1 and isinstance(errors[0], StoreError)
        assert "view stayed open" in str(errors[0])
        assert store.check_consistency() == []


def test_bad_limit_at_open_leaves_nothing_open(store_dir: Path) -> None:
    with pytest.raises(InvalidArgument):
        BlockStore(store_dir, limit_bytes=-5)
    with BlockStore(store_dir, sync=False) as store:  # not "already open"
        assert store.limit_bytes is None


def test_put_takes_any_bytes_like(store: BlockStore) -> None:
    words = array.array("I", range(1000))
    block_id = hashlib.sha256(words).digest()
    assert store.put(block_id, memoryview(words))
    assert store.size_of(block_id) == 4000
    assert store.get(block_id) == words.tobytes()
    with pytest.raises(InvalidArgument):
        store.put(block_id, "text")  # type: ignore[arg-type]


def test_eviction_drops_the_member_tags_of_what_it_evicts(store: BlockStore) -> None:
    """LRU eviction removed a block but left its member tags (found by
    tests/test_publish_races.py): the members table grew with every block ever
    evicted and check_consistency reported 'member tag of absent block'."""
    tag = bytes(range(32))
    blocks = [make_block(f"tagged {i}", 1000) for i in range(20)]
    store.put_many(blocks, tag=tag)
    assert all(store.is_member(tag, bid) for bid, _ in blocks)
    store.evict_to(0)
    assert store.count == 0
    assert not any(store.is_member(tag, bid) for bid, _ in blocks)
    assert store.check_consistency() == []


def test_has_pin_and_records_from_a_prefix_with_keys_before_it(store: BlockStore) -> None:
    """Mutation survivors (docs/testing.md): has_pin of a pin that exists, and a prefix
    scan that must seek to its prefix, not start at the first key."""
    store.set_pin("p", fill(store, range(2), 10))
    assert store.has_pin("p") and not store.has_pin("q")
    store.put_record(b"aaa", b"0")
    store.put_record(b"head:x", b"1")
    store.put_record(b"zzz", b"2")
    assert store.records(b"head:") == [(b"head:x", b"1")]
    assert [k for k, _ in store.records()] == [b"aaa", b"head:x", b"zzz"]


class _CountingTxn:
    """A write transaction that counts the LMDB calls made through it."""

    def __init__(self, txn) -> None:
        self._txn = txn
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        real = getattr(self._txn, name)
        if name not in ("get", "put", "delete", "stat", "cursor"):
            return real

        def counted(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)

        return counted


def test_a_new_block_costs_few_lmdb_calls_and_the_rules_still_hold(
        store: BlockStore, monkeypatch) -> None:
    """Each LMDB call gives the GIL away and waits to get it back (slow beside a busy
    event loop): a new block takes its value put (which is also the presence check),
    meta, LRU key and member tag, plus its pin count only when the store holds pins;
    the limit and "any pins?" are read once per transaction. It used to be seven
    calls. The rules that the old order of calls kept still hold: a block already
    present is only made recent, a full cache evicts the oldest, a pinned block
    skips the LRU."""
    from cache import writer as writer_mod

    txns: list[_CountingTxn] = []
    real_writer = writer_mod.Writer

    def counting_writer(txn, dbs, held):
        wrapped = _CountingTxn(txn)
        txns.append(wrapped)
        return real_writer(wrapped, dbs, held)

    monkeypatch.setattr("cache.store.Writer", counting_writer)
    tag = hashlib.sha256(b"drive").digest()
    blocks = [make_block(f"few{i}", 20 * KIB) for i in range(20)]
    store.set_limit(10 * 20 * KIB)
    txns.clear()
    assert store.put_many(blocks[:8], tag=tag) == 8
    per_txn = 4  # counters, limit, pins stat, counters written back
    assert len(txns[-1].calls) <= per_txn + 4 * 8, txns[-1].calls
    # present: only made recent (no new value, nothing counted twice)
    assert store.put_many(blocks[:2], tag=tag) == 0
    assert store.count == 8
    # over the limit: the oldest go (blocks 2.. were not touched by the put above)
    assert store.put_many(blocks[8:12], tag=tag) == 4
    assert store.total_bytes <= 10 * 20 * KIB
    assert store.has(blocks[0][0]) and store.has(blocks[1][0])
    assert not store.has(blocks[2][0])
    # with a pin in the store, the pin count is looked up per block: a pinned block
    # is stored outside the LRU even when it arrives through put_many
    store.set_pin("p", [blocks[15][0]])
    txns.clear()
    assert store.put_many(blocks[14:16], tag=tag) == 2
    assert store.is_pinned(blocks[15][0])
    assert blocks[15][0] not in store.eviction_order()
    assert blocks[14][0] in store.eviction_order()
    assert store.check_consistency(deep=True) == []
