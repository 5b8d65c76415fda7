"""The journal of a writable mount: the last tree an fsync made durable (sealed).

One store record per drive, `write-journal:<drive pubkey>`:

    msgpack {v: 1, base: seq, root: <root node block id>, box: nonce || AES-GCM(...)}

`base` is the seq of the version the tree was built on; `root` names the root
directory node (a block id, public like the head's); `box` seals the root's
entry (which holds the node's chunk hash, i.e. its key) under a key derived
from the read key, bound to the drive and the root block by its associated
data. So the journal holds ids and ciphertext only, like every block it names.

Rules: the blocks a journal names are stored (under the mount's write pin)
before the journal is written, each in its own LMDB commit, so a journal
never names a block that is not there; an fsync is answered only once its
journal is committed. At the next mount, a journal whose root is not the
head's root is published first (`WriteSession.recover`): what fsync
acknowledged survives a SIGKILL. A published journal is deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .capability import ReadCap
from .crypto import HASH_LEN
from .errors import FormatError, IntegrityError
from .formats import Entry, decode_entry, encode_entry

JOURNAL_VERSION = 1
_NONCE = 12
_MAX_JOURNAL = 4096


@dataclass(frozen=True, slots=True)
class Journal:
    base_seq: int
    root: Entry


def journal_key(pubkey: bytes) -> bytes:
    return b"write-journal:" + pubkey


def _key(read_key: bytes) -> bytes:
    return hmac.new(read_key, b"peerdrive write journal", hashlib.sha256).digest()


def _aad(pubkey: bytes, root_block: bytes) -> bytes:
    return b"peerdrive journal v1" + pubkey + root_block


def seal_journal(cap: ReadCap, base_seq: int, root: Entry) -> bytes:
    assert root.node is not None
    nonce = os.urandom(_NONCE)
    box = AESGCM(_key(cap.read_key)).encrypt(nonce, msgpack.packb(encode_entry(root)),
                                             _aad(cap.pubkey, root.node.block_id))
    return msgpack.packb({"v": JOURNAL_VERSION, "base": base_seq, "root": root.node.block_id,
                          "box": nonce + box})


def open_journal(cap: ReadCap, data: bytes) -> Journal:
    """The journal in `data`; FormatError if malformed, IntegrityError if it does not open."""
    if len(data) > _MAX_JOURNAL:
        raise FormatError("the write journal is too long")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=_MAX_JOURNAL,
                              max_str_len=16, max_array_len=16, max_map_len=8)
    except Exception as exc:  # msgpack raises many types for bad input
        raise FormatError(f"the write journal is not valid msgpack: {exc}") from exc
    if type(obj) is not dict or obj.get("v") != JOURNAL_VERSION or type(obj.get("v")) is not int:
        raise FormatError("the write journal has an unknown version; upgrade peerdrive")
    if set(obj) != {"v", "base", "root", "box"}:
        raise FormatError("the write journal has missing or unknown fields")
    base, root_block, box = obj["base"], obj["root"], obj["box"]
    if type(base) is not int or not 0 <= base < 1 << 63:
        raise FormatError("the write journal's base seq is out of range")
    if type(root_block) is not bytes or len(root_block) != HASH_LEN:
        raise FormatError("the write journal's root must be a 32-byte block id")
    if type(box) is not bytes or not _NONCE + 16 < len(box) <= 2048:
        raise FormatError("the write journal's box has a bad length")
    try:
        plain = AESGCM(_key(cap.read_key)).decrypt(box[:_NONCE], box[_NONCE:],
                                                   _aad(cap.pubkey, root_block))
    except InvalidTag as exc:
        raise IntegrityError("the write journal does not open with this drive's key") from exc
    try:
        root = decode_entry(msgpack.unpackb(plain, raw=False, strict_map_key=True))
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError("the write journal's root entry is malformed") from exc
    if not root.is_dir or root.node is None or root.node.block_id != root_block:
        raise FormatError("the write journal's box does not describe the root it names")
    return Journal(base, root)
