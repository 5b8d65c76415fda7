"""Records of a drive version: entries, directory nodes, chunk lists.

Every codec round trips; `build_directory` splits large directories into a
tree that walks back to the same entries; and every decoder, given anything
at all, either returns a value or raises FormatError, enforcing the bounds
docs/formats.md lists.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.crypto import HASH_LEN, MAX_BLOCK_PLAINTEXT, Ref
from vfs.errors import FormatError
from vfs.formats import (
    CHUNKS_PER_LIST_BLOCK,
    DIR_NODE_TARGET,
    FORMAT_VERSION,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    MAX_CHUNKS_PER_LIST,
    MAX_DIR_DEPTH_OF_NODES,
    MAX_ENTRIES_PER_NODE,
    MAX_FILE_SIZE,
    MAX_INLINE_CHUNKS,
    MAX_LINK_TARGET,
    MAX_LIST_BLOCKS,
    MAX_NAME,
    MAX_PARTS_PER_NODE,
    MAX_RECORD,
    MAX_TOTAL,
    ChunkListRef,
    DirInterior,
    DirLeaf,
    DirPart,
    Entry,
    build_directory,
    check_name,
    decode_chunk_list,
    decode_dir_node,
    decode_entry,
    decode_ref,
    encode_chunk_list,
    encode_dir_interior,
    encode_dir_leaf,
    encode_entry,
    encode_ref,
    split_chunk_list,
)

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

# ----------------------------------------------------------------------------- strategies

hashes = st.binary(min_size=HASH_LEN, max_size=HASH_LEN)
names = (
    st.binary(min_size=1, max_size=MAX_NAME)
    .map(lambda n: n.replace(b"/", b"_").replace(b"\x00", b"_"))
    .filter(lambda n: n not in (b".", b".."))
)
modes = st.integers(0, 0o7777)
mtimes = st.integers(I64_MIN, I64_MAX)
refs = st.builds(Ref, hashes, hashes, st.integers(0, MAX_BLOCK_PLAINTEXT))
chunk_refs = st.builds(Ref, hashes, hashes, st.integers(1, MAX_BLOCK_PLAINTEXT))
chunk_list_refs = st.builds(ChunkListRef, refs, st.integers(1, MAX_CHUNKS_PER_LIST),
                            st.integers(1, 1 << 40))


@st.composite
def file_entries(draw: st.DrawFn, name: bytes | None = None) -> Entry:
    name = draw(names) if name is None else name
    if draw(st.booleans()):
        chunks = tuple(draw(st.lists(chunk_refs, max_size=6)))
        return Entry(name, KIND_FILE, draw(modes), draw(mtimes),
                     size=sum(r.length for r in chunks), chunks=chunks)
    lists = tuple(draw(st.lists(chunk_list_refs, max_size=4)))
    return Entry(name, KIND_FILE, draw(modes), draw(mtimes),
                 size=sum(c.nbytes for c in lists), chunk_lists=lists)


@st.composite
def dir_entries(draw: st.DrawFn, name: bytes | None = None) -> Entry:
    name = draw(names) if name is None else name
    nentries = draw(st.integers(0, 1 << 32))
    # the folder aggregates: both totals (any in range) or neither (an older version)
    totals = draw(st.one_of(st.none(), st.tuples(st.integers(0, MAX_TOTAL),
                                                 st.integers(0, MAX_TOTAL))))
    files, size = totals if totals is not None else (None, None)
    return Entry(name, KIND_DIR, draw(modes), draw(mtimes), node=draw(refs),
                 nsubdirs=draw(st.integers(0, nentries)), nentries=nentries,
                 total_files=files, total_bytes=size)


targets = st.binary(min_size=1, max_size=MAX_LINK_TARGET).map(lambda t: t.replace(b"\x00", b"x"))


@st.composite
def link_entries(draw: st.DrawFn, name: bytes | None = None) -> Entry:
    name = draw(names) if name is None else name
    target = draw(targets)
    return Entry(name, KIND_LINK, draw(modes), draw(mtimes), size=len(target), target=target)


entries = st.one_of(file_entries(), dir_entries(), link_entries())


@st.composite
def sorted_entries(draw: st.DrawFn, max_size: int = 8) -> tuple[Entry, ...]:
    found = draw(st.lists(entries, max_size=max_size, unique_by=lambda e: e.name))
    return tuple(sorted(found, key=lambda e: e.name))


@st.composite
def interiors(draw: st.DrawFn) -> DirInterior:
    firsts = sorted(draw(st.lists(names, min_size=1, max_size=8, unique=True)))
    parts = tuple(DirPart(n, draw(refs), draw(st.integers(1, 1 << 24))) for n in firsts)
    return DirInterior(parts, sum(p.nentries for p in parts))


# Anything msgpack can carry, leaning on the field names the decoders look for.
FIELD_NAMES = ["v", "k", "e", "p", "c", "n", "t", "m", "mt", "s", "x", "r", "nd", "ne", "l",
               "d", "i", "tf", "tb"]
msgpack_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(I64_MIN, (1 << 64) - 1), st.floats(),
    st.sampled_from(FIELD_NAMES), st.text(max_size=8), st.binary(max_size=40),
    st.just(FORMAT_VERSION), st.sampled_from([0, 1, 2, 255, 256, -1]),
)
msgpack_objects = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=4)), inner,
                        max_size=7),
    ),
    max_leaves=30,
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj)


# ----------------------------------------------------------------------------- round trips


@given(refs)
def test_ref_round_trip(ref: Ref) -> None:
    assert decode_ref(encode_ref(ref)) == ref
    assert decode_ref(msgpack.unpackb(pack(encode_ref(ref)))) == ref


@settings(max_examples=300)
@given(entries)
def test_entry_round_trip(entry: Entry) -> None:
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(msgpack.unpackb(pack(encode_entry(entry)), raw=False)) == entry


@given(file_entries(), dir_entries(), link_entries())
def test_entry_kinds_and_st_mode(f: Entry, d: Entry, ln: Entry) -> None:
    assert f.is_file and not f.is_dir and stat.S_ISREG(f.st_mode)
    assert d.is_dir and stat.S_ISDIR(d.st_mode)
    assert ln.is_link and stat.S_ISLNK(ln.st_mode)
    for e in (f, d, ln):
        assert stat.S_IMODE(e.st_mode) == e.mode


@settings(max_examples=150)
@given(sorted_entries())
def test_dir_leaf_round_trip(found: tuple[Entry, ...]) -> None:
    assert decode_dir_node(encode_dir_leaf(found)) == DirLeaf(found)


@given(interiors())
def test_dir_interior_round_trip(node: DirInterior) -> None:
    assert decode_dir_node(encode_dir_interior(node.parts)) == node


@given(st.lists(chunk_refs, max_size=50))
def test_chunk_list_round_trip(chunks: list[Ref]) -> None:
    expect = ChunkListRef(Ref(bytes(32), bytes(32), 0), len(chunks),
                          sum(r.length for r in chunks))
    if not chunks:
        # A chunk list block always holds at least one chunk (its ref says nchunks >= 1);
        # the decoder itself only checks that the block matches what its ref says.
        assert decode_chunk_list(encode_chunk_list(chunks), expect) == ()
        return
    assert decode_chunk_list(encode_chunk_list(chunks), expect) == tuple(chunks)


def test_split_chunk_list() -> None:
    chunks = [Ref(bytes(32), i.to_bytes(32, "big"), 1) for i in range(2 * CHUNKS_PER_LIST_BLOCK
                                                                      + 5)]
    parts = split_chunk_list(chunks)
    assert [len(p) for p in parts] == [CHUNKS_PER_LIST_BLOCK, CHUNKS_PER_LIST_BLOCK, 5]
    assert [r for p in parts for r in p] == chunks
    assert split_chunk_list([]) == []
    for p in parts:
        expect = ChunkListRef(Ref(bytes(32), bytes(32), 0), len(p), len(p))
        assert decode_chunk_list(encode_chunk_list(p), expect) == tuple(p)


def test_chunk_list_limits_are_consistent() -> None:
    # A full chunk-list block must decode, and fit in one block.
    assert CHUNKS_PER_LIST_BLOCK <= MAX_CHUNKS_PER_LIST
    full = [Ref(bytes([1]) * 32, bytes([2]) * 32, MAX_BLOCK_PLAINTEXT)] * CHUNKS_PER_LIST_BLOCK
    assert len(encode_chunk_list(full)) <= MAX_BLOCK_PLAINTEXT
    # The biggest possible leaf entry (256 inline chunks, longest name) is far below a block.
    big = Entry(b"n" * MAX_NAME, KIND_FILE, 0o7777, I64_MIN, size=MAX_INLINE_CHUNKS * 7,
                chunks=(Ref(b"\xff" * 32, b"\xff" * 32, 7),) * MAX_INLINE_CHUNKS)
    assert len(pack(encode_entry(big))) < DIR_NODE_TARGET


# ----------------------------------------------------------------------------- build_directory


class FakeStore:
    """The `emit` of build_directory: keeps encoded nodes in a dict keyed by a fake Ref."""

    def __init__(self) -> None:
        self.nodes: dict[Ref, bytes] = {}
        self.emitted = 0

    def emit(self, data: bytes) -> Ref:
        self.emitted += 1
        ref = Ref(hashlib.sha256(data).digest(), hashlib.sha256(b"fake" + data).digest(),
                  len(data))
        self.nodes[ref] = data
        return ref

    def walk(self, ref: Ref, depth: int = 0) -> tuple[list[Entry], list[int]]:
        """Entries of the directory under `ref` in order, and the depth of every leaf.

        Checks the interior invariants on the way: each part's first name is the
        first name below it and its count is the number of entries below it.
        """
        assert depth <= 32, "node tree unreasonably deep"
        node = decode_dir_node(self.nodes[ref])
        if isinstance(node, DirLeaf):
            return list(node.entries), [depth]
        out: list[Entry] = []
        depths: list[int] = []
        if depth == 0:
            assert len(node.parts) >= 2, "a root interior node with one part is a wasted level"
        for part in node.parts:
            below, d = self.walk(part.ref, depth + 1)
            assert below, "an interior node points at an empty subtree"
            assert below[0].name == part.first_name
            assert len(below) == part.nentries
            out.extend(below)
            depths.extend(d)
        assert node.nentries == len(out)
        return out, depths


def many_entries(n: int, salt: bytes = b"") -> list[Entry]:
    """n entries of all kinds, names deliberately not in sorted order."""
    out = []
    for i in range(n):
        name = b"%s%08d" % (salt, (i * 7919) % n if n else 0)
        h = hashlib.sha256(name).digest()
        if i % 5 == 0:
            out.append(Entry(name, KIND_DIR, 0o755, i, node=Ref(h, h, 100), nsubdirs=1,
                             nentries=3))
        elif i % 11 == 0:
            out.append(Entry(name, KIND_LINK, 0o777, i, size=5, target=b"../x/"))
        else:
            out.append(Entry(name, KIND_FILE, 0o644, 1_700_000_000_000_000_000 + i,
                             size=1000 + i, chunks=(Ref(h, h, 1000 + i),)))
    return out


@pytest.fixture(scope="module")
def large_directory() -> tuple[list[Entry], FakeStore, Ref]:
    given_entries = many_entries(50_000)
    store = FakeStore()
    return given_entries, store, build_directory(given_entries, store.emit)


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_build_directory_walks_back_to_the_same_entries(n: int) -> None:
    given_entries = many_entries(n)
    store = FakeStore()
    root = build_directory(given_entries, store.emit)
    walked, _ = store.walk(root)
    assert walked == sorted(given_entries, key=lambda e: e.name)
    assert len(store.nodes) == store.emitted == 1
    assert isinstance(decode_dir_node(store.nodes[root]), DirLeaf)


def test_a_large_directory_walks_back_to_the_same_entries(large_directory) -> None:
    given_entries, store, root = large_directory
    walked, _ = store.walk(root)
    assert walked == sorted(given_entries, key=lambda e: e.name)
    assert store.emitted == len(store.nodes)  # no node emitted twice


def test_a_large_directory_really_splits(large_directory) -> None:
    _, store, root = large_directory
    top = decode_dir_node(store.nodes[root])
    assert isinstance(top, DirInterior) and top.nentries == 50_000
    leaves = [d for d in store.nodes.values() if isinstance(decode_dir_node(d), DirLeaf)]
    assert len(leaves) >= 50_000 * 40 // DIR_NODE_TARGET  # every entry encodes to > 40 bytes
    for data in leaves:
        # A leaf holds about `target` bytes of entries: never more (a leaf with a single
        # entry is the exception), and no leaf node comes near the block size limit.
        assert len(data) <= DIR_NODE_TARGET + 64
    _, depths = store.walk(root)
    assert set(depths) == {1}, "leaves sit at one depth"
    assert max(depths) <= MAX_DIR_DEPTH_OF_NODES


@pytest.mark.parametrize("target", [1, 300, 2048])
def test_small_targets_build_a_deep_balanced_tree(target: int) -> None:
    given_entries = many_entries(1000)
    store = FakeStore()
    root = build_directory(given_entries, store.emit, target=target)
    walked, depths = store.walk(root)
    assert walked == sorted(given_entries, key=lambda e: e.name)
    assert len(set(depths)) == 1 and depths[0] >= 2
    if target == 1:
        assert len(depths) == 1000  # one entry per leaf


def test_build_directory_is_deterministic_and_shares_unchanged_leaves() -> None:
    """The Merkle property: the same entries give the same root; changing one entry in
    place (same encoded size) rewrites only its leaf and the path above it."""
    given_entries = many_entries(20_000)
    a, b = FakeStore(), FakeStore()
    root_a = build_directory(given_entries, a.emit)
    assert build_directory(list(reversed(given_entries)), b.emit) == root_a
    changed = list(given_entries)
    e = changed[1234]
    changed[1234] = Entry(e.name, e.kind, e.mode, e.mtime_ns + 1 if e.mtime_ns % 10 != 9 else
                          e.mtime_ns - 1, e.size, e.chunks, e.chunk_lists, e.node, e.nsubdirs,
                          e.nentries, e.target)
    c = FakeStore()
    root_c = build_directory(changed, c.emit)
    assert root_c != root_a
    _, depths = c.walk(root_c)
    new_nodes = set(c.nodes) - set(a.nodes)
    assert len(new_nodes) == depths[0] + 1  # one leaf plus each interior node above it


def test_build_directory_refuses_duplicates() -> None:
    e = many_entries(3)
    with pytest.raises(FormatError, match="duplicated"):
        build_directory([*e, e[1]], FakeStore().emit)


# ----------------------------------------------------------------------------- raw records


def file_raw(**over: Any) -> dict:
    h = bytes(32)
    raw = {"n": b"f", "t": KIND_FILE, "m": 0o644, "mt": 0, "s": 10, "c": [[h, h, 4], [h, h, 6]]}
    raw.update(over)
    return raw


def dir_raw(**over: Any) -> dict:
    raw = {"n": b"d", "t": KIND_DIR, "m": 0o755, "mt": 0, "r": [bytes(32), bytes(32), 9],
           "nd": 1, "ne": 2}
    raw.update(over)
    return raw


def link_raw(**over: Any) -> dict:
    raw = {"n": b"l", "t": KIND_LINK, "m": 0o777, "mt": 0, "l": b"target"}
    raw.update(over)
    return raw


def leaf_raw(entries_raw: list, **over: Any) -> bytes:
    raw = {"v": FORMAT_VERSION, "k": "d", "e": entries_raw}
    raw.update(over)
    return pack(raw)


def interior_raw(parts: list, **over: Any) -> bytes:
    raw = {"v": FORMAT_VERSION, "k": "i", "p": parts}
    raw.update(over)
    return pack(raw)


def part_raw(name: bytes, n: int = 1) -> list:
    return [name, [bytes(32), bytes(32), 5], n]


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def test_raw_helpers_are_valid() -> None:
    node = decode_dir_node(leaf_raw([dir_raw(), file_raw(), link_raw()]))
    assert isinstance(node, DirLeaf) and [e.name for e in node.entries] == [b"d", b"f", b"l"]
    node = decode_dir_node(interior_raw([part_raw(b"a", 2), part_raw(b"b", 3)]))
    assert isinstance(node, DirInterior) and node.nentries == 5


BAD_NAMES = [b"", b".", b"..", b"a/b", b"/", b"a\x00", b"\x00", b"x" * (MAX_NAME + 1)]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(name: bytes) -> None:
    with pytest.raises(FormatError):
        check_name(name)
    for make in (file_raw, dir_raw, link_raw):
        with pytest.raises(FormatError):
            decode_entry(make(n=name))
        with pytest.raises(FormatError):
            decode_dir_node(leaf_raw([make(n=name)]))
    with pytest.raises(FormatError):
        decode_dir_node(interior_raw([part_raw(name)]))


def test_good_edge_names() -> None:
    for name in (b"x" * MAX_NAME, b"...", b".a", b"\xff\xfe", b" ", b"a\\b"):
        assert check_name(name) == name
        assert decode_entry(file_raw(n=name)).name == name
    with pytest.raises(FormatError):
        decode_entry(file_raw(n="text"))  # a name is bytes, never str


def test_duplicates_and_unsorted_names_are_refused() -> None:
    for names_ in ([b"a", b"a"], [b"b", b"a"], [b"a", b"c", b"b"], [b"a", b"b", b"b"]):
        with pytest.raises(FormatError, match="out of order or duplicated"):
            decode_dir_node(leaf_raw([link_raw(n=n) for n in names_]))
        with pytest.raises(FormatError, match="out of order or duplicated"):
            decode_dir_node(interior_raw([part_raw(n) for n in names_]))


@pytest.mark.parametrize("version", [0, 2, -1, True, 1.0, "1", b"\x01", None, [1]])
def test_unknown_versions_are_refused(version: object) -> None:
    with pytest.raises(FormatError, match="version"):
        decode_dir_node(leaf_raw([], v=version))
    with pytest.raises(FormatError, match="version"):
        decode_dir_node(interior_raw([part_raw(b"a")], v=version))
    data = pack({"v": version, "k": "c", "c": []})
    with pytest.raises(FormatError, match="version"):
        decode_chunk_list(data, ChunkListRef(Ref(bytes(32), bytes(32), 0), 1, 1))


def test_missing_version_and_wrong_kind_are_refused() -> None:
    with pytest.raises(FormatError, match="version"):
        decode_dir_node(pack({"k": "d", "e": []}))
    for kind in ("c", "x", None, 1, b"d"):
        with pytest.raises(FormatError, match="kind"):
            decode_dir_node(pack({"v": FORMAT_VERSION, "k": kind, "e": []}))
    chunk_ref = ChunkListRef(Ref(bytes(32), bytes(32), 0), 1, 1)
    with pytest.raises(FormatError, match="kind"):
        decode_chunk_list(leaf_raw([]), chunk_ref)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(FormatError, match="unknown fields"):
        decode_dir_node(leaf_raw([], extra=1))
    with pytest.raises(FormatError, match="unknown fields"):
        decode_dir_node(interior_raw([part_raw(b"a")], e=[]))
    with pytest.raises(FormatError, match="unknown fields"):
        decode_chunk_list(pack({"v": 1, "k": "c", "c": [], "z": 0}),
                          ChunkListRef(Ref(bytes(32), bytes(32), 0), 1, 1))
    for raw in (file_raw(l=b"x"), file_raw(r=[bytes(32), bytes(32), 1]), dir_raw(s=0),
                dir_raw(c=[]), link_raw(s=6), link_raw(c=[]), file_raw(zz=1),
                file_raw(x=[])):  # a file carries its chunks inline or in lists, never both
        with pytest.raises(FormatError, match="unknown fields"):
            decode_entry(raw)


def test_missing_fields_are_refused() -> None:
    for raw in (file_raw(), dir_raw(), link_raw()):
        for key in raw:
            with pytest.raises(FormatError):
                decode_entry(without(raw, key))
    for key in ("v", "k", "e"):
        with pytest.raises(FormatError):
            decode_dir_node(pack(without({"v": 1, "k": "d", "e": []}, key)))


def test_sizes_that_do_not_add_up_are_refused() -> None:
    h = bytes(32)
    with pytest.raises(FormatError, match="add up"):
        decode_entry(file_raw(s=11))
    with pytest.raises(FormatError, match="add up"):
        decode_entry(file_raw(s=0, c=[[h, h, 0], [h, h, 1]]))
    with pytest.raises(FormatError, match="empty chunk"):
        decode_entry(file_raw(s=1, c=[[h, h, 0], [h, h, 1]]))
    lists = [[h, h, 100, 3, 40], [h, h, 100, 2, 60]]
    assert decode_entry(without(file_raw(s=100, x=lists), "c")).size == 100
    with pytest.raises(FormatError, match="cover"):
        decode_entry(without(file_raw(s=99, x=lists), "c"))
    with pytest.raises(FormatError):
        decode_entry(without(file_raw(s=0, x=[[h, h, 100, 1, 0]]), "c"))  # empty list block
    with pytest.raises(FormatError):
        decode_entry(without(file_raw(s=1, x=[[h, h, 100, 0, 1]]), "c"))  # no chunks in it
    with pytest.raises(FormatError):
        decode_entry(dir_raw(nd=3, ne=2))  # more subdirectories than entries
    with pytest.raises(FormatError):
        decode_dir_node(interior_raw([part_raw(b"a", 0)]))  # an empty part
    with pytest.raises(FormatError, match="no parts"):
        decode_dir_node(interior_raw([]))
    chunks = [Ref(h, h, 4), Ref(h, h, 6)]
    data = encode_chunk_list(chunks)
    ref = Ref(h, h, len(data))
    assert decode_chunk_list(data, ChunkListRef(ref, 2, 10)) == tuple(chunks)
    with pytest.raises(FormatError, match="holds 2 chunks"):
        decode_chunk_list(data, ChunkListRef(ref, 3, 10))
    with pytest.raises(FormatError, match="add up"):
        decode_chunk_list(data, ChunkListRef(ref, 2, 11))
    with pytest.raises(FormatError, match="empty chunk"):
        decode_chunk_list(encode_chunk_list([Ref(h, h, 0), Ref(h, h, 10)]),
                          ChunkListRef(ref, 2, 10))


def test_field_types_and_ranges_are_checked() -> None:
    h = bytes(32)
    bad_entries = [
        file_raw(t=3), file_raw(t=-1), file_raw(t=True), file_raw(m=0o10000), file_raw(m=-1),
        file_raw(m=1.0), file_raw(mt=1 << 63), file_raw(mt=None), file_raw(s=-1),
        file_raw(s=MAX_FILE_SIZE + 1, c=[]), file_raw(s=False, c=[]),
        file_raw(c=[[h, h]]), file_raw(c=[[h, h, 4, 0]]), file_raw(c=[[h[:31], h, 10]]),
        file_raw(c=[[h, h + b"x", 10]]), file_raw(c=[["a" * 32, h, 10]]),
        file_raw(c=[[h, h, MAX_BLOCK_PLAINTEXT + 1]]), file_raw(c={}), file_raw(c=None),
        dir_raw(r=[h, h]), dir_raw(r=None), dir_raw(ne=-1), dir_raw(ne=(1 << 32) + 1),
        dir_raw(nd=-1),
        # the folder aggregates: both or neither, integers in [0, 2**62]
        dir_raw(tf=1), dir_raw(tb=1), dir_raw(tf=-1, tb=0), dir_raw(tf=0, tb=MAX_TOTAL + 1),
        dir_raw(tf=True, tb=0), dir_raw(tf=0, tb=None), dir_raw(tf=0, tb=1.0),
        link_raw(l=b""), link_raw(l=b"a\x00b"), link_raw(l="text"),
        link_raw(l=b"x" * (MAX_LINK_TARGET + 1)),
        [1, 2, 3], None, b"entry",
    ]
    for raw in bad_entries:
        with pytest.raises(FormatError):
            decode_entry(raw)
    assert decode_entry(link_raw(l=b"x" * MAX_LINK_TARGET)).size == MAX_LINK_TARGET
    folder = decode_entry(dir_raw(tf=MAX_TOTAL, tb=0))
    assert (folder.total_files, folder.total_bytes) == (MAX_TOTAL, 0)
    older = decode_entry(dir_raw())  # written before the aggregates: still a folder
    assert older.is_dir and older.total_files is None and older.total_bytes is None
    assert decode_entry(file_raw(mt=I64_MIN)).mtime_ns == I64_MIN


def test_oversize_lists_are_refused() -> None:
    h = bytes(32)
    ref = [h, h, 1]
    assert len(decode_entry(file_raw(s=MAX_INLINE_CHUNKS,
                                     c=[ref] * MAX_INLINE_CHUNKS)).chunks or ()) == 256
    with pytest.raises(FormatError, match="more than"):
        decode_entry(file_raw(s=MAX_INLINE_CHUNKS + 1, c=[ref] * (MAX_INLINE_CHUNKS + 1)))
    with pytest.raises(FormatError):
        decode_entry(without(file_raw(s=MAX_LIST_BLOCKS + 1,
                                      x=[[h, h, 9, 1, 1]] * (MAX_LIST_BLOCKS + 1)), "c"))
    too_many = MAX_CHUNKS_PER_LIST + 1
    with pytest.raises(FormatError):
        decode_chunk_list(pack({"v": 1, "k": "c", "c": [ref] * too_many}),
                          ChunkListRef(Ref(h, h, 0), MAX_CHUNKS_PER_LIST, too_many))
    # Node-level lists: the length check fires before any item is looked at.
    with pytest.raises(FormatError):
        decode_dir_node(leaf_raw([None] * (MAX_ENTRIES_PER_NODE + 1)))
    with pytest.raises(FormatError):
        decode_dir_node(interior_raw([None] * (MAX_PARTS_PER_NODE + 1)))
    with pytest.raises(FormatError, match="exceeds"):
        decode_dir_node(leaf_raw([], pad=b"x" * MAX_RECORD))
    with pytest.raises(FormatError, match="exceeds"):
        decode_dir_node(b"\x00" * (MAX_RECORD + 1))


def test_trailing_bytes_are_refused() -> None:
    data = encode_dir_leaf([])
    with pytest.raises(FormatError):
        decode_dir_node(data + b"\x00")
    with pytest.raises(FormatError):
        decode_dir_node(data[:-1])


# ----------------------------------------------------------------------------- hostile input

SOME_LIST = ChunkListRef(Ref(bytes(32), bytes(32), 0), 1, 1)


def decodes_or_format_error(fn: Callable[[], object]) -> object | None:
    try:
        return fn()
    except FormatError:
        return None


@settings(max_examples=400)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_format_error(data: bytes) -> None:
    # random bytes decode, if ever, only into a node that encodes back to those very bytes
    node = decodes_or_format_error(lambda: decode_dir_node(data))
    if isinstance(node, DirLeaf):
        assert encode_dir_leaf(node.entries) == data
    elif isinstance(node, DirInterior):
        assert encode_dir_interior(node.parts) == data
    else:
        assert node is None
    refs = decodes_or_format_error(lambda: decode_chunk_list(data, SOME_LIST))
    assert refs is None or encode_chunk_list(refs) == data


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_objects)
def test_arbitrary_msgpack_raises_only_format_error(obj: Any) -> None:
    data = pack(obj)
    decodes_or_format_error(lambda: decode_dir_node(data))
    decodes_or_format_error(lambda: decode_chunk_list(data, SOME_LIST))
    decodes_or_format_error(lambda: decode_entry(obj))
    decodes_or_format_error(lambda: decode_ref(obj))


def mutate(obj: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Change one spot deep inside a valid decoded record to something arbitrary."""
    if depth > 6 or not isinstance(obj, list | dict) or not obj or data.draw(
            st.integers(0, 3)) == 0:
        return data.draw(msgpack_objects)
    if isinstance(obj, list):
        i = data.draw(st.integers(0, len(obj) - 1))
        action = data.draw(st.sampled_from(["recurse", "drop", "dup"]))
        if action == "drop":
            return obj[:i] + obj[i + 1:]
        if action == "dup":
            return obj[:i + 1] + obj[i:]
        return obj[:i] + [mutate(obj[i], data, depth + 1)] + obj[i + 1:]
    key = data.draw(st.sampled_from(sorted(obj)))
    action = data.draw(st.sampled_from(["recurse", "drop", "add"]))
    out = dict(obj)
    if action == "drop":
        del out[key]
    elif action == "add":
        out[data.draw(st.sampled_from(FIELD_NAMES))] = data.draw(msgpack_objects)
    else:
        out[key] = mutate(obj[key], data, depth + 1)
    return out


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    sorted_entries(max_size=4).map(encode_dir_leaf),
    interiors().map(lambda n: encode_dir_interior(n.parts)),
    st.lists(chunk_refs, min_size=1, max_size=5).map(encode_chunk_list),
), st.data())
def test_near_valid_records_raise_only_format_error(encoded: bytes, data: st.DataObject) -> None:
    obj = mutate(msgpack.unpackb(encoded, raw=False), data)
    mutated = pack(obj)
    decodes_or_format_error(lambda: decode_dir_node(mutated))
    decodes_or_format_error(lambda: decode_chunk_list(mutated, SOME_LIST))


# ----------------------------------------------------------------------------- byte changes
#
# What is provable. msgpack has same-length respellings of one value that differ in a
# single byte: 0/1 <-> False/True (0x00/0x01 <-> 0xc2/0xc3), bin <-> str of one length
# (0xc4-0xc6 <-> 0xd9-0xdb), and an unsigned <-> signed integer of one width (0xcc-0xcf
# <-> 0xd0-0xd3, for values both can hold). The decoders take integers only of type
# int (never bool) and byte strings only of type bytes, so the first two are refused;
# the third is the same integer, and the decoders do not insist on canonical msgpack
# (a node's identity is its block id, checked with its tag before it is decoded). Every
# other one-byte change alters a value or the structure, and decoding is one-to-one on
# what the decoders accept. So: a one-byte change either raises FormatError, decodes to
# a different value, or is an integer re-spelled with the other signedness.

INT_TYPE_BYTES = range(0xCC, 0xD4)  # uint8..uint64, int8..int64


def typed_equal(a: object, b: object) -> bool:
    """Equal as msgpack values, telling True from 1 and str from bytes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(typed_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(typed_equal(a[k], b[k]) for k in a)
    return a == b


def decoded(fn: Callable[[bytes], object], data: bytes) -> object | None:
    try:
        return fn(data)
    except FormatError:
        return None


def assert_byte_change_is_seen(fn: Callable[[bytes], object], data: bytes, original: object,
                               i: int, v: int) -> None:
    changed = data[:i] + bytes([v]) + data[i + 1:]
    if decoded(fn, changed) != original:
        return
    # Silently equal: allowed only for an integer re-spelled with the other signedness.
    assert data[i] in INT_TYPE_BYTES and v in INT_TYPE_BYTES, (
        f"byte {i} {data[i]:#x}->{v:#x} decodes to the same value")
    assert (data[i] - v) % 4 == 0
    assert typed_equal(msgpack.unpackb(changed), msgpack.unpackb(data))


def assert_every_byte_change_is_seen(data: bytes, fn: Callable[[bytes], object]) -> None:
    original = fn(data)
    for i in range(len(data)):
        for v in range(256):
            if v != data[i]:
                assert_byte_change_is_seen(fn, data, original, i, v)


# Byte values that re-type or re-size msgpack items, plus a few plain ones.
INTERESTING_BYTES = sorted({0x00, 0x01, 0x02, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xa1, 0xbf,
                            0xc0, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xca, 0xcb, 0xcc, 0xcd, 0xce,
                            0xcf, 0xd0, 0xd3, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0,
                            0xff, 0x20, 0x41, 0x64, 0x69, 0x6b, 0x76})


def sample_leaf() -> bytes:
    h1, h2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
    return encode_dir_leaf([
        Entry(b"a", KIND_DIR, 0o755, 1, node=Ref(h1, h2, 300), nsubdirs=1, nentries=1),
        Entry(b"b", KIND_FILE, 0o644, -5, size=0, chunks=()),
        Entry(b"c", KIND_FILE, 0o600, 1 << 40, size=70_000,
              chunks=(Ref(h1, h2, 65_536), Ref(h2, h1, 4_464))),
        Entry(b"d", KIND_FILE, 0, 0, size=1, chunk_lists=(ChunkListRef(Ref(h2, h2, 1), 1, 1),)),
        Entry(b"e" * 40, KIND_LINK, 0o777, 0, size=3, target=b"a/b"),
    ])


def test_every_byte_change_of_a_leaf_is_seen() -> None:
    assert_every_byte_change_is_seen(sample_leaf(), decode_dir_node)


def test_integer_respelling_is_the_only_silent_change() -> None:
    """Pin down the exception above: it exists, and it is only a respelling."""
    data = encode_dir_leaf([Entry(b"a", KIND_FILE, 0, 0, size=300, chunks=(
        Ref(bytes(32), bytes(32), 300),))])
    i = data.index(b"\xcd\x01\x2c")  # 300 as uint16, the first of two (size, then length)
    respelled = data[:i] + b"\xd1" + data[i + 1:]  # int16
    assert respelled != data and decode_dir_node(respelled) == decode_dir_node(data)


def test_every_byte_change_of_an_interior_node_is_seen() -> None:
    h = hashlib.sha256(b"x").digest()
    data = encode_dir_interior([DirPart(b"a", Ref(h, h, 10), 1), DirPart(b"b" * 40,
                                                                         Ref(h, h, 0), 300)])
    assert_every_byte_change_is_seen(data, decode_dir_node)


def test_every_byte_change_of_a_chunk_list_is_seen() -> None:
    h = hashlib.sha256(b"x").digest()
    chunks = [Ref(h, h, 1), Ref(h, h, 255), Ref(h, h, 65_536)]
    expect = ChunkListRef(Ref(h, h, 0), 3, 1 + 255 + 65_536)
    assert_every_byte_change_is_seen(encode_chunk_list(chunks),
                                     lambda d: decode_chunk_list(d, expect))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(sorted_entries(max_size=3).map(encode_dir_leaf),
                 interiors().map(lambda n: encode_dir_interior(n.parts))), st.data())
def test_random_byte_changes_are_seen(encoded: bytes, data: st.DataObject) -> None:
    original = decode_dir_node(encoded)
    for _ in range(20):
        i = data.draw(st.integers(0, len(encoded) - 1))
        v = data.draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
        if v != encoded[i]:
            assert_byte_change_is_seen(decode_dir_node, encoded, original, i, v)


def test_bool_for_int_respelling_is_refused() -> None:
    """The one-byte respelling the version check once missed: v=True is not version 1."""
    data = encode_dir_leaf([])
    i = data.index(b"\xa1v\x01") + 2
    with pytest.raises(FormatError, match="version"):
        decode_dir_node(data[:i] + b"\xc3" + data[i + 1:])


def test_name_order_is_bytewise() -> None:
    """Names sort as raw bytes (not as text), so every reader agrees on the order."""
    ordered = [b"\x01", b"B", b"Z", b"_", b"a", b"a\x01", b"ab", b"\xc3\xa9"]
    leaf = encode_dir_leaf([Entry(n, KIND_LINK, 0, 0, size=1, target=b"x") for n in ordered])
    node = decode_dir_node(leaf)
    assert isinstance(node, DirLeaf)
    assert [e.name for e in node.entries] == ordered
    store = FakeStore()
    shuffled = [Entry(n, KIND_LINK, 0, 0, size=1, target=b"x") for n in reversed(ordered)]
    assert decode_dir_node(store.nodes[build_directory(shuffled, store.emit)]) == node


# Values around every bound `_decode_entry_checked` checks for an inline file's fields:
# right types and wrong ones (bool is an int to Python, never to the format).
_ODD_VALUES = st.sampled_from([None, True, False, 0, 1, -1, 0.0, "f", b"", [], {}])
_INTS = st.one_of(st.integers(-2, 2), st.sampled_from(
    [0o7777, 0o10000, MAX_FILE_SIZE, MAX_FILE_SIZE + 1, I64_MIN, I64_MIN - 1, I64_MAX,
     I64_MAX + 1, MAX_BLOCK_PLAINTEXT, MAX_BLOCK_PLAINTEXT + 1]), _ODD_VALUES)
_NAMES = st.one_of(st.sampled_from([b"f", b".", b"..", b"a/b", b"a\x00", b"", b"x" * MAX_NAME,
                                    b"x" * (MAX_NAME + 1), "f"]), _ODD_VALUES)
_IDS = st.one_of(st.sampled_from([bytes(HASH_LEN), bytes(HASH_LEN - 1), bytes(HASH_LEN + 1)]),
                 _ODD_VALUES)
_REFS = st.one_of(st.lists(st.one_of(_IDS, _INTS), min_size=2, max_size=4),
                  st.tuples(_IDS, _IDS, _INTS).map(list), _ODD_VALUES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_NAMES, kind=_INTS, mode=_INTS, mtime=_INTS, size=st.one_of(_INTS, st.just("sum")),
       chunks=st.one_of(st.lists(_REFS, max_size=3), _ODD_VALUES,
                        st.just([[bytes(HASH_LEN), bytes(HASH_LEN), 1]] * (MAX_INLINE_CHUNKS + 1))),
       drop=st.sampled_from([None, "n", "t", "m", "mt", "s", "c"]),
       extra=st.sampled_from([None, "x", "r", "l", "zz"]))
def test_the_inline_file_path_decodes_what_the_checked_path_does(
        name: Any, kind: Any, mode: Any, mtime: Any, size: Any, chunks: Any,
        drop: str | None, extra: str | None) -> None:
    """`decode_entry` takes a small file through `_inline_file` (no helper calls, a walk's
    commonest cost): for any entry, it returns exactly what the checked path returns, or
    defers to it (which then decodes or refuses it with its precise error)."""
    from vfs.formats import _decode_entry_checked, _inline_file

    raw = {"n": name, "t": kind, "m": mode, "mt": mtime, "s": size, "c": chunks}
    if size == "sum" and isinstance(chunks, list):  # sizes that match the chunks
        raw["s"] = sum(c[2] for c in chunks if isinstance(c, list) and len(c) == 3
                       and type(c[2]) is int)
    if drop is not None:
        del raw[drop]
    if extra is not None:
        raw[extra] = [bytes(HASH_LEN), bytes(HASH_LEN), 1]
    fast = _inline_file(raw)
    try:
        checked = _decode_entry_checked(raw)
    except FormatError:
        assert fast is None
        return
    if fast is not None:
        assert fast == checked and type(fast.mode) is int


@pytest.mark.parametrize("sizes", [[1], [4, 6], [MAX_BLOCK_PLAINTEXT], [3] * MAX_INLINE_CHUNKS])
def test_the_inline_file_path_takes_every_valid_small_file(sizes: list[int]) -> None:
    from vfs.formats import _inline_file

    h = bytes(HASH_LEN)
    raw = file_raw(s=sum(sizes), c=[[h, h, n] for n in sizes])
    fast = _inline_file(raw)
    assert fast is not None and fast == decode_entry(raw)
    assert fast.chunks == tuple(Ref(h, h, n) for n in sizes)
