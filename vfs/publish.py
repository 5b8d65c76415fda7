"""Publishing a folder as a new version of a drive.

The walk (one pass of lstat over the tree) is cheap; the work is cutting,
hashing, encrypting and storing the file contents. That runs in worker
threads (hashlib and AES-GCM release the GIL), a bounded number at a time so
memory stays bounded, while the trio task only schedules. Large files are cut
once (FastCDC over an mmap) and their chunks are encrypted in batches on
both cores; small files are grouped so thousands of them do not pay one
thread hop each.

Every block of the new version goes into the node's store under the drive's
publish pin, so the publisher keeps seeding it and eviction never removes it.
A version shares every unchanged block with the last one: `new_blocks` and
`new_bytes` count what this publish actually added.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .capability import WriteCap
from .chunker import CDC_MIN, make_chunker
from .crypto import Ref, encrypt_chunk
from .errors import NoSpaceError, UsageError
from .formats import (
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    MAX_INLINE_CHUNKS,
    ChunkListRef,
    Entry,
    build_directory,
    check_name,
    encode_chunk_list,
    split_chunk_list,
)
from .head import Head, make_head
from .storage import DriveStorage

BATCH_BYTES = 16 * 1024 * 1024
SMALL_FILE = 4 * 1024 * 1024
# Small files per group, at most: each group costs two commits (an fsync each), and enough
# groups remain for every worker on trees of thousands of files.
GROUP_FILES = 1024
WORKERS = max(1, min(4, os.cpu_count() or 1))


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


@dataclass
class _FileJob:
    path: Path
    st: os.stat_result
    chunks: list[Ref] = field(default_factory=list)


@dataclass
class _DirJob:
    path: Path
    st: os.stat_result
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

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        if self._cb is not None:
            self._cb(done, self.total)


def _read_small(path: Path, size: int) -> bytes:
    """A small file's bytes, with plain system calls (open() builds a buffered reader per file,
    which shows in the profile of a tree of thousands of small files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            parts = [os.read(fd, size + 1)]
            while parts[-1]:  # the file grew since it was listed, or a short read
                parts.append(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return parts[0] if len(parts) == 2 else b"".join(parts)


class Publisher:
    """Publishes one folder into one drive on one node's store."""

    def __init__(self, storage: DriveStorage, cap: WriteCap, source: Path,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_warning: Callable[[str], None] | None = None) -> None:
        self.storage = storage
        self.cap = cap
        self.source = source
        self._on_progress = on_progress
        self._warn = on_warning or (lambda msg: None)
        self._stats_lock = threading.Lock()
        self._put_lock = threading.Lock()
        self._new_blocks = 0
        self._new_bytes = 0
        self._all_ids: set[bytes] = set()
        self._pending_pin = f"publish-pending:{cap.pubkey.hex()}"
        self._emitted: list[tuple[Ref, bytes]] = []  # metadata blocks not yet stored
        self._emitted_bytes = 0

    # -- walking -------------------------------------------------------------------

    def _walk(self, path: Path, name: bytes, st: os.stat_result, skipped: list[str]) -> _DirJob:
        job = _DirJob(path, st, name)
        try:
            it = sorted(os.scandir(path), key=lambda d: os.fsencode(d.name))
        except OSError as exc:
            raise UsageError(f"cannot read folder {path}: {exc.strerror}") from exc
        for de in it:
            child = Path(de.path)
            bname = os.fsencode(de.name)
            try:
                check_name(bname)
                cst = os.lstat(child)
            except Exception as exc:  # a name we cannot represent or a file that vanished
                skipped.append(f"{child}: {exc}")
                continue
            if stat.S_ISREG(cst.st_mode):
                job.files.append(_FileJob(child, cst))
            elif stat.S_ISDIR(cst.st_mode):
                job.subdirs.append(self._walk(child, bname, cst, skipped))
            elif stat.S_ISLNK(cst.st_mode):
                target = os.fsencode(os.readlink(child))
                job.links.append(Entry(bname, KIND_LINK, stat.S_IMODE(cst.st_mode),
                                       cst.st_mtime_ns, size=len(target), target=target))
            else:
                skipped.append(f"{child}: not a regular file, folder or symlink (skipped)")
        return job

    # -- storing -------------------------------------------------------------------

    def _store_blocks(self, blocks: list[tuple[Ref, bytes]]) -> None:
        """Store encrypted blocks under the pending pin (runs in a worker thread)."""
        ids = [ref.block_id for ref, _ in blocks]
        try:
            store = self.storage.store
            unique = {ref.block_id: ct for ref, ct in blocks}
            store.add_to_pin(self._pending_pin, unique)
            with self._put_lock:  # "missing" and the put as one step among our workers
                missing = set(store.missing(unique))
                # one commit for the whole batch; encrypt_chunk hashed every block
                store.put_many(unique.items(), ids_checked=True)
            new_blocks = len(missing)
            new_bytes = sum(len(unique[bid]) for bid in missing)
        except self.storage.full_errors as exc:
            raise NoSpaceError(f"the device is full while publishing: {exc}") from exc
        with self._stats_lock:
            self._new_blocks += new_blocks
            self._new_bytes += new_bytes
            self._all_ids.update(ids)

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

    def _small_files(self, jobs: list[_FileJob], progress: Progress) -> None:
        """Read, cut and encrypt a group of small files, then store all their blocks at once.

        One pin update and one commit (one fsync each) for the whole group,
        not for every file: with thousands of small files the commits were
        most of the time.
        """
        chunker = make_chunker()
        blocks: list[tuple[Ref, bytes]] = []
        done = 0
        for job in jobs:
            data = _read_small(job.path, job.st.st_size)
            if len(data) <= CDC_MIN:  # FastCDC never cuts below its minimum: one chunk
                encrypted = [encrypt_chunk(self.cap.read_key, data)] if data else []
            else:
                encrypted = [encrypt_chunk(self.cap.read_key, c.data)
                             for c in chunker.cut_buf(data)]
            job.chunks = [ref for ref, _ in encrypted]
            blocks.extend(encrypted)
            done += len(data)
        self._store_blocks(blocks)
        progress.add(done)

    async def _large_file(self, job: _FileJob, progress: Progress,
                          limiter: trio.CapacityLimiter) -> None:
        try:
            f = open(job.path, "rb")  # noqa: SIM115 - closed below, after every view is gone
        except OSError as exc:
            raise UsageError(f"cannot read {job.path}: {exc.strerror}") from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with contextlib.suppress(OSError):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            try:
                await self._cut_and_encrypt(job, memoryview(mm), progress, limiter)
            finally:
                mm.close()

    async def _cut_and_encrypt(self, job: _FileJob, data: memoryview, progress: Progress,
                               limiter: trio.CapacityLimiter) -> None:
        """Cut in one thread, encrypt batches on every core, keep the chunk order."""
        bounds: list[tuple[int, int]] = await trio.to_thread.run_sync(
            lambda: [(c.offset, c.length) for c in make_chunker().cut_buf(data)],
            limiter=limiter)
        batches: list[list[tuple[int, int]]] = [[]]
        acc = 0
        for b in bounds:
            if acc >= BATCH_BYTES:
                batches.append([])
                acc = 0
            batches[-1].append(b)
            acc += b[1]
        results: list[list[Ref]] = [[] for _ in batches]

        async def run_batch(i: int) -> None:
            views = [data[o:o + n] for o, n in batches[i]]
            try:
                results[i] = await trio.to_thread.run_sync(self._encrypt_views, views,
                                                           limiter=limiter)
            finally:
                for v in views:
                    v.release()
            progress.add(sum(n for _, n in batches[i]))

        async with trio.open_nursery() as nursery:
            for i in range(len(batches)):
                nursery.start_soon(run_batch, i)
        job.chunks = [r for batch in results for r in batch]
        data.release()

    def _file_entry(self, job: _FileJob) -> Entry:
        size = sum(r.length for r in job.chunks)
        mode = stat.S_IMODE(job.st.st_mode)
        if len(job.chunks) <= MAX_INLINE_CHUNKS:
            return Entry(os.fsencode(job.path.name), KIND_FILE, mode, job.st.st_mtime_ns,
                         size=size, chunks=tuple(job.chunks))
        lists = []
        for part in split_chunk_list(job.chunks):
            ref = self._emit(encode_chunk_list(part))
            lists.append(ChunkListRef(ref, len(part), sum(r.length for r in part)))
        return Entry(os.fsencode(job.path.name), KIND_FILE, mode, job.st.st_mtime_ns,
                     size=size, chunk_lists=tuple(lists))

    def _dir_entry(self, job: _DirJob, result: PublishResult) -> Entry:
        entries = [self._file_entry(f) for f in job.files] + list(job.links)
        entries += [self._dir_entry(d, result) for d in job.subdirs]
        result.files += len(job.files)
        result.dirs += 1
        ref = build_directory(entries, self._emit)
        return Entry(job.name, KIND_DIR, stat.S_IMODE(job.st.st_mode), job.st.st_mtime_ns,
                     node=ref, nsubdirs=len(job.subdirs), nentries=len(entries))

    # -- the whole publish -----------------------------------------------------------

    async def run(self) -> PublishResult:
        if not self.source.is_dir():
            raise UsageError(f"{self.source} is not a folder")
        skipped: list[str] = []
        st = os.stat(self.source)
        root = await trio.to_thread.run_sync(self._walk, self.source, b"root", st, skipped)
        for msg in skipped:
            self._warn(msg)

        all_files: list[_FileJob] = []
        stack = [root]
        while stack:
            d = stack.pop()
            all_files.extend(d.files)
            stack.extend(d.subdirs)
        progress = Progress(sum(f.st.st_size for f in all_files), self._on_progress)
        limiter = trio.CapacityLimiter(WORKERS)

        small_groups: list[list[_FileJob]] = [[]]
        acc = 0
        large: list[_FileJob] = []
        for f in all_files:
            if f.st.st_size >= SMALL_FILE:
                large.append(f)
                continue
            if acc >= BATCH_BYTES or len(small_groups[-1]) >= GROUP_FILES:
                small_groups.append([])
                acc = 0
            small_groups[-1].append(f)
            acc += f.st.st_size

        async with trio.open_nursery() as nursery:
            for group in small_groups:
                if group:
                    nursery.start_soon(lambda g=group: trio.to_thread.run_sync(
                        self._small_files, g, progress, limiter=limiter))
            for f in large:
                nursery.start_soon(self._large_file, f, progress, limiter)

        result = PublishResult(self.cap, head=None)  # type: ignore[arg-type]
        root_entry = await trio.to_thread.run_sync(self._root_entry, root, result)
        result.bytes = progress.done
        result.skipped = skipped
        seq = self.storage.next_seq(self.cap)
        head = make_head(self.cap, seq, root_entry)
        self.storage.commit_publish(self.cap, head, self._all_ids, self._pending_pin)
        result.head = head
        result.new_blocks = self._new_blocks
        result.new_bytes = self._new_bytes
        return result
