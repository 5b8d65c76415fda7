"""Records of a drive version: entries, directory nodes, chunk lists (pure code).

Everything a drive version says about its tree is one of these records,
msgpack-encoded with a version field, then encrypted like a chunk
(`vfs.crypto`) and stored as a block. A directory references each
subdirectory's node by `Ref`, so the tree is a Merkle tree: a new version
shares every unchanged directory with the one before.

Decoders trust nothing: every length is bounded, names are checked (no `/`,
no NUL, not `.` or `..`, at most 255 bytes, strictly sorted so no duplicates),
sizes must add up, and anything else raises `FormatError`. docs/formats.md
describes every field.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgpack

from .crypto import HASH_LEN, MAX_BLOCK_PLAINTEXT, Ref
from .errors import FormatError

FORMAT_VERSION = 1

KIND_FILE = 0
KIND_DIR = 1
KIND_LINK = 2

MAX_NAME = 255
MAX_LINK_TARGET = 4095
MAX_FILE_SIZE = 1 << 50
MAX_ENTRIES_PER_NODE = 200_000
MAX_PARTS_PER_NODE = 200_000
MAX_DIR_DEPTH_OF_NODES = 6  # interior levels of one directory's node tree
# Entries of one directory, at most: a listing's offsets hold the index in 40 bits
# (vfs/fs.py), and no real folder comes near this.
MAX_DIR_ENTRIES = 1 << 32
MAX_INLINE_CHUNKS = 256  # more than this and a file's chunk list moves to blocks
CHUNKS_PER_LIST_BLOCK = 8192
MAX_CHUNKS_PER_LIST = 50_000
MAX_LIST_BLOCKS = 100_000
DIR_NODE_TARGET = 256 * 1024  # encoded bytes of entries before a directory splits
MAX_RECORD = 8 * 1024 * 1024
# A folder's totals (files, bytes below it) past this are no real drive: shared subtrees
# count once per path, so a hostile drive could claim any number; 2**62 bounds the sums.
MAX_TOTAL = 1 << 62

_I64 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ChunkListRef:
    """A block holding part of a large file's chunk list, and what it covers."""

    ref: Ref
    nchunks: int
    nbytes: int


class Kinded:
    """What a thing with a `kind` and a `mode` says of itself: an entry of a version, and a
    node of a writable mount's working tree (vfs/worktree.py) alike."""

    __slots__ = ()
    kind: int
    mode: int

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    @property
    def is_file(self) -> bool:
        return self.kind == KIND_FILE

    @property
    def is_link(self) -> bool:
        return self.kind == KIND_LINK

    @property
    def st_mode(self) -> int:
        return _KIND_BITS[self.kind] | (self.mode & 0o7777)


_KIND_BITS = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_LINK: stat.S_IFLNK}


@dataclass(frozen=True, slots=True)
class Entry(Kinded):
    """One name in a directory: a file, a directory or a symlink.

    A file carries its chunk list inline (`chunks`) or, when long, in blocks
    (`chunk_lists`). A directory carries the Ref of its node and the counts the
    kernel asks for (nlink needs the number of subdirectories), and, written
    since the folder aggregates, the totals of everything below it
    (`total_files`, `total_bytes`: None in older versions), so a folder's size
    is read from its entry, not summed over every directory below.
    """

    name: bytes
    kind: int
    mode: int
    mtime_ns: int
    size: int = 0
    chunks: tuple[Ref, ...] | None = None
    chunk_lists: tuple[ChunkListRef, ...] | None = None
    node: Ref | None = None
    nsubdirs: int = 0
    nentries: int = 0
    target: bytes | None = None
    total_files: int | None = None
    total_bytes: int | None = None


def dir_totals(entries: Iterable[Entry]) -> tuple[int | None, int | None]:
    """(files, bytes) at or below a folder with these entries, from its subfolders'
    own totals; (None, None) when a subfolder has none (written before the aggregates).

    Files and bytes count regular files only (a symlink is neither), each subtree
    once per path it appears at: what the mount's walk of the tree sums
    (vfs/figures.py), so the two agree (tests/test_formats.py).
    """
    files = size = 0
    for e in entries:
        if e.kind == KIND_FILE:
            files += 1
            size += e.size
        elif e.kind == KIND_DIR:
            if e.total_files is None or e.total_bytes is None:
                return None, None
            files += e.total_files
            size += e.total_bytes
    if files > MAX_TOTAL or size > MAX_TOTAL:
        return None, None
    return files, size


@dataclass(frozen=True, slots=True)
class DirPart:
    """One child of an interior directory node: a sub-range of the names."""

    first_name: bytes
    ref: Ref
    nentries: int


@dataclass(frozen=True, slots=True)
class DirLeaf:
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class DirInterior:
    parts: tuple[DirPart, ...]
    nentries: int = field(default=0)


# ----------------------------------------------------------------------------- checks


def check_name(name: bytes) -> bytes:
    """Raise FormatError unless `name` is one safe path component."""
    if not isinstance(name, bytes):
        raise FormatError("a name must be bytes")
    if not name or len(name) > MAX_NAME:
        raise FormatError(f"a name must be 1 to {MAX_NAME} bytes long")
    if b"/" in name or b"\x00" in name:
        raise FormatError(f"the name {name!r} contains '/' or NUL")
    if name in (b".", b".."):
        raise FormatError(f"the name {name!r} is not allowed")
    return name


def _int(value: object, what: str, lo: int = 0, hi: int = _I64) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _bytes(value: object, what: str, length: int | None = None, max_len: int = MAX_RECORD) -> bytes:
    if type(value) is not bytes:
        raise FormatError(f"{what} must be bytes")
    if length is not None and len(value) != length:
        raise FormatError(f"{what} must be {length} bytes, got {len(value)}")
    if len(value) > max_len:
        raise FormatError(f"{what} is longer than {max_len} bytes")
    return value


def _list(value: object, what: str, max_len: int) -> list:
    if type(value) is not list:
        raise FormatError(f"{what} must be a list")
    if len(value) > max_len:
        raise FormatError(f"{what} has more than {max_len} items")
    return value


def _map(value: object, what: str) -> dict:
    if type(value) is not dict:
        raise FormatError(f"{what} must be a map")
    return value


def _unpack(data: bytes | memoryview) -> object:
    if len(data) > MAX_RECORD:
        raise FormatError(f"record of {len(data)} bytes exceeds {MAX_RECORD}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_RECORD,
            max_str_len=64,
            max_array_len=max(MAX_ENTRIES_PER_NODE, MAX_PARTS_PER_NODE, MAX_LIST_BLOCKS),
            max_map_len=32,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
        raise FormatError(f"record is not valid msgpack: {exc}") from exc


def _check_version(obj: dict, kind: str) -> None:
    if type(obj.get("v")) is not int or obj["v"] != FORMAT_VERSION:  # True == 1 in Python
        raise FormatError(f"unknown record version {obj.get('v')!r} (this peerdrive reads "
                          f"version {FORMAT_VERSION}); upgrade peerdrive")
    if obj.get("k") != kind:
        raise FormatError(f"expected a record of kind {kind!r}, got {obj.get('k')!r}")


def _only_keys(obj: dict, allowed: set[str], what: str) -> None:
    extra = set(obj) - allowed
    if extra:
        # keys may be str or bytes (msgpack allows both): sort their reprs
        raise FormatError(f"{what} has unknown fields {sorted(map(repr, extra))}")


# ----------------------------------------------------------------------------- refs


def encode_ref(ref: Ref) -> list:
    return [ref.block_id, ref.chunk_hash, ref.length]


def decode_ref(obj: object, what: str = "ref") -> Ref:
    items = _list(obj, what, 3)
    if len(items) != 3:
        raise FormatError(f"{what} must have 3 items")
    return Ref(
        _bytes(items[0], f"{what} block id", HASH_LEN),
        _bytes(items[1], f"{what} chunk hash", HASH_LEN),
        _int(items[2], f"{what} length", 0, MAX_BLOCK_PLAINTEXT),
    )


def decode_refs(items: list, what: str = "ref") -> tuple[Ref, ...]:
    """Many refs: the checks of decode_ref inlined, since a large file's list has thousands.

    Opening a 1 GiB file decodes ~4,000 of them before its first byte can be read.
    """
    out = []
    append = out.append
    for item in items:
        if type(item) is list and len(item) == 3:
            block_id, chunk_hash, length = item
            if (type(block_id) is bytes and len(block_id) == HASH_LEN
                    and type(chunk_hash) is bytes and len(chunk_hash) == HASH_LEN
                    and type(length) is int and 0 <= length <= MAX_BLOCK_PLAINTEXT):
                append(Ref(block_id, chunk_hash, length))
                continue
        decode_ref(item, what)  # raises the precise error
        raise FormatError(f"{what} is malformed")  # decode_ref accepts nothing the loop refused
    return tuple(out)


# ----------------------------------------------------------------------------- entries


def encode_entry(e: Entry) -> dict:
    out: dict = {"n": e.name, "t": e.kind, "m": e.mode, "mt": e.mtime_ns}
    if e.kind == KIND_FILE:
        out["s"] = e.size
        if e.chunk_lists is not None:
            out["x"] = [[*encode_ref(c.ref), c.nchunks, c.nbytes] for c in e.chunk_lists]
        else:
            out["c"] = [encode_ref(r) for r in (e.chunks or ())]
    elif e.kind == KIND_DIR:
        assert e.node is not None
        out["r"] = encode_ref(e.node)
        out["nd"] = e.nsubdirs
        out["ne"] = e.nentries
        if e.total_files is not None and e.total_bytes is not None:
            out["tf"] = e.total_files
            out["tb"] = e.total_bytes
    else:
        out["l"] = e.target
    return out


# The keys of the commonest entry: a file with its chunks inline.
_INLINE_FILE_KEYS = frozenset(("n", "t", "m", "mt", "s", "c"))


def decode_entry(obj: object) -> Entry:
    """One entry of a directory node, checked; a small file through `_inline_file`."""
    entry = _inline_file(obj)
    return entry if entry is not None else _decode_entry_checked(obj)


def _inline_file(obj: object) -> Entry | None:
    """A file entry with its chunks inline, every check of `_decode_entry_checked` made
    inline; None for anything else, or anything those checks would refuse (decoded or
    refused, with its precise error, by `_decode_entry_checked` then).

    Most entries of a drive are such files, and every listing of a directory not
    in the node cache, and the first figures of a version, decode all of its
    entries: a walk of 10^5 files spent about half of the mount's CPU in the
    general path's helper calls (cProfile of a warm `find` past --max-inodes).
    It accepts exactly what the general path accepts
    (`tests/test_formats.py::test_the_inline_file_path_decodes_what_the_checked_path_does`).
    """
    if type(obj) is not dict or obj.keys() != _INLINE_FILE_KEYS:
        return None
    name, kind, mode, mtime, size, chunks = (obj["n"], obj["t"], obj["m"], obj["mt"],
                                             obj["s"], obj["c"])
    if not (type(kind) is int and kind == KIND_FILE
            and type(name) is bytes and 0 < len(name) <= MAX_NAME
            and b"/" not in name and b"\x00" not in name and name != b"." and name != b".."
            and type(mode) is int and 0 <= mode <= 0o7777
            and type(mtime) is int and -_I64 - 1 <= mtime <= _I64
            and type(size) is int and 0 <= size <= MAX_FILE_SIZE
            and type(chunks) is list and len(chunks) <= MAX_INLINE_CHUNKS):
        return None
    refs = []
    total = 0
    for item in chunks:
        if type(item) is not list or len(item) != 3:
            return None
        block_id, chunk_hash, length = item
        if not (type(block_id) is bytes and len(block_id) == HASH_LEN
                and type(chunk_hash) is bytes and len(chunk_hash) == HASH_LEN
                and type(length) is int and 0 < length <= MAX_BLOCK_PLAINTEXT):
            return None
        total += length
        refs.append(Ref(block_id, chunk_hash, length))
    if total != size:
        return None
    return Entry(name, KIND_FILE, mode, mtime, size=size, chunks=tuple(refs))


def _decode_entry_checked(obj: object) -> Entry:
    m = _map(obj, "entry")
    name = check_name(_bytes(m.get("n"), "entry name", max_len=MAX_NAME))
    kind = _int(m.get("t"), "entry kind", 0, 2)
    mode = _int(m.get("m"), "entry mode", 0, 0o7777)
    mtime = _int(m.get("mt"), "entry mtime", -_I64 - 1, _I64)
    if kind == KIND_FILE:
        size = _int(m.get("s"), "file size", 0, MAX_FILE_SIZE)
        if "x" in m:
            _only_keys(m, {"n", "t", "m", "mt", "s", "x"}, "file entry")
            lists = []
            total_bytes = 0
            for item in _list(m["x"], "chunk list refs", MAX_LIST_BLOCKS):
                it = _list(item, "chunk list ref", 5)
                if len(it) != 5:
                    raise FormatError("chunk list ref must have 5 items")
                ref = decode_ref(it[:3], "chunk list block")
                n = _int(it[3], "chunk list count", 1, MAX_CHUNKS_PER_LIST)
                nb = _int(it[4], "chunk list bytes", 1, MAX_FILE_SIZE)
                total_bytes += nb
                lists.append(ChunkListRef(ref, n, nb))
            if total_bytes != size:
                raise FormatError(f"file {name!r}: chunk lists cover {total_bytes} bytes, "
                                  f"size says {size}")
            return Entry(name, kind, mode, mtime, size=size, chunk_lists=tuple(lists))
        _only_keys(m, {"n", "t", "m", "mt", "s", "c"}, "file entry")
        chunks = tuple(decode_ref(r, "chunk") for r in _list(m.get("c"), "chunks",
                                                              MAX_INLINE_CHUNKS))
        _check_chunk_sum(chunks, size, name)
        return Entry(name, kind, mode, mtime, size=size, chunks=chunks)
    if kind == KIND_DIR:
        _only_keys(m, {"n", "t", "m", "mt", "r", "nd", "ne", "tf", "tb"}, "directory entry")
        node = decode_ref(m.get("r"), "directory node")
        ne = _int(m.get("ne"), "directory entry count", 0, MAX_DIR_ENTRIES)
        nd = _int(m.get("nd"), "subdirectory count", 0, ne)
        tf = tb = None
        if "tf" in m or "tb" in m:  # both or neither: a version before them has neither
            tf = _int(m.get("tf"), "folder file total", 0, MAX_TOTAL)
            tb = _int(m.get("tb"), "folder byte total", 0, MAX_TOTAL)
        return Entry(name, kind, mode, mtime, node=node, nsubdirs=nd, nentries=ne,
                     total_files=tf, total_bytes=tb)
    _only_keys(m, {"n", "t", "m", "mt", "l"}, "symlink entry")
    target = _bytes(m.get("l"), "symlink target", max_len=MAX_LINK_TARGET)
    if not target or b"\x00" in target:
        raise FormatError(f"symlink {name!r} has an empty target or one containing NUL")
    return Entry(name, kind, mode, mtime, size=len(target), target=target)


def _check_chunk_sum(chunks: Sequence[Ref], size: int, name: bytes) -> None:
    total = sum(r.length for r in chunks)
    if total != size:
        raise FormatError(f"file {name!r}: chunks add up to {total} bytes, size says {size}")
    if any(r.length == 0 for r in chunks):
        raise FormatError(f"file {name!r} has an empty chunk")


# ----------------------------------------------------------------------------- chunk lists


def encode_chunk_list(chunks: Sequence[Ref]) -> bytes:
    return msgpack.packb({"v": FORMAT_VERSION, "k": "c", "c": [encode_ref(r) for r in chunks]})


def decode_chunk_list(data: bytes, expect: ChunkListRef) -> tuple[Ref, ...]:
    m = _map(_unpack(data), "chunk list")
    _check_version(m, "c")
    _only_keys(m, {"v", "k", "c"}, "chunk list")
    chunks = decode_refs(_list(m.get("c"), "chunks", MAX_CHUNKS_PER_LIST), "chunk")
    if len(chunks) != expect.nchunks:
        raise FormatError(f"chunk list holds {len(chunks)} chunks, its ref says {expect.nchunks}")
    _check_chunk_sum(chunks, expect.nbytes, b"<chunk list>")
    return chunks


def split_chunk_list(chunks: Sequence[Ref]) -> list[list[Ref]]:
    return [list(chunks[i:i + CHUNKS_PER_LIST_BLOCK])
            for i in range(0, len(chunks), CHUNKS_PER_LIST_BLOCK)]


# ----------------------------------------------------------------------------- directory nodes


def encode_dir_leaf(entries: Sequence[Entry]) -> bytes:
    return msgpack.packb({"v": FORMAT_VERSION, "k": "d", "e": [encode_entry(e) for e in entries]})


def encode_dir_interior(parts: Sequence[DirPart]) -> bytes:
    return msgpack.packb({
        "v": FORMAT_VERSION,
        "k": "i",
        "p": [[p.first_name, encode_ref(p.ref), p.nentries] for p in parts],
    })


def decode_dir_node(data: bytes) -> DirLeaf | DirInterior:
    """Decode one directory node: a leaf of entries or an interior node of parts."""
    m = _map(_unpack(data), "directory node")
    kind = m.get("k")
    if kind == "d":
        _check_version(m, "d")
        _only_keys(m, {"v", "k", "e"}, "directory node")
        entries = tuple(decode_entry(e) for e in _list(m.get("e"), "entries",
                                                        MAX_ENTRIES_PER_NODE))
        _check_sorted([e.name for e in entries])
        return DirLeaf(entries)
    _check_version(m, "i")
    _only_keys(m, {"v", "k", "p"}, "directory node")
    parts = []
    total = 0
    for item in _list(m.get("p"), "parts", MAX_PARTS_PER_NODE):
        it = _list(item, "part", 3)
        if len(it) != 3:
            raise FormatError("a directory part must have 3 items")
        first = check_name(_bytes(it[0], "part name", max_len=MAX_NAME))
        n = _int(it[2], "part entry count", 1, MAX_DIR_ENTRIES)
        total += n
        if total > MAX_DIR_ENTRIES:
            raise FormatError(f"a directory holds more than {MAX_DIR_ENTRIES} entries")
        parts.append(DirPart(first, decode_ref(it[1], "part"), n))
    if not parts:
        raise FormatError("an interior directory node has no parts")
    _check_sorted([p.first_name for p in parts])
    return DirInterior(tuple(parts), total)


def _check_sorted(names: Sequence[bytes]) -> None:
    for a, b in zip(names, names[1:], strict=False):
        if not a < b:
            raise FormatError(f"names out of order or duplicated: {a!r} then {b!r}")


def build_directory(entries: Iterable[Entry], emit: Callable[[bytes], Ref],
                    target: int = DIR_NODE_TARGET) -> Ref:
    """Encode one directory as a tree of nodes; returns the root node's Ref.

    `emit` encrypts and stores one encoded node and returns its Ref (the only
    effect, so this stays testable). Small directories are one leaf; a large
    one is split into leaves of about `target` bytes under interior nodes,
    so a lookup loads one path of nodes, not the whole directory.
    """
    ordered = sorted(entries, key=lambda e: e.name)
    _check_sorted([e.name for e in ordered])
    leaves: list[list[Entry]] = [[]]
    size = 0
    for e in ordered:
        encoded = len(msgpack.packb(encode_entry(e)))
        if leaves[-1] and size + encoded > target:
            leaves.append([])
            size = 0
        leaves[-1].append(e)
        size += encoded
    if len(leaves) == 1:
        return emit(encode_dir_leaf(leaves[0]))
    level = [DirPart(leaf[0].name, emit(encode_dir_leaf(leaf)), len(leaf)) for leaf in leaves]
    fanout = max(2, target // 128)
    while len(level) > 1:
        groups = [level[i:i + fanout] for i in range(0, len(level), fanout)]
        if len(groups) == 1:
            return emit(encode_dir_interior(groups[0]))
        level = [DirPart(g[0].first_name, emit(encode_dir_interior(g)),
                         sum(p.nentries for p in g)) for g in groups]
    return level[0].ref
