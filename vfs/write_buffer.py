"""A file being written: its bytes as stored chunks, dirty bytes and holes (pure model).

Rules this model keeps (tests/test_write_buffer.py checks each):

* A file's content is a list of segments: STORED (a chunk already encrypted
  and stored, by its `Ref`), DIRTY (bytes in memory, not yet cut) and ZERO
  (n zero bytes that take no memory: a hole from a truncate that grows the
  file or a write past its end).
* A write that covers part of a stored chunk first needs that chunk's
  plaintext (`needs` names them; `fill` turns each into a dirty segment);
  a write that covers a stored chunk whole simply drops it. Nothing here
  does I/O: the caller loads, this module decides.
* Cutting (`settle`) goes over each run of non-stored segments from the chunk
  boundary before it (the file's start or the end of a stored chunk) with the
  same FastCDC parameters as `publish`, so an edit makes the chunks one cut of
  the whole file would make: after the run, the cut goes on into the stored
  chunks that follow until one of its cut points lands on one of their
  boundaries (from there on they are what a cut would give again), at most
  RESYNC_CHUNKS of them; then it stops at a boundary by force. Only chunks
  around a change become new blocks.
* `settle(final=False)` (a spill, to bound memory) leaves the last piece of a
  run that reaches the end of the file in memory, because an append would
  move its cut; `final=True` (a version being made) cuts everything. A run
  whose resync reaches the open tail a spill left at the end of the file takes
  in all of that tail (a dirty piece and an append are two segments), so it
  too is a run to the end of the file. Whenever a cut ends the file with a
  stored chunk, that chunk is `forced_end`: its end is the file's, no cut
  point, and if the file grows the next settle loads and cuts it again.
* Runs are read in windows of at most WINDOW bytes plus the carried piece,
  so cutting a 1 GiB hole or a 1 GiB dirty run holds a bounded amount.
* A file being appended to can be cut behind the writer (`sealed_run`,
  `cut_sealed`, `replace_sealed`): the run before its last segment is marked
  `spilling` and cut while writes go on, without the caller's lock. A
  change to a spilling segment first gives it a fresh copy of its bytes
  (the cut goes on reading the old ones) and clears the mark; the cut's
  chunks replace the run only if every segment of it is still there and
  still marked, else they are dropped. So a cut behind never writes over a
  newer byte, and the chunks it keeps are the ones a cut under the lock
  would have made (cut points depend only on the bytes before them).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import trio

from .chunker import CDC_MAX, make_chunker
from .crypto import Ref
from .errors import unwrap_group

STORED = 0
DIRTY = 1
ZERO = 2

WINDOW = 8 * 1024 * 1024
# Appends grow one dirty segment up to this size, then start another: growing one
# bytearray to tens of MiB copies it again at every reallocation.
DIRTY_SEGMENT = 4 * 1024 * 1024
# Windows cut and handed to `store` at once, at most (encrypting one while storing another).
WINDOWS_IN_FLIGHT = 2
RESYNC_CHUNKS = 8

Load = Callable[[Ref], Awaitable[bytes]]
Store = Callable[[list[memoryview]], Awaitable[list[Ref]]]


@dataclass(slots=True, eq=False)
class Seg:
    kind: int
    length: int
    ref: Ref | None = None
    data: bytearray | None = None
    spilling: bool = False  # being cut behind the writer: its `data` is read meanwhile


class FileContent:
    """The bytes of one file while it is written: segments, their offsets, the dirty total."""

    def __init__(self, chunks: Sequence[Ref] = ()) -> None:
        self.segs: list[Seg] = [Seg(STORED, r.length, ref=r) for r in chunks if r.length]
        self._starts: list[int] | None = None
        self.size = sum(s.length for s in self.segs)
        self.dirty_bytes = 0
        # the stored chunk that a cut ended only because the file ended there: if the file
        # grows past it, its end is no natural cut point and settle cuts it again
        self.forced_end: Seg | None = self.segs[-1] if self.segs else None

    # -- offsets ---------------------------------------------------------------------

    def starts(self) -> list[int]:
        if self._starts is None:
            pos = 0
            out = []
            for s in self.segs:
                out.append(pos)
                pos += s.length
            self._starts = out
        return self._starts

    def _index(self, off: int) -> int:
        """The index of the segment holding byte `off` (off < size)."""
        return bisect.bisect_right(self.starts(), off) - 1

    def _changed(self) -> None:
        self._starts = None

    @property
    def is_clean(self) -> bool:
        """Every byte is in stored chunks (a version can name them as they are)."""
        return all(s.kind == STORED for s in self.segs)

    def refs(self) -> tuple[Ref, ...]:
        if not self.is_clean:
            raise ValueError("the file has bytes that are not cut yet: settle it first")
        return tuple(s.ref for s in self.segs)  # type: ignore[misc]

    # -- what must be loaded first ---------------------------------------------------

    def needs(self, off: int, length: int) -> list[Seg]:
        """Stored segments that a change of [off, off+length) covers only in part.

        A write of that range (or a truncate to `off`, with length 0) can be
        applied once `fill` has given each of them its plaintext.
        """
        end = min(off + length, self.size)
        out: list[Seg] = []
        if off >= self.size:
            return out
        starts = self.starts()
        i = self._index(off)
        while i < len(self.segs) and starts[i] < max(end, off + 1):
            s = self.segs[i]
            lo, hi = starts[i], starts[i] + s.length
            whole = off <= lo and hi <= end and length > 0
            if s.kind == STORED and not whole:
                out.append(s)
            i += 1
        return out

    def fill(self, seg: Seg, plain: bytes | bytearray | memoryview) -> None:
        """Give a stored segment its plaintext: it becomes dirty (same length, same place)."""
        if seg.kind != STORED:
            return
        if len(plain) != seg.length:
            raise ValueError("a chunk's plaintext has the wrong length")
        seg.kind = DIRTY
        seg.data = bytearray(plain)
        seg.ref = None
        self.dirty_bytes += seg.length

    # -- changes ---------------------------------------------------------------------

    @staticmethod
    def _own(seg: Seg) -> None:
        """Before a dirty segment's bytes change: if a cut behind is reading them, the
        segment takes a copy (the cut keeps the old bytes, and its result is dropped)."""
        if seg.spilling:
            assert seg.data is not None
            seg.data = bytearray(seg.data)
            seg.spilling = False

    def _split(self, pos: int) -> int:
        """Make a segment boundary at `pos` (0 < pos < size); returns the index starting there."""
        i = self._index(pos)
        start = self.starts()[i]
        if start == pos:
            return i
        s = self.segs[i]
        cut = pos - start
        if s.kind == STORED:
            raise ValueError("a stored chunk cut in two: fill it first (see needs)")
        if s.kind == DIRTY:
            assert s.data is not None
            self._own(s)
            right = Seg(DIRTY, s.length - cut, data=s.data[cut:])
            del s.data[cut:]
        else:
            right = Seg(ZERO, s.length - cut)
        s.length = cut
        self.segs.insert(i + 1, right)
        self._changed()
        return i + 1

    def _remove(self, i: int, j: int) -> None:
        for s in self.segs[i:j]:
            if s.kind == DIRTY:
                self.dirty_bytes -= s.length
        del self.segs[i:j]
        self._changed()

    def write(self, off: int, data: bytes | memoryview) -> None:
        """Write `data` at `off` (zeros fill any gap past the end); `needs` must be filled."""
        n = len(data)
        if n == 0:
            return
        if off > self.size:
            self._append(Seg(ZERO, off - self.size))
        if off == self.size:
            self._append_bytes(data)
            return
        end = off + n
        # within one dirty segment: in place, no split
        i = self._index(off)
        s = self.segs[i]
        start = self.starts()[i]
        if s.kind == DIRTY and end <= start + s.length:
            assert s.data is not None
            self._own(s)
            s.data[off - start:end - start] = data
            return
        i = self._split(off) if off > 0 else 0
        if end < self.size:
            j = self._split(end)
        else:
            j = len(self.segs)
        self._remove(i, j)
        self.segs.insert(i, Seg(DIRTY, n, data=bytearray(data)))
        self.dirty_bytes += n
        self.size = max(self.size, end)
        self._changed()

    def _append(self, seg: Seg) -> None:
        if self._starts is not None:
            self._starts.append(self.size)
        self.segs.append(seg)
        self.size += seg.length
        if seg.kind == DIRTY:
            self.dirty_bytes += seg.length

    def _append_bytes(self, data: bytes | memoryview) -> None:
        last = self.segs[-1] if self.segs else None
        if last is not None and last.kind == DIRTY and last.length < DIRTY_SEGMENT:
            assert last.data is not None
            self._own(last)
            last.data += data
            last.length += len(data)
            self.size += len(data)
            self.dirty_bytes += len(data)
            return
        self._append(Seg(DIRTY, len(data), data=bytearray(data)))

    def truncate(self, size: int) -> None:
        """Cut or extend (with a hole) to `size`; `needs(size, 0)` must be filled."""
        if size >= self.size:
            if size > self.size:
                self._append(Seg(ZERO, size - self.size))
            return
        i = self._split(size) if size > 0 else 0
        self._remove(i, len(self.segs))
        self.size = size

    # -- reading ---------------------------------------------------------------------

    def read_plan(self, off: int, length: int) -> list[tuple[Seg, int, int]]:
        """The segments holding [off, off+length) and the range of each: (seg, lo, hi)."""
        end = min(off + length, self.size)
        out: list[tuple[Seg, int, int]] = []
        if off >= end:
            return out
        starts = self.starts()
        i = self._index(off)
        while i < len(self.segs) and starts[i] < end:
            s = self.segs[i]
            lo = max(off, starts[i]) - starts[i]
            hi = min(end, starts[i] + s.length) - starts[i]
            out.append((s, lo, hi))
            i += 1
        return out

    # -- cutting ---------------------------------------------------------------------

    def runs(self) -> list[tuple[int, int]]:
        """(first, end) index pairs of the runs of non-stored segments."""
        out = []
        i = 0
        while i < len(self.segs):
            if self.segs[i].kind == STORED:
                i += 1
                continue
            j = i
            while j < len(self.segs) and self.segs[j].kind != STORED:
                j += 1
            out.append((i, j))
            i = j
        return out

    # -- cutting behind the writer -----------------------------------------------------

    def sealed_run(self, min_bytes: int) -> list[Seg] | None:
        """The dirty and zero segments between the last stored chunk and the file's last
        segment (which an append grows), marked spilling; None if under `min_bytes`."""
        if len(self.segs) < 2 or self.segs[-1].kind == STORED:
            return None
        first = len(self.segs) - 1
        while first > 0 and self.segs[first - 1].kind != STORED:
            first -= 1
        if first > 0 and self.segs[first - 1] is self.forced_end:
            return None  # its end is the old end of the file, no cut point: settle refills it
        run = self.segs[first:-1]
        if any(s.spilling for s in run) or sum(s.length for s in run) < min_bytes:
            return None
        for s in run:
            s.spilling = True
        return run

    def replace_sealed(self, run: list[Seg], refs: list[Ref], tail: bytes) -> bool:
        """Put the chunks cut of `run` in its place (and its uncut tail as dirty bytes), if
        no segment of it changed meanwhile; False (nothing changed) otherwise."""
        if not run or not all(s.spilling for s in run):
            return False
        try:
            i = self.segs.index(run[0])  # by identity: segments compare as objects
        except ValueError:
            return False
        if self.segs[i:i + len(run)] != run or (i and self.segs[i - 1].kind != STORED):
            return False
        if sum(r.length for r in refs) + len(tail) != sum(s.length for s in run):
            raise ValueError("a cut behind the writer lost or gained bytes")
        replacement = [Seg(STORED, r.length, ref=r) for r in refs]
        if tail:
            replacement.append(Seg(DIRTY, len(tail), data=bytearray(tail)))
        self._remove(i, i + len(run))
        self.segs[i:i] = replacement
        self.dirty_bytes += len(tail)
        self._changed()
        return True

    @staticmethod
    def unseal(run: list[Seg]) -> None:
        for s in run:
            s.spilling = False


def _pieces(segs: Sequence[Seg], window: int) -> Iterator[bytes | memoryview]:
    """The bytes of dirty and zero segments in order, no piece longer than `window`."""
    for s in segs:
        if s.kind == DIRTY:
            assert s.data is not None
            view = memoryview(s.data)
            for lo in range(0, s.length, window):
                yield view[lo:lo + window]
        elif s.kind == ZERO:
            left = s.length
            while left:
                n = min(left, window)
                yield bytes(n)
                left -= n
        else:
            raise ValueError("a stored segment inside a run")


def cut_points(buf: bytes | memoryview) -> list[int]:
    """The end offset of every chunk FastCDC cuts `buf` into (the last is len(buf))."""
    if not len(buf):
        return []
    return [c.offset + c.length for c in make_chunker().cut_buf(buf)]


async def settle(content: FileContent, load: Load, store: Store, *, final: bool,
                 window: int = WINDOW) -> int:
    """Cut the file's dirty runs into stored chunks; returns the plaintext bytes stored.

    `load(ref)` gives a stored chunk's plaintext; `store(views)` encrypts and
    stores chunks and returns their refs in order. The caller keeps anyone
    else from changing `content` meanwhile.
    """
    forced = content.forced_end
    if forced is not None and forced.kind == STORED and content.segs and \
            content.segs[-1] is not forced and any(s is forced for s in content.segs):
        assert forced.ref is not None
        content.fill(forced, await load(forced.ref))
    stored = 0
    # last run first: the stored chunks a run resynchronises into are then all stored
    # (but for a kept tail at the end of the file), and earlier indexes stay valid
    for first, end in reversed(content.runs()):
        at_eof = end == len(content.segs)
        run_bytes = sum(s.length for s in content.segs[first:end])
        if at_eof and not final and run_bytes <= CDC_MAX:
            continue  # only the open tail: nothing a spill can cut for good
        new_refs, tail, absorbed = await _cut_run(content, first, end, load, store, final,
                                                  window)
        stored += sum(r.length for r in new_refs)
        replacement = [Seg(STORED, r.length, ref=r) for r in new_refs]
        if tail:
            replacement.append(Seg(DIRTY, len(tail), data=bytearray(tail)))
        content._remove(first, end + absorbed)
        content.segs[first:first] = replacement
        content.dirty_bytes += len(tail)
        content._changed()
    if content.segs and content.segs[-1].kind == STORED:
        # a cut that reached the end of the file ended its last chunk there by force
        # (final, or a spill whose cut resynchronised through to stored chunks at the end)
        content.forced_end = content.segs[-1]
    return stored


def _join_and_cut(parts: list[bytes | memoryview]) -> tuple[bytes, list[int]]:
    """One window's bytes and the cut points in it but the last (a worker thread)."""
    buf = b"".join(parts)
    return buf, cut_points(buf)[:-1]


async def _cut_windows(segs: Sequence[Seg], store: Store, window: int
                       ) -> tuple[list[Ref], bytes]:
    """Cut the bytes of `segs` (dirty and zero) from a chunk boundary, window by window:
    (refs of the chunks stored, the last piece, not cut: its end depends on what
    follows). Joining and cutting a window run in a worker thread, so the event loop
    goes on answering requests meanwhile."""
    windows: list[list[Ref]] = []
    parts: list[bytes | memoryview] = []
    held = 0
    in_flight = trio.Semaphore(WINDOWS_IN_FLIGHT)

    async def store_window(slot: int, buf: bytes, keep: list[int]) -> None:
        try:
            windows[slot] = await _store_cuts(buf, 0, keep, store)
        finally:
            in_flight.release()

    async with one_error(), trio.open_nursery() as nursery:
        for piece in _pieces(segs, window):
            parts.append(piece)
            held += len(piece)
            if held < window:
                continue
            # a slot first, then the join: at most WINDOWS_IN_FLIGHT joined windows exist
            # (joining the next one while both slots are taken held a third, 16 MiB more)
            await in_flight.acquire()
            try:
                # the last piece may be cut short by the window: carried
                buf, keep = await trio.to_thread.run_sync(_join_and_cut, parts)
            except BaseException:
                in_flight.release()
                raise
            windows.append([])
            nursery.start_soon(store_window, len(windows) - 1, buf, keep)
            carry = buf[keep[-1]:] if keep else buf
            parts, held = [carry], len(carry)
    return [r for w in windows for r in w], b"".join(parts)


async def cut_sealed(run: list[Seg], store: Store, window: int = WINDOW
                     ) -> tuple[list[Ref], bytes]:
    """Cut a run `sealed_run` marked, behind the writer: (refs of its chunks, stored; the
    last piece, left dirty). The caller holds no lock: see the module's rules."""
    refs, carry = await _cut_windows(run, store, window)
    keep = cut_points(carry)[:-1]
    refs += await _store_cuts(carry, 0, keep, store)
    return refs, carry[keep[-1]:] if keep else carry


async def _cut_run(content: FileContent, first: int, end: int, load: Load, store: Store,
                   final: bool, window: int) -> tuple[list[Ref], bytes, int]:
    """Cut one run: (refs of the new chunks, dirty tail left, stored segments absorbed)."""
    refs, carry = await _cut_windows(content.segs[first:end], store, window)
    # the run's end: at the file's end, or stored chunks follow (resync into them)
    after = content.segs[end:]
    if not after:
        points = cut_points(carry)
        if final:
            refs += await _store_cuts(carry, 0, points, store)
            return refs, b"", 0
        keep = points[:-1]
        refs += await _store_cuts(carry, 0, keep, store)
        return refs, carry[keep[-1]:] if keep else carry, 0
    combined = carry
    ends: list[int] = []  # end offsets in `combined` of the stored chunks absorbed
    for k, seg in enumerate(after[:RESYNC_CHUNKS]):
        if seg.kind != STORED:
            # the open tail a spill left (runs are cut last first): every segment from
            # here on is dirty or zero and the file ends with them, however many there
            # are (a dirty piece and an append, a hole and a write): the run now reaches
            # the end of the file, and is cut as such
            tail = after[k:]
            if any(s.kind == STORED for s in tail):
                raise ValueError("a stored chunk after the open tail of a file")
            combined += b"".join(_pieces(tail, window))
            points = cut_points(combined)
            keep = points if final else points[:-1]
            refs += await _store_cuts(combined, 0, keep, store)
            left = combined[keep[-1]:] if keep else combined
            return refs, bytes(left), k + len(tail)
        assert seg.ref is not None
        combined += await load(seg.ref)
        ends.append(len(combined))
        points = cut_points(combined)
        interior = set(points[:-1])
        synced = [e for e in ends if e in interior]
        if synced:
            stop = synced[0]
            refs += await _store_cuts(combined, 0, [p for p in points if p <= stop], store)
            absorbed = ends.index(stop) + 1
            return refs, b"", absorbed
        if k + 1 == len(after):
            break  # the file ends here: its last chunk ends at its end
    # never synced within the bound (or the file ended): stop at the last boundary absorbed
    points = cut_points(combined)
    refs += await _store_cuts(combined, 0, points, store)
    return refs, b"", len(ends)


@contextlib.asynccontextmanager
async def one_error() -> AsyncIterator[None]:
    """A nursery's first real error as itself: a full disk stays NoSpaceError, not a group
    (two windows in flight may both meet it)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = unwrap_group(group)
        if leaf is group:
            _, rest = group.split(trio.Cancelled)
            if rest is None:
                raise
            leaf = rest
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
        raise leaf from None


async def _store_cuts(buf: bytes, start: int, points: list[int], store: Store) -> list[Ref]:
    if not points:
        return []
    view = memoryview(buf)
    views = []
    lo = start
    for p in points:
        views.append(view[lo:p])
        lo = p
    try:
        return await store(views)
    finally:
        for v in views:
            v.release()
        view.release()
