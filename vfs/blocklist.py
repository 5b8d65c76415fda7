"""The block list of a version: every ciphertext block id in it, readable without the read key.

A host holds a drive with the store capability only: it cannot decrypt a
directory node, so it cannot walk the tree to learn which blocks a version
needs. The signed head therefore names a *block list*: a small tree of
plaintext, content-addressed blocks listing every block id of the version
(chunks, chunk lists, directory nodes) with its size:

    leaf      msgpack {v: 1, k: "bl", ids: bin(32 x n), sizes: bin(4 x n, u32 BE)}
    interior  msgpack {v: 1, k: "bi", kids: [[list block id, nblocks, nbytes], ...]}
    head      bl: [root list block id, depth, nblocks, nbytes]   (depth 0: the root is a leaf)

Rules (decoders enforce them; docs/formats.md has the why):

* ids are strictly ascending across the whole list (sorted, so file
  boundaries and the tree's shape do not show; strictness makes duplicates
  impossible), and each size is a block's ciphertext length, 16 .. 4 MiB;
* a leaf holds 1 .. MAX_LEAF_IDS ids, an interior node 1 .. MAX_FANOUT kids,
  the tree is at most MAX_DEPTH interior levels deep and every counter must
  add up to the one above it, down from the signed head;
* leaf and interior boundaries are content-defined (cut after an id whose
  first four bytes fall under a threshold), so a new version that adds a few
  blocks rewrites only the list blocks around them and the ones above.

A list block's id is SHA-256 of its bytes, like any block; it is not
encrypted: it reveals the number and sizes of the version's blocks, which
any holder of the ciphertext sees anyway, and nothing else (no names, no
grouping by file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from .crypto import HASH_LEN, MAX_BLOCK_PLAINTEXT, TAG_LEN
from .errors import FormatError

LIST_VERSION = 1
MAX_LEAF_IDS = 16384  # 576 KiB of ids and sizes
MAX_FANOUT = 16384
MAX_DEPTH = 3  # interior levels under the head: 16384^4 blocks, far beyond any drive
MIN_BLOCK = TAG_LEN + 1
MAX_BLOCK = MAX_BLOCK_PLAINTEXT + TAG_LEN
MAX_NBLOCKS = 1 << 40
MAX_NBYTES = 1 << 62
# A list block ends after an id whose first four bytes (as a big-endian number) are below
# the threshold: 4096 ids per leaf, 1024 kids per interior node on average.
LEAF_CUT = (1 << 32) // 4096
NODE_CUT = (1 << 32) // 1024
_SIZE_LEN = 4


@dataclass(frozen=True, slots=True)
class ListRef:
    """Where a version's block list starts, and what it must add up to."""

    block_id: bytes
    depth: int
    nblocks: int
    nbytes: int

    def encode(self) -> list:
        return [self.block_id, self.depth, self.nblocks, self.nbytes]


@dataclass(frozen=True, slots=True)
class ListLeaf:
    ids: tuple[bytes, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ListKid:
    block_id: bytes
    nblocks: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ListInterior:
    kids: tuple[ListKid, ...]


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def decode_list_ref(obj: object) -> ListRef:
    """The head's `bl` field."""
    if type(obj) is not list or len(obj) != 4:
        raise FormatError("the head's block list reference must be a list of 4 items")
    block_id, depth, nblocks, nbytes = obj
    if type(block_id) is not bytes or len(block_id) != HASH_LEN:
        raise FormatError("the block list id must be 32 bytes")
    return ListRef(block_id, _int(depth, "block list depth", 0, MAX_DEPTH),
                   _int(nblocks, "block list count", 1, MAX_NBLOCKS),
                   _int(nbytes, "block list bytes", MIN_BLOCK, MAX_NBYTES))


# ----------------------------------------------------------------------------- encoding


def encode_leaf(ids: list[bytes], sizes: list[int]) -> bytes:
    return msgpack.packb({"v": LIST_VERSION, "k": "bl", "ids": b"".join(ids),
                          "sizes": b"".join(s.to_bytes(_SIZE_LEN, "big") for s in sizes)})


def encode_interior(kids: list[ListKid]) -> bytes:
    return msgpack.packb({"v": LIST_VERSION, "k": "bi",
                          "kids": [[k.block_id, k.nblocks, k.nbytes] for k in kids]})


def _cut_points(keys: list[bytes], threshold: int, most: int) -> list[tuple[int, int]]:
    """Content-defined ranges of `keys`: end after a key under the threshold, or at `most`."""
    ranges = []
    start = 0
    for i, key in enumerate(keys):
        if int.from_bytes(key[:4], "big") < threshold or i + 1 - start >= most:
            ranges.append((start, i + 1))
            start = i + 1
    if start < len(keys):
        ranges.append((start, len(keys)))
    return ranges


def build_block_list(sizes: dict[bytes, int], emit: Callable[[bytes, bytes], None]) -> ListRef:
    """Write the block list of a version whose blocks are `sizes` (id -> ciphertext length).

    `emit(block_id, data)` stores one list block. Returns the reference the
    head carries. Deterministic: the same set of blocks gives the same list.
    """
    if not sizes:
        raise ValueError("a version has at least its root directory node")
    ids = sorted(sizes)
    level: list[ListKid] = []
    for lo, hi in _cut_points(ids, LEAF_CUT, MAX_LEAF_IDS):
        part = ids[lo:hi]
        lens = [sizes[i] for i in part]
        data = encode_leaf(part, lens)
        block_id = hashlib.sha256(data).digest()
        emit(block_id, data)
        level.append(ListKid(block_id, len(part), sum(lens)))
    depth = 0
    while len(level) > 1:
        depth += 1
        keys = [k.block_id for k in level]
        nxt = []
        for lo, hi in _cut_points(keys, NODE_CUT, MAX_FANOUT):
            kids = level[lo:hi]
            data = encode_interior(kids)
            block_id = hashlib.sha256(data).digest()
            emit(block_id, data)
            nxt.append(ListKid(block_id, sum(k.nblocks for k in kids),
                               sum(k.nbytes for k in kids)))
        level = nxt
    if depth > MAX_DEPTH:
        raise ValueError(f"a block list of {len(ids)} blocks is deeper than {MAX_DEPTH} levels")
    top = level[0]
    return ListRef(top.block_id, depth, top.nblocks, top.nbytes)


# ----------------------------------------------------------------------------- decoding


def _unpack(data: bytes) -> dict:
    if len(data) > MAX_BLOCK:
        raise FormatError(f"block list block of {len(data)} bytes is too big")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True,
                              max_bin_len=HASH_LEN * MAX_LEAF_IDS, max_str_len=8,
                              max_array_len=MAX_FANOUT, max_map_len=8, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
        raise FormatError(f"block list block is not valid msgpack: {exc}") from exc
    if type(obj) is not dict:
        raise FormatError("a block list block must be a map")
    if type(obj.get("v")) is not int or obj["v"] != LIST_VERSION:
        raise FormatError(f"unknown block list version {obj.get('v')!r} (this peerdrive reads "
                          f"version {LIST_VERSION}); upgrade peerdrive")
    return obj


def decode_list_block(data: bytes, leaf: bool) -> ListLeaf | ListInterior:
    """Decode one list block of the kind its depth says (a leaf at depth 0)."""
    obj = _unpack(data)
    if leaf:
        if obj.get("k") != "bl" or set(obj) != {"v", "k", "ids", "sizes"}:
            raise FormatError("expected a block list leaf with exactly v, k, ids, sizes")
        raw_ids, raw_sizes = obj["ids"], obj["sizes"]
        if type(raw_ids) is not bytes or type(raw_sizes) is not bytes:
            raise FormatError("block list ids and sizes must be bytes")
        n, rest = divmod(len(raw_ids), HASH_LEN)
        if rest or not 1 <= n <= MAX_LEAF_IDS or len(raw_sizes) != n * _SIZE_LEN:
            raise FormatError("a block list leaf holds 1 to 16384 ids of 32 bytes and one "
                              "4-byte size each")
        ids = tuple(raw_ids[i:i + HASH_LEN] for i in range(0, len(raw_ids), HASH_LEN))
        sizes = tuple(int.from_bytes(raw_sizes[i:i + _SIZE_LEN], "big")
                      for i in range(0, len(raw_sizes), _SIZE_LEN))
        for a, b in zip(ids, ids[1:], strict=False):
            if not a < b:
                raise FormatError("block list ids are out of order or repeated")
        if any(not MIN_BLOCK <= s <= MAX_BLOCK for s in sizes):
            raise FormatError(f"a block size in the list is outside {MIN_BLOCK}..{MAX_BLOCK}")
        return ListLeaf(ids, sizes)
    if obj.get("k") != "bi" or set(obj) != {"v", "k", "kids"}:
        raise FormatError("expected a block list interior node with exactly v, k, kids")
    items = obj["kids"]
    if type(items) is not list or not 1 <= len(items) <= MAX_FANOUT:
        raise FormatError(f"a block list interior node has 1 to {MAX_FANOUT} kids")
    kids = []
    for item in items:
        if type(item) is not list or len(item) != 3:
            raise FormatError("a block list kid is [id, nblocks, nbytes]")
        block_id, nblocks, nbytes = item
        if type(block_id) is not bytes or len(block_id) != HASH_LEN:
            raise FormatError("a block list kid id must be 32 bytes")
        kids.append(ListKid(block_id, _int(nblocks, "kid block count", 1, MAX_NBLOCKS),
                            _int(nbytes, "kid bytes", MIN_BLOCK, MAX_NBYTES)))
    return ListInterior(tuple(kids))


class BlockListWalk:
    """Checks a block list block by block, from the signed head down (sans-io).

    Feed it the list blocks it asks for (`wanted()`), in any order, with
    `feed(block_id, data)`; it checks each against its id, its decoder and
    the counts its parent vouched for, and collects the version's block ids
    and sizes in order. `done` once every list block was fed. Ids must be
    strictly ascending across leaves: checked once the walk is done.
    """

    def __init__(self, ref: ListRef) -> None:
        self.ref = ref
        # list block id -> (depth below it, its position in the walk, nblocks, nbytes)
        self._want: dict[bytes, tuple[int, tuple[int, ...], int, int]] = {
            ref.block_id: (ref.depth, (), ref.nblocks, ref.nbytes)}
        self._leaves: dict[tuple[int, ...], ListLeaf] = {}
        self.list_blocks: dict[bytes, int] = {}  # list block id -> size

    def wanted(self) -> list[bytes]:
        return list(self._want)

    @property
    def done(self) -> bool:
        return not self._want

    def feed(self, block_id: bytes, data: bytes) -> None:
        """One list block; FormatError if it is not what its parent named."""
        want = self._want.get(block_id)
        if want is None:
            raise FormatError(f"block {block_id.hex()[:16]} is not a wanted block list block")
        if hashlib.sha256(data).digest() != block_id:
            raise FormatError(f"block list block {block_id.hex()[:16]} does not match its id")
        depth, pos, nblocks, nbytes = want
        node = decode_list_block(data, leaf=depth == 0)
        if isinstance(node, ListLeaf):
            got = (len(node.ids), sum(node.sizes))
        else:
            got = (sum(k.nblocks for k in node.kids), sum(k.nbytes for k in node.kids))
        if got != (nblocks, nbytes):
            raise FormatError(f"block list block {block_id.hex()[:16]} holds {got[0]} blocks of "
                              f"{got[1]} bytes; its parent says {nblocks} of {nbytes}")
        del self._want[block_id]
        self.list_blocks[block_id] = len(data)
        if isinstance(node, ListLeaf):
            self._leaves[pos] = node
            return
        for i, kid in enumerate(node.kids):
            if kid.block_id in self._want or kid.block_id in self.list_blocks:
                raise FormatError("a block list names one of its blocks twice")
            self._want[kid.block_id] = (depth - 1, (*pos, i), kid.nblocks, kid.nbytes)

    def blocks(self) -> dict[bytes, int]:
        """Every block of the version with its size, once `done`; checks global order."""
        if not self.done:
            raise FormatError("the block list is not complete yet")
        out: dict[bytes, int] = {}
        last = b""
        for pos in sorted(self._leaves):
            leaf = self._leaves[pos]
            if leaf.ids[0] <= last:
                raise FormatError("block list ids are out of order or repeated across leaves")
            last = leaf.ids[-1]
            out.update(zip(leaf.ids, leaf.sizes, strict=True))
        return out


def read_block_list(ref: ListRef, get: Callable[[bytes], bytes | None]) -> LocalList:
    """Walk a list from local bytes (`get` returns a list block's bytes or None).

    Used by status: a node that lacks part of the list knows only part of
    the version, and counts what lies under the missing list blocks as
    unknown.
    """
    walk = BlockListWalk(ref)
    while not walk.done:
        progressed = False
        for block_id in walk.wanted():
            data = get(block_id)
            if data is not None:
                walk.feed(block_id, data)
                progressed = True
        if not progressed:
            break
    if walk.done:
        return LocalList(walk.blocks(), walk.list_blocks, 0, 0)
    known: dict[bytes, int] = {}
    for leaf in walk._leaves.values():
        known.update(zip(leaf.ids, leaf.sizes, strict=True))
    unknown = sum(w[2] for w in walk._want.values())
    return LocalList(known, walk.list_blocks, len(walk._want), unknown)


@dataclass(frozen=True, slots=True)
class LocalList:
    """What a node's own store tells of a version's block list."""

    blocks: dict[bytes, int]  # listed blocks known (all of them when nothing is missing)
    list_blocks: dict[bytes, int]  # list blocks present
    missing_list_blocks: int
    unknown_blocks: int  # listed under the missing list blocks
