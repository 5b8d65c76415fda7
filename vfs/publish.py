"""Publishing a folder as a new version of a drive.

The walk (one pass of lstat over the tree) is cheap; the work is cutting,
hashing, encrypting and storing the file contents. That runs in worker
threads, a bounded number at a time so memory stays bounded, while the trio
task only schedules. Large files are read in 16 MiB windows (pread, never an
mmap, which a concurrent truncate turns into SIGBUS), cut with FastCDC, and
their chunks are encrypted in batches on both cores (hashlib and AES-GCM
release the GIL over big buffers). Small files are grouped so thousands of
them do not pay one thread hop and one commit each; a group is read with the
next files already requested from the disk, and stored while the next group
is read (see `_SmallFilePipe` for why one thread reads).

Every block of the new version goes into the node's store under the drive's
publish pin, so the publisher keeps seeding it and eviction never removes it.
A version shares every unchanged block with the last one: `new_blocks` and
`new_bytes` count what this publish actually added.

Every new version, whoever builds its tree (this folder walk, a writable
mount, a watched folder), becomes a signed head through `commit_version`:
it finds the newest head this node can see, rebases the new tree onto it
when another writer got there first (`vfs.history.merge_trees`), chains the
head to the one before (`prev`), writes the block list and pins the version,
releasing versions older than the newest `keep_versions`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .blocklist import ListRef, build_block_list
from .blocks import BlockReader
from .capability import WriteCap
from .chunker import CDC_MIN, make_chunker
from .crypto import Ref, encrypt_chunk
from .errors import FormatError, IntegrityError, NoSpaceError, RollbackError, UsageError
from .formats import (
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    MAX_INLINE_CHUNKS,
    ChunkListRef,
    Entry,
    build_directory,
    check_name,
    dir_totals,
    encode_chunk_list,
    encode_dir_leaf,
    split_chunk_list,
)
from .head import Head, make_head, open_head
from .history import merge_trees
from .storage import DEFAULT_KEEP_VERSIONS, DriveStorage, HeadMoved
from .tree import Tree
from .version_blocks import VersionBlocks

log = logging.getLogger(__name__)

BATCH_BYTES = 16 * 1024 * 1024
SMALL_FILE = 4 * 1024 * 1024
# Small files per group, at most: each group costs one commit (an fsync), and enough groups
# remain to keep reading and storing going side by side on trees of thousands of files.
GROUP_FILES = 1024
WORKERS = max(1, min(4, os.cpu_count() or 1))
# Small files the reader has open and announced to the kernel (POSIX_FADV_WILLNEED) ahead of
# the one it reads: the disk then serves many small reads at once instead of one at a time
# (20,000 files with the page cache dropped: 2.9 s -> 0.4 s to read them all, 2-core VM).
READ_AHEAD_FILES = 32
# Large files are read in windows of this size (pread, not mmap: see _large_file); at most
# LARGE_WINDOWS of them, from all large files together, are in memory at once.
READ_WINDOW = 16 * 1024 * 1024
LARGE_WINDOWS = WORKERS + 2
# Reads of a file that changed while it was read, before publish gives up on it.
CHANGED_RETRIES = 3
# Groups of small files read and not yet taken by the storer, at most (memory: BATCH_BYTES each).
IN_FLIGHT_GROUPS = 4
# Small files' blocks the storer gathers into one commit, at most (blocks, ciphertext bytes).
# Block ids are random keys: a commit of B new blocks into a store of P pages per index
# rewrites about min(B, P) pages of each index and waits for them on disk, so small commits
# cost a page write per block per index (10^5 files of 64 bytes in commits of ~1,400 blocks:
# 3.1 GB written, 30 KB a file); commits of this size write each page about once per commit.
STORE_BATCH_BLOCKS = 65536
STORE_BATCH_BYTES = 64 * 1024 * 1024
# Merges a commit redoes when yet another version lands while it merges, before it gives up.
COMMIT_TRIES = 8


@dataclass
class PublishResult:
    cap: WriteCap
    head: Head
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    new_blocks: int = 0
    new_bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    merged_with: int | None = None  # seq of another writer's version the changes joined
    conflicts: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the commit step


async def commit_empty(storage: DriveStorage, cap: WriteCap, device: str) -> Commit:
    """`peerdrive new`: the drive's first version, an empty folder."""
    pending = f"publish-pending:{cap.pubkey.hex()}"
    ref, ct = encrypt_chunk(cap.read_key, encode_dir_leaf([]))
    storage.store.put_pinned(pending, [(ref.block_id, ct)], ids_checked=True,
                             tag=cap.discovery_key)
    root = Entry(b"root", KIND_DIR, 0o755, time.time_ns(), node=ref, nsubdirs=0, nentries=0,
                 total_files=0, total_bytes=0)
    return await commit_version(storage, cap, root, None, device=device,
                                blocks={ref.block_id: len(ct)}, pending_pin=pending)


@dataclass
class Commit:
    """A committed version: its head, and whether it had to join another writer's."""

    head: Head
    merged_with: Head | None = None  # the newer version the tree was rebased onto
    conflicts: list[str] = field(default_factory=list)  # conflict copies made, as paths


async def commit_version(
        storage: DriveStorage, cap: WriteCap, root: Entry, base: Entry | None, *,
        device: str, blocks: dict[bytes, int] | None = None, pending_pin: str | None = None,
        mirrors: list[str] | tuple[str, ...] | None = None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        fetch: Callable[..., Awaitable[bytes]] | None = None,
        lookup: Callable[[], Awaitable[bytes | None]] | None = None) -> Commit:
    """Make the tree under `root` the drive's next version; THE one way a version is made.

    - `root`: the root directory entry of the new tree, every block of which
      (directory nodes, chunk lists, chunks) is already in the store, held
      by `pending_pin` (default `publish-pending:<drive>`), tagged with the
      drive's discovery key.
    - `base`: the root entry of the version this tree was derived from (what
      the writer last saw), or None when unknown (then nothing is removed
      from the newest version: a union).
    - `blocks`: every block of `root`'s tree with its ciphertext size, if the
      caller knows them (a folder publish does); else the tree is walked.
    - `device`: `vfs.merge.device_name` of this node, for conflict names.
    - `lookup`/`fetch`: when the node is on the network, how to ask for the
      drive's newest head and for blocks of another writer's version;
      without them only what the store holds is seen (serve keeps the store
      at the newest head it hears of).

    If the newest head seen is not `base`'s version, another writer
    published meanwhile: the changes base -> root are rebased onto it per
    file (`vfs.history.merge_trees`; a file changed on both sides keeps
    both), and the merged tree is committed. The new head's seq is the
    newest's plus one and its `prev` the newest's id, checked again inside
    the store transaction that saves it: if yet another version arrived in
    between, the merge is redone. `mirrors` None keeps the newest head's.
    Raises BlockUnavailable when a block of the other version cannot be had.
    """
    pending = pending_pin or f"publish-pending:{cap.pubkey.hex()}"
    reader = BlockReader(storage.store, cap.read_key, fetch, tag=cap.discovery_key)
    tree = Tree(reader)
    if lookup is not None:
        wire = await lookup()
        if wire is not None:
            with contextlib.suppress(RollbackError, IntegrityError, FormatError):
                storage.save_head(open_head(wire, cap))

    def store(pairs: list[tuple[bytes, bytes]]) -> None:
        try:
            storage.store.put_pinned(pending, pairs, ids_checked=True, tag=cap.discovery_key)
        except storage.full_errors as exc:
            raise NoSpaceError(f"the device is full while committing a version: {exc}") from exc

    for _ in range(COMMIT_TRIES):
        theirs = storage.load_head(cap)
        merged_root, conflicts, merged_with = root, [], None
        if theirs is not None and theirs.root is not None:
            emitted: list[tuple[bytes, bytes]] = []

            def emit(payload: bytes, emitted: list = emitted) -> Ref:
                ref, ct = encrypt_chunk(cap.read_key, payload)
                emitted.append((ref.block_id, ct))
                return ref

            date = time.strftime("%Y-%m-%d")  # a label in conflict names; orders nothing
            merged = await merge_trees(tree, base, root, theirs.root, emit, device, date)
            if emitted:
                await trio.to_thread.run_sync(store, emitted)
            if merged.root.node != root.node:
                merged_root, conflicts, merged_with = merged.root, merged.conflicts, theirs
        if merged_root is root and blocks is not None:
            sizes = dict(blocks)
        else:
            sizes = await VersionBlocks(tree).sizes(merged_root)
        extra: list[tuple[bytes, bytes]] = []
        if theirs is not None:  # the previous head is a block of the version: `log` walks it
            extra.append((theirs.id, theirs.wire))
            sizes[theirs.id] = len(theirs.wire)
        block_list = build_block_list(sizes, lambda block_id, data, extra=extra: extra.append(
            (block_id, data)))
        await trio.to_thread.run_sync(store, extra)

        def sign(seq: int, last: Head | None, merged_root: Entry = merged_root,
                 block_list: ListRef = block_list) -> Head:
            chosen = mirrors
            if chosen is None:
                chosen = list(last.mirrors) if last is not None else []
            return make_head(cap, seq, merged_root, block_list, mirrors=chosen,
                             prev=None if last is None else last.id)

        try:
            head = await trio.to_thread.run_sync(functools.partial(
                storage.commit_publish, cap, sign, [*sizes, *(i for i, _ in extra)], pending,
                expect=None if theirs is None else theirs.id, keep_versions=keep_versions))
        except HeadMoved:
            log.info("drive %s: another version arrived while committing; merging again",
                     cap.drive_id[:16])
            continue
        if merged_with is not None:
            log.info("drive %s: version %d joins another writer's version %d (%d conflict "
                     "copies)", cap.drive_id[:16], head.seq, merged_with.seq, len(conflicts))
        return Commit(head, merged_with, conflicts)
    raise UsageError(f"drive {cap.drive_id[:16]}: other writers kept publishing while this "
                     f"version was merged ({COMMIT_TRIES} tries); commit again")


@dataclass(frozen=True, slots=True)
class _Listed:
    """What the walk keeps of a name's lstat: an `os.stat_result` holds 19 fields as
    Python objects (612 bytes a file), this 260; a publish keeps one per file until its
    directory node is built (10^6 files: 350 MB less)."""

    st_mode: int
    st_dev: int
    st_ino: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Listed:
        return cls(st.st_mode, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                   st.st_ctime_ns)


@dataclass(slots=True)
class _FileJob:
    path: bytes
    name: bytes
    st: _Listed
    chunks: list[Ref] = field(default_factory=list)


@dataclass
class _DirJob:
    path: bytes
    st: _Listed
    name: bytes
    files: list[_FileJob] = field(default_factory=list)
    links: list[Entry] = field(default_factory=list)
    subdirs: list[_DirJob] = field(default_factory=list)


class Progress:
    """Counts bytes done; the command line draws it, this module never prints."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self._cb = callback
        self._lock = threading.Lock()

    def grow(self, n: int) -> None:
        """More bytes to do: the walk found another file."""
        with self._lock:
            self.total += n

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            done, total = self.done, self.total
        if self._cb is not None:
            self._cb(done, total)


def _read_and_cut(fd: int, offset: int, carry: bytes) -> tuple[bytes, int, list[tuple[int, int]]]:
    """`carry` and the next READ_WINDOW bytes of the file from `offset` (fewer at its end):
    the buffer, the bytes read, and the (offset, length) of its chunks."""
    parts = [carry]
    got = 0
    while got < READ_WINDOW:
        part = os.pread(fd, READ_WINDOW - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    buf = b"".join(parts) if len(parts) > 2 or carry else (parts[1] if got else b"")
    bounds = [(c.offset, c.length) for c in make_chunker().cut_buf(buf)] if buf else []
    return buf, got, bounds


def _same_state(before: os.stat_result | _Listed, after: os.stat_result | _Listed) -> bool:
    return (before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns) == \
        (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _read_fd(fd: int, size: int, path: bytes) -> bytes:
    """The bytes of an open small file listed with `size` bytes, with plain system calls
    (open() builds a buffered reader per file, which shows in the profile of a tree of
    thousands of small files); one read when the size is still right."""
    try:
        data = os.read(fd, size + 1)
        if len(data) == size:  # as listed: no second read to find the end
            return data
        parts = [data]
        while parts[-1]:  # the file grew or shrank since it was listed, or a short read
            parts.append(os.read(fd, 1 << 20))
    except OSError as exc:
        raise UsageError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
    return b"".join(parts)


def _open_regular(path: bytes, listed: _Listed) -> int:
    """Open the file the walk listed at `path`, refusing whatever replaced it since.

    Without O_NONBLOCK a FIFO put in its place (by anyone who can write to the
    folder) would block the open for ever and hang the publish; without
    O_NOFOLLOW a symlink would publish what it points to. And the file opened
    must be the very file listed (same device and inode): a folder above it
    swapped for a symlink would otherwise publish a file from elsewhere on
    the machine under a name of the drive.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise UsageError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (listed.st_dev,
                                                                   listed.st_ino):
        os.close(fd)
        raise UsageError(f"{os.fsdecode(path)} is no longer the file that was listed (it or a "
                         "folder above it was replaced while publishing); publish again")
    return fd


def _list_dir(path: bytes, listed: _Listed,
              follow: bool = False) -> tuple[int, list[tuple[bytes, os.DirEntry[str]]]]:
    """(descriptor, (name, entry) by name) of the folder the walk listed at `path`; the
    names are the bytes the folder stores (encoded once here, not again by the walk).

    Opened with O_NOFOLLOW (`follow` only for the folder the user named) and
    checked against the parent's listing (device and inode), so a folder
    swapped for a symlink while publishing is an error, not a way to publish
    another folder of the machine. The entries' stat and readlink go
    through the descriptor; the caller closes it.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    replaced = UsageError(f"{os.fsdecode(path)} is no longer the folder that was listed (it "
                          "was replaced while publishing); publish again")
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # now a symlink or not a folder
            raise replaced from exc
        raise UsageError(f"cannot read folder {os.fsdecode(path)}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
            raise replaced
        with os.scandir(fd) as it:  # by descriptor, names come as str: keep their bytes
            listing = sorted(((os.fsencode(de.name), de) for de in it), key=_name_of)
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"cannot read folder {os.fsdecode(path)}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd, listing


def _open_ahead(job: _FileJob) -> int:
    """Open a small file and ask the kernel to start reading it (returns at once)."""
    fd = _open_regular(job.path, job.st)
    if job.st.st_size:
        try:
            os.posix_fadvise(fd, 0, job.st.st_size, os.POSIX_FADV_WILLNEED)
        except OSError:  # only a hint
            pass
    return fd


class _SmallFilePipe:
    """Groups of small files go through two stages: read+cut+encrypt, then store.

    One thread reads (the work per file is Python in small pieces between
    system calls: two readers pass the GIL back and forth at every call and
    were no faster, with more CPU). One task stores, gathering the groups
    into large commits (STORE_BATCH_BLOCKS): a commit rewrites the pages of
    the store's indexes it touches and waits for an fsync, so its cost is
    per page, not per block, and its fsync overlaps the reading of the next
    groups. At most IN_FLIGHT_GROUPS groups wait for the storer to take them.
    """

    def __init__(self) -> None:
        self.reader = trio.CapacityLimiter(1)
        self.in_flight = trio.Semaphore(IN_FLIGHT_GROUPS)
        self.send, self.receive = trio.open_memory_channel[tuple[list[tuple[Ref, bytes]], int]](
            IN_FLIGHT_GROUPS)
        # the walk, and the groups and large files whose chunks are not all known yet
        self.unread = 1
        self.all_read = trio.Event()

    def read_one(self) -> None:
        """The walk, a group or a large file has all its chunks (trio thread)."""
        self.unread -= 1
        if self.unread == 0:
            self.all_read.set()


class _Groups:
    """Cuts the files the walk finds into reading jobs as it finds them (walk thread).

    A large file is a job of its own; small files go in walk order into groups
    of up to GROUP_FILES files or about BATCH_BYTES. Each job goes to `start`
    as soon as it is complete, so reading and storing go on while the rest of
    the tree is still listed (20,000 small files: the walk took a fifth of the
    publish, and nothing was read until it ended).
    """

    def __init__(self, start: Callable[[list[_FileJob], bool], None],
                 progress: Progress) -> None:
        self._start = start
        self._progress = progress
        self._group: list[_FileJob] = []
        self._bytes = 0

    def found(self, job: _FileJob) -> None:
        size = job.st.st_size
        self._progress.grow(size)
        if size >= SMALL_FILE:
            self._start([job], True)
            return
        if self._bytes >= BATCH_BYTES or len(self._group) >= GROUP_FILES:
            self._start(self._group, False)
            self._group, self._bytes = [], 0
        self._group.append(job)
        self._bytes += size

    def finish(self) -> None:
        """The walk has ended: start the last group."""
        if self._group:
            self._start(self._group, False)
            self._group, self._bytes = [], 0


class Publisher:
    """Publishes one folder into one drive on one node's store."""

    def __init__(self, storage: DriveStorage, cap: WriteCap, source: Path,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_warning: Callable[[str], None] | None = None,
                 mirrors: list[str] | None = None, *, device: str = "unknown",
                 keep_versions: int = DEFAULT_KEEP_VERSIONS) -> None:
        self.storage = storage
        self.cap = cap
        self.source = source
        self.device = device
        self.keep_versions = keep_versions
        # base URLs of static mirrors for the head; None keeps the last version's
        self.mirrors = mirrors
        self._on_progress = on_progress
        self._warn = on_warning or (lambda msg: None)
        self._stats_lock = threading.Lock()
        self._new_blocks = 0
        self._new_bytes = 0
        self._sizes: dict[bytes, int] = {}  # every block of the version -> ciphertext length
        self._pending_pin = f"publish-pending:{cap.pubkey.hex()}"
        self._emitted: list[tuple[Ref, bytes]] = []  # metadata blocks not yet stored
        self._emitted_bytes = 0
        self._windows = trio.Semaphore(LARGE_WINDOWS)  # large-file windows in memory

    # -- walking -------------------------------------------------------------------

    def _walk(self, path: bytes, name: bytes, st: _Listed, skipped: list[str],
              found: Callable[[_FileJob], None]) -> _DirJob:
        """List one folder and everything below it (one lstat per name); every regular file
        also goes to `found`, in walk order (the files of a folder together, as a disk tends
        to hold them).

        Iterative, not recursive: a folder nested a thousand deep is as good as any
        (Python's recursion limit stopped a recursive walk near 600). Paths are
        bytes: names come back as the bytes the entries store, with no encoding
        per name.
        """
        top = _DirJob(path, st, name)
        stack = [top]
        while stack:
            job = stack.pop()
            # listed through a descriptor of the very folder its parent listed: a folder
            # swapped for a symlink meanwhile is refused, never followed elsewhere
            fd, listing = _list_dir(job.path, job.st, follow=job is top)
            try:
                for bname, de in listing:
                    epath = job.path + b"/" + bname
                    try:
                        check_name(bname)
                        cst = de.stat(follow_symlinks=False)
                        mode = cst.st_mode
                        if stat.S_ISLNK(mode):
                            target = os.readlink(bname, dir_fd=fd)
                    except Exception as exc:  # a name we cannot represent or a file that vanished
                        skipped.append(f"{os.fsdecode(epath)}: {exc}")
                        continue
                    if stat.S_ISREG(mode):
                        file_job = _FileJob(epath, bname, _Listed.of(cst))
                        job.files.append(file_job)
                        found(file_job)
                    elif stat.S_ISDIR(mode):
                        job.subdirs.append(_DirJob(epath, _Listed.of(cst), bname))
                    elif stat.S_ISLNK(mode):
                        job.links.append(Entry(bname, KIND_LINK, stat.S_IMODE(mode),
                                               cst.st_mtime_ns, size=len(target), target=target))
                    else:
                        skipped.append(f"{os.fsdecode(epath)}: not a regular file, folder or "
                                       "symlink (skipped)")
            finally:
                os.close(fd)
            stack.extend(reversed(job.subdirs))
        return top

    # -- storing -------------------------------------------------------------------

    def _store_blocks(self, blocks: list[tuple[Ref, bytes]]) -> None:
        """Pin and store encrypted blocks in one commit (runs in a worker thread)."""
        unique = {ref.block_id: ct for ref, ct in blocks}
        try:
            # encrypt_chunk hashed every block: the store need not hash them again
            new = self.storage.store.put_pinned(self._pending_pin, unique.items(),
                                                ids_checked=True, tag=self.cap.discovery_key)
        except self.storage.full_errors as exc:
            raise NoSpaceError(f"the device is full while publishing: {exc}") from exc
        new_bytes = sum(len(unique[block_id]) for block_id in new)
        with self._stats_lock:
            self._new_blocks += len(new)
            self._new_bytes += new_bytes
            for block_id, ct in unique.items():
                self._sizes[block_id] = len(ct)

    def _emit(self, payload: bytes) -> Ref:
        """Encrypt a metadata block (a chunk list or a directory node) and queue it for storing.

        Only the tree walk emits (one worker thread); the queue is stored in
        batches by `_flush_emitted`, so a tree of many folders costs a commit
        per batch rather than per folder. Everything is stored before the
        head is made.
        """
        ref, ct = encrypt_chunk(self.cap.read_key, payload)
        self._emitted.append((ref, ct))
        self._emitted_bytes += len(ct)
        if self._emitted_bytes >= BATCH_BYTES:
            self._flush_emitted()
        return ref

    def _flush_emitted(self) -> None:
        blocks, self._emitted, self._emitted_bytes = self._emitted, [], 0
        if blocks:
            self._store_blocks(blocks)

    def _root_entry(self, root: _DirJob, result: PublishResult) -> Entry:
        entry = self._dir_entry(root, result)
        self._flush_emitted()
        return entry

    def _encrypt_views(self, views: list[memoryview]) -> list[Ref]:
        blocks = [encrypt_chunk(self.cap.read_key, v) for v in views]
        self._store_blocks(blocks)
        return [ref for ref, _ in blocks]

    async def _small_files(self, jobs: list[_FileJob], pipe: _SmallFilePipe,
                           send: trio.MemorySendChannel[tuple[list[tuple[Ref, bytes]], int]],
                           ) -> None:
        """Read, cut and encrypt a group of small files, and hand its blocks to the storer."""
        async with send:
            await pipe.in_flight.acquire()  # released by the storer once they are stored
            blocks, done = await trio.to_thread.run_sync(self._read_small_files, jobs,
                                                         limiter=pipe.reader)
            pipe.read_one()
            await send.send((blocks, done))

    async def _store_small_files(self, pipe: _SmallFilePipe, progress: Progress) -> None:
        """Store the groups read, in commits of up to STORE_BATCH_BLOCKS blocks (or
        STORE_BATCH_BYTES), until the last is in.

        A group's slot is given back as soon as its blocks are taken here, so the
        reader goes on while a large commit is written; what waits for a commit is
        bounded by the batch limits plus IN_FLIGHT_GROUPS groups.
        """
        batch: list[tuple[Ref, bytes]] = []
        batch_bytes = batch_done = 0

        async def commit() -> None:
            nonlocal batch, batch_bytes, batch_done
            blocks, done = batch, batch_done
            batch, batch_bytes, batch_done = [], 0, 0
            await trio.to_thread.run_sync(self._store_blocks, blocks)
            progress.add(done)

        async with pipe.receive:
            async for blocks, done in pipe.receive:
                batch.extend(blocks)
                batch_bytes += sum(len(ct) for _, ct in blocks)
                batch_done += done
                pipe.in_flight.release()
                if len(batch) >= STORE_BATCH_BLOCKS or batch_bytes >= STORE_BATCH_BYTES:
                    await commit()
            if batch:
                await commit()

    def _read_small_files(self, jobs: list[_FileJob]) -> tuple[list[tuple[Ref, bytes]], int]:
        """Read, cut and encrypt a group of small files: their blocks and their bytes read.

        The next READ_AHEAD_FILES files are open and announced to the kernel
        while one is read, so a cold disk works on many at once.
        """
        key = self.cap.read_key
        cut = make_chunker().cut_buf
        blocks: list[tuple[Ref, bytes]] = []
        done = 0
        ahead: deque[tuple[_FileJob, int]] = deque()
        upcoming = iter(jobs)
        try:
            for job in upcoming:
                ahead.append((job, _open_ahead(job)))
                if len(ahead) >= READ_AHEAD_FILES:
                    break
            while ahead:
                job, fd = ahead.popleft()
                try:
                    data = _read_fd(fd, job.st.st_size, job.path)
                finally:
                    os.close(fd)
                for nxt in upcoming:  # keep the window full
                    ahead.append((nxt, _open_ahead(nxt)))
                    break
                if len(data) <= CDC_MIN:  # FastCDC never cuts below its minimum: one chunk
                    if data:
                        ref_ct = encrypt_chunk(key, data)
                        blocks.append(ref_ct)
                        job.chunks = [ref_ct[0]]
                else:
                    encrypted = [encrypt_chunk(key, c.data) for c in cut(data)]
                    job.chunks = [ref for ref, _ in encrypted]
                    blocks.extend(encrypted)
                done += len(data)
        finally:
            for _, fd in ahead:
                os.close(fd)
        return blocks, done

    async def _large_file(self, job: _FileJob, progress: Progress,
                          limiter: trio.CapacityLimiter) -> None:
        """Cut and encrypt one large file, read in windows with pread.

        Not an mmap: a file truncated by another process while it is mapped
        kills the reader with SIGBUS, and a publish must survive any folder
        being written to. A file whose size, mtime or inode changed while it
        was read (or that read short) is read again, up to CHANGED_RETRIES
        times, so its entry always describes one consistent state of it.
        """
        for _ in range(CHANGED_RETRIES + 1):
            fd = _open_regular(job.path, job.st)
            try:
                before = os.fstat(fd)
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                chunks, length = await self._cut_file(fd, job, progress, limiter)
                after = os.fstat(fd)
            finally:
                os.close(fd)
            if length == after.st_size and _same_state(before, after):
                job.chunks = chunks
                job.st = _Listed.of(after)
                return
        raise UsageError(f"{os.fsdecode(job.path)} kept changing while it was published "
                         f"({CHANGED_RETRIES + 1} reads); publish again once nothing writes to it")

    async def _cut_file(self, fd: int, job: _FileJob, progress: Progress,
                        limiter: trio.CapacityLimiter) -> tuple[list[Ref], int]:
        """(chunks, bytes read) of the open file: windows cut in one thread each, their chunks
        encrypted in batches on every core while the next window is read.

        FastCDC cuts a chunk from where it starts up to at most CDC_MAX bytes,
        so a window's last chunk (cut short by the window's end) is carried
        into the next window and cut again: the chunks are exactly those of
        one cut over the whole file.
        """
        results: list[list[Ref]] = []
        offset = 0
        carry = b""
        async with trio.open_nursery() as nursery:
            while True:
                await self._windows.acquire()  # released once the window's batches are stored
                try:
                    buf, got, bounds = await trio.to_thread.run_sync(
                        _read_and_cut, fd, offset, carry, limiter=limiter)
                except BaseException:
                    self._windows.release()
                    raise
                offset += got
                eof = got < READ_WINDOW
                if not eof and len(bounds) > 1:
                    keep = bounds[:-1]
                    carry = buf[bounds[-1][0]:]
                else:
                    keep, carry = bounds, b""
                batches: list[list[tuple[int, int]]] = [[]]
                acc = 0
                for b in keep:
                    if acc >= BATCH_BYTES:
                        batches.append([])
                        acc = 0
                    batches[-1].append(b)
                    acc += b[1]
                batches = [b for b in batches if b]
                if not batches:
                    self._windows.release()
                left = [len(batches)]

                async def run_batch(slot: int, buf: bytes, batch: list[tuple[int, int]],
                                    left: list[int]) -> None:
                    try:
                        view = memoryview(buf)
                        views = [view[o:o + n] for o, n in batch]
                        try:
                            results[slot] = await trio.to_thread.run_sync(
                                self._encrypt_views, views, limiter=limiter)
                        finally:
                            for v in views:
                                v.release()
                            view.release()
                        progress.add(sum(n for _, n in batch))
                    finally:
                        left[0] -= 1
                        if left[0] == 0:
                            self._windows.release()

                for batch in batches:
                    results.append([])
                    nursery.start_soon(run_batch, len(results) - 1, buf, batch, left)
                if eof:
                    break
        return [r for batch in results for r in batch], offset

    def _file_entry(self, job: _FileJob) -> Entry:
        size = sum(r.length for r in job.chunks)
        mode = stat.S_IMODE(job.st.st_mode)
        if len(job.chunks) <= MAX_INLINE_CHUNKS:
            return Entry(job.name, KIND_FILE, mode, job.st.st_mtime_ns,
                         size=size, chunks=tuple(job.chunks))
        lists = []
        for part in split_chunk_list(job.chunks):
            ref = self._emit(encode_chunk_list(part))
            lists.append(ChunkListRef(ref, len(part), sum(r.length for r in part)))
        return Entry(job.name, KIND_FILE, mode, job.st.st_mtime_ns,
                     size=size, chunk_lists=tuple(lists))

    def _dir_entry(self, top: _DirJob, result: PublishResult) -> Entry:
        """The entry of folder `top`, its directory nodes built bottom up (subfolders first).

        Iterative (an explicit stack, each folder visited twice: once to push its
        subfolders, once to build it from their entries), so depth is not bounded
        by Python's recursion limit.
        """
        built: dict[int, Entry] = {}
        stack: list[tuple[_DirJob, bool]] = [(top, False)]
        while stack:
            job, ready = stack.pop()
            if not ready:
                stack.append((job, True))
                stack.extend((d, False) for d in job.subdirs)
                continue
            entries = [self._file_entry(f) for f in job.files] + list(job.links)
            entries += [built.pop(id(d)) for d in job.subdirs]
            result.files += len(job.files)
            result.dirs += 1
            ref = build_directory(entries, self._emit)
            files, size = dir_totals(entries)
            built[id(job)] = Entry(job.name, KIND_DIR, stat.S_IMODE(job.st.st_mode),
                                   job.st.st_mtime_ns, node=ref, nsubdirs=len(job.subdirs),
                                   nentries=len(entries), total_files=files, total_bytes=size)
        return built[id(top)]

    # -- the whole publish -----------------------------------------------------------

    async def run(self) -> PublishResult:
        if not self.source.is_dir():
            raise UsageError(f"{self.source} is not a folder")
        skipped: list[str] = []
        source = os.fsencode(self.source)
        st = _Listed.of(os.stat(source))
        progress = Progress(0, self._on_progress)  # the total grows as the walk finds files
        limiter = trio.CapacityLimiter(WORKERS)
        pipe = _SmallFilePipe()
        result = PublishResult(self.cap, head=None)  # type: ignore[arg-type]

        async def large_file(job: _FileJob) -> None:
            await self._large_file(job, progress, limiter)
            pipe.read_one()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._store_small_files, pipe, progress)

            def start(group: list[_FileJob], large: bool) -> None:
                """Start reading a group the walk completed (trio thread)."""
                pipe.unread += 1
                if large:
                    nursery.start_soon(large_file, group[0])
                else:
                    nursery.start_soon(self._small_files, group, pipe, pipe.send.clone())

            groups = _Groups(lambda group, large: trio.from_thread.run_sync(start, group, large),
                             progress)

            def walk() -> _DirJob:
                top = self._walk(source, b"root", st, skipped, groups.found)
                groups.finish()
                return top

            async with pipe.send:  # the storer stops once every group's clone is closed
                # reading starts with the first group the walk completes, not after the walk
                root = await trio.to_thread.run_sync(walk)
            for msg in skipped:
                self._warn(msg)
            pipe.read_one()  # the walk: every group is started
            # once every chunk is known the directory nodes can be made, while the last
            # groups are still being stored
            await pipe.all_read.wait()
            root_entry = await trio.to_thread.run_sync(self._root_entry, root, result)
        result.bytes = progress.done
        result.skipped = skipped
        committed = await commit_version(
            self.storage, self.cap, root_entry, self._folder_base(), device=self.device,
            blocks=self._sizes, pending_pin=self._pending_pin, mirrors=self.mirrors,
            keep_versions=self.keep_versions)
        assert root_entry.node is not None
        # the next publish of this folder rebases from this tree, merged or not; a merged
        # version does not hold it, so its own pin keeps it then
        self.storage.set_folder_base(self.cap.pubkey, root_entry.node,
                                     list(self._sizes) if committed.merged_with else None)
        result.head = committed.head
        result.merged_with = committed.merged_with.seq if committed.merged_with else None
        result.conflicts = committed.conflicts
        result.new_blocks = self._new_blocks
        result.new_bytes = self._new_bytes
        return result

    def _folder_base(self) -> Entry | None:
        """The tree this folder had when it was last published: what its changes are
        relative to. A drive from before version history (its head names no previous
        version and the folder no base) was only ever published from here: its head."""
        ref = self.storage.folder_base(self.cap.pubkey)
        if ref is not None:
            return Entry(b"root", KIND_DIR, 0o755, 0, node=ref)
        local = self.storage.load_head(self.cap)
        if local is not None and local.version < 3:
            return local.root
        return None


def _name_of(named: tuple[bytes, os.DirEntry[str]]) -> bytes:
    return named[0]
