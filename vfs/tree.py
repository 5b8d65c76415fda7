"""The tree of one drive version, loaded lazily from directory nodes.

Nothing is read until asked for: listing a directory loads its node (and, for
a split directory, only the leaves a lookup or a listing walks through);
opening a file resolves its chunk list (loading chunk-list blocks only for a
large file). Decoded nodes are kept in an LRU bounded by their encoded bytes
(not by count: one leaf may hold thousands of entries), since a version's
content never changes.

Nothing here trusts the drive: a split directory's leaves must hold exactly
the entries their parent says, in the name range their part covers (else a
listing could repeat or skip names, or its offsets run past their bits);
every walk is iterative and visits each block once, so nodes that all
point at one child, or chunk lists that all name one block, cost one
decode each, not one per reference.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import AsyncIterator

from dht.types import Priority

from .blocks import BlockReader
from .crypto import Ref
from .errors import FormatError
from .formats import (
    MAX_DIR_DEPTH_OF_NODES,
    DirInterior,
    DirLeaf,
    DirPart,
    Entry,
    decode_chunk_list,
    decode_dir_node,
)

# Decoded directory nodes kept, at most, by encoded plaintext bytes: decoded they weigh
# about 4.5x that (tracemalloc: 470 bytes an entry of a small file), so 2 MiB is ~9 MB of
# objects, ~200 folders of 100 files: what a walk, a listing and its lookups use at
# once; 8 MiB held ~37 MB for nothing a walk comes back to.
NODE_CACHE_BYTES = 2 * 1024 * 1024
NODE_CACHE_COUNT = 4096
# Distinct node blocks of one directory's node tree, at most.
MAX_NODES_PER_DIR = 65536
# Chunks one file may have (each at least 1 byte): 4 Mi chunks is 1 TiB at the average
# chunk size; a hostile entry cannot make an open build a list past it.
MAX_CHUNKS_PER_FILE = 4 * 1024 * 1024


class Tree:
    """Read access to a drive's directories and files through a BlockReader."""

    def __init__(self, blocks: BlockReader) -> None:
        self.blocks = blocks
        self._nodes: OrderedDict[bytes, tuple[DirLeaf | DirInterior, int]] = OrderedDict()
        self._node_bytes = 0
        self.decodes = 0  # directory nodes decoded (LRU misses): what a warm walk costs

    async def node(self, ref: Ref, priority: Priority = Priority.READ) -> DirLeaf | DirInterior:
        hit = self._nodes.get(ref.block_id)
        if hit is not None:
            self._nodes.move_to_end(ref.block_id)
            return hit[0]
        plain = await self.blocks.read(ref, priority)
        node = decode_dir_node(plain)
        self.decodes += 1
        if ref.block_id not in self._nodes:
            self._nodes[ref.block_id] = (node, len(plain))
            self._node_bytes += len(plain)
            while (self._node_bytes > NODE_CACHE_BYTES
                   or len(self._nodes) > NODE_CACHE_COUNT) and len(self._nodes) > 1:
                _, (_, n) = self._nodes.popitem(last=False)
                self._node_bytes -= n
        return node

    async def _part(self, part: DirPart, upper: bytes | None,
                    priority: Priority) -> DirLeaf | DirInterior:
        """The node of one part of a split directory, checked against what its parent says.

        Its names must lie in [part.first_name, upper) and it must hold exactly
        part.nentries entries: else listings by index and lookups by name
        would disagree (names listed twice, skipped, or offsets past their bits).
        """
        node = await self.node(part.ref, priority)
        if isinstance(node, DirLeaf):
            count = len(node.entries)
            first = node.entries[0].name if node.entries else None
            last = node.entries[-1].name if node.entries else None
        else:
            count = node.nentries
            first = node.parts[0].first_name
            last = node.parts[-1].first_name
        if count != part.nentries:
            raise FormatError(f"a directory part says {part.nentries} entries, its node holds "
                              f"{count}")
        if first is not None and (first != part.first_name
                                  or (upper is not None and last is not None and last >= upper)):
            raise FormatError("a directory part holds names outside its range")
        return node

    async def lookup(self, dir_ref: Ref, name: bytes) -> Entry | None:
        node = await self.node(dir_ref)
        for _ in range(MAX_DIR_DEPTH_OF_NODES + 1):
            if isinstance(node, DirLeaf):
                entries = node.entries
                i = bisect.bisect_left(entries, name, key=_name)
                if i < len(entries) and entries[i].name == name:
                    return entries[i]
                return None
            i = bisect.bisect_right(node.parts, name, key=_first_name) - 1
            if i < 0:
                return None
            upper = node.parts[i + 1].first_name if i + 1 < len(node.parts) else None
            node = await self._part(node.parts[i], upper, Priority.READ)
        raise FormatError("directory node tree is deeper than allowed")

    async def entries(self, dir_ref: Ref, start: int = 0,
                      priority: Priority = Priority.READ) -> AsyncIterator[tuple[int, Entry]]:
        """Yield (index, entry) in name order from index `start`, skipping whole parts."""
        node = await self.node(dir_ref, priority)
        async for item in self._walk_entries(node, start, 0, priority):
            yield item

    async def _walk_entries(self, node: DirLeaf | DirInterior, start: int, depth: int,
                            priority: Priority) -> AsyncIterator[tuple[int, Entry]]:
        if depth > MAX_DIR_DEPTH_OF_NODES:
            raise FormatError("directory node tree is deeper than allowed")
        if isinstance(node, DirLeaf):
            for i in range(start, len(node.entries)):
                yield i, node.entries[i]
            return
        base = 0
        parts = node.parts
        for k, part in enumerate(parts):
            if start < base + part.nentries:
                upper = parts[k + 1].first_name if k + 1 < len(parts) else None
                child = await self._part(part, upper, priority)
                async for i, e in self._walk_entries(child, max(0, start - base), depth + 1,
                                                     priority):
                    yield base + i, e
            base += part.nentries

    async def read_directory(self, dir_ref: Ref, priority: Priority = Priority.READ
                             ) -> tuple[list[Ref], list[Entry]]:
        """All of one directory at once: its node blocks and its entries in name order.

        Iterative (a stack of parts, each checked as in a listing), each node
        read once, at most MAX_NODES_PER_DIR nodes.
        """
        refs = [dir_ref]
        entries: list[Entry] = []
        stack: list[tuple[DirLeaf | DirInterior, int]] = [(await self.node(dir_ref, priority), 0)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_DIR_DEPTH_OF_NODES:
                raise FormatError("directory node tree is deeper than allowed")
            if isinstance(node, DirLeaf):
                entries.extend(node.entries)
                continue
            parts = node.parts
            children = []
            for k, part in enumerate(parts):
                upper = parts[k + 1].first_name if k + 1 < len(parts) else None
                children.append((await self._part(part, upper, priority), depth + 1))
                refs.append(part.ref)
                if len(refs) > MAX_NODES_PER_DIR:
                    raise FormatError(f"a directory has more than {MAX_NODES_PER_DIR} nodes")
            stack.extend(reversed(children))
        return refs, entries

    async def node_refs(self, dir_ref: Ref, priority: Priority = Priority.READ) -> list[Ref]:
        """Every node block of one directory, each once (for pinning its metadata)."""
        out = [dir_ref]
        seen = {dir_ref.block_id}
        stack = [dir_ref]
        while stack:
            node = await self.node(stack.pop(), priority)
            if isinstance(node, DirInterior):
                for part in node.parts:
                    if part.ref.block_id not in seen:
                        seen.add(part.ref.block_id)
                        out.append(part.ref)
                        stack.append(part.ref)
            if len(seen) > MAX_NODES_PER_DIR:
                raise FormatError(f"a directory has more than {MAX_NODES_PER_DIR} nodes")
        return out

    async def chunk_map(self, entry: Entry, priority: Priority = Priority.READ) -> ChunkMap:
        """A file's chunks in order; each chunk-list block is read and decoded once."""
        if entry.chunks is not None:
            return ChunkMap(entry.chunks)
        lists = entry.chunk_lists or ()
        if sum(cl.nchunks for cl in lists) > MAX_CHUNKS_PER_FILE:
            raise FormatError(f"file {entry.name!r} has more than {MAX_CHUNKS_PER_FILE:,} "
                              "chunks")
        decoded: dict[tuple[bytes, int, int], tuple[Ref, ...]] = {}
        refs: list[Ref] = []
        for cl in lists:
            key = (cl.ref.block_id, cl.nchunks, cl.nbytes)
            part = decoded.get(key)
            if part is None:
                data = await self.blocks.read(cl.ref, priority)
                part = decoded[key] = decode_chunk_list(data, cl)
            refs.extend(part)
        return ChunkMap(tuple(refs))


def _name(e: Entry) -> bytes:
    return e.name


def _first_name(p: DirPart) -> bytes:
    return p.first_name


class ChunkMap:
    """A file's chunks with their offsets: maps a byte range to the chunks covering it."""

    def __init__(self, chunks: tuple[Ref, ...]) -> None:
        self.chunks = chunks
        self.starts: list[int] = []
        pos = 0
        for r in chunks:
            self.starts.append(pos)
            pos += r.length
        self.size = pos

    def span(self, offset: int, size: int) -> range:
        """Indexes of the chunks that hold bytes [offset, offset+size)."""
        if size <= 0 or offset >= self.size:
            return range(0)
        end = min(self.size, offset + size)
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, end) - 1
        return range(first, last + 1)
