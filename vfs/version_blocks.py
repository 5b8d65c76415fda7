"""Every block of a version and its ciphertext size, for the block list its head names.

`publish DIR` knows every block because it cuts every file; a writable mount
or a watched folder changes a few names of a big tree, so it walks the tree
instead, and remembers each folder's summary by its directory node's block
id: a folder that did not change since the last version has the same node,
and costs a dictionary lookup. Only folders reached by the latest walk are
remembered, so memory follows the drive, not its history.
"""

from __future__ import annotations

from .crypto import TAG_LEN
from .formats import Entry
from .tree import Tree


class VersionBlocks:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        # node block id -> (own blocks: id -> ciphertext size, subfolder entries)
        self._dirs: dict[bytes, tuple[dict[bytes, int], list[Entry]]] = {}

    async def sizes(self, root: Entry) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        seen: dict[bytes, tuple[dict[bytes, int], list[Entry]]] = {}
        stack = [root]
        while stack:
            entry = stack.pop()
            assert entry.node is not None
            key = entry.node.block_id
            if key in seen:
                continue
            summary = self._dirs.get(key)
            if summary is None:
                summary = await self._summarise(entry)
            seen[key] = summary
            out.update(summary[0])
            stack.extend(summary[1])
        self._dirs = seen
        return out

    async def _summarise(self, entry: Entry) -> tuple[dict[bytes, int], list[Entry]]:
        assert entry.node is not None
        refs, entries = await self.tree.read_directory(entry.node)
        own = {r.block_id: r.length + TAG_LEN for r in refs}
        subdirs = []
        for e in entries:
            if e.is_dir:
                subdirs.append(e)
            elif e.is_file:
                for cl in e.chunk_lists or ():
                    own[cl.ref.block_id] = cl.ref.length + TAG_LEN
                for r in (await self.tree.chunk_map(e)).chunks:
                    own[r.block_id] = r.length + TAG_LEN
        return own, subdirs
