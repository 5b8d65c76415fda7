"""Fuzz targets for the drive decoders: what a malicious publisher (or a lying peer)
can put in front of a reader.

Directory nodes, entries and chunk lists are decrypted blocks of a drive the
reader mounted; heads come from the DHT and from peers; links are pasted by a
user; blocks are ciphertext whose id checked out. Each target may raise only
the project's own errors (`PeerdriveError`; `DhtError` from the record
envelope under a head). See tests/fuzzing.py for the harness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dht.errors import DhtError
from dht.records import MutableRecord
from tests.fuzzing import seeds, target
from vfs.blocklist import BlockListWalk, ListRef, build_block_list, encode_interior, encode_leaf
from vfs.capability import WriteCap, parse_link
from vfs.crypto import TAG_LEN, Ref, block_id_of, decrypt_block, encrypt_chunk
from vfs.errors import PeerdriveError
from vfs.formats import (
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    ChunkListRef,
    DirPart,
    Entry,
    _unpack,
    decode_chunk_list,
    decode_dir_node,
    decode_entry,
    encode_chunk_list,
    encode_dir_interior,
    encode_dir_leaf,
    encode_entry,
)
from vfs.head import HEAD_VERSION, _aad, _box_key, open_head

ALLOWED: tuple[type[BaseException], ...] = (PeerdriveError, DhtError)

# ----------------------------------------------------------------------------- fixtures

# Fixed keys, so a corpus file means the same thing on every run.
_SEED = bytes(range(32))
_READ_KEY = bytes(range(32, 64))


def _write_cap():

    return WriteCap.from_secrets(_SEED, _READ_KEY)


def _refs(n: int, length: int = 1000):

    return [Ref(hashlib.sha256(b"b%d" % i).digest(), hashlib.sha256(b"c%d" % i).digest(), length)
            for i in range(n)]


def _sample_entries():

    refs = _refs(3)
    return [
        Entry(b"a.txt", KIND_FILE, 0o644, 1_700_000_000_000_000_000, size=3000,
              chunks=tuple(refs)),
        Entry(b"big", KIND_FILE, 0o600, 0, size=3000,
              chunk_lists=(ChunkListRef(refs[0], 3, 3000),)),
        Entry(b"empty", KIND_FILE, 0o644, 0, size=0, chunks=()),
        Entry(b"link", KIND_LINK, 0o777, 5, size=5, target=b"a.txt"),
        Entry(b"sub", KIND_DIR, 0o755, 7, node=refs[1], nsubdirs=1, nentries=4),
    ]


# ----------------------------------------------------------------------------- drive decoders


def _dir_node_seeds() -> Iterable[bytes]:
    entries = _sample_entries()
    yield encode_dir_leaf(entries)
    yield encode_dir_leaf([])
    yield encode_dir_leaf(entries[:1])
    refs = _refs(2)
    yield encode_dir_interior([DirPart(b"a", refs[0], 10), DirPart(b"m", refs[1], 5)])
    # near misses: unsorted, duplicate, bad version, unknown field, '..' name
    yield encode_dir_leaf([entries[3], entries[0]])
    yield encode_dir_leaf([entries[0], entries[0]])
    yield msgpack.packb({"v": 2, "k": "d", "e": []})
    yield msgpack.packb({"v": 1, "k": "d", "e": [], "zz": 1})
    yield msgpack.packb({"v": 1, "k": "d", "e": [{"n": b"..", "t": 0, "m": 0, "mt": 0,
                                                   "s": 0, "c": []}]})
    yield msgpack.packb({"v": 1, "k": "i", "p": [[b"a", [b"x" * 32, b"y" * 32, 1], 1 << 41]]})
    # a folder entry with its totals (the folder aggregates), and one claiming far too many
    yield encode_dir_leaf([*entries[:4], _folder_with_totals(12, 34_000)])
    yield encode_dir_leaf([*entries[:4], _folder_with_totals((1 << 62) - 1, 1 << 62)])


def _folder_with_totals(files: int, size: int) -> Entry:
    return Entry(b"sub", KIND_DIR, 0o755, 7, node=_refs(2)[1], nsubdirs=1, nentries=4,
                 total_files=files, total_bytes=size)


@target("dir_node", allowed=ALLOWED)
def fuzz_dir_node(data: bytes) -> object:
    """A directory node block after decryption (a leaf of entries or an interior node)."""
    return decode_dir_node(data)


def _chunk_list_seeds() -> Iterable[bytes]:
    yield b"\x03\x00\x00\x00" + encode_chunk_list(_refs(3))
    yield b"\x01\x00\x00\x00" + encode_chunk_list(_refs(1, 4 * 1024 * 1024 - 16))
    yield b"\x02\x00\x00\x00" + encode_chunk_list(_refs(3))  # count mismatch
    yield b"\x00\x00\x00\x00" + msgpack.packb({"v": 1, "k": "c", "c": [[b"", b"", -1]]})


@target("chunk_list", allowed=ALLOWED)
def fuzz_chunk_list(data: bytes) -> object:
    """The first 4 bytes say how many chunks the (trusted) parent entry claims."""

    n = max(1, int.from_bytes(data[:4], "little") % 60_000)
    expect = ChunkListRef(Ref(bytes(32), bytes(32), 100), n, 1000 * n)
    return decode_chunk_list(data[4:], expect)


def _entry_seeds() -> Iterable[bytes]:
    for e in _sample_entries():
        yield msgpack.packb(encode_entry(e))
    yield msgpack.packb({"n": b"x", "t": 0, "m": 0, "mt": 0, "s": 5, "x": [[b"a" * 32,
                                                                          b"b" * 32, 1, 1, 5]]})
    yield msgpack.packb(encode_entry(_folder_with_totals(3, 3000)))
    # near misses: one total without the other, a negative one, past 2**62
    folder = encode_entry(_folder_with_totals(3, 3000))
    yield msgpack.packb({k: v for k, v in folder.items() if k != "tb"})
    yield msgpack.packb({**folder, "tf": -1})
    yield msgpack.packb({**folder, "tb": (1 << 62) + 1})


@target("entry", allowed=ALLOWED)
def fuzz_entry(data: bytes) -> object:
    """One entry (a head box holds one; a directory leaf holds many)."""
    return decode_entry(_unpack(data))


def _head_wire(seq: int, root: Entry, created: int, mirrors: list[str] | None = None) -> bytes:
    """make_head with a fixed box nonce, so the seeds are the same bytes on every run."""
    cap = _write_cap()
    nonce = hashlib.sha256(b"nonce %d" % seq).digest()[:12]
    sealed = AESGCM(_box_key(cap.read_key)).encrypt(
        nonce, msgpack.packb(encode_entry(root)), _aad(cap.pubkey, seq, root.node.block_id))
    fields = {"v": HEAD_VERSION, "root": root.node.block_id, "box": nonce + sealed,
              "created": created, "bl": [hashlib.sha256(b"list").digest(), 0, 3, 3000]}
    if mirrors:
        fields["mirrors"] = mirrors
    return MutableRecord.create(cap.signing_key(), seq, msgpack.packb(fields))[1]


def _head_seeds() -> Iterable[bytes]:
    root = Entry(b"root", KIND_DIR, 0o755, 0, node=_refs(1)[0], nsubdirs=0, nentries=0)
    yield _head_wire(1, root, 1_700_000_000)
    yield _head_wire(1 << 40, root, 0)
    yield _head_wire(3, root, 9, ["https://mirror.example/drive/"])
    totals = Entry(b"root", KIND_DIR, 0o755, 0, node=_refs(1)[0], nsubdirs=0, nentries=0,
                   total_files=10**6, total_bytes=64 * 10**6)
    yield _head_wire(4, totals, 1_700_000_000)
    wire = bytearray(_head_wire(7, root, 5))
    wire[-1] ^= 1  # a broken signature
    yield bytes(wire)


@target("head", allowed=ALLOWED)
def fuzz_head(data: bytes) -> object:
    """A head as received from the DHT or a peer: signature first, then the value."""
    return open_head(data, _write_cap().read_cap())


def _head_value_seeds() -> Iterable[bytes]:
    for wire in _head_seeds():
        try:
            yield MutableRecord.decode(wire).value
        except DhtError:
            continue
    yield msgpack.packb({"v": 1, "root": b"r" * 32, "box": b"x" * 40, "created": 1})


@target("head_value", allowed=ALLOWED)
def fuzz_head_value(data: bytes) -> object:
    """A head value past a valid signature: what a writer that lies (or has a bug) can sign."""

    cap = _write_cap()
    try:
        _, wire = MutableRecord.create(cap.signing_key(), 3, data)
    except DhtError:
        return None  # too long to sign: no head can carry it
    return open_head(wire, cap.read_cap())


def _link_seeds() -> Iterable[bytes]:
    cap = _write_cap()
    yield cap.link().encode()
    yield cap.read_cap().link().encode()
    yield cap.store_cap().link().encode()
    yield cap.read_cap().link()[:-3].encode()
    yield b"peerdrive:x9:aaaa:bbbb"


@target("link", allowed=ALLOWED)
def fuzz_link(data: bytes) -> object:
    """A capability link pasted by a user (from chat, mail, a web page)."""
    return parse_link(data.decode("utf-8", errors="surrogateescape"))


def _block_seeds() -> Iterable[bytes]:
    ref, ct = encrypt_chunk(_READ_KEY, b"hello world" * 20)
    yield ref.chunk_hash + ct
    yield bytes(32) + ct


@target("block", allowed=ALLOWED)
def fuzz_block(data: bytes) -> object:
    """A block whose id checked out (any ciphertext does) opened with a Ref from a
    directory node: the first 32 bytes are the chunk hash the Ref claims."""

    chunk_hash, ct = data[:32].ljust(32, b"\0"), data[32:]
    ref = Ref(block_id_of(ct), chunk_hash, max(0, len(ct) - TAG_LEN))
    return decrypt_block(_READ_KEY, ref, ct)


def _block_list_seeds() -> Iterable[bytes]:
    emitted: list[bytes] = []
    build_block_list({hashlib.sha256(b"%d" % i).digest(): 100 + i for i in range(50)},
                     lambda _id, data: emitted.append(data))
    yield from emitted
    yield encode_leaf([b"\x02" * 32, b"\x01" * 32], [100, 100])  # out of order
    yield encode_interior([])


@target("block_list", allowed=ALLOWED)
def fuzz_block_list(data: bytes) -> object:
    """A block list block a host fetched by the id its signed parent named (what a lying
    publisher can sign): walked as the root of a list, as a leaf and as an interior node."""
    block_id = hashlib.sha256(data).digest()
    out = []
    for depth in (0, 1):
        walk = BlockListWalk(ListRef(block_id, depth, 2, 200))
        try:
            walk.feed(block_id, data)
            out.append(walk.wanted())
        except PeerdriveError:
            pass
    return out


# ----------------------------------------------------------------------------- seeds

seeds("dir_node")(_dir_node_seeds)
seeds("chunk_list")(_chunk_list_seeds)
seeds("entry")(_entry_seeds)
seeds("head")(_head_seeds)
seeds("head_value")(_head_value_seeds)
seeds("link")(_link_seeds)
seeds("block")(_block_seeds)
seeds("block_list")(_block_list_seeds)
