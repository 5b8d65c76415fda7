"""A mounted drive: the tree of its current version, the read path, its status.

The FUSE layer (`vfs.fs`) calls this with entries and byte ranges; this
module turns them into block reads through the `Tree` and the `BlockReader`,
and answers the status questions (`user.peerdrive.*`). It raises the drive
layer's own errors; only `vfs.fs` turns them into errno.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from dht.types import Priority

from .blocks import BlockReader, Fetch
from .capability import ReadCap
from .errors import FormatError, PeerdriveError, UsageError
from .formats import Entry
from .head import Head
from .storage import DriveStorage
from .tree import ChunkMap, Tree

if TYPE_CHECKING:
    from .pins import Pins

READAHEAD_CHUNKS = 8


@dataclass
class OpenFile:
    """An open file: the entry of the version it was opened in, and its chunk map."""

    entry: Entry
    map: ChunkMap
    next_offset: int = 0
    sequential: int = 0
    readahead_until: int = 0
    pending: set[int] = field(default_factory=set)


class Drive:
    def __init__(self, cap: ReadCap, storage: DriveStorage, head: Head,
                 fetch: Fetch | None = None) -> None:
        if head.root is None:
            raise FormatError("a mount needs a head opened with the read key")
        self.cap = cap
        self.storage = storage
        self.head = head
        self.version = 1
        self.blocks = BlockReader(storage.store, cap.read_key, fetch)
        self.tree = Tree(self.blocks)
        self._nursery: trio.Nursery | None = None
        self.pins: Pins | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work of the mount (readahead) until cancelled."""
        from .pins import Pins

        self.pins = Pins(self)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.pins.run)
            task_status.started()
            while True:
                # recency of reads is batched in memory by the store: persist it now and then
                await trio.sleep(5)
                await trio.to_thread.run_sync(self.storage.store.flush)

    # -- versions ------------------------------------------------------------------

    def root_entry(self) -> Entry:
        assert self.head.root is not None
        return self.head.root

    def set_head(self, head: Head) -> None:
        """Switch to a newer verified version; open files keep theirs."""
        if head.root is None:
            raise FormatError("a mount needs a head opened with the read key")
        self.head = head
        self.version += 1
        if self.pins is not None:
            self.pins.refresh()

    # -- tree ----------------------------------------------------------------------

    async def lookup(self, dir_entry: Entry, name: bytes) -> Entry | None:
        assert dir_entry.node is not None
        return await self.tree.lookup(dir_entry.node, name)

    async def entries(self, dir_entry: Entry, start: int) -> AsyncIterator[tuple[int, Entry]]:
        assert dir_entry.node is not None
        async for item in self.tree.entries(dir_entry.node, start):
            yield item

    # -- reading -------------------------------------------------------------------

    async def open(self, entry: Entry) -> OpenFile:
        return OpenFile(entry, await self.tree.chunk_map(entry))

    def close(self, of: OpenFile) -> None:
        of.pending.clear()

    async def read(self, of: OpenFile, off: int, size: int) -> bytes:
        span = of.map.span(off, size)
        if not span:
            return b""
        chunks = of.map.chunks
        if off == of.next_offset:
            of.sequential += 1
        else:
            of.sequential = 0
        of.next_offset = off + size
        if of.sequential >= 2:
            self._readahead(of, span[-1] + 1)
        if len(span) == 1:
            i = span[0]
            plain = await self.blocks.read(chunks[i], Priority.READ)
            start = off - of.map.starts[i]
            return plain[start:start + size]
        parts: list[bytes] = [b""] * len(span)

        async def get(k: int, i: int) -> None:
            parts[k] = await self.blocks.read(chunks[i], Priority.READ)

        async with trio.open_nursery() as nursery:
            for k, i in enumerate(span):
                nursery.start_soon(get, k, i)
        data = b"".join(parts)
        start = off - of.map.starts[span[0]]
        return data[start:start + size]

    def _readahead(self, of: OpenFile, first: int) -> None:
        """Load the next chunks of a sequential reader in the background.

        Local chunks are read and decrypted ahead into the plaintext cache;
        missing ones are fetched at READAHEAD priority, so the kernel's next
        requests find their bytes ready.
        """
        if self._nursery is None:
            return
        last = min(len(of.map.chunks), first + READAHEAD_CHUNKS)
        for i in range(max(first, of.readahead_until), last):
            if i in of.pending:
                continue
            if self.blocks.cached_plain(of.map.chunks[i].block_id) is not None:
                continue
            of.pending.add(i)
            self._nursery.start_soon(self._prefetch, of, i)
        of.readahead_until = max(of.readahead_until, last)

    async def _prefetch(self, of: OpenFile, i: int) -> None:
        try:
            await self.blocks.read(of.map.chunks[i], Priority.READAHEAD)
        except PeerdriveError:
            pass  # readahead is a hint: the real read reports the error
        finally:
            of.pending.discard(i)

    # -- status --------------------------------------------------------------------

    def cache_usage(self) -> tuple[int, int | None]:
        st = self.storage.store
        return st.total_bytes, st.limit_bytes

    def xattr_names(self) -> list[str]:
        return ["state", "cached", "size", "pinned"]

    async def file_chunks(self, entry: Entry) -> tuple:
        return (await self.tree.chunk_map(entry, Priority.PREFETCH)).chunks

    async def usage(self, entry: Entry) -> tuple[int, int]:
        """(bytes on this device, total bytes) of a file or a whole folder."""
        store = self.storage.store
        if entry.is_file:
            chunks = await self.file_chunks(entry)
            present = set(store.missing([r.block_id for r in chunks]))
            have = sum(r.length for r in chunks if r.block_id not in present)
            return have, entry.size
        if entry.is_dir:
            have = total = 0
            async for _, child in self.entries(entry, 0):
                h, t = await self.usage(child)
                have += h
                total += t
            return have, total
        return 0, 0

    async def get_xattr(self, path: list[bytes], entry: Entry, name: str) -> bytes | None:
        if name not in self.xattr_names():
            return None
        if name == "pinned":
            return b"1" if self.pins is not None and self.pins.is_pinned(path) else b"0"
        have, total = await self.usage(entry)
        if name == "cached":
            return str(have).encode()
        if name == "size":
            return str(total).encode()
        return state_of(have, total).encode()

    async def set_xattr(self, path: list[bytes], entry: Entry, name: str, value: bytes) -> bool:
        """`pinned` = 1/0 pins or unpins; `evict` = 1 frees the path's unpinned blocks now."""
        flag = value.strip()
        if flag not in (b"0", b"1"):
            raise UsageError(f"user.peerdrive.{name} takes 0 or 1")
        if name == "pinned" and self.pins is not None:
            if flag == b"1":
                self.pins.pin(path)
            else:
                self.pins.unpin(path)
            return True
        if name == "evict" and flag == b"1" and self.pins is not None:
            refs = await self.pins.blocks_under(entry)
            ids = [r.block_id for r in refs]
            self.storage.store.evict(ids)
            for i in ids:
                self.blocks.forget(i)
            return True
        return False


def state_of(have: int, total: int) -> str:
    """The Kindle-model state: nothing local, some, or everything."""
    if total == 0 or have >= total:
        return "device"
    return "cloud" if have == 0 else "partial"
