"""The head: the signed manifest of one drive version.

A head is a `dht.records.MutableRecord` signed by the drive key, with the
drive public key, a sequence number and a value that this module defines:

    value = msgpack {v: 3, root: <root node block id>, box: nonce || AES-GCM(...),
                     created: unix seconds, bl: [block list id, depth, nblocks, nbytes]
                     [, prev: <id of the previous version's head>]
                     [, mirrors: [base URL, ...]]}

The root node's block id is public (any store node can check the head and
the root block), but the root directory's entry (its node's chunk hash, which
derives the key, and its mode, mtime and counts) is sealed in `box`
under a key derived from the read key, so a DHT node holding the head learns
nothing about the tree. The box's associated data binds it to the drive key
and seq, so a box cannot be moved into another head.

`mirrors` lists the base URLs of static HTTP mirrors of the drive's
ciphertext (`peerdrive publish --mirror-url`), in the clear, so that store
nodes can use them too: a mirror serves nothing but ciphertext. At most
MAX_HEAD_MIRRORS, each checked like `dht.mirror_layout.check_base_url`
(http/https, no credentials, no query), no duplicates; absent when empty.

`bl` names the version's block list (`vfs.blocklist`): every ciphertext block
id of the version, readable without the read key, so a host holding only
the store capability knows what to fetch and refuses anything else. Version
1 heads (no `bl`) still open; they cannot be hosted.

`prev` chains the versions: the id (SHA-256 of the signed wire bytes, which
is also the id of the block holding them) of the head this version was
committed on top of, absent only in a drive's first version. The publisher
stores that previous head as a block of the new version (it is in the block
list), so `peerdrive log` walks the history back and fetches old heads
lazily like any block; each is verified like the newest one. Version 2 heads
(no `prev`) still open: a walk ends there.

Readers keep the highest seq they have verified and refuse anything lower
(`HeadTracker`): a peer replaying an old head cannot roll a mount back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dht.errors import DhtError
from dht.mirror_layout import MAX_URL_LEN, MirrorUrlError, check_base_url
from dht.records import MutableRecord

from .blocklist import ListRef, decode_list_ref
from .capability import ReadCap, StoreCap, WriteCap
from .crypto import HASH_LEN
from .errors import FormatError, IntegrityError, RollbackError
from .formats import Entry, decode_entry, encode_entry

HEAD_VERSION = 3
# per head version this code reads: (fields it must have, fields it may have)
_HEAD_FIELDS = {
    1: ({"v", "root", "box", "created"}, {"mirrors"}),
    2: ({"v", "root", "box", "created", "bl"}, {"mirrors"}),
    3: ({"v", "root", "box", "created", "bl"}, {"mirrors", "prev"}),
}
_BOX_NONCE = 12
MAX_HEAD_MIRRORS = 8


@dataclass(frozen=True, slots=True)
class Head:
    """A verified head. `root` is None when opened with a store capability."""

    pubkey: bytes
    seq: int
    root_block: bytes
    created: int
    wire: bytes
    root: Entry | None = None
    mirrors: tuple[str, ...] = ()
    block_list: ListRef | None = None  # None only in a version 1 head
    prev: bytes | None = None  # the previous version's head id; None in a first version
    version: int = HEAD_VERSION  # of the head format: below 3, no `prev` was written

    @property
    def id(self) -> bytes:
        """The version's id: SHA-256 of the signed bytes (the id of the block holding them)."""
        return head_id(self.wire)


def head_id(wire: bytes) -> bytes:
    return hashlib.sha256(wire).digest()


def _box_key(read_key: bytes) -> bytes:
    return hmac.new(read_key, b"peerdrive head box", hashlib.sha256).digest()


def _aad(pubkey: bytes, seq: int, root_block: bytes) -> bytes:
    return b"peerdrive head v1" + pubkey + struct.pack(">Q", seq) + root_block


def check_mirrors(urls: object) -> tuple[str, ...]:
    """Mirror base URLs as a head carries them (canonical, unique, bounded) or FormatError."""
    if type(urls) is not list and type(urls) is not tuple:
        raise FormatError("head mirrors must be a list")
    if not 1 <= len(urls) <= MAX_HEAD_MIRRORS:
        raise FormatError(f"a head lists 1 to {MAX_HEAD_MIRRORS} mirrors")
    out: list[str] = []
    for url in urls:
        if type(url) is not str:
            raise FormatError("a head mirror must be a URL string")
        try:
            canonical = check_base_url(url)
        except MirrorUrlError as exc:
            raise FormatError(str(exc)) from None
        if canonical != url or url in out:
            raise FormatError(f"head mirror {url!r} is not canonical or is listed twice")
        out.append(url)
    return tuple(out)


def make_head(cap: WriteCap, seq: int, root: Entry, block_list: ListRef,
              created: int | None = None, mirrors: tuple[str, ...] | list[str] = (),
              prev: bytes | None = None) -> Head:
    """Sign a new head whose root directory is `root` (a directory entry) at `seq`.

    `mirrors` are base URLs of static mirrors (checked; duplicates dropped);
    `prev` is the id of the head this version follows (None for a first version).
    """
    if prev is not None and len(prev) != HASH_LEN:
        raise ValueError("prev must be a 32-byte head id")
    assert root.node is not None
    mirrors = check_mirrors(list(dict.fromkeys(check_base_url(u) for u in mirrors))) \
        if mirrors else ()
    nonce = os.urandom(_BOX_NONCE)
    sealed = AESGCM(_box_key(cap.read_key)).encrypt(
        nonce, msgpack.packb(encode_entry(root)), _aad(cap.pubkey, seq, root.node.block_id)
    )
    created = int(time.time()) if created is None else created
    fields = {"v": HEAD_VERSION, "root": root.node.block_id, "box": nonce + sealed,
              "created": created, "bl": block_list.encode()}
    if mirrors:
        fields["mirrors"] = list(mirrors)
    if prev is not None:
        fields["prev"] = prev
    value = msgpack.packb(fields)
    record, wire = MutableRecord.create(cap.signing_key(), seq, value)
    return Head(cap.pubkey, seq, root.node.block_id, created, wire, root, mirrors, block_list,
                prev)


def open_head(wire: bytes, cap: StoreCap) -> Head:
    """Verify a head's signature and, with a read capability, unseal its root.

    Raises IntegrityError for a bad signature or a head of another drive, and
    FormatError for anything malformed.
    """
    try:
        record = MutableRecord.decode(wire)
    except DhtError as exc:
        raise IntegrityError(f"head rejected: {exc}") from exc
    if record.pk != cap.pubkey:
        raise IntegrityError("head is signed by another drive's key")
    try:
        value = msgpack.unpackb(record.value, raw=False, strict_map_key=True,
                                max_bin_len=4096, max_str_len=MAX_URL_LEN,
                                max_array_len=16, max_map_len=16)
    except Exception as exc:  # msgpack raises many types for bad input
        raise FormatError(f"head value is not valid msgpack: {exc}") from exc
    if type(value) is not dict or type(value.get("v")) is not int \
            or value["v"] not in _HEAD_FIELDS:
        raise FormatError("head value has an unknown version; upgrade peerdrive")
    required, optional = _HEAD_FIELDS[value["v"]]
    if not required <= set(value) <= required | optional:
        raise FormatError("head value has missing or unknown fields")
    block_list = decode_list_ref(value["bl"]) if "bl" in value else None
    mirrors = check_mirrors(value["mirrors"]) if "mirrors" in value else ()
    prev = value["prev"] if "prev" in value else None
    if "prev" in value and (type(prev) is not bytes or len(prev) != HASH_LEN):
        raise FormatError("head prev must be a 32-byte head id")
    root_block, box, created = value["root"], value["box"], value["created"]
    if type(root_block) is not bytes or len(root_block) != HASH_LEN:
        raise FormatError("head root must be a 32-byte block id")
    if type(box) is not bytes or not _BOX_NONCE + 16 < len(box) <= 1024:
        raise FormatError("head box has a bad length")
    if type(created) is not int or not 0 <= created < 1 << 40:
        raise FormatError("head creation time is out of range")
    root = None
    if isinstance(cap, ReadCap):
        try:
            plain = AESGCM(_box_key(cap.read_key)).decrypt(
                box[:_BOX_NONCE], box[_BOX_NONCE:], _aad(record.pk, record.seq, root_block))
        except InvalidTag as exc:
            raise IntegrityError("head does not open with this read key: wrong link?") from exc
        try:
            obj = msgpack.unpackb(plain, raw=False, strict_map_key=True)
        except Exception as exc:  # sealed by the writer, so only a buggy writer gets here
            raise FormatError("head box content is malformed") from exc
        root = decode_entry(obj)
        if not root.is_dir or root.node is None or root.node.block_id != root_block:
            raise FormatError("head box does not describe the root directory it names")
    return Head(record.pk, record.seq, root_block, created, bytes(wire), root, mirrors,
                block_list, prev, value["v"])


class HeadTracker:
    """Keeps the highest verified head of one drive; refuses rollbacks."""

    def __init__(self, cap: StoreCap, current: Head | None = None) -> None:
        self.cap = cap
        self.current = current

    def offer(self, wire: bytes) -> Head | None:
        """Verify `wire`; return it if it is newer than the current head, else None.

        Two different heads with one seq (a writer that forked: two machines
        publishing with one write link) are ordered as the DHT orders them
        (`dht.records.newest_mutable`): the larger wire wins, so every reader
        ends on the same one instead of staying split for good.

        Raises RollbackError for a lower seq and IntegrityError/FormatError
        for a head that does not verify.
        """
        head = open_head(wire, self.cap)
        if self.current is not None:
            if head.seq < self.current.seq:
                raise RollbackError(f"refused head seq {head.seq}: already at seq "
                                    f"{self.current.seq}")
            if head.seq == self.current.seq and head.wire <= self.current.wire:
                return None  # the same head, or the losing one of two forks
        self.current = head
        return head
