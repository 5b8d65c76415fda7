"""A writable drive at work: the working tree, its bytes in the store, versions made of it.

A `WriteSession` is what a writable mount (and `publish --watch`) changes.
It owns the `WorkTree` (vfs/worktree.py) and turns its changes into blocks
and versions:

* Bytes written are kept in memory as dirty segments; past DIRTY_LIMIT bytes
  over all files, the largest files are cut (`write_buffer.settle`, same
  FastCDC parameters as `publish`), encrypted and stored under the drive's
  write pin (`write:<pubkey>`), so memory stays bounded and no plaintext
  ever reaches the disk. A file being appended to is cut behind the writer
  once SPILL_BEHIND bytes of it are sealed (`write_buffer.cut_sealed`, one
  at a time, in `run`'s nursery): its writes go on while the bytes before
  them are cut, encrypted and stored, instead of waiting for all of it at
  the limit. A store that cannot take them (the disk full, or the
  cache limit taken by pinned blocks) fails the write with NoSpaceError
  (ENOSPC) before the write is applied.
* A checkpoint cuts every dirty file, builds new directory nodes for changed
  folders only, stores them, and commits the journal (vfs/write_journal.py):
  from then on the tree survives a SIGKILL. fsync asks for one and is
  answered once it is committed.
* A version is published after `publish_delay` seconds without a change, at
  once after an fsync, and when the mount ends: the checkpoint's root goes
  through `vfs.publish.commit_version` (the one step that turns a root into
  a signed head, merging with other writers' versions),
  and `on_version` tells the node (readers, pins, the DHT).

All changes to the tree take `lock`, so a checkpoint sees one state.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from cache.errors import StoreError, StoreFull

from .capability import WriteCap
from .crypto import Ref, encrypt_chunk
from .errors import NoSpaceError, PeerdriveError
from .formats import Entry
from .head import Head
from .publish import WORKERS, Commit, commit_version
from .storage import DriveStorage
from .tree import Tree
from .version_blocks import VersionBlocks
from .worktree import WNode, WorkTree
from .write_buffer import DIRTY, STORED, FileContent, Seg, cut_sealed, one_error, settle
from .write_journal import journal_key, open_journal, seal_journal

log = logging.getLogger(__name__)

# Dirty bytes in memory over all files, at most; past it a write first spills.
DIRTY_LIMIT = 32 * 1024 * 1024
# Sealed bytes of a file being appended to (all but its growing last segment) that are
# cut behind the writer at once.
SPILL_BEHIND = 8 * 1024 * 1024
# After a failed publish (a full disk), the next try waits this long.
RETRY_SECONDS = 5.0
DEFAULT_PUBLISH_DELAY = 2.0


def write_pin(pubkey: bytes) -> str:
    return f"write:{pubkey.hex()}"


class DriveBase:
    """What a working tree reads of the version it starts from (vfs.worktree.Base)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    async def directory(self, entry: Entry) -> list[Entry]:
        assert entry.node is not None
        _, entries = await self.tree.read_directory(entry.node)
        return entries

    async def chunks(self, entry: Entry) -> tuple[Ref, ...]:
        return (await self.tree.chunk_map(entry)).chunks

    async def lookup(self, entry: Entry, name: bytes) -> Entry | None:
        assert entry.node is not None
        return await self.tree.lookup(entry.node, name)


class WriteSession:
    def __init__(self, cap: WriteCap, storage: DriveStorage, tree: Tree, head: Head,
                 publish_delay: float = DEFAULT_PUBLISH_DELAY,
                 on_version: Callable[[Head], Awaitable[None]] | None = None,
                 root_ino: int = 1, *, device: str = "local",
                 fetch: Callable[..., Awaitable[bytes]] | None = None,
                 lookup: Callable[[], Awaitable[bytes | None]] | None = None,
                 adopt_merged: bool = True) -> None:
        assert head.root is not None
        self.cap = cap
        self.storage = storage
        self.store = storage.store
        self.reader = tree
        self.head = head
        self.publish_delay = publish_delay
        self.on_version = on_version
        self.pin = write_pin(cap.pubkey)
        self.tree = WorkTree(head.root, DriveBase(tree), root_ino)
        self.blocks = VersionBlocks(tree)
        self.lock = trio.Lock()
        self._publishing = trio.Lock()
        self._stored: set[bytes] = set()  # ids put under the write pin since the last build
        self._pending: tuple[Entry, set[bytes]] | None = None  # checkpointed, not published
        self._wake = trio.Event()
        self._urgent = False
        self._last_change = 0.0
        self.versions = 0
        self.failure: str | None = None
        # the commit step's view of this writer (vfs.publish.commit_version): the root the
        # tree's changes are relative to, and how to see other writers' versions
        self.base_root: Entry | None = head.root
        self.device = device
        self._fetch = fetch
        self._lookup = lookup
        # a version merged with another writer's becomes the tree (a mount), or not (a
        # watched folder: the folder stays what it is, and is merged again each time)
        self.adopt_merged = adopt_merged
        self.on_merged: Callable[[Head], Awaitable[None]] | None = None
        # cutting behind the writer: the nursery of `run`, the cut in flight (set when it
        # ends), and whether the last one failed (the disk full: the limit's spill, under
        # the lock, then says so to the writer)
        self._nursery: trio.Nursery | None = None
        self._spilling: trio.Event | None = None
        self._spill_failed = False

    # -- blocks ------------------------------------------------------------------------

    def _put(self, blocks: list[tuple[Ref, bytes]]) -> None:
        """Store encrypted blocks under the write pin (worker thread)."""
        if not blocks:
            return
        need = sum(len(ct) for _, ct in blocks)
        limit = self.store.limit_bytes
        if limit is not None and self.store.pinned_bytes + need > limit:
            raise NoSpaceError(
                f"the cache limit ({limit:,} bytes) is taken by pinned and unpublished data: "
                "raise --cache-size, or unpin something")
        try:
            self.store.put_pinned(self.pin, [(r.block_id, ct) for r, ct in blocks],
                                  ids_checked=True, tag=self.cap.discovery_key)
            # LMDB reads B-tree pages through its map while it writes, and the kernel maps
            # the cached pages around each one (fault-around): ~45 MB of data.mdb in the
            # mount's RSS after 512 MiB written, unless let go after each commit
            self.store.release_mapped_pages()
        except StoreFull as exc:
            raise NoSpaceError(f"the device is full: {exc}") from exc
        except StoreError as exc:
            raise NoSpaceError(f"the store cannot take new blocks: {exc}") from exc

    def _encrypt(self, views: list[memoryview]) -> list[tuple[Ref, bytes]]:
        return [encrypt_chunk(self.cap.read_key, v) for v in views]

    async def store_chunks(self, views: list[memoryview]) -> list[Ref]:
        """Encrypt chunks on every core (hashlib and AES-GCM release the GIL), store them in
        one commit."""
        groups = [views[i::WORKERS] for i in range(WORKERS)]
        done: list[list[tuple[Ref, bytes]]] = [[] for _ in groups]

        async def encrypt(i: int) -> None:
            done[i] = await trio.to_thread.run_sync(self._encrypt, groups[i])

        async with one_error(), trio.open_nursery() as nursery:
            for i, group in enumerate(groups):
                if group:
                    nursery.start_soon(encrypt, i)
        blocks: list[tuple[Ref, bytes]] = [None] * len(views)  # type: ignore[list-item]
        for i, group_blocks in enumerate(done):
            blocks[i::WORKERS] = group_blocks
        await trio.to_thread.run_sync(self._put, blocks)
        self._stored.update(r.block_id for r, _ in blocks)
        return [r for r, _ in blocks]

    async def load(self, ref: Ref) -> bytes:
        return await self.reader.blocks.read(ref)

    # -- changes -----------------------------------------------------------------------

    def changed(self) -> None:
        """A change was made: a version follows after the quiet period."""
        self._last_change = trio.current_time()
        self._wake.set()

    def dirty_bytes(self) -> int:
        return sum(n.content.dirty_bytes for n in self.tree.dirty_files if n.content)

    async def _spill(self, want: int) -> None:
        """Cut and store dirty bytes until `want` more fit under DIRTY_LIMIT."""
        for node in sorted(self.tree.dirty_files, key=lambda n: -(n.content.dirty_bytes
                                                                   if n.content else 0)):
            if self.dirty_bytes() + want <= DIRTY_LIMIT // 2:
                return
            if node.content is not None:
                await settle(node.content, self.load, self.store_chunks, final=False)
                if not node.content.dirty_bytes:
                    self.tree.dirty_files.discard(node)

    async def _prepare(self, content: FileContent, off: int, length: int) -> None:
        for seg in content.needs(off, length):
            assert seg.ref is not None
            content.fill(seg, await self.load(seg.ref))

    async def write(self, node: WNode, off: int, data: bytes) -> int:
        # over the limit with a cut behind in flight: it frees memory soon (wait unlocked)
        while self.dirty_bytes() + len(data) > DIRTY_LIMIT and self._spilling is not None:
            await self._spilling.wait()
        async with self.lock:
            content = await self.tree.content(node)
            if self.dirty_bytes() + len(data) > DIRTY_LIMIT:
                await self._spill(len(data))
                self._spill_failed = False
            await self._prepare(content, off, len(data))
            content.write(off, data)
            self.tree.wrote(node)
            self._spill_behind(node, content)
        self.changed()
        return len(data)

    def _spill_behind(self, node: WNode, content: FileContent) -> None:
        """Start cutting the sealed bytes of `content` behind the writer, if enough are."""
        if self._nursery is None or self._spilling is not None or self._spill_failed:
            return
        run = content.sealed_run(SPILL_BEHIND)
        if run is None:
            return
        self._spilling = trio.Event()
        self._nursery.start_soon(self._cut_behind, node, content, run)

    async def _cut_behind(self, node: WNode, content: FileContent, run: list[Seg]) -> None:
        try:
            try:
                refs, tail = await cut_sealed(run, self.store_chunks)
            except PeerdriveError as exc:
                # nothing is lost: the bytes stay in memory; a write past the limit cuts
                # under the lock and gets the error (ENOSPC)
                log.info("drive %s: cutting written bytes behind the writer failed: %s",
                         self.cap.drive_id[:16], exc)
                self._spill_failed = True
                return
            async with self.lock:
                if content.replace_sealed(run, refs, tail) and not content.dirty_bytes:
                    self.tree.dirty_files.discard(node)
        finally:
            FileContent.unseal(run)
            done, self._spilling = self._spilling, None
            if done is not None:
                done.set()

    async def _spills_done(self) -> None:
        while self._spilling is not None:
            await self._spilling.wait()

    async def truncate(self, node: WNode, size: int) -> None:
        async with self.lock:
            content = await self.tree.content(node)
            if size == content.size:
                return
            await self._prepare(content, size, 0)
            content.truncate(size)
            self.tree.wrote(node)
        self.changed()

    async def read(self, node: WNode, off: int, size: int) -> bytes:
        """Bytes of a file with unpublished changes (a clean one reads through the drive)."""
        content = node.content
        assert content is not None
        # take what the segments hold now: a write may change them while a chunk loads
        plan = [(seg.kind, seg.ref, bytes(seg.data[lo:hi]) if seg.kind == DIRTY else None,
                 lo, hi) for seg, lo, hi in content.read_plan(off, size)]  # type: ignore[index]
        parts: list[bytes] = []
        for kind, ref, data, lo, hi in plan:
            if kind == STORED:
                assert ref is not None
                parts.append((await self.load(ref))[lo:hi])
            elif kind == DIRTY:
                assert data is not None
                parts.append(data)
            else:
                parts.append(bytes(hi - lo))
        return b"".join(parts)

    # -- versions ----------------------------------------------------------------------

    async def checkpoint(self) -> Entry | None:
        """Make the tree durable: cut, build, store, journal. Its root, or None if unchanged."""
        await self._spills_done()  # its chunks are kept, not cut again
        async with self.lock:
            if not self.tree.has_changes:
                return self._pending[0] if self._pending is not None else None
            emitted: list[tuple[Ref, bytes]] = []

            def emit(payload: bytes) -> Ref:
                ref, ct = encrypt_chunk(self.cap.read_key, payload)
                emitted.append((ref, ct))
                return ref

            async def settle_file(node: WNode) -> tuple[Ref, ...]:
                assert node.content is not None
                await settle(node.content, self.load, self.store_chunks, final=True)
                return node.content.refs()

            root, done = await self.tree.build(settle_file, emit)
            await trio.to_thread.run_sync(self._put, emitted)
            self._stored.update(r.block_id for r, _ in emitted)
            journal = seal_journal(self.cap, self.head.seq, root)
            try:
                await trio.to_thread.run_sync(self.store.put_record,
                                              journal_key(self.cap.pubkey), journal)
            except StoreError as exc:
                raise NoSpaceError(f"the write journal cannot be saved: {exc}") from exc
            done()  # every block the root reaches is stored: the tree is clean
            self._spill_failed = False
            stored, self._stored = self._stored, set()
            if self._pending is not None:
                stored |= self._pending[1]
            self._pending = (root, stored)
            return root

    async def sync(self) -> None:
        """fsync: the tree is durable on return; its version follows at once."""
        await self.checkpoint()
        self._urgent = True
        self._wake.set()

    async def publish_now(self) -> Head | None:
        """Checkpoint and publish whatever changed; the new head, or None if nothing did."""
        async with self._publishing:
            root = await self.checkpoint()
            if root is None or self._pending is None:
                return None
            return await self._publish(*self._pending)

    async def publish_synced(self) -> Head | None:
        """Publish the last checkpoint (what fsync made durable), not the tree as it is now:
        a change made since (the next save's truncate, half its bytes) waits for its own
        fsync or quiet period. The new head, or None if no checkpoint waits."""
        async with self._publishing:
            if self._pending is None:
                return None
            return await self._publish(*self._pending)

    async def _commit(self, root: Entry) -> Commit:
        """The one commit step (vfs.publish.commit_version): `root` becomes the next
        version, merged per file onto another writer's if one came meanwhile."""
        sizes = await self.blocks.sizes(root)
        return await commit_version(
            self.storage, self.cap, root, self.base_root, device=self.device, blocks=sizes,
            pending_pin=f"write-commit:{self.cap.pubkey.hex()}", fetch=self._fetch,
            lookup=self._lookup)

    async def _publish(self, root: Entry, stored: set[bytes]) -> Head:
        commit = await self._commit(root)
        head = commit.head
        self.head = head
        newer = self._pending if self._pending is not None and self._pending[0] is not root \
            else None  # an fsync checkpointed again while this version was committed
        self._pending = newer
        if commit.merged_with is None:
            self.base_root = root
        elif self.adopt_merged and not self.tree.has_changes and newer is None:
            # the version holds another writer's changes too: it becomes the tree
            assert head.root is not None
            self.base_root = head.root
            if self.on_merged is not None:
                await self.on_merged(head)
        # else: the tree stays relative to the base it came from; the next commit merges
        # its changes onto the newest version again
        self.versions += 1
        await trio.to_thread.run_sync(self._forget_journal, root)
        # the version's blocks are under the publish pin now; what was written since stays,
        # and so does what a newer checkpoint, not published yet, names
        keep = self._stored if newer is None else self._stored | newer[1]
        release = [b for b in stored if b not in keep]
        if release:
            await trio.to_thread.run_sync(self._release, release)
        log.info("published version %d of drive %s", head.seq, self.cap.drive_id[:16])
        if self.on_version is not None:
            await self.on_version(head)
        return head

    def _release(self, ids: list[bytes]) -> None:
        try:
            self.store.remove_from_pin(self.pin, ids)
        except StoreError as exc:  # the pin is only bookkeeping: the next start clears it
            log.info("could not release written blocks: %s", exc)

    def _forget_journal(self, root: Entry) -> None:
        """Delete the journal if it still names `root` (a newer checkpoint keeps its own)."""
        assert root.node is not None
        key = journal_key(self.cap.pubkey)
        block_id = root.node.block_id

        def drop(old: bytes | None) -> bytes | None:
            if old is None:
                return None
            try:
                if open_journal(self.cap, old).root.node.block_id == block_id:  # type: ignore
                    return None
            except PeerdriveError:
                return None
            return old

        self.store.update_record(key, drop)

    async def recover(self) -> Head | None:
        """At start: publish the tree an fsync made durable if no version holds it yet."""
        data = await trio.to_thread.run_sync(self.store.get_record, journal_key(self.cap.pubkey))
        if data is None:
            await trio.to_thread.run_sync(self.store.unpin, self.pin)
            return None
        try:
            journal = open_journal(self.cap, data)
        except PeerdriveError as exc:
            log.warning("ignored the write journal of drive %s: %s", self.cap.drive_id[:16], exc)
            await trio.to_thread.run_sync(self.store.delete_record, journal_key(self.cap.pubkey))
            return None
        assert journal.root.node is not None
        if journal.root.node.block_id == self.head.root_block:
            await trio.to_thread.run_sync(self._forget_journal, journal.root)
            await trio.to_thread.run_sync(self.store.unpin, self.pin)
            return None
        if self.head.seq > journal.base_seq:
            log.warning("drive %s: version %d was published after this mount's last "
                        "fsync-ed tree (built on version %d); merging that tree onto it",
                        self.cap.drive_id[:16], self.head.seq, journal.base_seq)
            self.base_root = None  # its base is unknown here: a union loses nothing
        head = await self._publish(journal.root, set())
        await trio.to_thread.run_sync(self.store.unpin, self.pin)
        self.restart_from(head)
        return head

    @property
    def has_pending(self) -> bool:
        """A checkpoint not published yet."""
        return self._pending is not None

    def restart_from(self, head: Head) -> None:
        """Drop the (unchanged) tree and start from `head`, another writer's version."""
        assert head.root is not None
        self.head = head
        self.base_root = head.root
        self.tree = WorkTree(head.root, self.tree.base, self.tree.root.ino, self.tree.next_ino)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Publish after each quiet period (or at once after an fsync), until cancelled; cut
        written bytes behind the writer meanwhile."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._publish_loop(task_status)
            finally:
                self._nursery = None

    async def _publish_loop(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while not self._urgent:
                quiet = trio.current_time() - self._last_change
                if quiet >= self.publish_delay:
                    break
                with trio.move_on_after(self.publish_delay - quiet):
                    await self._wake.wait()
                self._wake = trio.Event()
            urgent, self._urgent = self._urgent, False
            try:
                if urgent:  # an fsync: its checkpoint, as it was
                    await self.publish_synced()
                    if self.tree.has_changes:  # made since: after their own quiet period
                        self._wake.set()
                else:
                    await self.publish_now()
                self.failure = None
            except PeerdriveError as exc:
                self.failure = str(exc)
                log.warning("drive %s: could not publish: %s (trying again in %.0f s)",
                            self.cap.drive_id[:16], exc, RETRY_SECONDS)
                await trio.sleep(RETRY_SECONDS)
                self._wake.set()
