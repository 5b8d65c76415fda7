"""The write buffer (vfs/write_buffer.py), pure: writes, truncates, cuts, against a bytearray.

No mount, no store: chunks are "stored" in a dict by a fake `store`, and the
content read back through `read_plan` must always equal a plain bytearray
that had the same operations applied.
"""

from __future__ import annotations

import hashlib
import os
import random

import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vfs.chunker import CDC_MAX, make_chunker
from vfs.crypto import Ref
from vfs.write_buffer import DIRTY, STORED, ZERO, FileContent, settle

KiB = 1024
MiB = 1024 * KiB


class FakeStore:
    """Chunks by ref, and how many distinct chunks were ever stored."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}
        self.stored = 0

    async def store(self, views: list[memoryview]) -> list[Ref]:
        refs = []
        for v in views:
            data = bytes(v)
            h = hashlib.sha256(data).digest()
            if h not in self.chunks:
                self.stored += 1
            self.chunks[h] = data
            refs.append(Ref(h, h, len(data)))
        return refs

    async def load(self, ref: Ref) -> bytes:
        return self.chunks[ref.block_id]


def read_all(c: FileContent, fs: FakeStore) -> bytes:
    out = bytearray()
    for seg, lo, hi in c.read_plan(0, c.size):
        if seg.kind == STORED:
            out += fs.chunks[seg.ref.block_id][lo:hi]
        elif seg.kind == DIRTY:
            out += seg.data[lo:hi]
        else:
            out += bytes(hi - lo)
    return bytes(out)


async def fill_needs(c: FileContent, fs: FakeStore, off: int, n: int) -> None:
    for seg in c.needs(off, n):
        c.fill(seg, await fs.load(seg.ref))


def canonical(data: bytes) -> list[bytes]:
    return [bytes(ch.data) for ch in make_chunker().cut_buf(data)] if data else []


def stored_file(data: bytes, fs: FakeStore) -> FileContent:
    refs = trio.run(fs.store, [memoryview(c) for c in canonical(data)])
    return FileContent(refs)


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3 * MiB), st.integers(1, 300 * KiB)),
    st.tuples(st.just("truncate"), st.integers(0, 3 * MiB), st.just(0)),
    st.tuples(st.just("spill"), st.just(0), st.just(0)),
), max_size=12)


@settings(max_examples=40)
@given(ops=ops, seed=st.integers(0, 2**32 - 1), start=st.integers(0, 2 * MiB))
# a spill's cut resynchronising into an open tail of two segments at the end of the file
@example(ops=[("write", 0, 1), ("write", 467100, 2), ("spill", 0, 0)], seed=0, start=467101)
# a spill's cut that ran through the stored chunks to the end of the file, then an append
# (the new last chunk's end is no cut point: the final cut must cut it again)
@example(ops=[("write", 0, 1), ("spill", 0, 0), ("write", 467099, 1000)], seed=0, start=467099)
def test_content_matches_a_bytearray_and_final_cut_is_canonical(ops, seed, start) -> None:
    rng = random.Random(seed)
    fs = FakeStore()
    model = bytearray(rng.randbytes(start))
    c = stored_file(bytes(model), fs)

    async def main() -> None:
        for kind, off, n in ops:
            if kind == "write":
                data = rng.randbytes(n)
                await fill_needs(c, fs, off, n)
                c.write(off, data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + n] = data
            elif kind == "truncate":
                await fill_needs(c, fs, off, 0)
                c.truncate(off)
                if off < len(model):
                    del model[off:]
                else:
                    model.extend(bytes(off - len(model)))
            else:
                await settle(c, fs.load, fs.store, final=False, window=512 * KiB)
            assert c.size == len(model)
            assert read_all(c, fs) == bytes(model)
        await settle(c, fs.load, fs.store, final=True, window=512 * KiB)

    trio.run(main)
    assert c.is_clean and c.dirty_bytes == 0
    got = [fs.chunks[r.block_id] for r in c.refs()]
    assert b"".join(got) == bytes(model)
    # the chunks are those of one cut over the whole file
    assert got == canonical(bytes(model))


def test_an_overwrite_in_the_middle_makes_only_nearby_chunks_new() -> None:
    fs = FakeStore()
    data = bytearray(random.Random(1).randbytes(32 * MiB))
    c = stored_file(bytes(data), fs)
    before = fs.stored
    patch = os.urandom(4096)

    async def main() -> None:
        off = 16 * MiB + 1000
        await fill_needs(c, fs, off, len(patch))
        c.write(off, patch)
        data[off:off + len(patch)] = patch
        await settle(c, fs.load, fs.store, final=True)

    trio.run(main)
    assert 1 <= fs.stored - before <= 3
    got = [fs.chunks[r.block_id] for r in c.refs()]
    assert got == canonical(bytes(data))  # resynchronised: as if cut from scratch


def test_appends_spill_all_but_the_open_tail_and_memory_stays_bounded() -> None:
    fs = FakeStore()
    c = FileContent()
    rng = random.Random(2)
    whole = bytearray()

    async def main() -> None:
        for _ in range(200):
            piece = rng.randbytes(128 * KiB)
            c.write(c.size, piece)
            whole.extend(piece)
            if c.dirty_bytes > 4 * MiB:
                await settle(c, fs.load, fs.store, final=False, window=MiB)
                assert c.dirty_bytes <= 2 * CDC_MAX
        await settle(c, fs.load, fs.store, final=True, window=MiB)

    trio.run(main)
    got = [fs.chunks[r.block_id] for r in c.refs()]
    assert got == canonical(bytes(whole))


def test_a_big_hole_is_cut_without_holding_it() -> None:
    fs = FakeStore()
    c = FileContent()
    c.truncate(64 * MiB)
    c.write(64 * MiB, b"end")
    assert c.dirty_bytes == 3
    assert [s.kind for s in c.segs] == [ZERO, DIRTY]
    trio.run(lambda: settle(c, fs.load, fs.store, final=True, window=MiB))
    assert c.size == 64 * MiB + 3
    assert fs.stored <= 3  # zero chunks of the maximum size are one block
    assert read_all(c, fs) == bytes(64 * MiB) + b"end"


def test_a_cut_behind_the_writer_keeps_every_newer_byte_and_the_canonical_chunks() -> None:
    """Appends cut behind the writer (no lock): the run's chunks replace it only if none
    of its segments changed meanwhile; a change during the cut (an overwrite, a truncate
    into the run) wins and the cut is dropped; an append after a truncate to the run's
    end goes into a new segment and the cut is kept. Either way the bytes are the
    writes', and the final cut is canonical."""
    from vfs.write_buffer import cut_sealed

    rng = random.Random(11)

    async def main() -> None:
        for change in (None, "overwrite", "truncate", "append"):
            fs = FakeStore()
            c = FileContent()
            want = bytearray()
            for _ in range(24):  # 24 MiB of appends: sealed segments of 4 MiB
                piece = rng.randbytes(1 * MiB)
                c.write(c.size, piece)
                want += piece
            run = c.sealed_run(16 * MiB)
            assert run is not None and all(s.spilling for s in run)
            assert c.sealed_run(16 * MiB) is None  # one cut of a run at a time
            refs, tail = await cut_sealed(run, fs.store)
            if change == "overwrite":
                at = 5 * MiB + 3
                c.write(at, b"newer")
                want[at:at + 5] = b"newer"
            elif change == "truncate":
                c.truncate(9 * MiB + 1)
                del want[9 * MiB + 1:]
            elif change == "append":
                c.truncate(20 * MiB)  # the run's last (full) segment is now the file's last
                del want[20 * MiB:]
                c.write(c.size, b"grown")
                want += b"grown"
            kept = c.replace_sealed(run, refs, tail)
            FileContent.unseal(run)
            assert kept == (change in (None, "append")), change
            assert read_all(c, fs) == bytes(want), change
            if change is None:
                assert c.dirty_bytes == len(tail) + 4 * MiB  # the tail, and the last segment
            await settle(c, fs.load, fs.store, final=True)
            assert read_all(c, fs) == bytes(want)
            assert [fs.chunks[r.block_id] for r in c.refs()] == canonical(bytes(want))

    trio.run(main)
