"""The layout of the block store's LMDB sub-databases: names, keys, values.

Pure code (no I/O): every byte layout the store writes is built and parsed
here, so docs/cache.md and the code have one place to agree on. All integers
are big-endian so that LMDB's bytewise key order is numeric order.

    blocks     id(32)                   -> xxh3_64(data) u64 || data
    meta       id(32)                   -> tick u64 || size u64
    lru        tick u64 || id(32)       -> b""      (present, unpinned blocks only)
    pin_refs   id(32)                   -> refcount u32 (ids held by >= 1 pin)
    pin_names  SHA-256(name)(32)        -> pin number u64 || member count u64 || name
    pins       pin number u64 || id(32) -> b""
    state      b"schema"                -> u32 schema version
               b"counters"              -> see `Counters`
               b"limit"                 -> u64 (absent: unlimited)
    records    key (1..511 bytes)       -> value (any bytes)
    members    id(32) || tag(32)        -> b""      (the block was stored for that tag)
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import astuple, dataclass

import xxhash

from cache.errors import CorruptMetadata, InvalidArgument

SCHEMA_VERSION = 1

DB_BLOCKS = b"blocks"
DB_META = b"meta"
DB_LRU = b"lru"
DB_PIN_REFS = b"pin_refs"
DB_PIN_NAMES = b"pin_names"
DB_PINS = b"pins"
DB_STATE = b"state"
DB_RECORDS = b"records"
DB_MEMBERS = b"members"
ALL_DBS = (DB_BLOCKS, DB_META, DB_LRU, DB_PIN_REFS, DB_PIN_NAMES, DB_PINS, DB_STATE, DB_RECORDS,
           DB_MEMBERS)

STATE_SCHEMA = b"schema"
STATE_COUNTERS = b"counters"
STATE_LIMIT = b"limit"

ID_LEN = 32
TAG_LEN = 32  # a member tag: opaque to the store (the node layer uses a discovery key)
DIGEST_LEN = 8
MAX_RECORD_KEY = 511  # LMDB's compiled-in maximum key size
MAX_PIN_NAME = 65536  # bytes of UTF-8; pin names are hashed into keys, so long paths fit

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_META = struct.Struct(">QQ")
_PIN_HEAD = struct.Struct(">QQ")
_COUNTERS = struct.Struct(">QQQQQQ")


def check_id(block_id: object) -> bytes:
    """Return `block_id` as bytes if it is a 32-byte block id, else raise InvalidArgument."""
    if isinstance(block_id, bytes):
        if len(block_id) == ID_LEN:
            return block_id
    elif isinstance(block_id, bytearray | memoryview):
        raw = bytes(block_id)
        if len(raw) == ID_LEN:
            return raw
    else:
        raise InvalidArgument(f"a block id is 32 bytes, not {type(block_id).__name__}")
    raise InvalidArgument(f"a block id is 32 bytes, not {len(block_id)}")


def check_tag(tag: object) -> bytes:
    """Return `tag` if it is a 32-byte member tag, else raise InvalidArgument."""
    if not isinstance(tag, bytes) or len(tag) != TAG_LEN:
        raise InvalidArgument(f"a member tag is {TAG_LEN} bytes")
    return tag


def member_key(block_id: bytes, tag: bytes) -> bytes:
    """Key of "block `block_id` was stored for `tag`" in `members` (id first: per-block range)."""
    return block_id + tag


def block_id_of(data: bytes | bytearray | memoryview) -> bytes:
    """The id a block is stored under: SHA-256 of its bytes (ciphertext)."""
    return hashlib.sha256(data).digest()


def digest_of(data: bytes | bytearray | memoryview) -> int:
    """The fast check stored beside each block (xxh3_64), catching bit rot on every read."""
    return xxhash.xxh3_64_intdigest(data)


def encode_block_value(digest: int, data: bytes | bytearray | memoryview) -> bytes:
    return b"".join((_U64.pack(digest), data))


def block_value_data(value: bytes | memoryview) -> memoryview | None:
    """The block bytes inside a stored value, or None when they fail their xxh3 check."""
    if len(value) < DIGEST_LEN:
        return None
    view = memoryview(value)
    data = view[DIGEST_LEN:]
    if _U64.unpack_from(view, 0)[0] != xxhash.xxh3_64_intdigest(data):
        return None
    return data


def block_value_unchecked(value: bytes | memoryview) -> memoryview | None:
    """The block bytes inside a stored value, unchecked (None if too short to hold any):
    for a reader that authenticates them itself (`BlockStore.get_decoded`)."""
    if len(value) < DIGEST_LEN:
        return None
    return memoryview(value)[DIGEST_LEN:]


def block_value_size(value: bytes | memoryview) -> int:
    return max(0, len(value) - DIGEST_LEN)


def encode_meta(tick: int, size: int) -> bytes:
    return _META.pack(tick, size)


def decode_meta(value: bytes | memoryview) -> tuple[int, int]:
    """(tick, size) of one stored block."""
    if len(value) != _META.size:
        raise CorruptMetadata(f"block metadata of {len(value)} bytes, expected {_META.size}")
    tick, size = _META.unpack(value)
    return tick, size


def lru_key(tick: int, block_id: bytes) -> bytes:
    return _U64.pack(tick) + block_id


def split_lru_key(key: bytes | memoryview) -> tuple[int, bytes]:
    if len(key) != 8 + ID_LEN:
        raise CorruptMetadata(f"LRU key of {len(key)} bytes, expected {8 + ID_LEN}")
    return _U64.unpack_from(key, 0)[0], bytes(key[8:])


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def decode_u32(value: bytes | memoryview) -> int:
    if len(value) != _U32.size:
        raise CorruptMetadata(f"u32 value of {len(value)} bytes")
    return _U32.unpack(value)[0]


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(value: bytes | memoryview) -> int:
    if len(value) != _U64.size:
        raise CorruptMetadata(f"u64 value of {len(value)} bytes")
    return _U64.unpack(value)[0]


def encode_pin_name(name: object) -> bytes:
    """The UTF-8 of a pin name (lone surrogates from os.fsdecode survive the round trip)."""
    if not isinstance(name, str):
        raise InvalidArgument(f"a pin name is a str, not {type(name).__name__}")
    if not name:
        raise InvalidArgument("a pin name cannot be empty")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PIN_NAME:
        raise InvalidArgument(
            f"a pin name is at most {MAX_PIN_NAME} bytes of UTF-8, not {len(raw)}"
        )
    return raw


def pin_name_key(name_utf8: bytes) -> bytes:
    return hashlib.sha256(name_utf8).digest()


def encode_pin_head(number: int, member_count: int, name_utf8: bytes) -> bytes:
    return _PIN_HEAD.pack(number, member_count) + name_utf8


def decode_pin_head(value: bytes | memoryview) -> tuple[int, int, str]:
    """(pin number, member count, name) of one pin."""
    if len(value) <= _PIN_HEAD.size:
        raise CorruptMetadata(f"pin record of {len(value)} bytes is too short")
    number, count = _PIN_HEAD.unpack_from(value, 0)
    name = bytes(value[_PIN_HEAD.size :]).decode("utf-8", "surrogateescape")
    return number, count, name


def pin_member_key(number: int, block_id: bytes) -> bytes:
    return _U64.pack(number) + block_id


def pin_prefix(number: int) -> bytes:
    return _U64.pack(number)


def check_record_key(key: object) -> bytes:
    if isinstance(key, bytearray | memoryview):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise InvalidArgument(f"a record key is bytes, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_RECORD_KEY:
        raise InvalidArgument(f"a record key is 1 to {MAX_RECORD_KEY} bytes, not {len(key)}")
    return key


@dataclass
class Counters:
    """The store-wide numbers kept in one `state` value, read and written once per transaction."""

    total_bytes: int = 0
    count: int = 0
    pinned_bytes: int = 0  # bytes of present blocks that some pin holds
    pinned_count: int = 0
    next_tick: int = 1  # recency clock: every access takes the next value
    next_pin: int = 1  # number given to the next new pin

    def encode(self) -> bytes:
        return _COUNTERS.pack(*astuple(self))

    @classmethod
    def decode(cls, value: bytes | memoryview | None) -> Counters:
        if value is None:
            return cls()
        if len(value) != _COUNTERS.size:
            raise CorruptMetadata(
                f"store counters of {len(value)} bytes, expected {_COUNTERS.size}"
            )
        return cls(*_COUNTERS.unpack(value))
