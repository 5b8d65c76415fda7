"""The peer-protocol message codec, sans-io.

A frame is a 4-byte big-endian payload length followed by that many bytes of
msgpack: a map holding the protocol version ``"v"``, the message type ``"t"``
and the message's fields, nothing else. `encode` turns a message object into
frame bytes; `FrameDecoder` is fed bytes in whatever pieces the network
delivers and hands back message objects. Neither does any I/O, so the codec is
tested without sockets and both peers share one definition of what is valid.

Every field is checked on the way in and on the way out (types, exact id
lengths, integer ranges, string and byte-string bounds); anything else is a
`FrameError`. A length prefix above `MAX_FRAME` is rejected as soon as its four
bytes arrive, so a peer cannot make us buffer gigabytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

from .errors import FrameError
from .types import BLOCK_ID_LEN, DISCOVERY_KEY_LEN, NODE_ID_LEN, Priority

PROTOCOL_VERSION = 1
MAX_BLOCK = 4 * 1024 * 1024  # the largest block the drive layer makes
MAX_FRAME = MAX_BLOCK + 4 * 1024  # payload bytes after the length prefix
MAX_CLIENT_FRAME = 4 * 1024  # a client only ever sends small frames (hello, want, cancel, ...)
MAX_RECORD = 64 * 1024  # an opaque signed record carried by Notice
MAX_REASON = 256  # characters in a Refused/Goodbye reason
MAX_REQ_ID = 2**32 - 1
MAX_TOKEN = 2**32 - 1
MAX_WANTS_LIMIT = 65535  # the largest per-connection want limit a server may announce
MAX_HAVE_IDS = 120  # block ids in one Have: 120 x 32 bytes keeps it under MAX_CLIENT_FRAME
MAX_RUN_IDS = MAX_HAVE_IDS  # block ids in one WantRun (the same bound: it fits a client frame)
MAX_BITMAP = (MAX_HAVE_IDS + 7) // 8
MAX_WHOLE_IDS = MAX_HAVE_IDS  # node ids in one Whole (0 allowed)
NONCE_LEN = 32
PUBLIC_KEY_LEN = 32
PROOF_LEN = 32
SIGNATURE_LEN = 64

_PREFIX = struct.Struct(">I")


# ---- field checkers ----------------------------------------------------------
# Each takes the decoded value and returns it (possibly converted) or raises
# FrameError. They run on encode as well, so we never send what we would refuse.


def _exact_bytes(n: int) -> Callable[[Any], bytes]:
    def check(value: Any) -> bytes:
        if type(value) is not bytes:
            raise FrameError(f"expected {n} bytes, got {type(value).__name__}")
        if len(value) != n:
            raise FrameError(f"expected {n} bytes, got {len(value)}")
        return value

    return check


def _bounded_bytes(limit: int) -> Callable[[Any], bytes]:
    def check(value: Any) -> bytes:
        if type(value) is not bytes:
            raise FrameError(f"expected bytes, got {type(value).__name__}")
        if len(value) > limit:
            raise FrameError(f"byte string of {len(value)} exceeds the limit of {limit}")
        return value

    return check


def _bounded_uint(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int:  # bool and IntEnum are not wire integers
            if isinstance(value, int) and not isinstance(value, bool):
                value = int(value)
            else:
                raise FrameError(f"expected an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise FrameError(f"integer {value} outside {low}..{high}")
        return value

    return check


def _bounded_str(limit: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if type(value) is not str:
            raise FrameError(f"expected a string, got {type(value).__name__}")
        if len(value) > limit:
            raise FrameError(f"string of {len(value)} characters exceeds the limit of {limit}")
        return value

    return check


def _priority(value: Any) -> Priority:
    if type(value) is not int and not isinstance(value, Priority):
        raise FrameError(f"expected a priority, got {type(value).__name__}")
    try:
        return Priority(value)
    except ValueError:
        raise FrameError(f"unknown priority {value}") from None


def _ids_from_wire(value: Any) -> tuple[bytes, ...]:
    """Concatenated 32-byte ids (1..MAX_HAVE_IDS of them) -> a tuple of ids."""
    if type(value) is not bytes:
        raise FrameError(f"expected concatenated block ids, got {type(value).__name__}")
    count, rest = divmod(len(value), BLOCK_ID_LEN)
    if rest or not 1 <= count <= MAX_HAVE_IDS:
        raise FrameError(
            f"expected 1..{MAX_HAVE_IDS} block ids of {BLOCK_ID_LEN} bytes, got {len(value)} bytes"
        )
    return tuple(value[i : i + BLOCK_ID_LEN] for i in range(0, len(value), BLOCK_ID_LEN))


def _maybe_ids_from_wire(value: Any) -> tuple[bytes, ...]:  # for Whole: MAX_WHOLE_IDS
    """As _ids_from_wire, but none at all is allowed too (an empty byte string)."""
    if value == b"":
        return ()
    return _ids_from_wire(value)


def _maybe_ids_to_wire(value: Any) -> bytes:
    if isinstance(value, tuple | list) and not value:
        return b""
    return _ids_to_wire(value)


def _ids_to_wire(value: Any) -> bytes:
    """A sequence of 1..MAX_HAVE_IDS block ids -> their concatenation (what the wire carries)."""
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= MAX_HAVE_IDS:
        raise FrameError(f"expected a list of 1..{MAX_HAVE_IDS} block ids")
    check = _exact_bytes(BLOCK_ID_LEN)
    return b"".join(check(block_id) for block_id in value)


def pack_bitmap(flags: Sequence[bool]) -> bytes:
    """Flags as bits, most significant bit of the first byte first (as BitTorrent's bitfield)."""
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def unpack_bitmap(bitmap: bytes, count: int) -> list[bool]:
    """The first `count` flags of a bitmap made by `pack_bitmap`; FrameError if it is not one."""
    if len(bitmap) != (count + 7) // 8:
        raise FrameError(f"a bitmap of {count} flags has {(count + 7) // 8} bytes, not {len(bitmap)}")
    if count % 8 and bitmap[-1] & (0xFF >> (count % 8)):
        raise FrameError("bits past the last flag are set in the bitmap")
    return [bool(bitmap[i >> 3] & (0x80 >> (i & 7))) for i in range(count)]


_REQ_ID = _bounded_uint(0, MAX_REQ_ID)
_REASON = _bounded_str(MAX_REASON)
_TOKEN = _bounded_uint(0, MAX_TOKEN)


# ---- messages ---------------------------------------------------------------


class Message:
    """Base of every frame's message; `TYPE` is its wire tag, `CHECKS` its field rules."""

    __slots__ = ()
    TYPE: ClassVar[str]
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]]
    # Fields whose wire form differs from their Python value: checked and
    # converted by these on encode (CHECKS convert back on decode).
    ENCODERS: ClassVar[dict[str, Callable[[Any], Any]]] = {}


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Server -> client, first frame: who the server is and a fresh nonce to sign."""

    server_id: bytes
    nonce: bytes
    TYPE: ClassVar[str] = "challenge"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "server_id": _exact_bytes(NODE_ID_LEN),
        "nonce": _exact_bytes(NONCE_LEN),
    }


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Client -> server: its node key, the drive it wants, proof of the drive secret, signature."""

    client_pubkey: bytes
    discovery_key: bytes
    proof: bytes
    sig: bytes
    TYPE: ClassVar[str] = "hello"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "client_pubkey": _exact_bytes(PUBLIC_KEY_LEN),
        "discovery_key": _exact_bytes(DISCOVERY_KEY_LEN),
        "proof": _exact_bytes(PROOF_LEN),
        "sig": _exact_bytes(SIGNATURE_LEN),
    }


@dataclass(frozen=True, slots=True)
class Push(Message):
    """Dialer -> listener, instead of Hello: "fetch this drive from me over this connection".

    The fields and checks are Hello's; the signature has its own context, so a
    Hello cannot be replayed as a Push. Once the listener answers Welcome the
    roles reverse: the dialer serves blocks (it sends its own Welcome first)
    and the listener sends wants (see docs/protocol.md, "Push connections").
    """

    client_pubkey: bytes
    discovery_key: bytes
    proof: bytes
    sig: bytes
    TYPE: ClassVar[str] = "push"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = Hello.CHECKS


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Server -> client: handshake accepted; at most `max_wants` requests may be outstanding."""

    max_wants: int
    TYPE: ClassVar[str] = "welcome"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "max_wants": _bounded_uint(1, MAX_WANTS_LIMIT),
    }


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """Server -> client: handshake refused; the server closes the connection."""

    reason: str
    TYPE: ClassVar[str] = "refused"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"reason": _REASON}


@dataclass(frozen=True, slots=True)
class Want(Message):
    """Client -> server: please send block `block_id`; answered by Block or NotFound."""

    req_id: int
    block_id: bytes
    priority: Priority
    TYPE: ClassVar[str] = "want"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "req_id": _REQ_ID,
        "block_id": _exact_bytes(BLOCK_ID_LEN),
        "priority": _priority,
    }


@dataclass(frozen=True, slots=True)
class WantRun(Message):
    """Client -> server: a run of Wants in one frame, block i under request id `req_id` + i.

    A reader streaming a file asks for its next blocks together: one frame,
    one decode and one scheduling step for the run instead of one per block.
    On the server each block is then a Want like any other (answered by its
    own Block or NotFound, cancelled by its own Cancel, counted against
    `max_wants` one by one). The ids travel concatenated, as Have's do; the
    run's request ids must all be within range (`req_id` + n - 1 <= MAX_REQ_ID).
    """

    req_id: int
    block_ids: tuple[bytes, ...]
    priority: Priority
    TYPE: ClassVar[str] = "want_run"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "req_id": _REQ_ID,
        "block_ids": _ids_from_wire,
        "priority": _priority,
    }
    ENCODERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"block_ids": _ids_to_wire}

    def __post_init__(self) -> None:
        # the one rule across fields; a frame breaking it is refused (decoder) or never
        # made (encoder), like any field out of bounds
        ids = self.block_ids
        if (type(self.req_id) is int and isinstance(ids, tuple | list) and ids
                and self.req_id + len(ids) - 1 > MAX_REQ_ID):
            raise FrameError(f"want_run of {len(ids)} from request id {self.req_id} "
                             f"runs past {MAX_REQ_ID}")

    def request_ids(self) -> range:
        """The request id of each block, in order."""
        return range(self.req_id, self.req_id + len(self.block_ids))


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Client -> server: drop want `req_id` if not yet answered; no reply."""

    req_id: int
    TYPE: ClassVar[str] = "cancel"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"req_id": _REQ_ID}


@dataclass(frozen=True, slots=True)
class Block(Message):
    """Server -> client: the bytes of the block asked for by `req_id` (client checks the hash)."""

    req_id: int
    data: bytes
    TYPE: ClassVar[str] = "block"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "req_id": _REQ_ID,
        "data": _bounded_bytes(MAX_BLOCK),
    }


@dataclass(frozen=True, slots=True)
class NotFound(Message):
    """Server -> client: the server does not hold the block asked for by `req_id`."""

    req_id: int
    TYPE: ClassVar[str] = "not_found"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"req_id": _REQ_ID}


@dataclass(frozen=True, slots=True)
class Have(Message):
    """Client -> server: which of these blocks do you hold? Answered by HaveReply.

    The ids travel as one byte string of 32-byte ids (1..MAX_HAVE_IDS), so the
    frame stays within the client frame limit.
    """

    req_id: int
    block_ids: tuple[bytes, ...]
    TYPE: ClassVar[str] = "have"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "req_id": _REQ_ID,
        "block_ids": _ids_from_wire,
    }
    ENCODERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"block_ids": _ids_to_wire}


@dataclass(frozen=True, slots=True)
class HaveReply(Message):
    """Server -> client: bit i (MSB first) says whether it holds id i of Have `req_id`."""

    req_id: int
    bitmap: bytes
    TYPE: ClassVar[str] = "have_reply"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "req_id": _REQ_ID,
        "bitmap": _bounded_bytes(MAX_BITMAP),
    }


@dataclass(frozen=True, slots=True)
class Notice(Message):
    """Server -> client: an opaque signed record (e.g. a new drive head) for `discovery_key`."""

    discovery_key: bytes
    record: bytes
    TYPE: ClassVar[str] = "notice"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "discovery_key": _exact_bytes(DISCOVERY_KEY_LEN),
        "record": _bounded_bytes(MAX_RECORD),
    }


@dataclass(frozen=True, slots=True)
class Holding(Message):
    """Server -> client: "ask me for these blocks": the server's node holds them.

    Readers of one drive push these to each other so a block crosses from the
    seed once and then spreads among readers. A hint, never a promise: a
    Want for an announced block may still be answered NotFound. (A node from
    before `Fetching` said this of blocks it was still fetching too; a client
    cannot tell those apart, and a hedge covers the wait.)
    """

    block_ids: tuple[bytes, ...]
    TYPE: ClassVar[str] = "holding"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"block_ids": _ids_from_wire}
    ENCODERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"block_ids": _ids_to_wire}


@dataclass(frozen=True, slots=True)
class Fetching(Message):
    """Server -> client: "my node is fetching these blocks now"; `Holding` follows for each
    one it gets.

    Not an offer to wait on: a client fetching the block in the background
    (readahead, pins) may hold back a moment for the Holding instead of
    taking the block from the seed too; a READ asks such a peer only with a
    short hedge to the seed.
    """

    block_ids: tuple[bytes, ...]
    TYPE: ClassVar[str] = "fetching"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"block_ids": _ids_from_wire}
    ENCODERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"block_ids": _ids_to_wire}


@dataclass(frozen=True, slots=True)
class Whole(Message):
    """Server -> client: the trees this node holds whole, by the id of their top directory
    node; it replaces whatever the server said before (none: it holds no tree whole).

    "Whole" means every block needed to read everything below (directory
    nodes, chunk lists, chunks) is on the node and kept there (pinned): a
    reader's complete pins, a publisher's or host's complete versions (a
    version's root directory node id is its head's root block). A directory
    node id names its whole tree (a Merkle tree), so the claim holds in every
    version that has that directory. Copies of a folder are counted from
    these, with no question per block. A claim, not a proof.
    """

    node_ids: tuple[bytes, ...]
    TYPE: ClassVar[str] = "whole"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"node_ids": _maybe_ids_from_wire}
    ENCODERS: ClassVar[dict[str, Callable[[Any], Any]]] = {"node_ids": _maybe_ids_to_wire}


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Either side: liveness / round-trip probe; answered by Pong with the same token."""

    token: int
    TYPE: ClassVar[str] = "ping"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"token": _TOKEN}


@dataclass(frozen=True, slots=True)
class Pong(Message):
    token: int
    TYPE: ClassVar[str] = "pong"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"token": _TOKEN}


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Either side: the sender is closing the connection, and why."""

    reason: str
    TYPE: ClassVar[str] = "goodbye"
    CHECKS: ClassVar[dict[str, Callable[[Any], Any]]] = {"reason": _REASON}


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Challenge,
        Hello,
        Push,
        Welcome,
        Refused,
        Want,
        WantRun,
        Cancel,
        Block,
        NotFound,
        Have,
        HaveReply,
        Notice,
        Holding,
        Fetching,
        Whole,
        Ping,
        Pong,
        Goodbye,
    )
}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls))
    for cls in MESSAGE_TYPES.values()  # type: ignore[arg-type]
}


# ---- encoding ---------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Frame bytes (length prefix + msgpack map) for `msg`; FrameError if a field is out of bounds."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", "")) is not cls:
        raise FrameError(f"not a peer-protocol message: {cls.__name__}")
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": cls.TYPE}
    for name in _FIELD_NAMES[cls]:
        check = cls.ENCODERS.get(name) or cls.CHECKS[name]
        value = check(getattr(msg, name))
        body[name] = int(value) if isinstance(value, int) else value
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME}")
    return _PREFIX.pack(len(payload)) + payload


def encode_block(req_id: int, data: bytes) -> tuple[bytes, bytes]:
    """The frame of `Block(req_id, data)` as (everything before the block's bytes, the
    block's bytes): the same bytes as `encode`, without copying the block twice more (into
    msgpack's output, then behind the length prefix). A serving node sends the two
    parts to the TLS object one after the other (docs/benchmarks.md, issue 12)."""
    data = Block.CHECKS["data"](data)
    body = {"v": PROTOCOL_VERSION, "t": Block.TYPE, "req_id": _REQ_ID(req_id), "data": b""}
    # `data` is the map's last field (Block's field order), so the packed map ends in an
    # empty bin8 (c4 00); the block's own bin header takes its place
    head = msgpack.packb(body, use_bin_type=True)[:-2]
    size = len(data)
    if size < 1 << 8:
        bin_head = struct.pack(">BB", 0xC4, size)
    elif size < 1 << 16:
        bin_head = struct.pack(">BH", 0xC5, size)
    else:
        bin_head = struct.pack(">BI", 0xC6, size)
    length = len(head) + len(bin_head) + size
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
    return _PREFIX.pack(length) + head + bin_head, data


def _decode_payload(payload: memoryview) -> Message:
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_FRAME,
            max_bin_len=MAX_FRAME,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=64,
        )
    except Exception as exc:  # msgpack raises a zoo of types on malformed input
        raise FrameError(f"malformed frame payload: {type(exc).__name__}: {exc}") from None
    if type(body) is not dict:
        raise FrameError(f"frame payload is a {type(body).__name__}, expected a map")
    version = body.pop("v", None)
    if type(version) is not int:
        raise FrameError("frame has no protocol version")
    if version != PROTOCOL_VERSION:
        raise FrameError(
            f"peer speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}"
        )
    tag = body.pop("t", None)
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        raise FrameError(f"unknown message type {tag!r}")
    names = _FIELD_NAMES[cls]
    if len(body) != len(names) or any(name not in body for name in names):
        expected = ", ".join(names) or "no fields"
        raise FrameError(
            f"{cls.TYPE} frame has fields {sorted(map(str, body))}, expected {expected}"
        )
    values = {}
    for name in names:
        try:
            values[name] = cls.CHECKS[name](body[name])
        except FrameError as exc:
            raise FrameError(f"{cls.TYPE}.{name}: {exc}") from None
    return cls(**values)


# ---- decoding ---------------------------------------------------------------


class FrameDecoder:
    """Turns a byte stream into messages; feed bytes, then take events until None.

    After a FrameError the decoder is broken for good (the stream has lost
    framing) and raises the same error again on every call. `max_frame` bounds
    the payload length accepted (a server reading clients passes
    MAX_CLIENT_FRAME: no client message is near 4 MiB, so no client may make
    it buffer that much).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None
        self._max_frame = min(max_frame, MAX_FRAME)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into a message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data
        # Check the head frame's prefix as soon as it is complete, even before
        # the caller asks for events, so nothing is ever buffered for a frame
        # we would refuse. (Later prefixes are checked when they reach the head.)
        if len(self._buf) >= _PREFIX.size:
            self._check_length(_PREFIX.unpack_from(self._buf)[0])

    def set_max_frame(self, max_frame: int) -> None:
        """Change the payload limit from the next frame on (a push connection's roles swap)."""
        self._max_frame = min(max_frame, MAX_FRAME)
        if self._error is None and len(self._buf) >= _PREFIX.size:
            self._check_length(_PREFIX.unpack_from(self._buf)[0])

    def _check_length(self, length: int) -> None:
        if length > self._max_frame:
            self._fail(FrameError(f"frame length {length} exceeds the limit of {self._max_frame}"))

    def _fail(self, error: FrameError) -> None:
        self._error = error
        self._buf = bytearray()
        raise error

    def next_event(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        if len(self._buf) < _PREFIX.size:
            return None
        (length,) = _PREFIX.unpack_from(self._buf)
        self._check_length(length)
        end = _PREFIX.size + length
        if len(self._buf) < end:
            return None
        try:
            with memoryview(self._buf) as view, view[_PREFIX.size : end] as payload:
                msg = _decode_payload(payload)
        except FrameError as exc:
            self._fail(exc)
        del self._buf[:end]
        return msg

    def __iter__(self) -> Iterator[Message]:
        """Every message that is complete in the buffer now."""
        while (msg := self.next_event()) is not None:
            yield msg
