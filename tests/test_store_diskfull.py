"""A real full disk under the store: an 8 MiB tmpfs mounted (and unmounted) by the test.

LMDB then fails its commit with ENOSPC/EIO. The store must raise DiskFull
(a StoreFull), keep everything committed before, write nothing half, keep
serving reads, and (for cache blocks) make room by evicting.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.errors import DiskFull, StoreFull
from cache.store import BlockStore
from tests.test_store import make_block

KIB = 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_pinned_writes_fail_cleanly_on_a_full_disk(small_disk: Path) -> None:
    path = small_disk / "store"
    blocks = [make_block(f"pub{i}", 64 * KIB + i) for i in range(200)]  # 12.5 MiB > 8 MiB
    with BlockStore(path) as store:
        store.set_pin("publish", [block_id for block_id, _ in blocks])  # nothing evictable
        stored = []
        with pytest.raises(DiskFull, match="disk .* is full") as info:
            for block_id, data in blocks:
                store.put(block_id, data)
                stored.append(block_id)
        assert isinstance(info.value, StoreFull)
        failed_id = blocks[len(stored)][0]
        assert not store.has(failed_id)  # nothing half-written
        assert 60 < len(stored) < 128
        assert store.missing(stored) == []
        assert store.count == len(stored)
        assert store.check_consistency(deep=True) == []
        # Reads need no disk space.
        assert store.get(stored[0]) == blocks[0][1]
        # Releasing data lets writes go on: the freed pages are reused.
        store.set_pin("publish", stored[len(stored) // 2 :])
        assert store.evict(stored[: len(stored) // 2]) > 0
        store.put_record(b"head:x", b"signed head")
        store.flush()
        store.put(*blocks[len(stored)])
        assert store.check_consistency(deep=True) == []
    with BlockStore(path) as store:  # reopens on the full disk
        assert store.get_record(b"head:x") == b"signed head"
        assert store.check_consistency(deep=True) == []


def test_cache_blocks_make_room_on_a_full_disk(small_disk: Path) -> None:
    path = small_disk / "store"
    with BlockStore(path) as store:  # no limit: only the disk bounds it
        put = failed = 0
        for i in range(300):  # 19 MiB of blocks through an 8 MiB disk
            block_id, data = make_block(f"c{i}", 48 * KIB + (i * 4099) % (32 * KIB))
            try:
                store.put(block_id, data)
            except DiskFull:
                failed += 1
                assert not store.has(block_id)
            else:
                put += 1
                assert store.get(block_id) == data
        # A full disk shrinks the cache instead of failing every new block.
        assert put > 250, f"{failed} of 300 failed"
        assert store.total_bytes < 8 * 1024 * KIB
        assert store.check_consistency(deep=True) == []


def test_pinned_blocks_push_out_cache_blocks_on_a_full_disk(small_disk: Path) -> None:
    path = small_disk / "store"
    with BlockStore(path) as store:
        loose = []
        for i in range(200):
            block_id, data = make_block(f"l{i}", 64 * KIB)
            try:
                store.put(block_id, data)
            except DiskFull:
                break
            loose.append(block_id)
        wanted = [make_block(f"w{i}", 64 * KIB) for i in range(40)]
        store.set_pin("user", [block_id for block_id, _ in wanted])
        for block_id, data in wanted:
            store.put(block_id, data)  # succeeds by evicting unpinned blocks
        assert store.pin_progress("user").complete
        assert store.missing(loose)  # some cache blocks gave way
        assert store.check_consistency(deep=True) == []
