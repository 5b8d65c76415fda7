"""What a mounted drive answers about its paths: status, copies, pin and evict requests.

The FUSE layer hands every `user.peerdrive.*` request here (names and
encodings: `vfs.xattrs`). Folder figures come from the per-directory
summaries (`vfs.figures`), never from a walk of the entries below, so a
folder of a million files answers as fast as one of ten; a pin's progress
comes from the pin's own counters (`vfs.pins`). The drive itself
(`vfs.drive`) keeps only the version and the read path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from dht.types import Priority

from . import xattrs
from .formats import Entry

if TYPE_CHECKING:
    from .drive import Drive

COPIES_TIMEOUT = 5.0  # seconds the peers get to say which blocks they hold
# Blocks looked up in the store on the event loop at most; more go to a worker thread.
LOOP_LOOKUPS = 2048


class Answers:
    """The `user.peerdrive.*` answers of one mounted drive."""

    def __init__(self, drive: Drive) -> None:
        self.drive = drive

    @property
    def store(self):
        return self.drive.storage.store

    async def _missing(self, ids: list[bytes]) -> set[bytes]:
        """The ids not on this device (fetched blocks waiting for the store writer count
        as on it, as in the folder figures)."""
        if len(ids) > LOOP_LOOKUPS:
            missing = await trio.to_thread.run_sync(self.store.missing, ids)
        else:
            missing = self.store.missing(ids)
        unstored = self.drive.blocks.is_unstored
        return {i for i in missing if not unstored(i)}

    # -- figures ---------------------------------------------------------------------

    async def usage(self, entry: Entry) -> tuple[int, int]:
        """(bytes on this device, total bytes) of a file or a whole folder."""
        if entry.is_file:
            chunks = (await self.drive.tree.chunk_map(entry, Priority.PREFETCH)).chunks
            gone = await self._missing([r.block_id for r in chunks])
            have = sum(r.length for r in chunks if r.block_id not in gone)
            return have, entry.size
        if entry.is_dir and entry.node is not None:
            root = self.drive.root_entry().node
            t = await self.drive.figures.totals(entry.node, root=entry.node == root)
            return t.have, t.size
        return 0, 0

    async def file_block_sets(self, entry: Entry) -> list[list[bytes]]:
        """For every file at or below `entry`: the ids of its chunk-list and chunk blocks."""
        if entry.is_file:
            ids = [cl.ref.block_id for cl in entry.chunk_lists or ()]
            ids.extend(r.block_id for r in
                       (await self.drive.tree.chunk_map(entry, Priority.PREFETCH)).chunks)
            return [ids]
        out: list[list[bytes]] = []
        if entry.is_dir and entry.node is not None:
            async for d in self.drive.figures.subtree(entry.node, Priority.PREFETCH):
                ids = d.block_ids()
                start = 0
                for end in d.file_ends:
                    out.append(ids[start:end])
                    start = end
        return out

    async def copies(self, entry: Entry) -> int:
        """How many copies of `entry` are known: devices that hold it whole.

        For a file: the reachable peers serving this drive that hold every
        block of it (chunk lists and chunks), asked now with Have (one
        question for all the blocks of a folder, not one per file), plus one
        if this device holds it whole. For a folder: the least of that over
        every file below it (0 for a folder with no files). A peer that does
        not answer within COPIES_TIMEOUT does not count.
        """
        files = await self.file_block_sets(entry)
        if not files:
            return 0
        union = list(dict.fromkeys(i for ids in files for i in ids))
        answers: dict[bytes, list[bool]] = {}
        if self.drive.holders is not None:
            answers = await self.drive.holders(union, COPIES_TIMEOUT)
        where = {block_id: k for k, block_id in enumerate(union)}
        gone = await self._missing(union)
        least: int | None = None
        for k, ids in enumerate(files):
            count = sum(1 for flags in answers.values() if all(flags[where[i]] for i in ids))
            if not gone.intersection(ids):
                count += 1
            least = count if least is None else min(least, count)
            if k % 1024 == 1023:
                await trio.lowlevel.checkpoint()
        return least or 0

    # -- the attributes --------------------------------------------------------------

    async def versions(self) -> bytes:
        """The drive's versions from the mounted one back (`peerdrive log MNT`)."""
        from .history import version_log
        from .versions import VERSIONS_XATTR, XATTR_PATHS, block_getter, encode_xattr

        drive = self.drive
        infos = await version_log(drive.head, drive.cap, drive.tree, block_getter(drive.blocks),
                                  versions=VERSIONS_XATTR, paths=XATTR_PATHS)
        return encode_xattr(infos)

    def names(self) -> tuple[str, ...]:
        return xattrs.LISTED

    async def get(self, path: list[bytes], entry: Entry, name: str) -> bytes | None:
        """The value of `user.peerdrive.<name>` on `path`, or None if there is no such name."""
        pins = self.drive.pins
        if name == xattrs.PINNED:
            return xattrs.encode_flag(pins is not None and pins.is_pinned(path))
        if name == xattrs.PROGRESS:
            progress = pins.progress_of(path) if pins is not None else None
            return progress.encode() if progress is not None else None
        if name == xattrs.COPIES:
            return xattrs.encode_int(await self.copies(entry))
        if name == xattrs.VERSIONS:
            return await self.versions() if not path else None
        if name not in (xattrs.STATE, xattrs.CACHED, xattrs.SIZE):
            return None
        have, total = await self.usage(entry)
        if name == xattrs.CACHED:
            return xattrs.encode_int(have)
        if name == xattrs.SIZE:
            return xattrs.encode_int(total)
        return xattrs.state_of(have, total).encode()

    async def set(self, path: list[bytes], entry: Entry, name: str, value: bytes,
                  folder: bytes | None = None) -> bool:
        """`pinned` = 1/0 pins or unpins; `evict` = 1 frees the path's unpinned blocks now.

        `folder` is the node id of the directory holding `path` (its figures change).
        """
        if name not in xattrs.SETTABLE:
            return False
        on = xattrs.decode_flag(value, name)
        pins = self.drive.pins
        if name == xattrs.PINNED and pins is not None:
            if on:
                pins.pin(path)
            else:
                pins.unpin(path)
            return True
        if name == xattrs.EVICT and on:
            await self.evict(entry, folder)
            return True
        return False

    async def evict(self, entry: Entry, folder: bytes | None = None) -> None:
        """Remove the unpinned blocks of `entry` (and of everything below it) from this device."""
        drive = self.drive
        dirs: list[bytes] = []
        ids: list[bytes] = []
        if entry.is_file:
            ids = [cl.ref.block_id for cl in entry.chunk_lists or ()]
            ids.extend(r.block_id for r in
                       (await drive.tree.chunk_map(entry, Priority.PREFETCH)).chunks)
        elif entry.is_dir and entry.node is not None:
            async for d in drive.figures.subtree(entry.node, Priority.PREFETCH):
                dirs.append(d.node_id)
                ids.extend(r.block_id for r in d.nodes)
                ids.extend(d.block_ids())
        else:
            return
        ids = list(dict.fromkeys(ids))
        await drive.blocks.evict(ids)
        if entry.is_file:
            dirs = [folder] if folder is not None else []
        # a file whose folder is not known here: any folder may have changed
        drive.figures.removed(ids, dirs if dirs or entry.is_dir else None)
        drive.figures.noted()

