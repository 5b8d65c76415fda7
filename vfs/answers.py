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

COPIES_TIMEOUT = 5.0  # seconds the peers get to answer (a ping, or which blocks they hold)
# Blocks looked up in the store on the event loop at most; more go to a worker thread.
LOOP_LOOKUPS = 2048
# Blocks evicted in one go when a folder is evicted (one store transaction each).
EVICT_BATCH = 8192


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

    async def size(self, entry: Entry) -> int:
        """A path's bytes in all: a folder's from its entry's aggregates (the drive's
        signed folder totals) until its own figures are at hand, so the first `size`
        of a version does not wait for every directory below to be read."""
        if (entry.is_dir and entry.node is not None and entry.total_bytes is not None
                and not self.drive.figures.complete(entry.node)):
            return entry.total_bytes
        return (await self.usage(entry))[1]

    async def figures_state(self, entry: Entry) -> xattrs.FiguresState:
        """Whether `state`/`cached` of `entry` are at hand, never waiting for them.

        A folder whose figures are not: its count is started in the background
        (the drive's nursery; one per folder, shared with any `state` read that
        waits for it) and the answer says how far it is.
        """
        if not entry.is_dir or entry.node is None:
            return xattrs.FiguresState(True, 1 if entry.is_file else 0,
                                       entry.size if entry.is_file else 0)
        figures = self.drive.figures
        root = self.drive.root_entry().node
        if figures.complete(entry.node):
            t = await figures.totals(entry.node, root=entry.node == root)
            return xattrs.FiguresState(True, t.files, t.size, t.files)
        failed = figures.counting(entry.node)
        error = failed.error if failed is not None and failed.done else ""
        count, start = figures.start_count(entry.node)  # after a failure: a new try
        if start and not self.drive.start_soon(figures.count, entry.node, count,
                                               entry.node == root):
            await figures.count(entry.node, count, entry.node == root)  # no nursery: wait
            error = count.error
        return xattrs.FiguresState(False, entry.total_files, entry.total_bytes, count.files,
                                   error)

    async def copies(self, path: list[bytes], entry: Entry) -> int:
        """How many copies of `entry` are known: devices that keep it whole.

        For a folder: the peers that announced (Whole frames, kept per
        connection) a tree holding it whole, that is the folder itself or a
        folder above it (a complete pin, a publisher's or host's complete
        version: its root); no question per block or file is asked, so this
        costs the same for a folder of ten files and of a million. Plus one
        if this device holds every byte below it (0 for a folder with no
        files). For a file: the reachable peers that hold every block of it
        (chunk lists and chunks), asked now with one Have, plus one if this
        device holds it whole. A peer that does not answer within
        COPIES_TIMEOUT does not count.
        """
        drive = self.drive
        if entry.is_file:
            ids = [cl.ref.block_id for cl in entry.chunk_lists or ()]
            ids.extend(r.block_id for r in
                       (await drive.tree.chunk_map(entry, Priority.PREFETCH)).chunks)
            count = 0 if await self._missing(ids) else 1
            if drive.holders is not None and ids:
                answers = await drive.holders(ids, COPIES_TIMEOUT)
                count += sum(1 for flags in answers.values() if all(flags))
            return count
        if not entry.is_dir or entry.node is None:
            return 0
        root = drive.root_entry().node
        totals = await drive.figures.totals(entry.node, root=entry.node == root)
        if totals.files == 0:
            return 0
        count = 1 if totals.have >= totals.size else 0
        if drive.whole is not None:
            tops = set(await self._folders_on_the_way(path))
            tops.add(entry.node.block_id)
            announced = await drive.whole(COPIES_TIMEOUT)
            count += sum(1 for held in announced.values() if not tops.isdisjoint(held))
        return count

    async def _folders_on_the_way(self, path: list[bytes]) -> list[bytes]:
        """Node ids of the folders from the root down to `path`'s parent."""
        tree = self.drive.tree
        entry = self.drive.root_entry()
        out: list[bytes] = []
        for name in path[:-1]:
            if not entry.is_dir or entry.node is None:
                break
            out.append(entry.node.block_id)
            child = await tree.lookup(entry.node, name)
            if child is None:
                break
            entry = child
        else:
            if path and entry.is_dir and entry.node is not None:
                out.append(entry.node.block_id)
        return out

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

    def pin_value(self, path: list[bytes], name: str) -> bytes | None:
        """`pinned` or `progress` of `path`: the pins' own answer, the same for a
        published entry and for a path with unpublished changes."""
        pins = self.drive.pins
        if name == xattrs.PINNED:
            return xattrs.encode_flag(pins is not None and pins.is_pinned(path))
        progress = pins.progress_of(path) if pins is not None else None
        return progress.encode() if progress is not None else None

    async def get(self, path: list[bytes], entry: Entry, name: str) -> bytes | None:
        """The value of `user.peerdrive.<name>` on `path`, or None if there is no such name."""
        if name in (xattrs.PINNED, xattrs.PROGRESS):
            return self.pin_value(path, name)
        if name == xattrs.COPIES:
            return xattrs.encode_int(await self.copies(path, entry))
        if name == xattrs.VERSIONS:
            return await self.versions() if not path else None
        if name == xattrs.FIGURES:
            return (await self.figures_state(entry)).encode()
        if name == xattrs.SIZE:
            return xattrs.encode_int(await self.size(entry))
        if name not in (xattrs.STATE, xattrs.CACHED):
            return None
        have, total = await self.usage(entry)
        if name == xattrs.CACHED:
            return xattrs.encode_int(have)
        return xattrs.state_of(have, total).encode()

    async def set(self, path: list[bytes], entry: Entry | None, name: str, value: bytes,
                  folder: bytes | None = None) -> bool:
        """`pinned` = 1/0 pins or unpins; `evict` = 1 frees the path's unpinned blocks now.

        `folder` is the node id of the directory holding `path` (its figures change).
        `entry` None: a path no version holds yet (a writable mount's new name): a pin
        takes it by path, as every pin, and holds its blocks once it is published;
        there is nothing to evict.
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
            if entry is not None:
                await self.evict(entry, folder)
            return True
        return False

    async def evict(self, entry: Entry, folder: bytes | None = None) -> None:
        """Remove the unpinned blocks of `entry` (and of everything below it) from this device.

        A folder goes a few thousand blocks at a time, as its directories come:
        what is held in memory does not grow with the folder.
        """
        drive = self.drive
        if entry.is_file:
            ids = [cl.ref.block_id for cl in entry.chunk_lists or ()]
            ids.extend(r.block_id for r in
                       (await drive.tree.chunk_map(entry, Priority.PREFETCH)).chunks)
            # a file whose folder is not known here: any folder may have changed
            await self._evict_batch(ids, [folder] if folder is not None else None)
            return
        if not entry.is_dir or entry.node is None:
            return
        dirs: list[bytes] = []
        ids = []
        async for d in drive.figures.subtree(entry.node, Priority.PREFETCH):
            dirs.append(d.node_id)
            ids.extend(r.block_id for r in d.nodes)
            ids.extend(d.block_ids())
            if len(ids) >= EVICT_BATCH:
                await self._evict_batch(ids, dirs)
                ids, dirs = [], []
        await self._evict_batch(ids, dirs)

    async def _evict_batch(self, ids: list[bytes], dirs: list[bytes] | None) -> None:
        drive = self.drive
        ids = list(dict.fromkeys(ids))
        await drive.blocks.evict(ids)
        drive.figures.removed(ids, dirs)
        drive.figures.noted()
        drive.memory.freed(len(ids))
