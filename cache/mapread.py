"""Read ahead in the store file for a stream of large values, as the kernel would for a file.

LMDB hands out values as views into its map of data.mdb, and py-lmdb touches
every page of a value before returning it, so a cold value is one page fault
per 4 KiB page (the map is MADV_RANDOM: read-around on a fault was measured
far slower still). On the machines we measured, 256 KiB that way took ~4 ms,
while the same bytes read ahead with posix_fadvise(WILLNEED) and then touched
took ~0.2 ms. Blocks are stored in the order they were published or fetched,
so the blocks of one file sit one after another in data.mdb: once a read
lands right after the previous one, `StoreReadahead` asks the kernel for the
next window of the file, and the following reads find their pages resident.

Only where a view lives in the file is needed: the view's address, and the
mapping of data.mdb that contains it (from /proc/self/maps, checked against
the file's device and inode). Anything unexpected (no /proc, a view that is
not in a mapping of this file) only means no readahead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from dataclasses import dataclass


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer (stable since 3.3); only `buf` is used
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


def buffer_address(view: memoryview) -> int:
    """The address of the first byte of a contiguous buffer."""
    buf = _PyBuffer()
    _get_buffer(view, ctypes.byref(buf), 0)  # PyBUF_SIMPLE: read-only views are fine
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))


_NODE_HEADER = struct.Struct("<HHHH")  # LMDB's MDB_node: mn_lo, mn_hi, mn_flags, mn_ksize
_PGNO = struct.Struct("<Q")  # pgno_t on 64-bit builds
_F_BIGDATA = 0x01  # the node's data is the number of its first overflow page
_KNOWN_FLAGS = 0x07  # F_BIGDATA | F_SUBDATA | F_DUPDATA
_PAGE_HEADER = 16  # PAGEHDRSZ: an overflow page's data starts after it


def overflow_extent(key: memoryview, page_size: int) -> tuple[int, int] | None:
    """Where in data.mdb a record's value lies, read from its leaf node without touching it.

    `key` is the key of the record a cursor stands on, as py-lmdb returns it
    with buffers=True: a view into the leaf page, right after the node's
    8-byte header. A value too big for the leaf (F_BIGDATA) is stored on
    consecutive overflow pages; the node holds its size and the number of
    its first page, and the map starts at file offset 0, so the value is at
    page * page_size + 16 in the file. Only the leaf page is read (the
    lookup has already faulted it in). Returns (offset, length), or None for
    a value stored in the leaf or a node that does not look as expected:
    the result is only a hint for the kernel, never used to read bytes.
    """
    addr = buffer_address(key)
    if not addr:
        return None
    lo, hi, flags, ksize = _NODE_HEADER.unpack(ctypes.string_at(addr - 8, 8))
    if not flags & _F_BIGDATA or flags & ~_KNOWN_FLAGS or ksize != len(key):
        return None
    (pgno,) = _PGNO.unpack(ctypes.string_at(addr + ksize, 8))
    return pgno * page_size + _PAGE_HEADER, lo | (hi << 16)


@dataclass(frozen=True)
class _Region:
    start: int
    end: int
    file_offset: int  # offset in the file of `start`


class StoreReadahead:
    """Asks the kernel to read ahead in one mapped file when values are read in file order."""

    def __init__(self, path: str, window: int = 8 * 1024 * 1024,
                 slack: int = 16 * 1024 * 1024) -> None:
        self.path = path
        self.window = window
        self.slack = slack  # reads this close to the last one still count as in order
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._dev = (os.major(st.st_dev), os.minor(st.st_dev))
        self._ino = st.st_ino
        self._region: _Region | None = None  # where offsets are looked up (a hint only)
        self._mapping: _Region | None = None  # what `release` advises; see forget_mapping
        self._lock = threading.Lock()
        self._last_end = -1  # file offset just past the last value read
        self._ahead_until = 0  # file offset up to which readahead was already asked
        self.windows = 0  # readahead requests made (for tests and benchmarks)
        self.hints = 0  # single values asked for by will_need (for tests and benchmarks)
        self.release_every = 4 * 1024 * 1024  # bytes read between two unmaps
        self._read_since_release = 0
        self.releases = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def will_need(self, key: memoryview, page_size: int, min_size: int) -> None:
        """Ask the kernel for a large value's pages before py-lmdb touches them.

        py-lmdb touches every 4 KiB page of a value before handing it out, and
        the map is MADV_RANDOM, so a cold 256 KiB block was 64 page faults,
        each one disk read in a row (~12 ms p50 on a loaded machine). Called
        between the cursor's lookup and its `value()`, with the record's key
        view: one WILLNEED of exactly the value's range submits one read, and
        the faults that follow find the pages in the page cache or in flight.
        """
        extent = overflow_extent(key, page_size)
        if extent is None or extent[1] < min_size:
            return
        fd = self._fd
        if fd < 0:
            return
        self.hints += 1
        try:
            os.posix_fadvise(fd, extent[0], extent[1], os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint

    def offset_of(self, view: memoryview) -> int | None:
        """Where in the file the view's first byte is, or None if it is not in this file."""
        addr = buffer_address(view)
        region = self._region
        if region is None or not region.start <= addr < region.end:
            region = self._find(addr)
            if region is None:
                return None
            self._region = region
        return region.file_offset + (addr - region.start)

    def note_read(self, view: memoryview) -> None:
        """A value was just looked up: if it follows the last one, read the next window ahead.

        py-lmdb has already faulted in the view's own pages; the window is
        for the values stored after it.
        """
        offset = self.offset_of(view)
        if offset is None:
            return
        end = offset + len(view)
        self._note_mapped(view)
        with self._lock:
            in_order = abs(offset - self._last_end) <= self.slack
            self._last_end = max(self._last_end, end) if in_order else end
            if not in_order:
                self._ahead_until = 0
                return
            start = max(offset, self._ahead_until)
            if start >= end + self.window // 2:
                return  # still well ahead of the reader
            until = end + self.window
            self._ahead_until = until
            fd = self._fd
            self.windows += 1
        if fd >= 0:
            try:
                os.posix_fadvise(fd, start, until - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # only a hint

    def _note_mapped(self, view: memoryview) -> None:
        """Unmap the pages read so far now and then, so they do not count as ours.

        Every page of a value read stays mapped in this process after the
        read (py-lmdb touches them all), so streaming a 1 GiB file through a
        mount left ~1 GiB of the store in the process's RSS. MADV_DONTNEED on
        this shared, read-only file mapping only drops our page-table entries:
        the pages stay in the page cache and a later read maps them again
        (a minor fault), so no byte is lost or changed, even for a view
        another thread is reading at that moment.

        The caller holds what keeps the map where it is (the store's read
        transaction and resize gate), and the mapping is looked up afresh
        from the view's own address, so only pages of data.mdb are ever
        advised: never memory that a remap handed to someone else.
        """
        with self._lock:
            self._read_since_release += len(view)
            if self._read_since_release < self.release_every:
                return
            self._read_since_release = 0
        self.release(view)

    def release(self, view: memoryview) -> None:
        """Unmap every page of the mapping `view` lies in (same conditions as _note_mapped).

        The mapping is the one found in /proc/self/maps the last time, while
        the view lies inside it and `forget_mapping` has not been called since:
        the store calls it whenever it remaps (a map resize, in its exclusive
        section, when no view can be open), so the cached range is always its
        current map. Parsing /proc/self/maps (~330 lines in a mount, ~1 ms of
        Python holding the GIL) on every release cost a hot read a few tenths
        of a CPU-second per GiB.
        """
        addr = buffer_address(view)
        region = self._mapping
        if region is None or not region.start <= addr < region.end:
            region = self._find(addr)
            self._mapping = region
        if region is not None:
            _madvise(region.start, region.end - region.start, mmap.MADV_DONTNEED)
            self.releases += 1

    def forget_mapping(self) -> None:
        """The file was mapped anew (or unmapped): look the mapping up again next time.

        The caller guarantees no view of the old map is in use (the store calls
        this inside its exclusive section around `set_mapsize`)."""
        self._mapping = None
        self._region = None

    def _find(self, addr: int) -> _Region | None:
        """The mapping of this file that contains `addr`, from /proc/self/maps."""
        try:
            with open("/proc/self/maps", "rb") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) < 6:
                        continue
                    lo, _, hi = fields[0].partition(b"-")
                    start, end = int(lo, 16), int(hi, 16)
                    if not start <= addr < end:
                        continue
                    major, _, minor = fields[3].partition(b":")
                    if (int(major, 16), int(minor, 16)) != self._dev:
                        return None
                    if int(fields[4]) != self._ino:
                        return None
                    return _Region(start, end, int(fields[2], 16))
        except (OSError, ValueError):
            return None
        return None
