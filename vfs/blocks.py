"""The read path's source of plaintext: local store first, then the network.

`BlockReader.read(ref)` returns the plaintext of one block. It looks in the
node's store; if the block is missing (or failed its check there) it asks
the fetcher, which gets it from peers and verifies its id; the ciphertext is
cached (a full disk only means it is handed over uncached) and decrypted
at once, on the event loop (see `_load`); blocks read from the store are
decrypted in worker threads, where a cold page of the store may be a disk read. Every block decrypted here was checked against its id
(SHA-256) on its way in, by the fetcher or by the store's put, so only the
GCM tag is checked, not the plaintext's hash a second time
(`decrypt_checked_block`, docs/security.md). A small
in-memory LRU of plaintext makes the kernel's several reads of one chunk cost
one decryption.

A block fetched from a peer or a mirror is usually decrypted before the
event loop hears of it: the fetch's own thread (a peer connection's receive
thread, a mirror's fetch thread) calls `open_verified(block_id, ciphertext)`
once it has checked the bytes against the id (the fetch's `open_with` hands
it over; dht/ sees an opaque callable), and AES-GCM runs there with the GIL
released. It decrypts only blocks a load here expects (`_expect`: the
readahead's asks and the loads waiting on the network), with the ref the
load will use, and keeps the plaintext until that load takes it (bounded:
OPENED_LIMIT_BYTES). A load finding none, or one made for another ref,
decrypts on the event loop as before; a block that fails to decrypt there
is left to the event loop, which fails it the usual way (IntegrityError,
evicted), so a failure in the thread never yields bytes.

Fetched blocks are stored behind the reader's back: `run_store_writer` (a
task of the drive's nursery, with one long-lived thread of its own) puts
everything fetched since its last commit in one transaction, so a stream of blocks costs one commit (one fsync) per
batch instead of one per block, and a read never waits for the disk to take
what the network gave it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from cache.errors import StoreError, StoreFull
from cache.store import BlockStore
from dht.types import Priority

from .crypto import Ref, decrypt_checked_block
from .errors import BlockUnavailable, IntegrityError
from .threadbatch import ThreadBatches

log = logging.getLogger(__name__)

# fetch(block_id, priority) -> ciphertext whose SHA-256 is block_id, or raises. It may
# also have `ahead(block_ids, priority, task_status=)` (vfs.network.DriveFetch): ask for
# blocks together, in order, so they go to a peer in runs; started once they are queued;
# and `hurry(block_id, priority) -> bool`: move a fetch in flight up to a more urgent
# priority where it stands (False: no such fetch, the caller asks again itself); and
# `batch(block_ids, priority, deliver)`: fetch them as one batch, `await deliver(group)`
# called with each group of (id, verified bytes) as they come (a pin's blocks, and the
# readahead's through `fetch_window`); BlockUnavailable when it stalls.
Fetch = Callable[[bytes, Priority], Awaitable[bytes]]

PLAINTEXT_CACHE_BYTES = 16 * 1024 * 1024
# Fetched ciphertext waiting for the store writer, at most: past it, fetches wait for a commit.
UNSTORED_LIMIT_BYTES = 16 * 1024 * 1024
_THREAD_MIN = 64 * 1024
# fetch_and_store (a pin's blocks): one store transaction per this many blocks or bytes.
# LMDB (without writemap) copies every page a transaction changes into memory from
# malloc and, once committed, keeps those copies on its own free list for the life of
# the process: the mount's heap keeps the largest transaction's pages. Block ids are
# random keys, so a commit of B blocks into a large store changes about one leaf page per
# block in each of the store's five id-keyed indexes: 8,192 blocks left ~90 MB in the
# mount at 10^6 blocks (and growing with the store), 2,048 ~25 MB, for the same CPU
# (docs/benchmarks.md, issue 17).
STORE_BATCH_BLOCKS = 2048
STORE_BATCH_BYTES = 16 * 1024 * 1024
PER_BLOCK_CONCURRENCY = 128  # blocks in flight when the fetch takes no batches
# plaintext decrypted in a fetch thread, waiting for its load (past it, the oldest goes:
# its load decrypts on the event loop); refs a fetch thread may decrypt with, at most
OPENED_LIMIT_BYTES = 16 * 1024 * 1024
EXPECTED_LIMIT = 4096
# ids found missing by the readahead remembered until their load starts, at most (a hint)
_ABSENT_AHEAD_MAX = 4096


class BlockReader:
    def __init__(self, store: BlockStore, read_key: bytes, fetch: Fetch | None = None,
                 plaintext_cache_bytes: int = PLAINTEXT_CACHE_BYTES, *,
                 tag: bytes | None = None) -> None:
        self.store = store
        self.read_key = read_key
        self.fetch = fetch
        # the drive's discovery key: fetched blocks are stored as members of it, so this
        # node serves them to that drive's clients only (vfs/network.py)
        self.tag = tag
        self._plain: OrderedDict[bytes, bytes] = OrderedDict()
        self._plain_bytes = 0
        self._plain_limit = plaintext_cache_bytes
        self._inflight: dict[bytes, trio.Event] = {}
        # block id -> the most urgent priority a reader of a load in flight asked for, and
        # the ids whose load is waiting on the network now: a READ arriving behind a
        # readahead of its block hurries that fetch instead of riding at READAHEAD
        self._urgency: dict[bytes, Priority] = {}
        self._fetching: set[bytes] = set()
        # Evict wins over the readahead started before it: `evictions` counts evicts (the
        # drive's readahead starts no load planned before one), and `_fenced` holds the
        # ids evicted while a load of them was in flight; such a load, if still only the
        # readahead's when it ends (no READ joined it), neither stores nor keeps its block
        self.evictions = 0
        self._fenced: set[bytes] = set()
        # ids `load_ahead` has just found missing from the store, until a load of each
        # starts: a READ that gets there before the readahead's own load (the kernel's
        # READs run ahead of ours) goes to the network without a second look
        self._absent_ahead: set[bytes] = set()
        # reads and decryptions of large blocks; batched while `workers.run` runs (the
        # drive starts it), one thread call per block otherwise
        self.workers = ThreadBatches()
        # fetched, verified, not yet in the store (oldest first); only with a store writer
        self._unstored: dict[bytes, bytes] = {}
        # fetched and verified by fetch_and_store, waiting for its next commit: read from
        # here meanwhile, never fetched a second time
        self._batched: dict[bytes, bytes] = {}
        # held while a batch goes to the store from the event loop's side, and by evict: a
        # batch committed just after an evict would bring the evicted blocks back
        self._store_lock = trio.Lock()
        # held by the thread putting any batch in the store, and by evict's removal from
        # it (the store writer's thread stores without the trio lock above)
        self._batch_lock = threading.Lock()
        self._unstored_bytes = 0
        self._writer_running = False  # fetched blocks go to the store writer
        self._stored = trio.Event()  # set (and replaced) after each batch the writer commits
        # the store writer's thread (run_store_writer): what waits for it, in order
        self._writer_cond = threading.Condition()
        self._to_store: list[tuple[bytes, bytes]] = []
        self._writer_idle = False  # it waits on _writer_cond for blocks
        self._writer_stop = False
        self._writer_thread = False  # it runs (set and read on the event loop)
        self._evicts_waiting = 0  # evicts waiting for a batch to be stored (tests)
        # ids that failed to decrypt, until a batch holding them has been stored and evicted
        self._undecryptable: set[bytes] = set()
        self.fetched_blocks = 0
        self.fetched_bytes = 0
        self.uncached_blocks = 0
        # blocks a fetch thread may decrypt (`open_verified`), by id: the ref their load
        # will use; and the plaintexts made there, waiting for that load. One lock: the
        # fetch threads and the event loop both change them.
        self._expected: OrderedDict[bytes, Ref] = OrderedDict()
        self._opened: OrderedDict[bytes, tuple[Ref, bytes]] = OrderedDict()
        self._opened_bytes = 0
        self._open_lock = threading.Lock()
        self.opened_in_thread = 0  # loads whose plaintext a fetch thread made
        # called on the event loop after each commit of fetched blocks, with True when the
        # store changed in more ways than taking them (a block refused, or evictions made
        # room): the drive's folder figures then recount (vfs.figures)
        self.on_stored: Callable[[bool], None] | None = None

    def is_unstored(self, block_id: bytes) -> bool:
        """Fetched and verified, waiting for the store writer: as good as on the device."""
        return block_id in self._unstored or block_id in self._batched

    def _remember(self, block_id: bytes, plain: bytes) -> None:
        if len(plain) > self._plain_limit:
            return
        self._plain[block_id] = plain
        self._plain_bytes += len(plain)
        while self._plain_bytes > self._plain_limit:
            _, old = self._plain.popitem(last=False)
            self._plain_bytes -= len(old)

    def forget(self, block_id: bytes) -> None:
        """Drop a block's plaintext from memory (after an evict)."""
        plain = self._plain.pop(block_id, None)
        if plain is not None:
            self._plain_bytes -= len(plain)
        self._absent_ahead.discard(block_id)
        ct = self._unstored.pop(block_id, None)
        if ct is not None:
            self._unstored_bytes -= len(ct)
        self._batched.pop(block_id, None)

    async def evict(self, ids: list[bytes]) -> int:
        """Drop blocks from memory and from the store (the unpinned ones), in turn
        with the store writer so that no batch it took before stores them again."""
        self.evictions += 1
        self._fenced.update(b for b in ids if b in self._inflight)
        async with self._store_lock:
            for block_id in ids:
                self.forget(block_id)
            return await trio.to_thread.run_sync(self._evict_stored, ids)

    def _evict_stored(self, ids: list[bytes]) -> int:
        """Evict from the store (worker thread) once no batch is being stored: one the
        writer's thread took before `forget` would otherwise store them again."""
        self._evicts_waiting += 1
        try:
            with self._batch_lock:
                return self.store.evict(ids)
        finally:
            self._evicts_waiting -= 1

    def _evicted_ahead(self, block_id: bytes) -> bool:
        """Whether a load of the block in flight was the readahead's when the block was
        evicted and still is: what it brings is neither stored nor kept (a user who
        evicts a file finds it `cloud` afterwards). A READ that joined it wants the
        bytes, on the device as any read's are."""
        return block_id in self._fenced and self._urgency.get(block_id) == Priority.READAHEAD

    def passed(self, block_id: bytes) -> None:
        """A sequential reader has read the block to its end: first in line to leave the
        plaintext cache (drop-behind, as the kernel's page cache does).

        The readahead's window and the chunks already read share the cache; by
        recency alone, chunks read after a top-up outranked the far half of that
        top-up, still unread, and the next top-up pushed those out: their READs read
        them back from the store and decrypted them again (tests/test_readahead_steps.py).
        """
        if block_id in self._plain:
            self._plain.move_to_end(block_id, last=False)

    def has_plain(self, block_id: bytes) -> bool:
        """Whether the block's plaintext is in memory (without counting it as a use)."""
        return block_id in self._plain

    def cached_plain(self, block_id: bytes) -> bytes | None:
        plain = self._plain.get(block_id)
        if plain is not None:
            self._plain.move_to_end(block_id)
        return plain

    async def read(self, ref: Ref, priority: Priority = Priority.READ, *,
                   looked: bool = False) -> bytes:
        """The block's plaintext. `looked`: the caller has just found it missing from the
        store (`load_ahead`), so it goes to the network without a second look there."""
        plain = self.cached_plain(ref.block_id)
        if plain is not None:
            return plain
        # one fetch per block: concurrent readers of the same block wait for the first
        while (ev := self._inflight.get(ref.block_id)) is not None:
            await self._wait_for_load(ref.block_id, priority, ev)
            plain = self.cached_plain(ref.block_id)
            if plain is not None:
                return plain
        ev = self._inflight[ref.block_id] = trio.Event()
        self._urgency[ref.block_id] = priority
        if ref.block_id in self._absent_ahead:
            self._absent_ahead.discard(ref.block_id)
            looked = True
        try:
            plain = await self._load(ref, priority, looked)
            if not self._evicted_ahead(ref.block_id):
                self._remember(ref.block_id, plain)
            return plain
        finally:
            self._fenced.discard(ref.block_id)
            del self._inflight[ref.block_id]
            del self._urgency[ref.block_id]
            ev.set()

    async def _wait_for_load(self, block_id: bytes, priority: Priority, ev: trio.Event) -> None:
        """Wait for another task's load of the block, hurrying it if we are more urgent.

        A process blocked in read() on a block the readahead is loading must
        not wait at READAHEAD priority: the fetcher keeps its last slots per
        peer for READs and peers answer READs first, but only if it hears of
        one. While the load waits on the network its fetch is moved up to our
        priority where it stands (`hurry`: no task, no second fetch; without
        it, the fetch is asked again at our priority and the fetcher joins the
        two and upgrades the request); a load not yet at the network fetches at
        our priority when it gets there.
        """
        if priority >= self._urgency.get(block_id, priority):
            await ev.wait()
            return
        self._urgency[block_id] = priority
        if block_id not in self._fetching or self.fetch is None:
            await ev.wait()
            return
        hurry = getattr(self.fetch, "hurry", None)
        if hurry is not None and hurry(block_id, priority):
            # the fetch in flight was moved up to our priority where it stands: no task, no
            # second fetch call per block a READ catches up with (a cold sequential read's
            # READs catch up with most of the readahead's blocks)
            await ev.wait()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hurry, block_id, priority)
            await ev.wait()
            nursery.cancel_scope.cancel()

    async def _hurry(self, block_id: bytes, priority: Priority) -> None:
        assert self.fetch is not None
        try:
            await self.fetch(block_id, priority)  # the load in flight gets the bytes
        except BlockUnavailable:
            pass  # the load in flight fails alike and its reader reports it

    async def load_ahead(self, refs: list[Ref]) -> list[Ref]:
        """Read and decrypt from the store, ahead of their reads, those of `refs` not in
        memory; the ones found missing from the store are returned (in order).

        A sequential reader's readahead over a hot file: one block at a time,
        each cost a task, an event, a queued job and a thread hand-off, on
        the event loop that also answers every FUSE request. Here a run of
        about a MiB of blocks is one worker-thread job, and the runs go to
        idle lanes in parallel. Blocks loaded here are in flight meanwhile, so
        a read of one waits for it instead of loading it a second time. A
        block that fails (rot, a bad key, a store error) is neither kept nor
        returned: its own read finds out and reports it. Never raises but
        Cancelled.
        """
        todo = [r for r in refs
                if r.block_id not in self._plain and r.block_id not in self._inflight
                and r.block_id not in self._undecryptable and not self.is_unstored(r.block_id)]
        runs: list[list[Ref]] = []
        cost = self.workers.batch_cost
        for ref in todo:
            if not runs or cost + ref.length > self.workers.batch_cost:
                runs.append([])
                cost = 0
            runs[-1].append(ref)
            cost += ref.length
        events = {}
        for ref in todo:
            events[ref.block_id] = self._inflight[ref.block_id] = trio.Event()
            self._urgency[ref.block_id] = Priority.READAHEAD
        absent: set[bytes] = set()

        async def load(run: list[Ref]) -> None:
            found = await self.workers.call(self._open_run, run, cost=sum(r.length for r in run))
            for ref, plain in zip(run, found, strict=True):
                if plain is None:
                    absent.add(ref.block_id)
                    if len(self._absent_ahead) >= _ABSENT_AHEAD_MAX:
                        self._absent_ahead.clear()  # (a hint: loads that never came)
                    self._absent_ahead.add(ref.block_id)
                elif plain and not self._evicted_ahead(ref.block_id):
                    self._remember(ref.block_id, plain)

        try:
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(load, run)
        finally:
            for block_id, ev in events.items():
                self._fenced.discard(block_id)
                del self._inflight[block_id]
                del self._urgency[block_id]
                ev.set()
        return [r for r in todo if r.block_id in absent]

    def _open_run(self, refs: list[Ref]) -> list[bytes | None]:
        """`_open_local` of each block, in a worker thread: its plaintext, None if it is
        not in the store, b"" if it failed (its own read reports why)."""
        found: list[bytes | None] = []
        for ref in refs:
            try:
                found.append(self._open_local(ref))
            except (IntegrityError, StoreError):
                found.append(b"")
        return found

    async def fetch_ahead(self, refs: list[Ref], priority: Priority, *, looked: bool = False,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask for the blocks of `refs` that are not on this device, together and in order.

        A sequential reader's readahead: asked one by one (each after its own
        look into the store) they reach the fetcher one at a time and go to
        the peer one request each; asked together they go as runs (one
        WantRun, one scheduling step per run). The reads that follow join
        these fetches; this only gets them asked early. Started once asked
        (`nursery.start`); never raises.
        """
        ahead = getattr(self.fetch, "ahead", None)
        ids = [r.block_id for r in refs
               if r.block_id not in self._plain and r.block_id not in self._unstored
               and r.block_id not in self._inflight]
        missing: list[bytes] = []
        if ahead is None or len(ids) < 2:
            pass
        elif looked:  # the caller has just found them missing from the store (load_ahead)
            missing = ids
        else:
            try:
                # a read transaction and a lookup per id, each giving the GIL away and
                # waiting for it back: in a worker thread (with the reads' jobs), not on
                # the event loop that answers FUSE (7% of its samples on a hot read)
                missing = await self.workers.call(self.store.missing, ids, cost=0)
            except StoreError:
                missing = []  # the reads that follow find out
        if len(missing) < 2:  # nothing to fetch, or one block: its read asks for it
            task_status.started()
            return
        wanted = set(missing)
        self._expect([r for r in refs if r.block_id in wanted])
        await ahead(missing, priority, task_status=task_status)

    def fetches_windows(self) -> bool:
        """Whether `fetch_window` can be used: the fetch takes batches (`batch`)."""
        return getattr(self.fetch, "batch", None) is not None

    async def fetch_window(self, refs: list[Ref], priority: Priority,
                           loaded: Callable[[bytes], None],
                           failed: Callable[[list[bytes], str], None]) -> None:
        """Fetch the blocks of `refs` (found missing from the store just now: the readahead's
        window) as one batch, each block's plaintext put in memory as it comes.

        One call and one task per window, not a task, a load and a fetcher
        request per block: each block is in flight here (`_inflight`: a READ of
        it waits for it and hurries its fetch, `_wait_for_load`) from this call
        until it arrives or the batch ends. An arriving block goes as a load's
        would (`ciphertext_of`, `_load`): counted, handed to the store writer,
        decrypted (or taken as the fetch's thread decrypted it), kept in the
        plaintext cache, its waiters woken; `loaded(block_id)` is told. One
        evicted meanwhile while only this batch wanted it (`_evicted_ahead`) is
        neither stored nor kept; one that fails to decrypt is evicted and left
        to its READ. Blocks already in memory, fetched or being loaded are left
        out. Nothing waits on this between the call and the blocks being in
        flight. When the batch stalls (BlockUnavailable), `failed(ids, why)` is
        told the blocks it did not deliver, which are no longer in flight then:
        their READs ask again. Raises only Cancelled (and bugs).
        """
        batch = getattr(self.fetch, "batch", None)
        assert batch is not None
        by_id: dict[bytes, Ref] = {}
        for ref in refs:
            block_id = ref.block_id
            if (block_id in self._plain or block_id in self._inflight or block_id in by_id
                    or block_id in self._undecryptable or self.is_unstored(block_id)):
                continue
            by_id[block_id] = ref
        if not by_id:
            return
        events: dict[bytes, trio.Event] = {}
        for block_id in by_id:
            events[block_id] = self._inflight[block_id] = trio.Event()
            self._urgency[block_id] = priority
            self._fetching.add(block_id)
            self._absent_ahead.discard(block_id)
        self._expect(list(by_id.values()))

        def end(block_id: bytes) -> None:
            ev = events.pop(block_id)
            self._fenced.discard(block_id)
            self._fetching.discard(block_id)
            del self._inflight[block_id]
            del self._urgency[block_id]
            ev.set()

        async def deliver(group: list[tuple[bytes, bytes]]) -> None:
            unstored: list[tuple[bytes, bytes]] = []
            for block_id, ct in group:
                ref = by_id.get(block_id)
                if ref is None or block_id not in events:
                    continue
                opened = self._take_opened(block_id)
                self.fetched_blocks += 1
                self.fetched_bytes += len(ct)
                try:
                    if self._evicted_ahead(block_id):
                        continue  # evicted while only this readahead wanted it
                    if self._writer_running:
                        self._to_writer(block_id, ct)
                    else:
                        unstored.append((block_id, ct))
                    if opened is not None and opened[0] == ref:
                        self.opened_in_thread += 1
                        plain = opened[1]
                    else:
                        try:
                            plain = self._decrypt(ref, ct)
                        except IntegrityError:
                            continue  # evicted (_decrypt): its READ fails it
                    self._remember(block_id, plain)
                finally:
                    end(block_id)
                    loaded(block_id)
            if unstored:  # the store writer has stopped (the mount ends): stored here
                async with self._store_lock:
                    failed, changed = await trio.to_thread.run_sync(self._store_batch_now,
                                                                    unstored)
                self.uncached_blocks += failed
                self._committed(unstored, changed)
            # bounded memory: a disk slower than the network slows the fetches down
            while self._unstored_bytes > UNSTORED_LIMIT_BYTES and self._writer_running:
                await self._stored.wait()

        try:
            await batch(list(by_id), priority, deliver)
        except BlockUnavailable as exc:
            failed(list(events), str(exc))
        finally:
            for block_id in list(events):
                self._take_opened(block_id)
                end(block_id)

    def _to_writer(self, block_id: bytes, ct: bytes) -> None:
        """Hand a fetched, verified block to the store writer (running)."""
        if block_id in self._unstored:
            return
        self._unstored[block_id] = ct
        self._unstored_bytes += len(ct)
        with self._writer_cond:
            self._to_store.append((block_id, ct))
            if self._writer_idle:  # a busy writer takes it with its next batch
                self._writer_idle = False
                self._writer_cond.notify()

    async def ciphertext(self, ref: Ref, priority: Priority) -> bytes:
        """The verified ciphertext of a block, fetched and cached if missing.

        With the store writer running, a fetched block is handed back before
        it is stored, except at PIN and PREFETCH priority, whose callers want
        it on the device when this returns.
        """
        return await self.ciphertext_of(ref.block_id, priority)

    async def ciphertext_of(self, block_id: bytes, priority: Priority, *,
                            local: bool = True, looked: bool = False) -> bytes | None:
        """`ciphertext` by block id. With `local=False` a block found in the store is
        not read (None is returned): a pin only wants it on the device. `looked`: the
        caller has just found it missing from the store, so it is not looked up again."""
        ct = self._unstored.get(block_id)
        if ct is not None:
            # fetched by someone else (a read), not yet committed: a PIN or PREFETCH
            # caller wants it on the device, as if it had fetched it itself
            if priority >= Priority.PIN:
                await self._until_stored(block_id)
            return ct
        ct = self._batched.get(block_id)
        if ct is not None:
            return ct  # a pin's, in its next commit (a read wants the bytes, not the store)
        # a block that failed to decrypt may sit in the store for a moment (a writer batch
        # in flight stored it; it evicts it next): never taken from there, fetched afresh
        if block_id not in self._undecryptable and not looked:
            if not local and self.store.has(block_id):
                return None
            ct = self.store.get(block_id)
            if ct is not None:
                return ct
        if self.fetch is None:
            raise BlockUnavailable(f"block {block_id.hex()[:16]} is not on this device "
                                   "and this mount has no network")
        priority = min(priority, self._urgency.get(block_id, priority))
        self._fetching.add(block_id)
        try:
            ct = await self.fetch(block_id, priority)
        finally:
            self._fetching.discard(block_id)
        self.fetched_blocks += 1
        self.fetched_bytes += len(ct)
        if self._evicted_ahead(block_id):
            return ct  # the readahead's, evicted meanwhile: its reader drops it too
        if not self._writer_running:
            # a put hashes the block and commits (fsync): worker thread, not the event loop
            async with self._store_lock:
                failed, changed = await trio.to_thread.run_sync(self._store_batch_now,
                                                                [(block_id, ct)])
            self.uncached_blocks += failed
            self._committed([(block_id, ct)], changed)
            return ct
        self._to_writer(block_id, ct)
        if priority >= Priority.PIN:
            await self._until_stored(block_id)
        # bounded memory: a disk slower than the network slows the fetches down
        while self._unstored_bytes > UNSTORED_LIMIT_BYTES and self._writer_running:
            await self._stored.wait()
        return ct

    async def fetch_and_store(self, ids: list[bytes], priority: Priority,
                              stored: Callable[[list[bytes]], None]) -> None:
        """Fetch blocks missing from the store (a pin's) and store them in large commits.

        With a fetch that takes batches (`batch`: vfs.network.DriveFetch) they
        are asked for together, so they go to peers in long runs; each block
        is still verified against its id by the fetcher. What arrives is
        stored in one transaction per STORE_BATCH_BLOCKS blocks or
        STORE_BATCH_BYTES bytes and at the end (a commit per block rewrites
        a page of every index each time: a pin of 10^4 small files wrote 1.2
        GB). `stored(ids)` is told after each commit. Blocks another reader
        fetched and the store writer has not taken yet are waited for, not
        fetched again. Raises BlockUnavailable when the network stalls, and
        StoreFull when fetched blocks could not be stored.
        """
        if not ids:
            return
        taken = {b for b in ids if b in self._unstored}
        if taken:
            for block_id in taken:
                await self._until_stored(block_id)
            stored(list(taken))
            ids = [b for b in ids if b not in taken]
            if not ids:
                return
        if self.fetch is None:
            raise BlockUnavailable(f"{len(ids)} blocks are not on this device and this mount "
                                   "has no network")
        pending: list[tuple[bytes, bytes]] = []
        pending_bytes = 0

        async def commit() -> None:
            nonlocal pending, pending_bytes
            batch, pending, pending_bytes = pending, [], 0
            try:
                async with self._store_lock:
                    # not what an evict dropped meanwhile (it holds the lock while it does)
                    batch = [(i, ct) for i, ct in batch if self._batched.get(i) is ct]
                    failed, changed = await trio.to_thread.run_sync(self._store_batch_now,
                                                                    batch)
            finally:
                for block_id, ct in batch:
                    if self._batched.get(block_id) is ct:
                        del self._batched[block_id]
            self.uncached_blocks += failed
            self._committed(batch, changed)
            if failed:
                raise StoreFull(f"{failed} of {len(batch)} fetched blocks could not be stored "
                                "on this device (the cache is full)")
            stored([block_id for block_id, _ in batch])

        async def deliver(group: list[tuple[bytes, bytes]]) -> None:
            nonlocal pending_bytes
            for block_id, ct in group:
                self.fetched_blocks += 1
                self.fetched_bytes += len(ct)
                pending_bytes += len(ct)
                self._batched[block_id] = ct
            pending.extend(group)
            if len(pending) >= STORE_BATCH_BLOCKS or pending_bytes >= STORE_BATCH_BYTES:
                await commit()

        batch = getattr(self.fetch, "batch", None)
        try:
            if batch is not None:
                await batch(ids, priority, deliver)
            else:
                fetch = self.fetch
                limiter = trio.Semaphore(PER_BLOCK_CONCURRENCY)
                errors: list[Exception] = []

                async def one(block_id: bytes) -> None:
                    async with limiter:
                        try:
                            ct = await fetch(block_id, priority)
                            await deliver([(block_id, ct)])
                        except Exception as exc:  # noqa: BLE001 - raised below, as it came
                            # the first failure ends the window, as `batch` does; the caller
                            # gets it as raised (BlockUnavailable, StoreFull), not in a group
                            errors.append(exc)
                            nursery.cancel_scope.cancel()

                async with trio.open_nursery() as nursery:
                    for block_id in ids:
                        nursery.start_soon(one, block_id)
                if errors:
                    raise errors[0]
            if pending:
                await commit()
        finally:
            for block_id, ct in pending:  # a failed fetch or commit: not coming after all
                if self._batched.get(block_id) is ct:
                    del self._batched[block_id]

    async def _until_stored(self, block_id: bytes) -> None:
        """Wait until the store writer has taken `block_id` (committed, or refused)."""
        while block_id in self._unstored and self._writer_running:
            await self._stored.wait()

    async def run_store_writer(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Store fetched blocks in batches, one transaction each, until cancelled.

        One long-lived thread (its own capacity limiter, joined before this
        returns) takes everything fetched since its last commit, stores it,
        and tells the event loop (one `run_sync_soon` per batch); blocks
        fetched while it commits wait for its next batch without waking
        anyone. A `trio.to_thread` call per batch cost the event loop a
        thread hand-off and a task wake-up each (docs/benchmarks.md, issue 12
        "the cold insert path"). On cancellation what is still waiting is
        stored first, so an unmount keeps every block it fetched.
        """
        self._writer_running = True
        self._writer_stop = False
        token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_writer_when_cancelled)
                task_status.started()
                self._writer_thread = True
                try:
                    await trio.to_thread.run_sync(self._writer_main, token,
                                                  limiter=trio.CapacityLimiter(1))
                finally:
                    self._writer_thread = False
                nursery.cancel_scope.cancel()
        finally:
            self._writer_running = False
            with trio.CancelScope(shield=True):
                await self._store_unstored()  # what the thread did not take (it failed)

    async def _stop_writer_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._writer_running = False  # from now on a fetch stores its block itself
            with self._writer_cond:
                self._writer_stop = True
                self._writer_cond.notify()

    def _writer_main(self, token: trio.lowlevel.TrioToken) -> None:
        """The store writer's thread: batches until told to stop and nothing waits."""
        while True:
            with self._writer_cond:
                while not self._to_store and not self._writer_stop:
                    self._writer_idle = True
                    self._writer_cond.wait()
                self._writer_idle = False
                if not self._to_store:
                    return
                taken, self._to_store = self._to_store, []
            with self._batch_lock:
                # not what an evict (or a failed decryption) dropped since it was fetched
                batch = [(block_id, ct) for block_id, ct in taken
                         if self._unstored.get(block_id) is ct]
                result = self._store_batch(batch) if batch else (0, False)
            token.run_sync_soon(self._writer_stored, taken, result)

    def _writer_stored(self, taken: list[tuple[bytes, bytes]], result: tuple[int, bool]) -> None:
        """On the event loop: a batch of the writer's thread is in the store (or refused)."""
        failed, changed = result
        self.uncached_blocks += failed
        for block_id, ct in taken:
            if self._unstored.get(block_id) is ct:
                del self._unstored[block_id]
                self._unstored_bytes -= len(ct)
        self._stored.set()
        self._stored = trio.Event()
        try:
            self._committed(taken, changed)
        except Exception:  # a callback of run_sync_soon must not raise into trio
            log.exception("after storing fetched blocks")

    async def _store_unstored(self) -> None:
        """Store what waits for the store writer: with its thread running, wait until it
        has; without (its last round), here."""
        if self._writer_thread:
            while self._unstored and self._writer_thread:
                await self._stored.wait()
            return
        while self._unstored:
            async with self._store_lock:
                batch = list(self._unstored.items())
                if not batch:  # an evict took them while we waited for the lock
                    break
                # Only a batch the store took leaves `_unstored`: a cancellation can land
                # before the worker thread starts, and the blocks must then wait for the
                # writer's shielded last round (they used to be dropped, unstored).
                failed, changed = await trio.to_thread.run_sync(self._store_batch_now, batch)
            self.uncached_blocks += failed
            for block_id, ct in batch:
                if self._unstored.get(block_id) is ct:
                    del self._unstored[block_id]
                    self._unstored_bytes -= len(ct)
            with self._writer_cond:
                self._to_store.clear()
            self._stored.set()
            self._stored = trio.Event()
            self._committed(batch, changed)

    def _committed(self, batch: list[tuple[bytes, bytes]], changed: bool) -> None:
        """After a commit of fetched blocks: the drive's figures recount (`on_stored`), and
        the fetcher lets go of its copies kept for other readers until the store had them
        (`stored`, vfs.network.DriveFetch: ~20 MB of small blocks during a pin)."""
        tell = getattr(self.fetch, "stored", None)
        if tell is not None:
            tell([block_id for block_id, _ in batch])
        if self.on_stored is not None:
            self.on_stored(changed)

    def _store_batch_now(self, batch: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
        """`_store_batch` from a worker thread other than the store writer's."""
        with self._batch_lock:
            return self._store_batch(batch)

    def _store_batch(self, batch: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
        """Put fetched blocks in one transaction (worker thread).

        Returns how many were not stored, and whether the store changed in
        more ways than taking the batch (blocks refused, or others evicted to
        make room; seen in its block count). A store that cannot take them
        (the limit is taken by pinned blocks, the disk is full, any store
        error) only means "uncached": a full disk never fails a read the
        network served. If the batch as a whole does not fit, the blocks are
        tried one by one, so what fits is kept.

        The store does not hash the blocks again (`ids_checked`): the fetch
        hands over only ciphertext it has checked against its id (the `Fetch`
        contract above: the peer connection's receive thread or the mirror
        source hashed it), and a second SHA-256 here cost a tenth of the cold
        read's store writes (docs/benchmarks.md, issue 12).
        """
        batch = [(block_id, ct if type(ct) is bytes else bytes(ct)) for block_id, ct in batch]
        try:
            before = self.store.count
            new = self.store.put_many(batch, ids_checked=True, tag=self.tag)
            after = self.store.count
            self.store.release_mapped_pages()
            if self._evict_undecryptable(batch):
                return 0, True
            return 0, after != before + new
        except StoreFull:
            if len(batch) == 1:
                return 1, True
        except StoreError as exc:
            log.warning("%d block(s) not cached: %s", len(batch), exc)
            return len(batch), True
        failed = 0
        for block_id, ct in batch:
            try:
                self.store.put_many([(block_id, ct)], ids_checked=True, tag=self.tag)
            except StoreError:
                failed += 1
        self._evict_undecryptable(batch)
        return failed, True

    def _evict_undecryptable(self, batch: list[tuple[bytes, bytes]]) -> bool:
        """Evict what failed to decrypt while its batch was being stored (worker thread);
        True if there was any."""
        bad = [block_id for block_id, _ in batch if block_id in self._undecryptable]
        if bad:
            self._undecryptable.difference_update(bad)
            self.store.evict(bad)
        return bool(bad)

    def _open_local(self, ref: Ref) -> bytes | None:
        """Read and decrypt a block from the store, in a worker thread.

        Both halves can be slow: a cold LMDB page is a disk read (a page fault
        in the map) and AES-GCM of a large block is CPU work. Off the event
        loop they overlap with other reads and with the kernel's requests.
        The ciphertext is decrypted where it lies in the store's map, without
        a copy and without its xxh3 check: the GCM tag proves it (a block
        that fails it is checked then, and dropped as rot if it is).
        """
        try:
            return self.store.get_decoded(
                ref.block_id, functools.partial(decrypt_checked_block, self.read_key, ref))
        except IntegrityError:
            self._undecryptable_block(ref)
            raise

    def _decrypt(self, ref: Ref, ct: bytes) -> bytes:
        try:
            return decrypt_checked_block(self.read_key, ref, ct)  # the fetcher checked its id
        except IntegrityError:
            self._undecryptable_block(ref)
            raise

    def _expect(self, refs: list[Ref]) -> None:
        """These blocks may arrive from the network soon: a fetch thread may decrypt
        them (`open_verified`) with these refs."""
        with self._open_lock:
            expected = self._expected
            for ref in refs:
                expected[ref.block_id] = ref
                expected.move_to_end(ref.block_id)
            while len(expected) > EXPECTED_LIMIT:
                expected.popitem(last=False)

    def _take_opened(self, block_id: bytes) -> tuple[Ref, bytes] | None:
        """A load of the block ends: it is no longer expected, and what a fetch thread
        decrypted of it (if anything) is handed over."""
        with self._open_lock:
            self._expected.pop(block_id, None)
            opened = self._opened.pop(block_id, None)
            if opened is not None:
                self._opened_bytes -= len(opened[1])
            return opened

    def open_verified(self, block_id: bytes, ciphertext: bytes) -> None:
        """In a fetch's thread: decrypt a block that was just checked against its id,
        if a load expects it, and keep the plaintext for that load.

        The fetch calls this (the hook `open_with` gave it) with bytes whose
        SHA-256 it has compared with `block_id`, so only the GCM tag is left
        to check. Nothing is kept for a block no load expects, for one that
        fails to decrypt (its load decrypts again on the event loop and fails
        it there: IntegrityError, evicted) or for one whose load ended
        meanwhile. Never raises.
        """
        with self._open_lock:
            ref = self._expected.get(block_id)
            if ref is None or block_id in self._opened:
                return
        try:
            plain = decrypt_checked_block(self.read_key, ref, ciphertext)
        except IntegrityError:
            return
        with self._open_lock:
            if self._expected.get(block_id) is not ref or block_id in self._opened:
                return  # its load has ended (or another thread was quicker)
            self._opened[block_id] = (ref, plain)
            self._opened_bytes += len(plain)
            while self._opened_bytes > OPENED_LIMIT_BYTES:
                _, (_, old) = self._opened.popitem(last=False)
                self._opened_bytes -= len(old)

    def _undecryptable_block(self, ref: Ref) -> None:
        """The id matched, so the publisher encrypted garbage under this ref, or the ref
        itself is wrong: drop the block so it is not served again (the caller fails).

        A block just fetched may still wait for the store writer (dropped from
        there) or be in the batch it is storing now (evicted once that is stored).
        """
        self._undecryptable.add(ref.block_id)
        self.forget(ref.block_id)
        self.store.evict([ref.block_id])

    async def _load(self, ref: Ref, priority: Priority, looked: bool = False) -> bytes:
        # large blocks in worker threads, in batches (vfs/threadbatch.py): what the kernel's
        # requests and the readahead ask for meanwhile goes in one thread call
        if ref.block_id in self._undecryptable:
            plain = None  # not from the store: see ciphertext_of
        elif looked:
            # the readahead's blocks that load_ahead has just found missing: a second
            # look was a worker-thread trip per block of a cold read, for nothing (a
            # block stored meanwhile by another reader's fetch is in `_unstored`, or the
            # fetcher's recent blocks, or fetched again: verified either way)
            plain = None
        elif ref.length >= _THREAD_MIN:
            plain = await self.workers.call(self._open_local, ref, cost=ref.length,
                                            urgent=priority == Priority.READ)
        else:
            plain = self._open_local(ref)
        if plain is not None:
            return plain
        # just found missing from the store (or never taken from it): straight to the
        # network, not a second lookup on the event loop
        self._expect([ref])
        try:
            ct = await self.ciphertext_of(ref.block_id, priority, looked=True)
        finally:
            opened = self._take_opened(ref.block_id)
        assert ct is not None
        if opened is not None and opened[0] == ref:
            # decrypted in the fetch's thread from bytes it checked against this id: the
            # same bytes as `ct` (both hash to the id), with this very ref
            self.opened_in_thread += 1
            return opened[1]
        # A fetched block is decrypted here, at once, whoever asked for it (a READ or the
        # readahead). AES-GCM is all that is left of it (the id was checked on the way
        # in): ~0.05-0.4 ms for a chunk of 256 KiB-1 MiB, while a trip to a worker thread
        # and back waits for two wakeups, 5 ms at the median and 20 at p90 on a loaded
        # machine (docs/benchmarks.md, issue 12 "first byte"), and costs the event loop
        # more Python (a job, an event, a lane task, trio's thread hand-off) than the
        # decryption itself: on a cold sequential read those hand-offs were the loop's
        # largest item (docs/benchmarks.md, issue 12 "the cold insert path").
        return self._decrypt(ref, ct)
