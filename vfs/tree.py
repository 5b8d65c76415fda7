"""The tree of one drive version, loaded lazily from directory nodes.

Nothing is read until asked for: listing a directory loads its node (and, for
a split directory, only the leaves a lookup or a listing walks through);
opening a file resolves its chunk list (loading chunk-list blocks only for a
large file). Decoded nodes are kept in a bounded LRU since a version's
content never changes.
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
    Entry,
    decode_chunk_list,
    decode_dir_node,
)

_NODE_CACHE = 4096


class Tree:
    """Read access to a drive's directories and files through a BlockReader."""

    def __init__(self, blocks: BlockReader) -> None:
        self.blocks = blocks
        self._nodes: OrderedDict[bytes, DirLeaf | DirInterior] = OrderedDict()

    async def node(self, ref: Ref, priority: Priority = Priority.READ) -> DirLeaf | DirInterior:
        hit = self._nodes.get(ref.block_id)
        if hit is not None:
            self._nodes.move_to_end(ref.block_id)
            return hit
        node = decode_dir_node(await self.blocks.read(ref, priority))
        self._nodes[ref.block_id] = node
        if len(self._nodes) > _NODE_CACHE:
            self._nodes.popitem(last=False)
        return node

    async def lookup(self, dir_ref: Ref, name: bytes) -> Entry | None:
        ref = dir_ref
        for _ in range(MAX_DIR_DEPTH_OF_NODES + 1):
            node = await self.node(ref)
            if isinstance(node, DirLeaf):
                names = [e.name for e in node.entries]
                i = bisect.bisect_left(names, name)
                if i < len(names) and names[i] == name:
                    return node.entries[i]
                return None
            firsts = [p.first_name for p in node.parts]
            i = bisect.bisect_right(firsts, name) - 1
            if i < 0:
                return None
            ref = node.parts[i].ref
        raise FormatError("directory node tree is deeper than allowed")

    async def entries(self, dir_ref: Ref, start: int = 0,
                      priority: Priority = Priority.READ) -> AsyncIterator[tuple[int, Entry]]:
        """Yield (index, entry) in name order from index `start`, skipping whole parts."""
        async for item in self._entries(dir_ref, start, 0, priority):
            yield item

    async def _entries(self, ref: Ref, start: int, depth: int,
                       priority: Priority) -> AsyncIterator[tuple[int, Entry]]:
        if depth > MAX_DIR_DEPTH_OF_NODES:
            raise FormatError("directory node tree is deeper than allowed")
        node = await self.node(ref, priority)
        if isinstance(node, DirLeaf):
            for i in range(start, len(node.entries)):
                yield i, node.entries[i]
            return
        base = 0
        for part in node.parts:
            if start < base + part.nentries:
                async for i, e in self._entries(part.ref, max(0, start - base), depth + 1,
                                                priority):
                    yield base + i, e
            base += part.nentries

    async def node_refs(self, dir_ref: Ref, priority: Priority = Priority.READ) -> list[Ref]:
        """Every node block of one directory (for pinning its metadata)."""
        out = [dir_ref]
        node = await self.node(dir_ref, priority)
        if isinstance(node, DirInterior):
            for part in node.parts:
                out.extend(await self.node_refs(part.ref, priority))
        return out

    async def chunk_map(self, entry: Entry, priority: Priority = Priority.READ) -> ChunkMap:
        if entry.chunks is not None:
            return ChunkMap(entry.chunks)
        refs: list[Ref] = []
        for cl in entry.chunk_lists or ():
            data = await self.blocks.read(cl.ref, priority)
            refs.extend(decode_chunk_list(data, cl))
        return ChunkMap(tuple(refs))


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
