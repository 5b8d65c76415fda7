"""The head: the signed manifest of one drive version.

A head is a `dht.records.MutableRecord` signed by the drive key, with the
drive public key, a sequence number and a value that this module defines:

    value = msgpack {v: 1, root: <root node block id>, box: nonce || AES-GCM(...),
                     created: unix seconds}

The root node's block id is public (any store node can check the head and
the root block), but the root directory's entry (its node's chunk hash, which
derives the key, and its mode, mtime and counts) is sealed in `box`
under a key derived from the read key, so a DHT node holding the head learns
nothing about the tree. The box's associated data binds it to the drive key
and seq, so a box cannot be moved into another head.

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
from dht.records import MutableRecord

from .capability import ReadCap, StoreCap, WriteCap
from .crypto import HASH_LEN
from .errors import FormatError, IntegrityError, RollbackError
from .formats import Entry, decode_entry, encode_entry

HEAD_VERSION = 1
_BOX_NONCE = 12


@dataclass(frozen=True, slots=True)
class Head:
    """A verified head. `root` is None when opened with a store capability."""

    pubkey: bytes
    seq: int
    root_block: bytes
    created: int
    wire: bytes
    root: Entry | None = None


def _box_key(read_key: bytes) -> bytes:
    return hmac.new(read_key, b"peerdrive head box", hashlib.sha256).digest()


def _aad(pubkey: bytes, seq: int, root_block: bytes) -> bytes:
    return b"peerdrive head v1" + pubkey + struct.pack(">Q", seq) + root_block


def make_head(cap: WriteCap, seq: int, root: Entry, created: int | None = None) -> Head:
    """Sign a new head whose root directory is `root` (a directory entry) at `seq`."""
    assert root.node is not None
    nonce = os.urandom(_BOX_NONCE)
    sealed = AESGCM(_box_key(cap.read_key)).encrypt(
        nonce, msgpack.packb(encode_entry(root)), _aad(cap.pubkey, seq, root.node.block_id)
    )
    created = int(time.time()) if created is None else created
    value = msgpack.packb(
        {"v": HEAD_VERSION, "root": root.node.block_id, "box": nonce + sealed, "created": created}
    )
    record, wire = MutableRecord.create(cap.signing_key(), seq, value)
    return Head(cap.pubkey, seq, root.node.block_id, created, wire, root)


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
                                max_bin_len=4096, max_str_len=16, max_array_len=16,
                                max_map_len=16)
    except Exception as exc:  # msgpack raises many types for bad input
        raise FormatError(f"head value is not valid msgpack: {exc}") from exc
    if type(value) is not dict or type(value.get("v")) is not int or value["v"] != HEAD_VERSION:
        raise FormatError("head value has an unknown version; upgrade peerdrive")
    if set(value) != {"v", "root", "box", "created"}:
        raise FormatError("head value has missing or unknown fields")
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
    return Head(record.pk, record.seq, root_block, created, bytes(wire), root)


class HeadTracker:
    """Keeps the highest verified head of one drive; refuses rollbacks."""

    def __init__(self, cap: StoreCap, current: Head | None = None) -> None:
        self.cap = cap
        self.current = current

    def offer(self, wire: bytes) -> Head | None:
        """Verify `wire`; return it if it is newer than the current head, else None.

        Raises RollbackError for a lower seq and IntegrityError/FormatError
        for a head that does not verify.
        """
        head = open_head(wire, self.cap)
        if self.current is not None:
            if head.seq < self.current.seq:
                raise RollbackError(f"refused head seq {head.seq}: already at seq "
                                    f"{self.current.seq}")
            if head.seq == self.current.seq:
                return None
        self.current = head
        return head
