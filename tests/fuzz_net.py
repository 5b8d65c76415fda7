"""Fuzz targets for the network decoders: peer frames, DHT records, DHT datagrams, LAN packets.

Each target feeds untrusted bytes to the code a stranger's bytes reach and
checks more than "no crash": what decodes must re-encode to the same message
(no wrong bytes), and a DHT node must never send a datagram over its limit nor
more than a bounded reply to an address that has not proved it is the sender.
See tests/fuzzing.py for the harness.
"""

from __future__ import annotations

import asyncio
import hashlib

import msgpack
from kademlia.node import Node

from dht.errors import FrameError
from dht.frames import (
    MAX_CLIENT_FRAME,
    MAX_FRAME,
    Block,
    Cancel,
    Challenge,
    FrameDecoder,
    Goodbye,
    Have,
    HaveReply,
    Hello,
    NotFound,
    Notice,
    Ping,
    Pong,
    Push,
    Refused,
    Want,
    Welcome,
    encode,
)
from dht.kad import (
    MAX_DATAGRAM,
    TAG_MUTABLE,
    TAG_PROVIDER,
    UNVERIFIED_REPLY_MAX,
    PeerdriveProtocol,
    RecordStorage,
    provider_key,
)
from dht.lan import LanError, decode_lan_datagram, encode_lan_datagrams
from dht.records import MutableRecord, ProviderRecord, RecordError, discovery_key
from dht.types import Priority
from tests.fuzzing import seeds, target

NOW = 1_800_000_000
"""The fixed clock of every target (so a seed's validity never depends on the day)."""

SENDER = ("127.0.0.1", 40000)
_DRIVE_KEY = hashlib.sha256(b"fuzz drive key").digest()
_NODE_KEY = hashlib.sha256(b"fuzz node key").digest()
_MUTABLE, MUTABLE_WIRE = MutableRecord.create(_DRIVE_KEY, 7, b"a head" * 10)
DK = _MUTABLE.key
_PROVIDER, PROVIDER_WIRE = ProviderRecord.create(_NODE_KEY, DK, [("127.0.0.1", 4100)], now=NOW)
NODE_ID = hashlib.sha256(b"fuzz node id").digest()


# ---- frames -------------------------------------------------------------------------


@target("frames", allowed=(FrameError,))
def fuzz_frames(data: bytes) -> None:
    """Peer-protocol frames fed in pieces to a server's (4 KiB) or a client's decoder."""
    if not data:
        return
    control, stream = data[0], data[1:]
    decoder = FrameDecoder(MAX_CLIENT_FRAME if control & 1 else MAX_FRAME)
    step = 1 + (control >> 1)
    for start in range(0, len(stream), step):
        decoder.feed(stream[start : start + step])
        for msg in decoder:
            again = FrameDecoder(MAX_FRAME)
            again.feed(encode(msg))
            assert list(again) == [msg], "a decoded frame re-encodes to another message"


def _frame_messages() -> list:
    i32, j32 = bytes(range(32)), bytes(range(32, 64))
    return [
        Challenge(i32, j32),
        Hello(i32, j32, i32, bytes(64)),
        Push(i32, j32, i32, bytes(64)),
        Welcome(256),
        Refused("no"),
        Want(1, i32, Priority.READ),
        Want(2**32 - 1, j32, Priority.PREFETCH),
        Cancel(1),
        Block(1, b"x" * 100),
        NotFound(9),
        Have(3, (i32, j32)),
        HaveReply(3, b"\x80"),
        Notice(j32, MUTABLE_WIRE),
        Ping(5),
        Pong(5),
        Goodbye("bye"),
    ]


@seeds("frames")
def frames_seeds():
    msgs = _frame_messages()
    for control in (0, 1):
        for msg in msgs:
            yield bytes([control]) + encode(msg)
    yield bytes([6]) + b"".join(encode(m) for m in msgs)
    yield bytes([1]) + b"\x00\x00\x10\x01" + b"\x00" * 8  # over the client limit
    yield bytes([0]) + b"\x00\x00\x00\x05" + msgpack.packb({"v": 2, "t": "ping"})


# ---- records ------------------------------------------------------------------------


@target("records", allowed=(RecordError,))
def fuzz_records(data: bytes) -> None:
    """Signed DHT records: a mutable record (first byte even) or a provider record (odd)."""
    if not data:
        return
    wire = data[1:]
    if data[0] & 1:
        record = ProviderRecord.decode(wire, now=NOW)
        assert record.wire == wire and NOW < record.expires <= NOW + 3600 + 300
        assert ProviderRecord.decode(record.wire, now=NOW) == record
    else:
        mutable = MutableRecord.decode(wire)
        assert mutable.wire == wire and MutableRecord.decode(wire) == mutable


@seeds("records")
def records_seeds():
    yield b"\x00" + MUTABLE_WIRE
    yield b"\x01" + PROVIDER_WIRE
    yield b"\x01" + ProviderRecord.create(_NODE_KEY, DK, [("h" * 253, 65535)] * 4, now=NOW)[1]
    yield b"\x01" + ProviderRecord.create(_NODE_KEY, DK, [("::1", 1)], now=NOW - 7200)[1]
    yield b"\x00" + MutableRecord.create(_DRIVE_KEY, 2**64 - 1, b"")[1]
    yield b"\x00" + MUTABLE_WIRE[:-1] + bytes([MUTABLE_WIRE[-1] ^ 1])


# ---- DHT datagrams ------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr) -> None:
        self.sent.append((data, tuple(addr)))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return default


# a plain asyncio loop: importing trio_asyncio (dht.kad does) makes new_event_loop() a
# trio-backed one, whose per-call machinery was most of this target's time
_loop = asyncio.SelectorEventLoop()


def _accept_any(value: bytes) -> None:
    """Verify a value from a find_value reply as a lookup would."""
    if value[:1] == bytes([TAG_MUTABLE]):
        MutableRecord.decode(value[1:])
    elif value[:1] == bytes([TAG_PROVIDER]):
        ProviderRecord.decode(value[1:], now=NOW)
    else:
        raise RecordError("an untagged value")


def _storage() -> RecordStorage:
    """A node's storage holding one head and one provider record.

    Fresh per input (no state carried from one input to the next), filled with
    the records decoded once at import: verifying them again per input was
    most of the target's time.
    """
    storage = RecordStorage(clock=lambda: NOW)
    assert storage._offer_mutable(DK, _MUTABLE, None)
    assert storage._offer_provider(provider_key(DK), _PROVIDER, NOW, None)
    return storage


async def _one_datagram(data: bytes) -> None:
    storage = _storage()
    protocol = PeerdriveProtocol(Node(NODE_ID), storage, 20, wait_timeout=1.0)
    transport = _Transport()
    protocol.connection_made(transport)
    try:
        protocol._handle_datagram(data, SENDER)
        await asyncio.sleep(0)  # whatever the handler scheduled runs (and fails) here
    finally:
        protocol.fail_outstanding()
    assert all(len(d) <= MAX_DATAGRAM for d, _ in transport.sent), "an oversize datagram"
    # SENDER never proved its address: nothing bigger than the cap goes back to it
    assert all(len(d) <= UNVERIFIED_REPLY_MAX for d, a in transport.sent if a == SENDER)
    assert len(transport.sent) <= 2, "more than a reply and a verification ping"
    # what the body would give a lookup, if this were a reply
    try:
        body = msgpack.unpackb(data[21:], raw=False, strict_map_key=True)
    except Exception:
        return
    protocol.parse_nodes(body)
    parsed = protocol.parse_find_value(body)
    if parsed is not None:
        for value in parsed[0]:
            try:
                _accept_any(value)
            except RecordError:
                pass


@target("dht_datagram")
def fuzz_dht_datagram(data: bytes) -> None:
    """A DHT datagram from a stranger: handled without any exception, replies bounded."""
    _loop.run_until_complete(_one_datagram(data))


def _request(name: str, args: list) -> bytes:
    return b"\x00" + hashlib.sha256(name.encode()).digest()[:20] + msgpack.packb(
        [name, args], use_bin_type=True)


@seeds("dht_datagram")
def dht_datagram_seeds():
    peer = hashlib.sha256(b"fuzz peer").digest()
    pkey = provider_key(DK)
    yield _request("ping", [peer])
    yield _request("find_node", [peer, DK])
    yield _request("find_value", [peer, DK])
    yield _request("find_value", [peer, pkey])
    yield _request("store", [peer, pkey, bytes([TAG_PROVIDER]) + PROVIDER_WIRE])
    yield _request("store", [peer, DK, bytes([TAG_MUTABLE]) + MUTABLE_WIRE])
    yield _request("store", [peer, DK, b"\x01garbage"])
    yield _request("find_value", [peer])
    reply_id = b"\x01" + bytes(20)
    yield reply_id + msgpack.packb(peer)
    yield reply_id + msgpack.packb([[peer, "127.0.0.1", 4000]] * 3)
    yield reply_id + msgpack.packb(
        {"values": [bytes([TAG_MUTABLE]) + MUTABLE_WIRE], "nodes": [[peer, "10.0.0.1", 1]]})


# ---- LAN packets --------------------------------------------------------------------


@target("lan", allowed=(LanError,))
def fuzz_lan(data: bytes) -> None:
    """A LAN discovery datagram: verified records come out, or LanError."""
    records, refused = decode_lan_datagram(data, now=NOW)
    assert refused >= 0
    for record in records:
        assert isinstance(record, ProviderRecord) and record.expires > NOW


@seeds("lan")
def lan_seeds():
    other = ProviderRecord.create(_NODE_KEY, discovery_key(bytes(32)), [("10.1.2.3", 9)],
                                  now=NOW, ttl=120)[1]
    yield from encode_lan_datagrams([PROVIDER_WIRE, other])
    yield from encode_lan_datagrams([PROVIDER_WIRE[:-3] + b"abc"])
    yield msgpack.packb([b"peerdrive-lan", 2, []])
