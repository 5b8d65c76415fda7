"""Giving freed memory back to the system: what a long-running mount frees, it returns.

A mount of a large drive allocates in waves: a `find` makes an inode per
name, the kernel forgets them later; a pin or an evict of a big folder goes
through every directory's summary; a new version replaces entries. Python
frees the objects, but glibc keeps the freed chunks in its heaps (the main
one and one per worker thread) for reuse, so the resident set stays at the
high-water mark long after the work is done: measured on a mount of 10^5
files, about 95 MB of live Python objects against 240 MB anonymous RSS.

Two things bound that, both in this process (a user sets nothing):

- `limit_arenas`: glibc gives each thread that calls malloc while the
  others hold theirs an arena of its own (up to 8 per core), and memory
  freed in one is never reused by another. Our worker threads (hashing,
  decrypting, store transactions) are short calls; two arenas are plenty
  (a cold 512 MiB read: peak anonymous memory 185-215 -> 135-155 MB, same
  speed). A user's own `MALLOC_ARENA_MAX` wins.
- `Releaser`: the places that free a lot at once (the kernel forgetting
  inodes, an evict, a version switch, summaries dropped; in a serve, each
  new version published or hosted) say how much they
  freed; once enough has been freed since the last time, `malloc_trim(0)`
  hands the free pages of every heap back (it also releases pages inside a
  heap, not only at its top). It runs in a worker thread, at most once per
  `MIN_INTERVAL` seconds, so a burst of frees costs one trim.

Neither changes what the process computes; on a C library without these
calls (not glibc) both do nothing.

What the mount must keep but rarely reads goes to a `Spill`: an unlinked
file whose pages the kernel's page cache holds, writes back and drops
under pressure, instead of the process's anonymous memory (which nothing
but the process can free). The folder summaries' block ids, 36 bytes a
block, are that: 36 MB at 10^6 small files, read once per recount, pin or
evict of a folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
import weakref

import trio

log = logging.getLogger(__name__)

# mallopt's parameter number for the most arenas glibc makes (malloc.h: M_ARENA_MAX)
M_ARENA_MAX = -8
ARENAS = 2
# Freed items (inodes, blocks, summaries) after which a trim is worth its cost.
TRIM_AFTER = 4096
# Seconds between two trims at least: a trim walks every heap (a few ms per 100 MB).
MIN_INTERVAL = 5.0


def _glibc():
    """glibc's handle, or None when the C library is another one (musl has no trim)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC = _glibc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas in this process (call before threads start).

    A user's own `MALLOC_ARENA_MAX` wins: glibc read it at start-up, and a
    mallopt here would override it, so nothing is changed then (False)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _LIBC is not None and _LIBC.mallopt(M_ARENA_MAX, arenas) == 1


def trim() -> bool:
    """Return the free pages of every malloc heap to the system; whether any were."""
    return _LIBC is not None and _LIBC.malloc_trim(0) == 1


class Releaser:
    """Trims the heaps once enough has been freed: `freed(n)` from wherever memory goes."""

    def __init__(self, after: int = TRIM_AFTER, min_interval: float = MIN_INTERVAL) -> None:
        self.after = after
        self.min_interval = min_interval
        self.pending = 0  # items freed since the last trim
        self.trims = 0  # trims done (what the tests look at)
        self._due = trio.Event()

    def freed(self, n: int) -> None:
        """`n` items (inodes, blocks, summaries) were just let go."""
        if n <= 0:
            return
        self.pending += n
        if self.pending >= self.after:
            self._due.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await self._due.wait()
            self._due = trio.Event()
            self.pending = 0
            await trio.to_thread.run_sync(trim)
            self.trims += 1
            await trio.sleep(self.min_interval)
            if self.pending >= self.after:
                self._due.set()


class Spill:
    """Records kept in an unlinked file in `directory` (the page cache's, not this
    process's memory); `put` gives a handle, `get` the bytes back.

    Append-only: `dropped` counts the bytes of records let go, and whoever keeps
    the handles copies the live ones to a new Spill once that is most of the file
    (`worth_compacting`). A record the file cannot take (no directory given, a
    full disk, any error) is kept in memory as it is: a spill never fails a
    caller, it only costs it memory then. Only for one thread at a time (the
    event loop: a read is a `pread` of a few KB the page cache mostly has).
    """

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self._fd = -1
        self.end = 0  # bytes written to the file
        self.dropped = 0  # bytes of those no longer referred to
        self.in_memory = 0  # bytes of records kept in memory (the file refused them)
        if directory is not None:
            try:
                f = tempfile.TemporaryFile(dir=directory, prefix=".spill-")
            except OSError as exc:
                log.info("no spill file in %s (%s): kept in memory", directory, exc)
            else:
                self._fd = os.dup(f.fileno())
                f.close()
                weakref.finalize(self, os.close, self._fd)

    def put(self, data: bytes) -> int | bytes:
        """Keep `data`; the handle to `get` it with (the bytes themselves if not spilled)."""
        if self._fd < 0 or not data:
            self.in_memory += len(data)
            return data
        try:
            written = os.pwrite(self._fd, data, self.end)
        except OSError:  # ENOSPC, EIO: memory, as before the spill
            written = -1
        if written != len(data):
            self.in_memory += len(data)
            return data
        at = self.end
        self.end += len(data)
        return at

    def get(self, handle: int | bytes, length: int) -> bytes:
        if isinstance(handle, bytes):
            return handle
        data = os.pread(self._fd, length, handle)
        if len(data) != length:
            raise OSError(f"spill file: {len(data)} of {length} bytes at {handle}")
        return data

    def drop(self, handle: int | bytes, length: int) -> None:
        """The record is no longer needed (its bytes stay in the file until compacted)."""
        if isinstance(handle, bytes):
            self.in_memory -= len(handle)
        else:
            self.dropped += length

    def worth_compacting(self, floor: int = 4 * 1024 * 1024) -> bool:
        return self.dropped > floor and self.dropped * 2 > self.end
