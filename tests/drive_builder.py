"""Build drive versions straight into a store, honest or hostile, signed with the real key.

`peerdrive publish` reads a folder from disk; a test that needs 100,000 files
or a drive no publisher would ever make (a directory whose entries all share
one child, chunk-list refs that all name one block, parts that lie about
their names or counts) builds its records here instead: the same encoders
(`vfs.formats`), the same encryption (`vfs.crypto`), a head signed by the
drive key (`vfs.head`), saved the way a publish saves it. A mount of the
result cannot tell it from a published drive.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cache.store import BlockStore
from vfs.blocklist import build_block_list
from vfs.capability import WriteCap
from vfs.crypto import Ref, encrypt_chunk
from vfs.formats import (
    KIND_DIR,
    KIND_FILE,
    ChunkListRef,
    DirPart,
    Entry,
    build_directory,
    dir_totals,
    encode_chunk_list,
    encode_dir_interior,
)
from vfs.head import Head, make_head
from vfs.home import Home
from vfs.storage import DriveStorage

MTIME = 1_700_000_000_000_000_000


class DriveBuilder:
    """Encrypted blocks of one drive, gathered in memory and stored in one commit."""

    def __init__(self, cap: WriteCap, *, aggregates: bool = True) -> None:
        self.cap = cap
        self.blocks: dict[bytes, bytes] = {}
        # folder entries carry their totals as a publish writes them; False: as a
        # version written before the folder aggregates (docs/formats.md)
        self.aggregates = aggregates

    def emit(self, payload: bytes) -> Ref:
        ref, ct = encrypt_chunk(self.cap.read_key, payload)
        self.blocks[ref.block_id] = ct
        return ref

    def file(self, name: bytes, data: bytes) -> Entry:
        chunks = (self.emit(data),) if data else ()
        return Entry(name, KIND_FILE, 0o644, MTIME, size=len(data), chunks=chunks)

    def listed_file(self, name: bytes, lists: Iterable[ChunkListRef], size: int) -> Entry:
        return Entry(name, KIND_FILE, 0o644, MTIME, size=size, chunk_lists=tuple(lists))

    def chunk_list(self, chunks: list[Ref]) -> ChunkListRef:
        ref = self.emit(encode_chunk_list(chunks))
        return ChunkListRef(ref, len(chunks), sum(r.length for r in chunks))

    def dir(self, name: bytes, entries: list[Entry]) -> Entry:
        ref = build_directory(entries, self.emit)
        return self.dir_at(name, ref, entries)

    def dir_at(self, name: bytes, node: Ref, entries: list[Entry]) -> Entry:
        files, size = dir_totals(entries) if self.aggregates else (None, None)
        return Entry(name, KIND_DIR, 0o755, MTIME, node=node,
                     nsubdirs=sum(1 for e in entries if e.is_dir), nentries=len(entries),
                     total_files=files, total_bytes=size)

    def interior(self, parts: list[DirPart]) -> Ref:
        return self.emit(encode_dir_interior(parts))

    def commit(self, store: BlockStore, root: Entry) -> Head:
        """Store every block and the version's block list, then save the next head the way
        a publish does (`DriveStorage.commit_publish`)."""
        storage = DriveStorage(store)
        pending = f"publish-pending:{self.cap.pubkey.hex()}"
        listed: list[tuple[bytes, bytes]] = []
        block_list = build_block_list({i: len(ct) for i, ct in self.blocks.items()},
                                      lambda block_id, data: listed.append((block_id, data)))
        store.put_pinned(pending, [*self.blocks.items(), *listed], ids_checked=True)
        return storage.commit_publish(
            self.cap, lambda seq, _last: make_head(self.cap, seq, root, block_list),
            [*self.blocks, *(i for i, _ in listed)], pending)


def root_entry(builder: DriveBuilder, entries: list[Entry]) -> Entry:
    return builder.dir(b"root", entries)


def small_tree(builder: DriveBuilder, files: int, per_folder: int = 100,
               size: int = 64, seed: int = 0) -> Entry:
    """`files` files of `size` random bytes in folders of `per_folder`: the root entry."""
    folders = []
    rnd = os.urandom if seed == 0 else None
    for d in range(-(-files // per_folder)):
        n = min(per_folder, files - d * per_folder)
        entries = [builder.file(f"f{i:03d}".encode(),
                                rnd(size) if rnd else bytes([seed, d % 256, i % 256]) * size)
                   for i in range(n)]
        folders.append(builder.dir(f"d{d:05d}".encode(), entries))
    return root_entry(builder, folders)


def new_home_drive(home: Path) -> WriteCap:
    """A drive of this home (its write capability saved as a publish would)."""
    home.mkdir(parents=True, exist_ok=True)
    source = home / "source"
    source.mkdir(exist_ok=True)
    return Home(home).create_drive(source)

