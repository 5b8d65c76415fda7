"""The block list a head names: every block id of a version, readable with the store capability.

The promises under test: a list built from a set of blocks walks back to
exactly that set (ids and sizes), whatever order its blocks arrive in; the
walk accepts only the blocks its signed parent named, with the counts it
vouched for, in strictly ascending id order; a second version with a few
new blocks rewrites only a few list blocks; and the decoders raise only
FormatError on arbitrary input.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vfs.blocklist as bl
from vfs.blocklist import (
    MAX_BLOCK,
    MIN_BLOCK,
    BlockListWalk,
    ListRef,
    build_block_list,
    decode_list_block,
    decode_list_ref,
    encode_interior,
    encode_leaf,
    read_block_list,
)
from vfs.errors import FormatError

ids32 = st.binary(min_size=32, max_size=32)
sizes = st.integers(MIN_BLOCK, MAX_BLOCK)
block_sets = st.dictionaries(ids32, sizes, min_size=1, max_size=400)


def build(blocks: dict[bytes, int]) -> tuple[ListRef, dict[bytes, bytes]]:
    out: dict[bytes, bytes] = {}

    def emit(block_id: bytes, data: bytes) -> None:
        assert hashlib.sha256(data).digest() == block_id
        out[block_id] = data

    return build_block_list(blocks, emit), out


def walk(ref: ListRef, stored: dict[bytes, bytes], rng: random.Random | None = None
         ) -> BlockListWalk:
    w = BlockListWalk(ref)
    while not w.done:
        wanted = w.wanted()
        if rng is not None:
            rng.shuffle(wanted)
        for block_id in wanted:
            w.feed(block_id, stored[block_id])
    return w


@pytest.fixture
def small_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny list blocks, so a few hundred ids make a deep tree."""
    monkeypatch.setattr(bl, "LEAF_CUT", 1 << 29)  # 1 in 8 ids ends a leaf
    monkeypatch.setattr(bl, "MAX_LEAF_IDS", 16)
    monkeypatch.setattr(bl, "NODE_CUT", 1 << 30)
    monkeypatch.setattr(bl, "MAX_FANOUT", 4)
    monkeypatch.setattr(bl, "MAX_DEPTH", 12)


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(block_sets, st.randoms(use_true_random=False))
def test_a_list_walks_back_to_its_blocks(blocks: dict[bytes, int], rng: random.Random) -> None:
    ref, stored = build(blocks)
    assert (ref.nblocks, ref.nbytes) == (len(blocks), sum(blocks.values()))
    w = walk(ref, stored, rng)
    assert w.blocks() == blocks
    assert set(w.list_blocks) == set(stored)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the same patch each time
@given(block_sets, st.randoms(use_true_random=False))
def test_deep_lists_walk_back_too(small_cuts: None, blocks: dict[bytes, int],
                                  rng: random.Random) -> None:
    ref, stored = build(blocks)
    w = walk(ref, stored, rng)
    assert w.blocks() == blocks
    assert list(w.blocks()) == sorted(blocks)  # ascending: nothing of the tree's shape shows
    if len(blocks) > 64:
        assert ref.depth >= 2


def test_lists_are_deterministic_and_bounded() -> None:
    rng = random.Random(7)
    blocks = {rng.randbytes(32): rng.randrange(MIN_BLOCK, MAX_BLOCK) for _ in range(20_000)}
    ref, stored = build(blocks)
    assert build(dict(reversed(blocks.items())))[0] == ref
    assert ref.depth == 1
    leaves = [decode_list_block(d, leaf=True) for d in stored.values() if b"\xa2bl" in d]
    assert 2 <= len(leaves) <= 20
    assert all(len(d) <= 600 * 1024 for d in stored.values())
    # 36 bytes per block and a little: the cost a version pays for being hostable
    assert sum(len(d) for d in stored.values()) < 37 * len(blocks) + 4096


def test_a_few_new_blocks_rewrite_few_list_blocks() -> None:
    rng = random.Random(11)
    blocks = {rng.randbytes(32): rng.randrange(MIN_BLOCK, MAX_BLOCK) for _ in range(40_000)}
    _, first = build(blocks)
    more = dict(blocks)
    for _ in range(3):
        more[rng.randbytes(32)] = 1000
    _, second = build(more)
    new = set(second) - set(first)
    # at most one leaf per new id, plus the root
    assert 2 <= len(new) <= 4, len(new)
    assert len(second) == len(first)


# ----------------------------------------------------------------------------- the walk refuses


def test_the_walk_refuses_blocks_it_did_not_ask_for(small_cuts: None) -> None:
    rng = random.Random(3)
    blocks = {rng.randbytes(32): 100 for _ in range(200)}
    ref, stored = build(blocks)
    w = BlockListWalk(ref)
    stranger = encode_leaf([b"\x01" * 32], [100])
    with pytest.raises(FormatError, match="not a wanted"):
        w.feed(hashlib.sha256(stranger).digest(), stranger)
    with pytest.raises(FormatError, match="does not match"):
        w.feed(ref.block_id, stored[ref.block_id] + b"\x00")
    with pytest.raises(FormatError, match="not complete"):
        w.blocks()


def test_counts_must_match_what_the_parent_vouched_for() -> None:
    data = encode_leaf([b"\x01" * 32, b"\x02" * 32], [100, 200])
    block_id = hashlib.sha256(data).digest()
    for nblocks, nbytes in ((1, 300), (2, 299), (3, 300)):
        with pytest.raises(FormatError, match="parent says"):
            BlockListWalk(ListRef(block_id, 0, nblocks, nbytes)).feed(block_id, data)
    w = BlockListWalk(ListRef(block_id, 0, 2, 300))
    w.feed(block_id, data)
    assert w.blocks() == {b"\x01" * 32: 100, b"\x02" * 32: 200}


def test_ids_must_ascend_across_leaves() -> None:
    a = encode_leaf([b"\x05" * 32], [100])
    b = encode_leaf([b"\x03" * 32], [100])
    ka, kb = (bl.ListKid(hashlib.sha256(x).digest(), 1, 100) for x in (a, b))
    for kids, ok in (([ka, kb], False), ([kb, ka], True), ([ka, ka], False)):
        top = encode_interior(kids)
        ref = ListRef(hashlib.sha256(top).digest(), 1, 2, 200)
        w = BlockListWalk(ref)
        try:
            w.feed(ref.block_id, top)
            for block_id in w.wanted():
                w.feed(block_id, a if block_id == ka.block_id else b)
            w.blocks()
        except FormatError:
            assert not ok
        else:
            assert ok


def test_the_depth_the_head_names_is_the_kind_expected() -> None:
    leaf = encode_leaf([b"\x01" * 32], [100])
    block_id = hashlib.sha256(leaf).digest()
    with pytest.raises(FormatError, match="interior"):
        BlockListWalk(ListRef(block_id, 1, 1, 100)).feed(block_id, leaf)


def test_read_block_list_counts_what_is_missing(small_cuts: None) -> None:
    rng = random.Random(5)
    blocks = {rng.randbytes(32): 100 for _ in range(300)}
    ref, stored = build(blocks)
    whole = read_block_list(ref, stored.get)
    assert whole.blocks == blocks and whole.missing_list_blocks == 0
    assert read_block_list(ref, lambda _: None).unknown_blocks == len(blocks)
    leaf = next(i for i, d in stored.items() if b"\xa2bl" in d)
    part = read_block_list(ref, lambda i: None if i == leaf else stored.get(i))
    lost = len(decode_list_block(stored[leaf], leaf=True).ids)
    assert (part.missing_list_blocks, part.unknown_blocks) == (1, lost)
    assert len(part.blocks) == len(blocks) - lost


# ----------------------------------------------------------------------------- decoders


def test_leaf_bounds() -> None:
    good = {"v": 1, "k": "bl", "ids": b"\x01" * 32, "sizes": (100).to_bytes(4, "big")}
    assert decode_list_block(msgpack.packb(good), leaf=True).ids == (b"\x01" * 32,)
    for change in ({"v": 2}, {"v": True}, {"k": "bi"}, {"ids": b""}, {"ids": b"\x01" * 31},
                   {"sizes": b"\x00\x00\x00"}, {"sizes": (15 + 1 - 1).to_bytes(4, "big")},
                   {"sizes": (MAX_BLOCK + 1).to_bytes(4, "big")}, {"extra": 1},
                   {"ids": "x" * 32}):
        with pytest.raises(FormatError):
            decode_list_block(msgpack.packb({**good, **change}), leaf=True)
    two = {**good, "ids": b"\x02" * 32 + b"\x01" * 32, "sizes": good["sizes"] * 2}
    with pytest.raises(FormatError, match="order"):
        decode_list_block(msgpack.packb(two), leaf=True)
    dup = {**good, "ids": b"\x01" * 64, "sizes": good["sizes"] * 2}
    with pytest.raises(FormatError, match="order"):
        decode_list_block(msgpack.packb(dup), leaf=True)


def test_interior_bounds() -> None:
    good = {"v": 1, "k": "bi", "kids": [[b"\x01" * 32, 1, 100]]}
    assert len(decode_list_block(msgpack.packb(good), leaf=False).kids) == 1
    for change in ({"kids": []}, {"kids": [[b"\x01" * 32, 0, 100]]},
                   {"kids": [[b"\x01" * 32, 1, 3]]}, {"kids": [[b"\x01" * 32, 1]]},
                   {"kids": [[b"\x01" * 31, 1, 100]]}, {"kids": [[b"\x01" * 32, True, 100]]},
                   {"k": "bl"}, {"v": 0}):
        with pytest.raises(FormatError):
            decode_list_block(msgpack.packb({**good, **change}), leaf=False)


msgpack_objects = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.binary(max_size=80) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=20)


@settings(max_examples=300)
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_raise_only_format_error(data: bytes, leaf: bool) -> None:
    try:
        decode_list_block(data, leaf=leaf)
    except FormatError:
        pass


@settings(max_examples=300)
@given(msgpack_objects, st.booleans())
def test_arbitrary_msgpack_raises_only_format_error(obj: Any, leaf: bool) -> None:
    for candidate in (obj, {"v": 1, "k": "bl" if leaf else "bi", "ids": obj, "sizes": obj,
                            "kids": obj}):
        try:
            data = msgpack.packb(candidate)
        except (OverflowError, ValueError, TypeError):
            continue
        try:
            decode_list_block(data, leaf=leaf)
        except FormatError:
            pass
    try:
        decode_list_ref(obj)
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_mutation_of_a_valid_block_is_refused_or_changes_the_value(
        data: st.DataObject) -> None:
    blocks = data.draw(st.dictionaries(ids32, sizes, min_size=1, max_size=6))
    ids = sorted(blocks)
    leaf_bytes = encode_leaf(ids, [blocks[i] for i in ids])
    kids = [bl.ListKid(i, 1, blocks[i]) for i in ids]
    for encoded, leaf in ((leaf_bytes, True), (encode_interior(kids), False)):
        original = decode_list_block(encoded, leaf)
        i = data.draw(st.integers(0, len(encoded) - 1))
        v = data.draw(st.integers(0, 255).filter(lambda x, i=i, e=encoded: x != e[i]))
        bad = encoded[:i] + bytes([v]) + encoded[i + 1:]
        try:
            assert decode_list_block(bad, leaf) != original
        except FormatError:
            pass


@given(st.binary(min_size=32, max_size=32), st.integers(-2, 5), st.integers(-1, 1 << 41),
       st.integers(-1, 1 << 63))
def test_list_refs_are_bounded(block_id: bytes, depth: int, nblocks: int, nbytes: int) -> None:
    try:
        ref = decode_list_ref([block_id, depth, nblocks, nbytes])
    except FormatError:
        assert not (0 <= depth <= bl.MAX_DEPTH and 1 <= nblocks <= bl.MAX_NBLOCKS
                    and MIN_BLOCK <= nbytes <= bl.MAX_NBYTES)
    else:
        assert ref.encode() == [block_id, depth, nblocks, nbytes]
