"""The frame codec without sockets: examples, bounds, and hypothesis properties."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dht.frames as frames_module
from dht.errors import DhtError, FrameError
from dht.frames import (
    MAX_BITMAP,
    MAX_BLOCK,
    MAX_CLIENT_FRAME,
    MAX_FRAME,
    MAX_HAVE_IDS,
    MAX_REASON,
    MAX_RECORD,
    MAX_REQ_ID,
    MAX_RUN_IDS,
    MAX_TOKEN,
    MAX_WANTS_LIMIT,
    PROTOCOL_VERSION,
    Block,
    Cancel,
    Challenge,
    Fetching,
    FrameDecoder,
    Goodbye,
    Have,
    HaveReply,
    Hello,
    Holding,
    Message,
    NotFound,
    Notice,
    Ping,
    Pong,
    Push,
    Refused,
    Want,
    WantRun,
    Welcome,
    Whole,
    encode,
    encode_block,
    pack_bitmap,
    unpack_bitmap,
)
from dht.types import Priority

ID = bytes(range(32))
ID2 = bytes(range(1, 33))


def frame_of(body: object) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def decode_all(data: bytes) -> list[Message]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder)


EXAMPLES: list[Message] = [
    Challenge(ID, ID2),
    Hello(ID, ID2, ID, bytes(64)),
    Push(ID, ID2, ID, bytes(64)),
    Welcome(256),
    Refused("no"),
    Want(7, ID, Priority.PIN),
    WantRun(7, (ID,), Priority.READAHEAD),
    WantRun(MAX_REQ_ID - 2, (ID, ID2, ID), Priority.READ),
    Cancel(7),
    Block(7, b"hello block"),
    Block(MAX_REQ_ID, b""),
    NotFound(0),
    Have(3, (ID,)),
    Have(MAX_REQ_ID, (ID, ID2, ID)),
    HaveReply(3, b"\x80"),
    HaveReply(0, b""),
    Notice(ID, b"\x01" * 100),
    Ping(MAX_TOKEN),
    Pong(0),
    Goodbye("bye \u00e9\u4e16"),
    Holding((ID, bytes(range(32)))),
    Fetching((ID,)),
    Fetching((bytes(range(32)), ID, ID2)),
    Whole((ID, bytes(range(32)))),
    Whole(()),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_examples(msg: Message) -> None:
    assert decode_all(encode(msg)) == [msg]


def test_the_frame_limit_can_change_between_frames() -> None:
    """A push connection's roles swap after the handshake: so do the frame limits."""
    decoder = FrameDecoder(MAX_CLIENT_FRAME)
    big = encode(Block(1, b"x" * 10_000))
    decoder.feed(encode(Welcome(5)))
    assert decoder.next_event() == Welcome(5)
    decoder.set_max_frame(MAX_FRAME)
    decoder.feed(big)
    assert decoder.next_event() == Block(1, b"x" * 10_000)
    decoder.set_max_frame(MAX_CLIENT_FRAME)
    with pytest.raises(FrameError):
        decoder.feed(big[:4])


def test_wire_layout_is_length_prefix_then_msgpack_map() -> None:
    frame = encode(Want(5, ID, Priority.READ))
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    body = msgpack.unpackb(frame[4:], raw=False)
    assert body == {"v": PROTOCOL_VERSION, "t": "want", "req_id": 5, "block_id": ID, "priority": 0}


def test_largest_block_fits_in_a_frame() -> None:
    frame = encode(Block(1, b"\xab" * MAX_BLOCK))
    assert len(frame) - 4 <= MAX_FRAME
    [msg] = decode_all(frame)
    assert isinstance(msg, Block) and len(msg.data) == MAX_BLOCK


def test_priority_decodes_as_enum() -> None:
    [msg] = decode_all(encode(Want(1, ID, Priority.PREFETCH)))
    assert isinstance(msg, Want) and msg.priority is Priority.PREFETCH


def test_frame_error_is_a_dht_error() -> None:
    assert issubclass(FrameError, DhtError)


def test_oversize_length_prefix_fails_on_the_prefix_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x40")  # half a prefix: nothing to judge yet
    with pytest.raises(FrameError, match="exceeds"):
        decoder.feed(struct.pack(">I", MAX_FRAME + 1)[2:])
    assert decoder.buffered == 0


def test_oversize_prefix_behind_a_good_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(Ping(1)) + struct.pack(">I", 2**32 - 1))
    # The good frame is delivered; the bad prefix fails once it is at the head.
    assert decoder.next_event() == Ping(1)
    with pytest.raises(FrameError, match="exceeds"):
        decoder.next_event()
    assert decoder.buffered == 0


def test_a_smaller_frame_limit_can_be_chosen() -> None:
    decoder = FrameDecoder(max_frame=MAX_CLIENT_FRAME)
    decoder.feed(encode(Want(1, ID, Priority.READ)))
    assert isinstance(decoder.next_event(), Want)
    with pytest.raises(FrameError, match=f"limit of {MAX_CLIENT_FRAME}"):
        decoder.feed(struct.pack(">I", MAX_CLIENT_FRAME + 1))


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_of([1, 2, 3]))
    with pytest.raises(FrameError):
        decoder.next_event()
    with pytest.raises(FrameError):
        decoder.feed(encode(Ping(1)))
    with pytest.raises(FrameError):
        decoder.next_event()


def test_partial_frame_waits_for_more() -> None:
    frame = encode(Block(3, b"x" * 1000))
    decoder = FrameDecoder()
    decoder.feed(frame[:-1])
    assert decoder.next_event() is None
    decoder.feed(frame[-1:])
    assert decoder.next_event() == Block(3, b"x" * 1000)
    assert decoder.next_event() is None


def good_want() -> dict[str, object]:
    return {"v": PROTOCOL_VERSION, "t": "want", "req_id": 1, "block_id": ID, "priority": 1}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version 2"),
        ({"v": "1"}, "no protocol version"),
        ({"t": "teleport"}, "unknown message type"),
        ({"t": 3}, "unknown message type"),
        ({"block_id": ID[:31]}, "expected 32 bytes"),
        ({"block_id": ID + b"x"}, "expected 32 bytes"),
        ({"block_id": ID.hex()}, "expected 32 bytes"),
        ({"req_id": -1}, "outside"),
        ({"req_id": MAX_REQ_ID + 1}, "outside"),
        ({"req_id": True}, "expected an integer"),
        ({"req_id": 1.0}, "expected an integer"),
        ({"priority": 4}, "unknown priority"),
        ({"priority": -1}, "unknown priority"),
        ({"extra": 1}, "fields"),
    ],
)
def test_bad_fields_are_rejected(change: dict[str, object], match: str) -> None:
    body = good_want() | change
    with pytest.raises(FrameError, match=match):
        decode_all(frame_of(body))


def test_missing_field_is_rejected() -> None:
    body = good_want()
    del body["priority"]
    with pytest.raises(FrameError, match="fields"):
        decode_all(frame_of(body))


def test_missing_version_is_rejected() -> None:
    body = good_want()
    del body["v"]
    with pytest.raises(FrameError, match="version"):
        decode_all(frame_of(body))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", frame_of([1])[4:], frame_of("text")[4:], frame_of({1: 2})[4:], b"\x81\xa1"],
)
def test_malformed_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_all(struct.pack(">I", len(payload)) + payload)


def test_trailing_bytes_inside_a_frame_are_rejected() -> None:
    payload = msgpack.packb(good_want(), use_bin_type=True) + b"\x00"
    with pytest.raises(FrameError, match="malformed"):
        decode_all(struct.pack(">I", len(payload)) + payload)


def test_bounded_strings_and_bytes() -> None:
    with pytest.raises(FrameError, match="limit"):
        decode_all(frame_of({"v": 1, "t": "goodbye", "reason": "x" * (MAX_REASON + 1)}))
    with pytest.raises(FrameError, match="limit"):
        decode_all(
            frame_of(
                {"v": 1, "t": "notice", "discovery_key": ID, "record": b"r" * (MAX_RECORD + 1)}
            )
        )
    with pytest.raises(FrameError, match="outside"):
        decode_all(frame_of({"v": 1, "t": "welcome", "max_wants": 0}))


@pytest.mark.parametrize(
    "msg",
    [
        Want(1, ID[:31], Priority.READ),
        Want(-1, ID, Priority.READ),
        Want(1, ID, 9),  # type: ignore[arg-type]
        Block(1, b"x" * (MAX_BLOCK + 1)),
        Notice(ID, b"x" * (MAX_RECORD + 1)),
        Goodbye("x" * (MAX_REASON + 1)),
        Welcome(MAX_WANTS_LIMIT + 1),
        Hello(ID, ID, ID, bytes(63)),
        Push(ID, ID, ID[:31], bytes(64)),
        Have(1, ()),
        Have(1, (ID,) * (MAX_HAVE_IDS + 1)),
        Have(1, (ID[:31],)),
        Have(1, ID),  # type: ignore[arg-type]
        HaveReply(1, b"x" * (MAX_BITMAP + 1)),
        Whole((ID,) * (MAX_HAVE_IDS + 1)),
        Whole((ID[:31],)),
        Fetching(()),
        Fetching((ID,) * (MAX_HAVE_IDS + 1)),
        Fetching((ID[:31],)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_encode_refuses_what_decode_would_refuse(msg: Message) -> None:
    with pytest.raises(FrameError):
        encode(msg)


def test_have_carries_ids_as_one_byte_string_within_the_client_frame_limit() -> None:
    most = tuple(bytes([i]) * 32 for i in range(MAX_HAVE_IDS))
    frame = encode(Have(9, most))
    assert len(frame) - 4 <= MAX_CLIENT_FRAME
    body = msgpack.unpackb(frame[4:], raw=False)
    assert body == {"v": PROTOCOL_VERSION, "t": "have", "req_id": 9, "block_ids": b"".join(most)}
    decoder = FrameDecoder(max_frame=MAX_CLIENT_FRAME)
    decoder.feed(frame)
    assert decoder.next_event() == Have(9, most)


def test_the_longest_want_run_fits_in_a_client_frame() -> None:
    frame = encode(WantRun(MAX_REQ_ID - MAX_RUN_IDS + 1, (ID,) * MAX_RUN_IDS, Priority.PREFETCH))
    assert len(frame) - 4 <= MAX_CLIENT_FRAME
    decoder = FrameDecoder(MAX_CLIENT_FRAME)
    decoder.feed(frame)
    (run,) = list(decoder)
    assert isinstance(run, WantRun)
    assert list(run.request_ids()) == list(range(MAX_REQ_ID - MAX_RUN_IDS + 1, MAX_REQ_ID + 1))


@pytest.mark.parametrize("req_id, count", [(MAX_REQ_ID, 2), (MAX_REQ_ID - 5, 7)])
def test_a_want_run_past_the_last_request_id_is_refused(req_id: int, count: int) -> None:
    """Every block of a run has its own request id, each within range: a run that would
    wrap is refused by the encoder and the decoder alike."""
    with pytest.raises(FrameError, match="runs past"):
        WantRun(req_id, (ID,) * count, Priority.READ)
    body = {"v": PROTOCOL_VERSION, "t": "want_run", "req_id": req_id,
            "block_ids": ID * count, "priority": 0}
    with pytest.raises(FrameError, match="runs past"):
        decode_all(frame_of(body))


@pytest.mark.parametrize("block_ids, match", [
    (b"", "block ids"), (ID * (MAX_RUN_IDS + 1), "block ids"), (ID + b"\x00", "block ids")])
def test_bad_want_run_ids_are_rejected(block_ids: bytes, match: str) -> None:
    body = {"v": PROTOCOL_VERSION, "t": "want_run", "req_id": 1, "block_ids": block_ids,
            "priority": 0}
    with pytest.raises(FrameError, match=match):
        decode_all(frame_of(body))


@given(st.integers(0, MAX_REQ_ID), st.binary(max_size=40 * 32), st.integers(-2, 6))
def test_arbitrary_want_runs_decode_or_raise_frame_error(req_id: int, block_ids: bytes,
                                                         priority: int) -> None:
    """The decoder's answer to any run is a valid WantRun (every request id in range, the
    ids 32 bytes each) or a FrameError, nothing else."""
    body = {"v": PROTOCOL_VERSION, "t": "want_run", "req_id": req_id, "block_ids": block_ids,
            "priority": priority}
    try:
        (run,) = decode_all(frame_of(body))
    except FrameError:
        return
    assert isinstance(run, WantRun)
    assert run.request_ids()[-1] <= MAX_REQ_ID
    assert b"".join(run.block_ids) == block_ids and all(len(b) == 32 for b in run.block_ids)
    assert decode_all(encode(run)) == [run]


def test_have_list_of_ids_decodes_as_a_tuple() -> None:
    [msg] = decode_all(encode(Have(1, [ID, ID2])))  # type: ignore[arg-type]
    assert isinstance(msg, Have) and msg.block_ids == (ID, ID2)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (b"", f"1..{MAX_HAVE_IDS} block ids"),
        (ID[:31], f"1..{MAX_HAVE_IDS} block ids"),
        (ID + b"x", f"1..{MAX_HAVE_IDS} block ids"),
        (ID * (MAX_HAVE_IDS + 1), f"1..{MAX_HAVE_IDS} block ids"),
        ([ID], "concatenated block ids"),
        (ID.hex(), "concatenated block ids"),
    ],
)
def test_bad_have_ids_are_rejected(ids: object, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode_all(frame_of({"v": 1, "t": "have", "req_id": 1, "block_ids": ids}))


def test_bitmap_bits_are_most_significant_first() -> None:
    assert pack_bitmap([True] + [False] * 7 + [True]) == b"\x80\x80"
    assert pack_bitmap([]) == b""
    assert unpack_bitmap(b"\x40", 3) == [False, True, False]


@pytest.mark.parametrize(
    ("bitmap", "count"), [(b"", 1), (b"\x00\x00", 8), (b"\x10", 3), (b"\x01", 7)]
)
def test_malformed_bitmaps_are_rejected(bitmap: bytes, count: int) -> None:
    with pytest.raises(FrameError):
        unpack_bitmap(bitmap, count)


@given(st.lists(st.booleans(), max_size=3 * MAX_HAVE_IDS))
def test_bitmaps_round_trip(flags: list[bool]) -> None:
    assert unpack_bitmap(pack_bitmap(flags), len(flags)) == flags


@given(st.binary(max_size=40), st.integers(0, 300))
def test_arbitrary_bitmaps_raise_only_frame_error(bitmap: bytes, count: int) -> None:
    try:
        flags = unpack_bitmap(bitmap, count)
    except FrameError:
        return
    assert pack_bitmap(flags) == bitmap


def test_encode_refuses_foreign_objects() -> None:
    with pytest.raises(FrameError):
        encode(object())  # type: ignore[arg-type]


# ---- properties -------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
req_ids = st.integers(0, MAX_REQ_ID)
tokens = st.integers(0, MAX_TOKEN)
reasons = st.text(max_size=MAX_REASON)
messages = st.one_of(
    st.builds(Challenge, ids, ids),
    st.builds(Hello, ids, ids, ids, st.binary(min_size=64, max_size=64)),
    st.builds(Push, ids, ids, ids, st.binary(min_size=64, max_size=64)),
    st.builds(Welcome, st.integers(1, MAX_WANTS_LIMIT)),
    st.builds(Refused, reasons),
    st.builds(Want, req_ids, ids, st.sampled_from(Priority)),
    st.builds(Cancel, req_ids),
    st.lists(ids, min_size=1, max_size=MAX_RUN_IDS).flatmap(
        lambda run: st.builds(WantRun, st.integers(0, MAX_REQ_ID - len(run) + 1),
                              st.just(tuple(run)), st.sampled_from(Priority))),
    st.builds(Block, req_ids, st.binary(max_size=2048)),
    st.builds(NotFound, req_ids),
    st.builds(Have, req_ids, st.lists(ids, min_size=1, max_size=MAX_HAVE_IDS).map(tuple)),
    st.builds(HaveReply, req_ids, st.binary(max_size=MAX_BITMAP)),
    st.builds(Notice, ids, st.binary(max_size=512)),
    st.builds(Ping, tokens),
    st.builds(Pong, tokens),
    st.builds(Goodbye, reasons),
    st.builds(Holding, st.lists(ids, min_size=1, max_size=MAX_HAVE_IDS).map(tuple)),
    st.builds(Fetching, st.lists(ids, min_size=1, max_size=MAX_HAVE_IDS).map(tuple)),
    st.builds(Whole, st.lists(ids, max_size=MAX_HAVE_IDS).map(tuple)),
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Message]:
    decoder = FrameDecoder()
    events: list[Message] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        decoder.feed(data[start:cut])
        events.extend(decoder)
        start = cut
    return events


@settings(max_examples=400)
@given(messages)
def test_every_message_round_trips(msg: Message) -> None:
    assert decode_all(encode(msg)) == [msg]


@given(st.lists(messages, max_size=8), st.data())
def test_any_split_of_a_valid_stream_yields_the_same_events(
    msgs: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert feed_in_pieces(stream, cuts) == msgs


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.data())
def test_arbitrary_bytes_raise_only_frame_error(junk: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(junk)), max_size=10))
    try:
        events = feed_in_pieces(junk, cuts)
    except FrameError:
        return
    # whatever decoded is a valid message: it encodes, and decodes back to itself
    for event in events:
        assert decode_all(encode(event)) == [event]


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.binary(max_size=12), children, max_size=6)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "v",
        "t",
        "req_id",
        "block_id",
        "priority",
        "data",
        "reason",
        "record",
        "token",
        "nonce",
        "server_id",
        "client_pubkey",
        "discovery_key",
        "proof",
        "sig",
        "max_wants",
        "block_ids",
        "bitmap",
    ]
)


@settings(max_examples=400)
@given(
    st.dictionaries(
        field_names,
        msgpack_values | ids | req_ids | st.lists(ids, max_size=4).map(b"".join),
        max_size=6,
    ),
    st.sampled_from([None, *sorted(m.TYPE for m in map(type, EXAMPLES))]),
    st.sampled_from([None, PROTOCOL_VERSION, 0, 2]),
)
def test_structured_junk_raises_only_frame_error(
    body: dict[str, object], tag: str | None, version: int | None
) -> None:
    if tag is not None:
        body["t"] = tag
    if version is not None:
        body["v"] = version
    try:
        events = decode_all(frame_of(body))
    except FrameError:
        return
    # If it decoded, it must be a valid message that encodes back to itself.
    assert len(events) == 1
    assert decode_all(encode(events[0])) == events


@settings(max_examples=400)
@given(messages, st.integers(0, 10_000), st.integers(0, 255))
def test_corrupted_frames_raise_only_frame_error(msg: Message, where: int, value: int) -> None:
    frame = bytearray(encode(msg))
    frame[where % len(frame)] = value
    try:
        events = decode_all(bytes(frame))
    except FrameError:
        return
    for event in events:
        assert decode_all(encode(event)) == [event]


@given(st.lists(ids, min_size=1, max_size=MAX_HAVE_IDS), st.binary(max_size=MAX_HAVE_IDS * 32))
def test_fetching_and_holding_share_one_id_rule(block_ids: list[bytes], raw: bytes) -> None:
    """`fetching` is `holding` with another meaning: the same ids field, the same bounds; a
    body of either kind with an ids string not a whole number of ids is refused."""
    for kind in (Holding, Fetching):
        frame = encode(kind(tuple(block_ids)))
        assert decode_all(frame) == [kind(tuple(block_ids))]
        body = {"v": PROTOCOL_VERSION, "t": kind.TYPE, "block_ids": raw}
        try:
            events = decode_all(frame_of(body))
        except FrameError:
            assert len(raw) % 32 or not raw
        else:
            assert events == [kind(tuple(raw[i:i + 32] for i in range(0, len(raw), 32)))]


def test_a_node_without_fetching_refuses_it_clearly() -> None:
    """A node from before `fetching` (no such type) gets a FrameError that names it, and
    ends the connection with it, never a misread Holding."""
    frame = frame_of({"v": PROTOCOL_VERSION, "t": "fetching", "block_ids": ID})
    assert decode_all(frame) == [Fetching((ID,))]
    old_types = {t: c for t, c in frames_module.MESSAGE_TYPES.items() if t != "fetching"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frames_module, "MESSAGE_TYPES", old_types)
        with pytest.raises(FrameError, match="unknown message type 'fetching'"):
            decode_all(frame)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 256 * 1024, MAX_BLOCK])
@pytest.mark.parametrize("req_id", [0, 127, 128, 65536, 2**32 - 1])
def test_encode_block_is_encode_of_a_block_in_two_parts(size: int, req_id: int) -> None:
    """A serving node sends a block as (header, the block itself): the same bytes as
    `encode(Block(...))`, the block's bytes the very object given (not copied)."""
    data = os.urandom(size)
    head, block = encode_block(req_id, data)
    assert block is data
    assert head + block == encode(Block(req_id, data))
    decoder = FrameDecoder()
    decoder.feed(head + block)
    assert decoder.next_event() == Block(req_id, data)


def test_encode_block_refuses_what_encode_refuses() -> None:
    with pytest.raises(FrameError):
        encode_block(2**32, b"x")
    with pytest.raises(FrameError):
        encode_block(1, b"x" * (MAX_BLOCK + 1))
    with pytest.raises(FrameError):
        encode_block(1, bytearray(b"x"))  # type: ignore[arg-type]
