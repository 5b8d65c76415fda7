"""Folder figures without walking the tree: one summary per directory, kept as blocks come and go.

A folder's status (bytes in all, bytes on this device, files below it) and
its pin set used to be answered by walking every entry below it on each
request: at 100,000 files a `getxattr` on the root held the event loop for
over a second, and `peerdrive pin`'s progress poll asked four times a
second. Now each directory has a `DirFigures`: what its own entries hold
(file count, bytes, the ids and lengths of their content blocks, its
subdirectories), computed once from its nodes and kept by the block id of
its node. A version's content never changes, so a summary is valid for as
long as that directory exists in any version: a new version recomputes only
the directories that changed (a Merkle tree).

What changes is which blocks are on this device. Each summary keeps the
bytes of its own blocks present (`have`) and a `dirty` flag; whoever
changes the store in this process marks the directories concerned (a read
marks the directory of the file it read from, a pin the directories it
fetched for, an evict everything below the path), and a change nobody here
made (a cache limit evicting, another process of the node) is seen in the
store's counters and marks every summary. A dirty summary is recounted
from the store (one lookup per block of that directory alone, in a worker
thread when large). A folder's totals are sums over the summaries below
it, memoised by the change stamp, so a poll that finds nothing changed
costs O(1) and one after a change costs one pass over the directories
below (not the files) plus the recount of the dirty ones.

The walk that builds summaries is iterative, memoised by node id (a
directory whose entries all share one child costs one visit), bounded in
total work (`MAX_WALK_DIRS`), and yields to trio every few hundred entries,
so a hostile drive can neither recurse the mount to death nor hold its
event loop.
"""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from cache.errors import StoreError
from dht.types import Priority

from .crypto import HASH_LEN, Ref
from .errors import FormatError, PeerdriveError
from .memory import Spill
from .tree import Tree

# Distinct directories one walk may visit: a drive of 10^6 files in folders of 100 has
# 10^4; far past any real drive, it only stops a hostile one from running the mount out
# of memory.
MAX_WALK_DIRS = 4_000_000
# Entries handled between two checkpoints: keeps each step of a walk to a few ms.
YIELD_EVERY = 256
# Directories not summed yet that a folder's figures read at once (`collect`).
READ_AHEAD_DIRS = 16
# A summary with more blocks than this is recounted in a worker thread.
THREAD_RECOUNT = 2048
# A folder total past this is a hostile drive (shared subtrees counted once per path).
MAX_TOTAL = 1 << 62
# The Bloom filter that finds blocks held by several directories: 2**24 bits, 3 probes
# (about 0.5% false hits at a million blocks).
BLOOM_BYTES = 1 << 21
_BLOOM_MASK = BLOOM_BYTES * 8 - 1
# A block's plaintext length in a summary: 4 bytes (crypto.MAX_BLOCK_PLAINTEXT < 2**32).
LENGTHS_TYPE = "I"
# A summary's record in the spill file: its ids, then its lengths.
RECORD_BYTES = HASH_LEN + array(LENGTHS_TYPE).itemsize


@dataclass(eq=False, slots=True)
class DirFigures:
    """What one directory's own entries hold; immutable but for `have` and `dirty`
    (and where its record is kept, which a compaction of the spill moves).

    `ids` is the content blocks of its files, 32 bytes each (chunk lists, then
    chunks, file by file, repeated where files share blocks), `lengths` the
    plaintext bytes each counts for "on this device" (0 for a chunk list), as
    unsigned 32-bit integers (a block holds at most 4 MiB): 36 bytes a block,
    which at 10^6 small files is most of what the summaries weigh (36 MB). They
    are read only to recount, pin or evict the directory, so they live in the
    spill file (`vfs.memory.Spill`: the page cache's memory, not the mount's);
    the object keeps the figures and a handle.
    """

    node_id: bytes
    nodes: tuple[Ref, ...]  # its own directory node blocks (root node, interiors, leaves)
    files: int
    size: int
    blocks: int  # content blocks counted: len(ids) // HASH_LEN
    children: tuple[Ref, ...]  # node refs of its subdirectories, one per entry
    spill: Spill
    at: int | bytes  # the record's handle in `spill`: ids then lengths
    have: int = 0
    dirty: bool = True

    @property
    def ids(self) -> bytes:
        return self.spill.get(self.at, self.blocks * HASH_LEN) if self.blocks else b""

    @property
    def lengths(self) -> array:
        return self.record()[1]

    def record(self) -> tuple[bytes, array]:
        """(ids, lengths), read in one go."""
        lengths = array(LENGTHS_TYPE)
        if not self.blocks:
            return b"", lengths
        raw = self.spill.get(self.at, self.blocks * RECORD_BYTES)
        split = self.blocks * HASH_LEN
        lengths.frombytes(raw[split:])
        return raw[:split], lengths

    def block_ids(self) -> list[bytes]:
        ids = self.ids
        return [ids[i:i + HASH_LEN] for i in range(0, len(ids), HASH_LEN)]


def _unseen_children(d: DirFigures, seen: set[bytes], queue: list[Ref]) -> None:
    """Queue `d`'s subdirectories not met yet in this walk (each distinct one once)."""
    for child in d.children:
        if child.block_id not in seen:
            seen.add(child.block_id)
            queue.append(child)
    if len(seen) > MAX_WALK_DIRS:
        raise FormatError(f"the folder holds more than {MAX_WALK_DIRS:,} directories")


@dataclass(slots=True)
class Count:
    """How far the first figures of a folder are: a count running in the background.

    The first figures of a version need every directory below the folder read
    once (O(files) of decoding: minutes at 10^6 files on a loaded machine); a
    `status` that asks meanwhile is answered at once with the totals the drive's
    folder aggregates give and this progress, instead of waiting for it.
    """

    files: int = 0  # files of the directories summed so far
    dirs: int = 0
    done: bool = False
    error: str = ""
    final: bool = False  # the error is the drive's (a malformed directory): no retry


@dataclass(slots=True)
class FolderTotals:
    files: int
    size: int
    have: int


@dataclass
class _Memo:
    stamp: int = -1
    totals: dict[bytes, FolderTotals] = field(default_factory=dict)


class Figures:
    """The summaries of one mounted drive's directories, and the folder totals made of them."""

    def __init__(self, tree: Tree, store, *,
                 unstored: Callable[[bytes], bool] = lambda _i: False,
                 spill_dir: str | None = None) -> None:
        self.tree = tree
        self.store = store
        # the summaries' ids and lengths (None: kept in memory; the store's folder, so
        # the cache's file system, in a mount)
        self._spill_dir = spill_dir
        self._spill = Spill(spill_dir)
        self._unstored = unstored  # fetched, waiting for the store writer: counts as here
        self._dirs: dict[bytes, DirFigures] = {}
        self._building: dict[bytes, trio.Event] = {}
        self._stamp = 0  # bumped whenever some `have` may have changed
        self._memo = _Memo()
        self._counters: tuple[int, int] | None = None
        # Blocks that more than one directory may hold (equal files in two folders): a
        # change to one of them may change folders nobody marked, so it marks them all.
        # Found with a Bloom filter over every id summed (false hits only cost a recount).
        self._seen = bytearray(BLOOM_BYTES)
        self._shared: set[bytes] = set()
        # folders every directory below which has its summary: their totals need no read
        self._complete: set[bytes] = set()
        self._counts: dict[bytes, Count] = {}  # background counts (`count`), by node id
        self.walks = 0  # summaries built from the tree: what the tests count

    # -- keeping `have` current ------------------------------------------------------

    def changed(self, dir_ids: list[bytes] | None = None) -> None:
        """Blocks of these directories (node ids) came or went; None: maybe any."""
        if dir_ids is None:
            for d in self._dirs.values():
                d.dirty = True
        else:
            for node_id in dir_ids:
                d = self._dirs.get(node_id)
                if d is not None:
                    d.dirty = True
        self._stamp += 1

    def fetched(self, block_id: bytes, folder: bytes | None) -> None:
        """`block_id` arrived for a file of directory `folder` (None: not known)."""
        if folder is None or block_id in self._shared:
            self.changed(None)
        else:
            self.changed([folder])

    def removed(self, block_ids: list[bytes], folders: list[bytes] | None) -> None:
        """These blocks left the device; `folders` are the directories known to hold them."""
        if folders is None or not self._shared.isdisjoint(block_ids):
            self.changed(None)
        else:
            self.changed(folders)

    def _note_ids(self, ids: bytes) -> None:
        seen, shared = self._seen, self._shared
        for k in range(0, len(ids), HASH_LEN):
            block_id = ids[k:k + HASH_LEN]
            hit = True
            for p in (0, 4, 8):
                bit = int.from_bytes(block_id[p:p + 4], "little") & _BLOOM_MASK
                byte, mask = bit >> 3, 1 << (bit & 7)
                if not seen[byte] & mask:
                    hit = False
                    seen[byte] |= mask
            if hit:
                shared.add(block_id)

    def check_store(self) -> None:
        """Compare the store's counters with the last seen: a change nobody here noted marks all.

        Called after this process changed the store itself too (with its own
        marks already made), so only changes from elsewhere mark everything.
        """
        counters = self._read_counters()
        if self._counters is not None and counters != self._counters:
            self.changed(None)
        self._counters = counters

    def noted(self) -> None:
        """This process changed the store and marked what it changed: take the counters as seen."""
        self._counters = self._read_counters()

    def _read_counters(self) -> tuple[int, int]:
        try:
            return self.store.count, self.store.total_bytes
        except Exception:  # a closed store at shutdown: nothing to compare
            return (-1, -1)

    async def _recount(self, d: DirFigures) -> None:
        if not d.dirty:
            return
        d.dirty = False  # a change while we count marks it again
        if not d.blocks:
            d.have = 0
            return
        raw, lengths = d.record()
        ids = [raw[i:i + HASH_LEN] for i in range(0, len(raw), HASH_LEN)]
        if len(ids) > THREAD_RECOUNT:
            missing = await trio.to_thread.run_sync(self.store.missing, ids)
        else:
            missing = self.store.missing(ids)
        gone = {i for i in missing if not self._unstored(i)}
        d.have = sum(lengths[k] for k, i in enumerate(ids) if i not in gone)

    # -- summaries -------------------------------------------------------------------

    def known(self, node_id: bytes) -> DirFigures | None:
        return self._dirs.get(node_id)

    async def of(self, node: Ref, priority: Priority = Priority.READ) -> DirFigures:
        """The summary of the directory whose node is `node`, built once."""
        hit = self._dirs.get(node.block_id)
        if hit is not None:
            return hit
        while (ev := self._building.get(node.block_id)) is not None:
            await ev.wait()
            hit = self._dirs.get(node.block_id)
            if hit is not None:
                return hit
        ev = self._building[node.block_id] = trio.Event()
        try:
            d, ids = await self._build(node, priority)
            self._note_ids(ids)
            self._dirs[node.block_id] = d
            return d
        finally:
            del self._building[node.block_id]
            ev.set()

    async def _build(self, top: Ref, priority: Priority) -> tuple[DirFigures, bytes]:
        """Read one directory's nodes (checked, iteratively, each once) and sum its
        entries; the summary (its record spilled) and its ids."""
        self.walks += 1
        nodes, entries = await self.tree.read_directory(top, priority)
        ids = bytearray()
        lengths = array(LENGTHS_TYPE)
        children: list[Ref] = []
        files = size = 0
        for k, e in enumerate(entries):
            if e.is_file:
                files += 1
                size += e.size
                for cl in e.chunk_lists or ():
                    ids += cl.ref.block_id
                    lengths.append(0)
                chunks = e.chunks  # inline (a small file): no chunk map to build
                if chunks is None:
                    chunks = (await self.tree.chunk_map(e, priority)).chunks
                for r in chunks:
                    ids += r.block_id
                    lengths.append(r.length)
            elif e.is_dir and e.node is not None:
                children.append(e.node)
            if k % YIELD_EVERY == YIELD_EVERY - 1:
                await trio.lowlevel.checkpoint()
        at = self._spill.put(bytes(ids) + lengths.tobytes())
        return DirFigures(top.block_id, tuple(nodes), files, size, len(lengths),
                          tuple(children), self._spill, at), bytes(ids)

    async def subtree(self, node: Ref,
                      priority: Priority = Priority.READ) -> AsyncIterator[DirFigures]:
        """Every distinct directory at or below `node`, each once (a DAG walk), top first.

        A walk to its end (a pin's listing, an evict) leaves every summary below
        `node` built: its figures are then complete without a count of their own.
        """
        seen = {node.block_id}
        queue = [node]
        handled = 0
        while queue:
            ref = queue.pop()
            d = await self.of(ref, priority)
            yield d
            handled += 1
            _unseen_children(d, seen, queue)
            if handled % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
        self._complete.update(seen)

    def complete(self, node: Ref) -> bool:
        """Whether the folder's figures are at hand: every summary below it built, so
        its totals cost a pass over summaries and at most a recount, no directory read."""
        return node.block_id in self._complete

    def counting(self, node: Ref) -> Count | None:
        """The background count of this folder's figures, if one was started."""
        return self._counts.get(node.block_id)

    def start_count(self, node: Ref) -> tuple[Count, bool]:
        """The count of `node`'s figures; True if the caller must run it (`count`)."""
        c = self._counts.get(node.block_id)
        if c is not None and not (c.done and c.error and not c.final):
            return c, False
        c = self._counts[node.block_id] = Count()
        return c, True

    async def count(self, node: Ref, c: Count, root: bool = False) -> None:
        """Build the figures of `node` (every summary below it), keeping `c` current."""
        try:
            await self.totals(node, root=root, progress=c)
        except (PeerdriveError, StoreError) as exc:  # never the mount's nursery's end
            c.error = str(exc) or type(exc).__name__
            # a malformed directory fails the same way every time (its id is its bytes);
            # anything else (no peer served a directory in time) is tried again
            c.final = isinstance(exc, FormatError)
        finally:
            c.done = True

    async def collect(self, node: Ref, priority: Priority = Priority.READ,
                      progress: Count | None = None) -> list[DirFigures]:
        """Every distinct directory at or below `node` (the top first), as `subtree`, but
        the directories not summed yet are read READ_AHEAD_DIRS at a time.

        A folder's first figures on a fresh mount need every directory node below
        it: one after the other, 10^4 folders were 10^4 round trips to a peer (over
        300 s on a loaded machine); in waves, the peer gets them in flight together.
        Summaries already built cost no task.
        """
        if progress is None:
            progress = Count()
        top = await self.of(node, priority)
        progress.files += top.files
        progress.dirs += 1
        out = [top]
        seen = {node.block_id}
        todo: list[Ref] = []
        _unseen_children(top, seen, todo)
        handled = 0
        while todo:
            wave: list[Ref] = []
            while todo and len(wave) < READ_AHEAD_DIRS:
                ref = todo.pop()
                known = self._dirs.get(ref.block_id)
                if known is None:
                    wave.append(ref)
                    continue
                out.append(known)
                progress.files += known.files
                progress.dirs += 1
                _unseen_children(known, seen, todo)
                handled += 1
                if handled % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
            if not wave:
                continue
            built: list[DirFigures | BaseException | None] = [None] * len(wave)
            async with trio.open_nursery() as nursery:
                for k, ref in enumerate(wave):
                    nursery.start_soon(self._build_into, built, k, ref, priority)
            for d in built:
                if isinstance(d, BaseException):
                    raise d
                assert d is not None
                out.append(d)
                progress.files += d.files
                progress.dirs += 1
                _unseen_children(d, seen, todo)
        self._complete.update(d.node_id for d in out)
        return out

    async def _build_into(self, built: list, k: int, ref: Ref, priority: Priority) -> None:
        try:
            built[k] = await self.of(ref, priority)
        except Exception as exc:  # raised by `collect`, alone: not as an exception group
            built[k] = exc

    async def totals(self, node: Ref, *, root: bool = False,
                     progress: Count | None = None) -> FolderTotals:
        """Files, bytes and bytes on this device of everything at or below a directory.

        Sums with multiplicity (a subtree that appears twice counts twice, as
        its files appear twice), memoised per node id and per change stamp.
        For the drive's `root`, summaries of directories no longer in the
        version are dropped: memory follows the drive, not its history.
        """
        memo = self._memo
        if memo.stamp == self._stamp and node.block_id in memo.totals:
            return memo.totals[node.block_id]
        order = await self.collect(node, progress=progress)
        if root and len(self._dirs) > len(order):
            await self.forget_unreachable({d.node_id for d in order})
            memo = self._memo
        for k, d in enumerate(order):
            if d.dirty:
                await self._recount(d)
            if k % YIELD_EVERY == YIELD_EVERY - 1:
                await trio.lowlevel.checkpoint()
        if memo.stamp != self._stamp:
            memo.stamp = self._stamp
            memo.totals = {}
        done = memo.totals
        # post-order over the DAG: every child is summed before its parent
        pending: list[tuple[DirFigures, bool]] = [(order[0], False)]
        by_id = {d.node_id: d for d in order}
        while pending:
            d, ready = pending.pop()
            if d.node_id in done:
                continue
            if not ready:
                pending.append((d, True))
                pending.extend((by_id[c.block_id], False) for c in d.children
                               if c.block_id not in done)
                continue
            t = FolderTotals(d.files, d.size, d.have)
            for c in d.children:
                ct = done[c.block_id]
                t.files += ct.files
                t.size += ct.size
                t.have += ct.have
            if t.size > MAX_TOTAL or t.files > MAX_TOTAL:
                raise FormatError("the folder's totals are beyond any real drive")
            done[d.node_id] = t
        return done[node.block_id]

    async def forget_unreachable(self, keep: set[bytes]) -> None:
        """Drop the summaries of directories no longer in `keep` (after a new version)."""
        for node_id in [n for n in self._dirs if n not in keep]:
            d = self._dirs.pop(node_id)
            d.spill.drop(d.at, d.blocks * RECORD_BYTES)
        self._complete &= keep
        self._counts = {n: c for n, c in self._counts.items() if n in keep}
        self._memo = _Memo()
        self._seen = bytearray(BLOOM_BYTES)
        self._shared = set()
        # the records of the versions before are mostly dead once the drive changed much:
        # the live ones go to a new file (the old one goes with its last reader)
        old = self._spill
        new = Spill(self._spill_dir) if old.worth_compacting() else None
        if new is not None:
            self._spill = new
        for d in list(self._dirs.values()):
            ids, lengths = d.record()
            self._note_ids(ids)
            if new is not None and d.spill is old:
                d.at, d.spill = new.put(ids + lengths.tobytes()), new
            await trio.lowlevel.checkpoint()
