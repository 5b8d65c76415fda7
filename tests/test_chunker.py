"""Content-defined chunking: local edits change only nearby chunks.

This is what makes a new version of a big file cheap: every chunk (and so
every block) away from an edit is shared with the version before.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.chunker import CDC_MAX, CDC_MIN, cut_buffer, make_chunker
from vfs.crypto import MAX_BLOCK_PLAINTEXT

MiB = 1024 * 1024
SIZE = 20 * 1000 * 1000


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def chunks_of(buf: bytes) -> list[bytes]:
    return [bytes(c) for c in cut_buffer(buf)]


def hashes(chunks: list[bytes]) -> dict[bytes, int]:
    return {hashlib.sha256(c).digest(): len(c) for c in chunks}


@pytest.fixture(scope="module")
def base() -> tuple[bytes, list[bytes]]:
    buf = random_bytes(SIZE, 1)
    return buf, chunks_of(buf)


def assert_chunks_are_well_formed(buf: bytes, chunks: list[bytes]) -> None:
    assert b"".join(chunks) == buf
    for c in chunks[:-1]:
        assert CDC_MIN <= len(c) <= CDC_MAX
    if chunks:
        assert 1 <= len(chunks[-1]) <= CDC_MAX


def test_sizes_stay_within_bounds(base: tuple[bytes, list[bytes]]) -> None:
    buf, chunks = base
    assert_chunks_are_well_formed(buf, chunks)
    average = len(buf) / len(chunks)
    assert CDC_MIN < average < CDC_MAX
    assert CDC_MAX <= MAX_BLOCK_PLAINTEXT  # every chunk fits in one block


def test_inserting_at_the_start_changes_only_a_handful_of_chunks(
        base: tuple[bytes, list[bytes]]) -> None:
    buf, chunks = base
    edited = random_bytes(10, 2) + buf
    new_chunks = chunks_of(edited)
    assert_chunks_are_well_formed(edited, new_chunks)
    new = set(hashes(new_chunks)) - set(hashes(chunks))
    assert len(new) <= 4, f"{len(new)} of {len(new_chunks)} chunks changed"


def test_changing_a_mebibyte_in_the_middle_changes_at_most_four(
        base: tuple[bytes, list[bytes]]) -> None:
    buf, chunks = base
    middle = len(buf) // 2
    edited = buf[:middle] + random_bytes(MiB, 3) + buf[middle + MiB:]
    new_chunks = chunks_of(edited)
    assert_chunks_are_well_formed(edited, new_chunks)
    old = hashes(chunks)
    changed = {h: n for h, n in hashes(new_chunks).items() if h not in old}
    assert sum(changed.values()) <= 4 * MiB, f"{sum(changed.values())} bytes of chunks changed"


def test_deleting_in_the_middle_changes_only_nearby_chunks(
        base: tuple[bytes, list[bytes]]) -> None:
    buf, chunks = base
    edited = buf[:7_000_000] + buf[7_000_100:]
    new = set(hashes(chunks_of(edited))) - set(hashes(chunks))
    assert len(new) <= 4


def test_cutting_is_deterministic_and_matches_the_chunker(
        base: tuple[bytes, list[bytes]]) -> None:
    buf, chunks = base
    direct = [(c.offset, c.length) for c in make_chunker().cut_buf(buf)]
    offsets = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    assert direct == list(zip(offsets, (len(c) for c in chunks), strict=True))
    assert chunks_of(buf[: 3 * MiB]) == chunks_of(buf[: 3 * MiB])


def test_zero_filled_data_cuts_at_the_maximum() -> None:
    """No content boundary in a run of zeros: chunks are cut at the maximum size."""
    chunks = chunks_of(bytes(5 * CDC_MAX + 17))
    assert [len(c) for c in chunks] == [CDC_MAX] * 5 + [17]


def test_small_and_empty_buffers() -> None:
    assert chunks_of(b"") == []
    assert chunks_of(b"x") == [b"x"]
    small = random_bytes(CDC_MIN - 1, 4)
    assert chunks_of(small) == [small]
    assert chunks_of(memoryview(small)) == [small]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 3 * MiB), st.integers(0, 2**32))
def test_any_buffer_is_cut_into_well_formed_chunks(size: int, seed: int) -> None:
    buf = random_bytes(size, seed)
    assert_chunks_are_well_formed(buf, chunks_of(buf))
