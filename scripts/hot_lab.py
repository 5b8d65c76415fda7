"""Lab for the read path below FUSE: the CPU a hot read and a store write cost per byte.

    .venv/bin/python scripts/hot_lab.py make DIR [--size 256M]
    .venv/bin/python scripts/hot_lab.py read DIR [--in-flight 12]
    .venv/bin/python scripts/hot_lab.py store DIR [--batch 64] [--busy]

`make` publishes SIZE of random bytes as ~256 KiB blocks (the drive's own
encryption, a fixed lab key) into a block store at DIR/store and keeps the
refs in DIR/refs. `read` reads every block back through a `BlockReader`
(the mount's read path: the store read in place, decryption in worker
threads batched by `ThreadBatches`), IN_FLIGHT blocks at a time as the
kernel's parallel FUSE reads ask, and checks the bytes (every 16th block by hash). `store` puts the
same ciphertext into a fresh store DIR/fresh in batches of BATCH blocks,
as the mount's store writer does with fetched blocks (`put_many` with the
ids checked and a member tag), and removes it; with `--busy` a thread runs
Python all the while, as a busy event loop does: every LMDB call gives the
GIL away and must wait to get it back from that thread, so the wall time
then counts the calls per block. Each prints its wall time;
time the whole process (`/usr/bin/time -v`, or any tool that alternates
two checkouts) to compare CPU seconds. The script imports the checkout it
lies in, so a copy of an older checkout measures the older code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402
import trio  # noqa: E402

from cache.store import BlockStore  # noqa: E402
from vfs.blocks import BlockReader  # noqa: E402
from vfs.crypto import Ref, encrypt_chunk  # noqa: E402

KEY = hashlib.sha256(b"hot lab read key").digest()
TAG = hashlib.sha256(b"hot lab tag").digest()
CHUNK = 256 * 1024 - 7  # not a power of two, like content-defined chunks


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make(root: Path, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    refs = []
    with BlockStore(root / "store", sync=False) as store:
        batch = []
        for off in range(0, size, CHUNK):
            chunk = os.urandom(min(CHUNK, size - off))
            ref, ct = encrypt_chunk(KEY, chunk)
            refs.append((ref.block_id, ref.chunk_hash, ref.length))
            batch.append((ref.block_id, ct))
            if len(batch) == 64:
                store.put_many(batch, ids_checked=True, tag=TAG)
                batch = []
        if batch:
            store.put_many(batch, ids_checked=True, tag=TAG)
    (root / "refs").write_bytes(msgpack.packb(refs))


def load_refs(root: Path) -> list[Ref]:
    return [Ref(bytes(a), bytes(b), n) for a, b, n in msgpack.unpackb((root / "refs").read_bytes())]


async def read_all(store: BlockStore, refs: list[Ref], in_flight: int) -> int:
    reader = BlockReader(store, KEY, None, plaintext_cache_bytes=0)
    total = 0
    limit = trio.Semaphore(in_flight)

    async def one(i: int, ref: Ref) -> None:
        nonlocal total
        try:
            plain = await reader.read(ref)
        finally:
            limit.release()
        # every 16th block fully: hashing them all would be most of what is measured
        if len(plain) != ref.length or (i % 16 == 0 and
                                        hashlib.sha256(plain).digest() != ref.chunk_hash):
            raise SystemExit(f"wrong bytes for block {ref.block_id.hex()[:16]}")
        total += len(plain)

    async with trio.open_nursery() as outer:
        await outer.start(reader.workers.run)
        async with trio.open_nursery() as nursery:
            for i, ref in enumerate(refs):
                await limit.acquire()  # in order, at most in_flight at once
                nursery.start_soon(one, i, ref)
        outer.cancel_scope.cancel()
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("make", "read", "store"))
    p.add_argument("dir", type=Path)
    p.add_argument("--size", default="256M")
    p.add_argument("--in-flight", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--busy", action="store_true", help="store: a thread runs Python meanwhile")
    args = p.parse_args()
    started = time.perf_counter()
    if args.mode == "make":
        make(args.dir, parse_size(args.size))
        what = "made"
    elif args.mode == "read":
        refs = load_refs(args.dir)
        with BlockStore(args.dir / "store", sync=False) as store:
            total = trio.run(read_all, store, refs, args.in_flight)
        what = f"read {total} bytes"
    else:
        refs = load_refs(args.dir)
        fresh = args.dir / "fresh"
        shutil.rmtree(fresh, ignore_errors=True)
        with BlockStore(args.dir / "store", sync=False) as source:
            blocks = [(r.block_id, source.get(r.block_id)) for r in refs]
        done = threading.Event()

        def spin() -> None:  # pure Python, never blocking: it holds the GIL when it can
            n = 0
            while not done.is_set():
                n += 1

        spinner = threading.Thread(target=spin, daemon=True)
        if args.busy:
            spinner.start()
        started = time.perf_counter()
        try:
            with BlockStore(fresh, sync=False) as store:
                for i in range(0, len(blocks), args.batch):
                    store.put_many(blocks[i:i + args.batch], ids_checked=True, tag=TAG)
        finally:
            done.set()
            if args.busy:
                spinner.join()
        shutil.rmtree(fresh)
        what = f"stored {len(blocks)} blocks"
    print(f"{what} in {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
