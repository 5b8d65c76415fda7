"""Micro benchmark of the block store: `.venv/bin/python scripts/bench_store.py [--quick]`.

Prints operations per second for the paths that matter:

* get (hit) of 64 KiB and 256 KiB blocks: one read transaction, an xxh3 check
  and a copy; get_view without the copy;
* put with eviction (the cache is full, every put evicts LRU blocks), with
  fsync on every commit (the default) and without, and put_many batches;
* the data file size after pushing ten times the limit through the cache.

It runs in a temporary directory (or --dir) and removes what it made.
Figures depend on the machine; they are for comparing changes, not asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

# this checkout's cache/, whichever peerdrive the venv has installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cache.sizes import format_size  # noqa: E402
from cache.store import BlockStore  # noqa: E402

KIB = 1024
MIB = 1024 * KIB


def _blocks(tag: str, count: int, size: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(count):
        data = hashlib.shake_256(f"{tag}{i}".encode()).digest(size)
        out.append((hashlib.sha256(data).digest(), data))
    return out


def _rate(count: int, run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def bench_get(root: str, size: int, count: int, rounds: int) -> tuple[float, float]:
    """(get/s, get_view/s) on `count` stored blocks of `size`, all hits."""
    blocks = _blocks(f"get{size}", count, size)
    with BlockStore(os.path.join(root, f"get{size}"), sync=False) as store:
        store.put_many(blocks)
        for block_id, _ in blocks:  # warm: map the pages once, outside the timing
            store.get(block_id)
        ids = [block_id for block_id, _ in blocks] * rounds

        def gets() -> None:
            for block_id in ids:
                store.get(block_id)

        def views() -> None:
            for block_id in ids:
                with store.get_view(block_id) as view:
                    assert view is not None

        return _rate(len(ids), gets), _rate(len(ids), views)


def bench_put_evicting(root: str, name: str, sync: bool, count: int, size: int) -> float:
    """put/s into a full cache (each put evicts), fsync per commit or not."""
    limit = 32 * MIB
    with BlockStore(os.path.join(root, name), sync=sync, limit_bytes=limit) as store:
        store.put_many(_blocks(f"{name}fill", limit // size, size))
        blocks = _blocks(name, count, size)

        def puts() -> None:
            for block_id, data in blocks:
                store.put(block_id, data)

        return _rate(len(blocks), puts)


def bench_put_many(root: str, count: int, size: int, batch: int) -> float:
    """blocks/s stored with put_many in batches (fsync per batch), as publish does."""
    blocks = _blocks("many", count, size)
    with BlockStore(os.path.join(root, "many"), limit_bytes=32 * MIB) as store:

        def puts() -> None:
            for i in range(0, len(blocks), batch):
                store.put_many(blocks[i : i + batch])

        return _rate(len(blocks), puts)


def file_size_after_churn(root: str, limit: int, passes: int) -> tuple[int, int]:
    """(data file bytes, stored bytes) after `passes` x limit of mixed-size blocks went in."""
    with BlockStore(os.path.join(root, "churn"), sync=False, limit_bytes=limit) as store:
        pushed, i = 0, 0
        while pushed < passes * limit:
            size = 16 * KIB + (i * 40503) % (240 * KIB)  # 16..256 KiB, like CDC chunks
            data = hashlib.shake_256(f"churn{i}".encode()).digest(size)
            store.put(hashlib.sha256(data).digest(), data)
            pushed += size
            i += 1
        stats = store.stats()
        return stats["file_bytes"], stats["total_bytes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_store.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    parser.add_argument("--dir", help="where to make the stores (default: a temporary dir)")
    args = parser.parse_args(argv)
    scale = 1 if args.quick else 10
    root = tempfile.mkdtemp(prefix="peerdrive-bench-", dir=args.dir)
    out = sys.stdout
    try:
        for size in (64 * KIB, 256 * KIB):
            get_rate, view_rate = bench_get(root, size, 200, 5 * scale)
            out.write(
                f"get hit {format_size(size):>9}: {get_rate:10.0f} ops/s "
                f"({get_rate * size / MIB:7.0f} MiB/s); get_view {view_rate:10.0f} ops/s\n"
            )
        for sync in (True, False):
            rate = bench_put_evicting(root, f"put{sync}", sync, 100 * scale, 64 * KIB)
            label = "fsync per put" if sync else "no fsync"
            out.write(f"put 64 KiB, evicting, {label:>13}: {rate:8.0f} ops/s\n")
        rate = bench_put_many(root, 100 * scale, 64 * KIB, 64)
        out.write(f"put_many 64 KiB x 64 per commit:      {rate:8.0f} blocks/s\n")
        limit = (16 if args.quick else 64) * MIB
        file_bytes, total = file_size_after_churn(root, limit, 10)
        out.write(
            f"data file after 10 x {format_size(limit)} of 16-256 KiB blocks: "
            f"{format_size(file_bytes)} for {format_size(total)} stored "
            f"({file_bytes / limit:.2f} x the limit)\n"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
