"""A mounted drive: the tree of its current version and the read path.

The FUSE layer (`vfs.fs`) calls this with entries and byte ranges; this
module turns them into block reads through the `Tree` and the `BlockReader`.
Status and pin questions (`user.peerdrive.*`) are answered by `vfs.answers`
from the folder figures (`vfs.figures`) this drive keeps current as blocks
arrive. It raises the drive layer's own errors; only `vfs.fs` turns them
into errno.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from cache.errors import StoreError
from dht.types import Priority

from .answers import Answers
from .blocks import BlockReader, Fetch
from .capability import ReadCap
from .crypto import Ref
from .errors import BlockUnavailable, FormatError, PeerdriveError
from .figures import Figures
from .formats import Entry
from .head import Head
from .memory import Releaser
from .storage import DriveStorage
from .tree import ChunkMap, Tree

if TYPE_CHECKING:
    from .pins import Pins

READAHEAD_CHUNKS = 16  # keeps three peers at 5 MB/s each busy (tests/test_netns.py)
# ... and at most this many bytes (about 7 chunks of ~1.1 MiB, 16 of ~256 KiB): the window's
# plaintexts go to the plaintext cache (16 MiB, vfs/blocks.py); a window larger than it
# pushed out its own front, the chunks the next READs wanted, before they were read (a hot
# read decrypted them twice: docs/benchmarks.md, issue 10 "Chunks of about 1 MiB")
READAHEAD_BYTES = 8 * 1024 * 1024
# The window is topped up once this many chunks of it are free, not at every READ: each
# top-up costs a store lookup in a worker thread, a task and the fetcher's scheduling, and
# its missing chunks go to a source as one run (a 1 MiB READ freed ~4 chunks: runs of 2.2
# blocks on average through a mirror, docs/benchmarks.md issue 10)
READAHEAD_REFILL = 8
# Chunk lists of a listed directory's large files fetched ahead of their first open, at most
# this many bytes per directory (a 1 GiB file's list is ~280 KB).
CHUNK_LIST_PREFETCH_BYTES = 4 * 1024 * 1024
# Directories whose chunk lists were fetched ahead, remembered so a re-listing does not
# look through them again; bounded, since a drive may hold millions of directories.
LISTS_PREFETCHED_REMEMBERED = 65536
# Nodes of a listed directory's subdirectories fetched ahead (and stored, in one commit),
# at most this many bytes per directory: `find` or `ls -R` lists them next, and fetched
# one by one as it descends they cost a round trip and a store commit each. A folder of
# 100 small files has a node of ~10.5 KB: this covers a root of ~1,500 such folders.
SUBDIR_PREFETCH_BYTES = 16 * 1024 * 1024
# After a block could not be fetched within the fetch timeout, reads of it are not given
# the whole timeout again for this long: the kernel follows a failed readahead with a
# read of the same page, which would otherwise wait out the whole timeout a second time.
UNAVAILABLE_MEMORY = 2.0
# ... but a READ of it then still asks once, for at most this long, if any source can be
# asked (the fetcher probes a backed-off one at once): a source back a moment after the
# failure serves it, where the memory alone answered EIO without asking (issue 10).
# A source still dead costs that READ this long, not the fetch timeout.
RECHECK_WAIT = 2.0

# Seconds between two looks at the store's counters for changes other processes made.
STORE_CHECK_SECONDS = 5
# holders(block_ids, timeout) -> {peer node id: [holds id i]} for every peer that answered
Holders = Callable[[list[bytes], float], Awaitable[dict[bytes, list[bool]]]]
# whole(timeout) -> {peer node id: node ids of the trees it announced holding whole}
WholeMap = Callable[[float], Awaitable[dict[bytes, frozenset[bytes]]]]
# announce_whole(node ids): tell the peers which trees this node keeps whole now
AnnounceWhole = Callable[[list[bytes]], None]


@dataclass
class OpenFile:
    """An open file: the entry of the version it was opened in, and its chunk map."""

    entry: Entry
    map: ChunkMap
    folder: bytes | None = None  # node id of the directory holding it (for its figures)
    next_offset: int = 0
    sequential: int = 0
    readahead_until: int = 0
    pending: set[int] = field(default_factory=set)
    # chunks the readahead found missing from the store and has not loaded yet: a READ
    # that gets to one first fetches it without its own look into the store
    absent: set[int] = field(default_factory=set)


class Drive:
    def __init__(self, cap: ReadCap, storage: DriveStorage, head: Head,
                 fetch: Fetch | None = None, holders: Holders | None = None,
                 whole: WholeMap | None = None,
                 announce_whole: AnnounceWhole | None = None) -> None:
        if head.root is None:
            raise FormatError("a mount needs a head opened with the read key")
        self.cap = cap
        self.storage = storage
        self.head = head
        self.version = 1
        self.blocks = BlockReader(storage.store, cap.read_key, fetch, tag=cap.discovery_key)
        # probe_now() -> whether any source can be asked now (each backed-off one probed at
        # once); without it a remembered failure fails a READ at once (see RECHECK_WAIT)
        self._probe_now: Callable[[], bool] | None = getattr(fetch, "probe_now", None)
        open_with = getattr(fetch, "open_with", None)
        if open_with is not None:  # fetched blocks decrypted in the fetch's threads
            open_with(self.blocks.open_verified)
        self.tree = Tree(self.blocks)
        self.figures = Figures(self.tree, storage.store, unstored=self.blocks.is_unstored,
                               spill_dir=getattr(storage.store, "path", None))
        self.blocks.on_stored = self._stored
        self.answers = Answers(self)
        self.holders = holders
        self.whole = whole
        self.announce_whole = announce_whole
        self._unavailable: dict[bytes, tuple[float, str]] = {}  # block id -> (when, why)
        self._nursery: trio.Nursery | None = None
        self._lists_prefetched: set[bytes] = set()  # directory nodes already looked through
        self.pins: Pins | None = None
        # told what large frees free (inodes forgotten, evicts, summaries dropped): gives
        # the heap's free pages back to the system (vfs/memory.py)
        self.memory = Releaser()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background work of the mount (readahead) until cancelled."""
        from .pins import Pins

        self.pins = Pins(self)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.blocks.workers.run)
            await nursery.start(self.blocks.run_store_writer)
            await nursery.start(self.pins.run)
            await nursery.start(self.memory.run)
            nursery.start_soon(self._warm_up)
            task_status.started()
            self.figures.noted()
            while True:
                # recency of reads is batched in memory by the store: persist it now and then
                await trio.sleep(STORE_CHECK_SECONDS)
                await trio.to_thread.run_sync(self.storage.store.flush)
                self.figures.check_store()

    async def _warm_up(self) -> None:
        """Load the root directory as the mount starts, before anyone asks.

        With an empty cache this is also what finds the drive's peers and
        connects to one, so the first `ls` or open of a file pays for
        neither (first 64 KiB of an uncached file: see docs/benchmarks.md).
        Only a head start: a failure here is left for the real request.
        """
        root = self.root_entry()
        if root.node is not None:
            with contextlib.suppress(PeerdriveError):
                await self.tree.node(root.node)
                await self._prefetch_chunk_lists(root)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run `fn(*args)` in the mount's background nursery (a folder's first figures);
        False before `run` has its nursery (a drive used in process without one)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def listed(self, dir_entry: Entry) -> None:
        """A directory is being listed: its large files may be opened next."""
        if (self._nursery is not None and dir_entry.node is not None
                and dir_entry.node.block_id not in self._lists_prefetched):
            self._nursery.start_soon(self._prefetch_chunk_lists, dir_entry)

    async def _prefetch_chunk_lists(self, dir_entry: Entry) -> None:
        """Load the chunk lists of a directory's large files before anyone opens them, and
        its subdirectories' nodes before anyone lists them.

        Opening a file of more than 256 chunks reads its chunk-list blocks
        before its first byte can be fetched: one more round trip to a peer.
        The lists are small beside the files (~70 bytes per ~256 KiB chunk),
        so a listed directory's are fetched ahead at PREFETCH priority, up to
        CHUNK_LIST_PREFETCH_BYTES, and an open finds them in memory.
        """
        assert dir_entry.node is not None
        if dir_entry.node.block_id in self._lists_prefetched:
            return
        if len(self._lists_prefetched) >= LISTS_PREFETCHED_REMEMBERED:
            self._lists_prefetched.clear()  # at worst a directory is looked through again
        self._lists_prefetched.add(dir_entry.node.block_id)
        budget = CHUNK_LIST_PREFETCH_BYTES
        nodes: list[bytes] = []
        nodes_budget = SUBDIR_PREFETCH_BYTES
        with contextlib.suppress(PeerdriveError, StoreError):
            async for _, entry in self.tree.entries(dir_entry.node, 0, Priority.PREFETCH):
                if entry.is_dir and entry.node is not None and nodes_budget > 0:
                    nodes.append(entry.node.block_id)
                    nodes_budget -= entry.node.length
                if budget < 0:
                    continue
                for cl in entry.chunk_lists or ():
                    budget -= cl.ref.length
                    if budget < 0:
                        break
                    await self.blocks.read(cl.ref, Priority.PREFETCH)
            if nodes:
                # the subdirectories' nodes, asked for together (runs) and stored in one go
                missing = await trio.to_thread.run_sync(self.storage.store.missing, nodes)
                await self.blocks.fetch_and_store(missing, Priority.PREFETCH, lambda ids: None)

    # -- versions ------------------------------------------------------------------

    def root_entry(self) -> Entry:
        assert self.head.root is not None
        return self.head.root

    def set_head(self, head: Head) -> None:
        """Switch to a newer verified version; open files keep theirs."""
        if head.root is None:
            raise FormatError("a mount needs a head opened with the read key")
        old = self.head.root.node if self.head.root is not None else None
        self.head = head
        self.version += 1
        if self.pins is not None:
            self.pins.refresh()
        new = head.root.node
        if (self._nursery is not None and old is not None and new is not None
                and self.figures.complete(old)):
            # the last version's figures were at hand: the new one's are too at once,
            # counting only the directories that changed (each other one's summary is
            # kept by its node id), so a `status` after a new version need not wait
            count, start = self.figures.start_count(new)
            if start:
                self.start_soon(self.figures.count, new, count, True)

    # -- tree ----------------------------------------------------------------------

    async def lookup(self, dir_entry: Entry, name: bytes) -> Entry | None:
        assert dir_entry.node is not None
        return await self.tree.lookup(dir_entry.node, name)

    async def entries(self, dir_entry: Entry, start: int) -> AsyncIterator[tuple[int, Entry]]:
        assert dir_entry.node is not None
        async for item in self.tree.entries(dir_entry.node, start):
            yield item

    # -- reading -------------------------------------------------------------------

    async def open(self, entry: Entry, folder: bytes | None = None) -> OpenFile:
        """Open a file; `folder` is the node id of its directory, whose figures its reads change."""
        return OpenFile(entry, await self.tree.chunk_map(entry), folder)

    def close(self, of: OpenFile) -> None:
        of.pending.clear()
        of.absent.clear()

    async def read(self, of: OpenFile, off: int, size: int) -> bytes | memoryview:
        parts = await self.read_parts(of, off, size)
        if len(parts) == 1:
            return parts[0]  # a view, not a copy
        return b"".join(parts)  # the one copy: only the bytes asked for

    async def read_parts(self, of: OpenFile, off: int, size: int) -> tuple[memoryview, ...]:
        """The bytes asked for as views of the chunks' plaintexts, in order (none at EOF).

        The FUSE read hands them to pyfuse3 as they are where it takes a tuple
        (the kernel gathers them into the reply), so a 1 MiB reply of four
        chunks is not first joined into one copy on the event loop.
        """
        span = of.map.span(off, size)
        if not span:
            return ()
        chunks = of.map.chunks
        if off == of.next_offset:
            of.sequential += 1
        else:
            of.sequential = 0
        of.next_offset = off + size
        if of.sequential >= 2:
            self._readahead(of, span[-1] + 1)
        starts = of.map.starts
        end = off + size
        # The readahead has usually decrypted some of a request's chunks already: those
        # are taken from memory here, and only the chunks still to load get a task
        # each (a nursery and a task per chunk of every 1 MiB request were a good part
        # of the event loop's work on a hot read, which also answers every FUSE request)
        plains: list[bytes | None] = [self.blocks.cached_plain(chunks[i].block_id)
                                      for i in span]
        todo = [k for k, plain in enumerate(plains) if plain is None]
        if len(todo) == 1:
            k = todo[0]
            plains[k] = await self._read_chunk(chunks[span[k]], Priority.READ, of,
                                               span[k] in of.absent)
        elif todo:
            errors: list[PeerdriveError] = []

            async def get(k: int) -> None:
                # a failed chunk does not cancel the others: each ends bounded by the fetch
                # timeout, and every chunk found unavailable is remembered as such
                try:
                    plains[k] = await self._read_chunk(chunks[span[k]], Priority.READ, of,
                                                       span[k] in of.absent)
                except PeerdriveError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for k in todo:
                    nursery.start_soon(get, k)
            if errors:
                raise errors[0]
        parts = tuple(memoryview(plain)[max(off, starts[i]) - starts[i]:end - starts[i]]  # type: ignore[arg-type]
                      for plain, i in zip(plains, span, strict=True))
        if of.sequential >= 2:
            for i in span:  # read to their end: first to leave the plaintext cache
                if starts[i] + chunks[i].length <= end:
                    self.blocks.passed(chunks[i].block_id)
        return parts

    async def _read_chunk(self, ref: Ref, priority: Priority,
                          of: OpenFile | None = None, looked: bool = False) -> bytes:
        """A chunk's plaintext; fails at once if no peer could serve it moments ago.

        A chunk fetched for `of` changes its folder's figures: they are marked.
        `looked`: just found missing from the store (BlockReader.read).
        """
        fetched = self.blocks.fetched_blocks
        try:
            return await self._read_chunk_once(ref, priority, looked)
        finally:
            if of is not None and self.blocks.fetched_blocks != fetched:
                self.figures.fetched(ref.block_id, of.folder)

    async def _read_chunk_once(self, ref: Ref, priority: Priority, looked: bool = False) -> bytes:
        now = trio.current_time()
        failed = self._unavailable.get(ref.block_id)
        if failed is not None:
            when, why = failed
            if now - when < UNAVAILABLE_MEMORY:
                return await self._recheck(ref, priority, looked, why)
            del self._unavailable[ref.block_id]
        try:
            return await self.blocks.read(ref, priority, looked=looked)
        except BlockUnavailable as exc:
            self._remember_unavailable([ref.block_id], str(exc))
            raise

    def _remember_unavailable(self, block_ids: list[bytes], why: str) -> None:
        """These blocks could not be fetched just now: a READ of one within
        UNAVAILABLE_MEMORY asks once more briefly (`_recheck`), not the whole wait."""
        now = trio.current_time()
        for block_id, (when, _) in list(self._unavailable.items()):
            if now - when >= UNAVAILABLE_MEMORY:
                del self._unavailable[block_id]
        for block_id in block_ids:
            self._unavailable[block_id] = (now, why)

    async def _recheck(self, ref: Ref, priority: Priority, looked: bool, why: str) -> bytes:
        """A block that failed moments ago, asked for again: one short try, not the whole wait.

        The memory exists for the kernel's read of a page right after its failed
        readahead: that read must not wait out the fetch timeout a second time. But
        answered from memory alone, a READ failed with EIO for up to
        UNAVAILABLE_MEMORY after the failure even when the source was back (a mirror
        thawed, a peer reconnected): nothing asked it. So a READ asks once more,
        for at most RECHECK_WAIT, when some source can be asked (`probe_now` lets a
        backed-off one be probed at once); with none, or without an answer in that
        time, it fails as remembered. Readahead, a hint, fails at once as before.
        """
        probe_now = self._probe_now
        if priority != Priority.READ or probe_now is None or not probe_now():
            raise BlockUnavailable(why)
        with trio.move_on_after(RECHECK_WAIT):
            plain = await self.blocks.read(ref, priority, looked=looked)
            self._unavailable.pop(ref.block_id, None)
            return plain
        raise BlockUnavailable(why)

    def _readahead(self, of: OpenFile, first: int) -> None:
        """Load the next chunks of a sequential reader in the background.

        Local chunks are read and decrypted ahead into the plaintext cache;
        missing ones are fetched at READAHEAD priority, so the kernel's next
        requests find their bytes ready. The window (READAHEAD_CHUNKS, at most
        READAHEAD_BYTES) is topped up once READAHEAD_REFILL chunks of it (or half
        of it, if fewer) are free, and in one go.
        """
        if self._nursery is None:
            return
        chunks = of.map.chunks
        last, size = first, 0
        while last < len(chunks) and last - first < READAHEAD_CHUNKS and size < READAHEAD_BYTES:
            size += chunks[last].length
            last += 1
        refill = min(READAHEAD_REFILL, max(1, (last - first) // 2))
        if last - max(first, of.readahead_until) < refill and last < len(chunks):
            return  # most of the window is still ahead: topped up in steps (and to the end)
        wanted: list[int] = []
        for i in range(max(first, of.readahead_until), last):
            if i in of.pending:
                continue
            if self.blocks.cached_plain(of.map.chunks[i].block_id) is not None:
                continue
            of.pending.add(i)
            wanted.append(i)
        of.readahead_until = max(of.readahead_until, last)
        if wanted:
            self._nursery.start_soon(self._prefetch_in_order, of, wanted, self.blocks.evictions)

    async def _prefetch_in_order(self, of: OpenFile, wanted: list[int], evictions: int) -> None:
        """Start the readahead of `wanted` chunk by chunk, in file order.

        Peers answer the requests of one priority first come, first served, and
        trio runs tasks started together in no fixed order (it may reverse
        them): started in one batch, the chunk the reader needs next was often
        asked for last, behind the whole window (first MiB from one seeder at
        5 MB/s: 1.0-1.6 s instead of 0.3 s).

        `evictions`: BlockReader.evictions when the window was planned. After an
        evict the rest of it is dropped: its chunks' tasks start one after the
        other, and one started after an evict of its file fetched and stored a
        block the user had just evicted (the file showed `partial`, not `cloud`).
        """
        assert self._nursery is not None
        chunks = of.map.chunks
        # those in the store read and decrypted first, a worker-thread job per MiB or so
        # (a hot read: one task per chunk was much of the event loop's work)
        try:
            absent = {r.block_id for r in await self.blocks.load_ahead([chunks[i] for i in wanted])}
        finally:
            left = [i for i in wanted if not self.blocks.has_plain(chunks[i].block_id)]
            of.pending.difference_update(set(wanted) - set(left))
        if not left:
            return
        if self.blocks.evictions != evictions:
            of.pending.difference_update(left)
            return
        if self.blocks.fetches_windows():
            await self._fetch_missing(of, left, absent, evictions)
            return
        # those missing here asked for next, together: they go to a peer in runs
        await self._nursery.start(functools.partial(
            self.blocks.fetch_ahead, [chunks[i] for i in left if chunks[i].block_id in absent],
            Priority.READAHEAD, looked=True))
        of.absent.update(i for i in left if chunks[i].block_id in absent)
        for k, i in enumerate(left):
            if self.blocks.evictions != evictions:  # evict wins over the readahead before it
                of.pending.difference_update(left[k:])
                of.absent.difference_update(left[k:])
                return
            await self._nursery.start(self._prefetch, of, i, chunks[i].block_id in absent,
                                      evictions)

    async def _fetch_missing(self, of: OpenFile, left: list[int], absent: set[bytes],
                             evictions: int) -> None:
        """The readahead of `left` with a fetch that takes batches: the chunks missing from
        the store fetched as one batch (`BlockReader.fetch_window`), in this task.

        A task, a load, an event, a fetch call and a fetcher request per chunk were
        much of the event loop's work per block of a cold sequential read (issue
        10): here a window costs one task and one batch, each block a delivery.
        The rest of `left` (in memory meanwhile, or fetched by another reader and
        not yet stored) is read as before, a task each. A chunk whose fetch failed
        moments ago (`_unavailable`) is left to its READ, as a readahead task of it
        would fail at once; when the batch stalls, its chunks not delivered are
        remembered as unavailable, as their fetches failing one by one were.
        """
        assert self._nursery is not None
        chunks = of.map.chunks
        now = trio.current_time()
        missing: dict[bytes, list[int]] = {}
        for k, i in enumerate(left):
            if self.blocks.evictions != evictions:  # evict wins over the readahead before it
                of.pending.difference_update(left[k:])
                of.absent.difference_update(left[k:])
                return
            block_id = chunks[i].block_id
            failed = self._unavailable.get(block_id)
            if block_id not in absent:
                await self._nursery.start(self._prefetch, of, i, False, evictions)
            elif failed is not None and now - failed[0] < UNAVAILABLE_MEMORY:
                of.pending.discard(i)  # a hint: the READ rechecks it (`_recheck`)
            else:
                missing.setdefault(block_id, []).append(i)
                of.absent.add(i)
        if not missing:
            return
        if self.blocks.evictions != evictions:
            for ids in missing.values():
                of.pending.difference_update(ids)
                of.absent.difference_update(ids)
            return

        def loaded(block_id: bytes) -> None:
            for i in missing.pop(block_id, ()):
                of.pending.discard(i)
                of.absent.discard(i)
            self.figures.fetched(block_id, of.folder)

        try:
            await self.blocks.fetch_window([chunks[ids[0]] for ids in missing.values()],
                                           Priority.READAHEAD, loaded, self._remember_unavailable)
        except PeerdriveError:
            pass  # readahead is a hint: the real read reports the error
        finally:
            for ids in missing.values():  # not fetched here: their READs load them
                of.pending.difference_update(ids)
                of.absent.difference_update(ids)

    async def _prefetch(self, of: OpenFile, i: int, looked: bool, evictions: int,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # and on into the read at once, before the next chunk's task
        try:
            if self.blocks.evictions != evictions:
                return  # an evict came between its planning and this task's first step
            # (from here to the load's start nothing awaits: an evict after that fences it)
            # (a chunk load_ahead found missing goes to the network without a second look)
            await self._read_chunk(of.map.chunks[i], Priority.READAHEAD, of, looked)
        except PeerdriveError:
            pass  # readahead is a hint: the real read reports the error
        finally:
            of.pending.discard(i)
            of.absent.discard(i)

    # -- the store as the node sees it -------------------------------------------------

    def cache_usage(self) -> tuple[int, int | None]:
        st = self.storage.store
        return st.total_bytes, st.limit_bytes

    def _stored(self, changed: bool) -> None:
        """The store writer committed fetched blocks (see BlockReader.on_stored)."""
        if changed:
            self.figures.changed(None)
        self.figures.noted()
