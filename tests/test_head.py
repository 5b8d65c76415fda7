"""The signed head of a drive version, and rollback protection.

The promise under test: `open_head` returns a head only if the drive's key
signed exactly these bytes; with a read capability it also recovers the root
directory's entry, which nobody without the read key can read or move into
another head. `HeadTracker` never goes back to a lower seq.
"""

from __future__ import annotations

import hashlib
import os
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.records import MAX_MUTABLE_VALUE, MAX_SEQ, MutableRecord
from vfs.blocklist import ListRef
from vfs.capability import ReadCap, StoreCap, WriteCap
from vfs.crypto import Ref
from vfs.errors import FormatError, IntegrityError, RollbackError
from vfs.formats import KIND_DIR, KIND_FILE, MAX_DIR_ENTRIES, MAX_NAME, Entry, encode_entry
from vfs.head import HEAD_VERSION, Head, HeadTracker, _aad, _box_key, make_head, open_head

LIST = ListRef(hashlib.sha256(b"list").digest(), 0, 3, 3000)
CAP = WriteCap.from_secrets(bytes(range(32)), bytes(range(32, 64)))
OTHER = WriteCap.from_secrets(bytes(range(64, 96)), bytes(range(96, 128)))


def root_entry(tag: bytes = b"v1", nentries: int = 3) -> Entry:
    h = hashlib.sha256(tag).digest()
    return Entry(b"root", KIND_DIR, 0o755, 1_700_000_000_123_456_789,
                 node=Ref(h, hashlib.sha256(b"chunk" + tag).digest(), 1234), nsubdirs=1,
                 nentries=nentries)


def signed_value(cap: WriteCap, seq: int, value: dict) -> bytes:
    """Sign an arbitrary head value with the drive key (what only a writer can do)."""
    return MutableRecord.create(cap.signing_key(), seq, msgpack.packb(value))[1]


def sealed_box(cap: WriteCap, seq: int, root_block: bytes, payload: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return nonce + AESGCM(_box_key(cap.read_key)).encrypt(
        nonce, payload, _aad(cap.pubkey, seq, root_block))


def value_of(wire: bytes) -> dict:
    return msgpack.unpackb(MutableRecord.decode(wire).value, raw=False)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_with_read_cap() -> None:
    root = root_entry()
    made = make_head(CAP, 7, root, LIST, created=1_700_000_000)
    assert made.root == root and made.seq == 7 and made.pubkey == CAP.pubkey
    opened = open_head(made.wire, CAP.read_cap())
    assert opened == Head(CAP.pubkey, 7, root.node.block_id, 1_700_000_000, made.wire, root,
                          block_list=LIST)
    assert opened.root == root
    # A write capability reads too.
    assert open_head(made.wire, CAP).root == root


def test_round_trip_with_store_cap_gives_no_root() -> None:
    made = make_head(CAP, 1, root_entry(), LIST, created=5)
    opened = open_head(made.wire, CAP.read_cap().store_cap())
    assert opened.root is None
    assert opened.root_block == root_entry().node.block_id
    assert (opened.pubkey, opened.seq, opened.created, opened.wire) == (CAP.pubkey, 1, 5,
                                                                        made.wire)


def test_value_layout_and_what_it_hides() -> None:
    root = root_entry()
    made = make_head(CAP, 3, root, LIST, created=99)
    value = value_of(made.wire)
    assert set(value) == {"v", "root", "box", "created", "bl"}
    assert value["bl"] == [LIST.block_id, 0, 3, 3000]
    assert value["v"] == HEAD_VERSION and value["created"] == 99
    assert value["root"] == root.node.block_id
    # The root's chunk hash (which derives the root node's key) is only inside the box.
    assert root.node.chunk_hash not in made.wire
    assert b"root" not in MutableRecord.decode(made.wire).value.replace(b"\xa4root", b"")


def test_created_defaults_to_now() -> None:
    before = int(time.time())
    head = make_head(CAP, 1, root_entry(), LIST)
    assert before <= head.created <= int(time.time()) + 1


def test_boxes_are_fresh_per_head() -> None:
    a = make_head(CAP, 1, root_entry(), LIST, created=1)
    b = make_head(CAP, 1, root_entry(), LIST, created=1)
    assert value_of(a.wire)["box"] != value_of(b.wire)["box"]  # random nonce
    assert open_head(a.wire, CAP).root == open_head(b.wire, CAP).root


@settings(max_examples=50)
@given(st.integers(0, MAX_SEQ), st.integers(0, (1 << 40) - 1), st.binary(min_size=1,
       max_size=MAX_NAME).filter(lambda n: b"/" not in n and b"\x00" not in n
                                 and n not in (b".", b"..")),
       st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, MAX_DIR_ENTRIES))
def test_round_trip_over_the_whole_range(seq: int, created: int, name: bytes, mtime: int,
                                         nentries: int) -> None:
    h = hashlib.sha256(name).digest()
    root = Entry(name, KIND_DIR, 0o7777, mtime, node=Ref(h, h, 4 * 1024 * 1024 - 16),
                 nsubdirs=nentries, nentries=nentries)
    made = make_head(CAP, seq, root, LIST, created=created)
    assert len(MutableRecord.decode(made.wire).value) <= MAX_MUTABLE_VALUE
    opened = open_head(made.wire, CAP.read_cap())
    assert (opened.seq, opened.created, opened.root) == (seq, created, root)


# ----------------------------------------------------------------------------- wrong keys


def test_another_drives_cap_is_refused() -> None:
    wire = make_head(CAP, 1, root_entry(), LIST).wire
    for cap in (OTHER, OTHER.read_cap(), OTHER.read_cap().store_cap()):
        with pytest.raises(IntegrityError, match="another drive"):
            open_head(wire, cap)


def test_right_pubkey_wrong_read_key_is_refused() -> None:
    wire = make_head(CAP, 1, root_entry(), LIST).wire
    with pytest.raises(IntegrityError, match="read key"):
        open_head(wire, ReadCap(CAP.pubkey, OTHER.read_key))
    # The store cap of the same key still verifies it: the signature is the drive key's.
    assert open_head(wire, StoreCap(CAP.pubkey)).seq == 1


def test_a_box_cannot_be_moved_to_another_seq_or_root() -> None:
    """The box's associated data binds it to (drive key, seq, root block id)."""
    made = make_head(CAP, 4, root_entry(), LIST, created=1)
    value = value_of(made.wire)
    for seq, root in ((5, value["root"]), (4, hashlib.sha256(b"other").digest())):
        forged = signed_value(CAP, seq, {**value, "root": root})
        with pytest.raises(IntegrityError, match="read key"):
            open_head(forged, CAP.read_cap())
        assert open_head(forged, CAP.read_cap().store_cap()).seq == seq  # store can't tell


def test_a_box_cannot_be_moved_to_another_drive() -> None:
    value = value_of(make_head(CAP, 4, root_entry(), LIST, created=1).wire)
    # Same read key, other signing key: the box was bound to CAP's public key.
    twin = WriteCap.from_secrets(OTHER.signing_seed, CAP.read_key)
    with pytest.raises(IntegrityError, match="read key"):
        open_head(signed_value(twin, 4, value), twin.read_cap())


# ----------------------------------------------------------------------------- tampering


def test_every_byte_change_of_the_wire_is_refused() -> None:
    wire = make_head(CAP, 9, root_entry(), LIST, created=1).wire
    read = CAP.read_cap()
    for i in range(len(wire)):
        for delta in (0x01, 0x80, 0xFF):
            bad = wire[:i] + bytes([wire[i] ^ delta]) + wire[i + 1:]
            with pytest.raises(IntegrityError):
                open_head(bad, read)


@settings(max_examples=200)
@given(st.data())
def test_random_byte_changes_are_refused(data: st.DataObject) -> None:
    wire = make_head(CAP, 2, root_entry(), LIST, created=1).wire
    # every head's wire differs (fresh nonces), so what is drawn must not depend on it:
    # a filter on wire[i] made hypothesis see different draws for one example
    i = data.draw(st.integers(0, 1 << 16)) % len(wire)
    delta = data.draw(st.integers(1, 255))
    bad = wire[:i] + bytes([wire[i] ^ delta]) + wire[i + 1:]
    cap = data.draw(st.sampled_from([CAP, CAP.read_cap(), CAP.read_cap().store_cap()]))
    with pytest.raises((IntegrityError, FormatError)):
        open_head(bad, cap)


def test_truncated_and_extended_wire_is_refused() -> None:
    wire = make_head(CAP, 2, root_entry(), LIST, created=1).wire
    for bad in (wire[:-1], wire[1:], wire + b"\x00", b"", wire[: len(wire) // 2]):
        with pytest.raises(IntegrityError):
            open_head(bad, CAP)


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_our_errors(wire: bytes) -> None:
    for cap in (CAP.read_cap(), CAP.read_cap().store_cap()):
        with pytest.raises(FormatError):  # IntegrityError is a FormatError
            open_head(wire, cap)


# ----------------------------------------------------------------------------- malformed values
# Correctly signed by the drive key, so only a buggy or future writer makes them: they
# are FormatError (or IntegrityError where the box is involved), never a crash.


def good_value(seq: int = 1) -> dict:
    return value_of(make_head(CAP, seq, root_entry(), LIST, created=1).wire)


@pytest.mark.parametrize("change", [
    {"v": 4}, {"v": 0}, {"v": True}, {"v": "1"}, {"v": None},
])
def test_unknown_head_versions_are_refused(change: dict) -> None:
    with pytest.raises(FormatError, match="version"):
        open_head(signed_value(CAP, 1, {**good_value(), **change}), CAP.read_cap())


@pytest.mark.parametrize("change", [
    {"root": b"x" * 31}, {"root": "x" * 32}, {"root": None},
    {"box": b"x" * 28}, {"box": b"x" * 1025}, {"box": "text"},
    {"created": -1}, {"created": 1 << 40}, {"created": True}, {"created": 1.5},
    {"extra": 1},
    {"bl": None}, {"bl": [b"x" * 32, 0, 1]}, {"bl": [b"x" * 31, 0, 1, 100]},
    {"bl": [b"x" * 32, 4, 1, 100]}, {"bl": [b"x" * 32, 0, 0, 100]},
    {"bl": [b"x" * 32, 0, 1, 3]}, {"bl": [b"x" * 32, True, 1, 100]},
    {"prev": b"x" * 31}, {"prev": b"x" * 33}, {"prev": "x" * 32}, {"prev": None},
    {"prev": 1},
])
def test_malformed_head_fields_are_refused(change: dict) -> None:
    wire = signed_value(CAP, 1, {**good_value(), **change})
    for cap in (CAP.read_cap(), CAP.read_cap().store_cap()):
        with pytest.raises(FormatError):
            open_head(wire, cap)


@pytest.mark.parametrize("field", ["v", "root", "box", "created", "bl"])
def test_missing_head_fields_are_refused(field: str) -> None:
    value = {k: v for k, v in good_value().items() if k != field}
    with pytest.raises(FormatError):
        open_head(signed_value(CAP, 1, value), CAP.store_cap())


def test_a_version_1_head_still_opens_without_a_block_list() -> None:
    value = {k: v for k, v in good_value().items() if k != "bl"}
    opened = open_head(signed_value(CAP, 1, {**value, "v": 1}), CAP.read_cap())
    assert opened.block_list is None and opened.root == root_entry()
    # a version 1 head with a block list, or a version 2 head without one, is refused
    with pytest.raises(FormatError, match="fields"):
        open_head(signed_value(CAP, 1, {**good_value(), "v": 1}), CAP.read_cap())


def test_prev_round_trips_and_names_the_previous_heads_bytes() -> None:
    first = make_head(CAP, 1, root_entry(), LIST, created=1)
    assert first.prev is None and "prev" not in value_of(first.wire)
    second = make_head(CAP, 2, root_entry(b"v2"), LIST, created=2, prev=first.id)
    assert first.id == hashlib.sha256(first.wire).digest()
    for cap in (CAP.read_cap(), CAP.store_cap()):
        opened = open_head(second.wire, cap)
        assert opened.prev == first.id and opened.version == HEAD_VERSION == 3
    with pytest.raises(ValueError):
        make_head(CAP, 2, root_entry(), LIST, prev=b"short")


@given(st.binary(min_size=32, max_size=32), st.integers(1, MAX_SEQ))
@settings(max_examples=50)
def test_any_prev_id_round_trips(prev: bytes, seq: int) -> None:
    head = make_head(CAP, seq, root_entry(), LIST, created=3, prev=prev)
    assert open_head(head.wire, CAP.store_cap()).prev == prev


def test_a_version_2_head_without_prev_still_opens() -> None:
    value = {**good_value(5), "v": 2}
    opened = open_head(signed_value(CAP, 5, value), CAP.read_cap())
    assert opened.prev is None and opened.version == 2 and opened.block_list == LIST
    # prev is a version 3 field: a version 2 head carrying one is refused
    with pytest.raises(FormatError, match="fields"):
        open_head(signed_value(CAP, 5, {**value, "prev": b"p" * 32}), CAP.read_cap())


def test_head_values_that_are_not_maps_are_refused() -> None:
    for value in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb(1), b"\x81"):
        wire = MutableRecord.create(CAP.signing_key(), 1, value)[1]
        with pytest.raises(FormatError):
            open_head(wire, CAP.store_cap())


def test_a_box_that_does_not_describe_the_named_root_is_refused() -> None:
    root = root_entry()
    block = root.node.block_id
    file_entry = Entry(b"root", KIND_FILE, 0o644, 0, size=0, chunks=())
    other_root = root_entry(b"other")
    for payload in (msgpack.packb(encode_entry(file_entry)),
                    msgpack.packb(encode_entry(other_root)),
                    b"\xc1", msgpack.packb({"n": b"/"})):
        value = {"v": 2, "root": block, "box": sealed_box(CAP, 1, block, payload), "created": 0,
                 "bl": LIST.encode()}
        with pytest.raises(FormatError):
            open_head(signed_value(CAP, 1, value), CAP.read_cap())


# ----------------------------------------------------------------------------- the tracker


def wire_at(seq: int, cap: WriteCap = CAP) -> bytes:
    return make_head(cap, seq, root_entry(str(seq).encode()), LIST, created=seq).wire


def test_tracker_accepts_higher_ignores_equal_refuses_lower() -> None:
    tracker = HeadTracker(CAP.read_cap())
    assert tracker.current is None
    first = tracker.offer(wire_at(5))
    assert first is not None and first.seq == 5 and tracker.current == first
    assert tracker.offer(first.wire) is None  # the same head: nothing new
    with pytest.raises(RollbackError, match="already at seq 5"):
        tracker.offer(wire_at(4))
    with pytest.raises(RollbackError):
        tracker.offer(wire_at(0))
    assert tracker.current == first
    newer = tracker.offer(wire_at(6))
    assert newer is not None and newer.seq == 6 and tracker.current == newer
    assert tracker.offer(wire_at(100)).seq == 100  # type: ignore[union-attr]  # gaps are fine
    with pytest.raises(RollbackError):
        tracker.offer(wire_at(99))


def test_two_heads_with_one_seq_every_tracker_ends_on_the_same() -> None:
    """A forked writer signed two heads with seq 5: readers that saw them in either
    order (and the DHT's newest_mutable) agree on the larger wire, never stay split."""
    a, b = wire_at(5), wire_at(5)
    assert a != b
    winner = max(a, b)
    for order in ((a, b), (b, a)):
        tracker = HeadTracker(CAP.read_cap())
        for w in order:
            tracker.offer(w)
        assert tracker.current.wire == winner
    assert MutableRecord.decode(winner).sort_key() == max(
        MutableRecord.decode(w).sort_key() for w in (a, b))


def test_tracker_starts_from_a_known_head() -> None:
    known = open_head(wire_at(10), CAP.store_cap())
    tracker = HeadTracker(CAP.store_cap(), known)
    with pytest.raises(RollbackError):
        tracker.offer(wire_at(9))
    assert tracker.offer(known.wire) is None
    assert tracker.offer(wire_at(11)).root is None  # type: ignore[union-attr]  # store cap


def test_tracker_refuses_bad_heads_without_moving() -> None:
    tracker = HeadTracker(CAP.read_cap())
    tracker.offer(wire_at(3))
    current = tracker.current
    bad = bytearray(wire_at(4))
    bad[-1] ^= 1
    with pytest.raises(IntegrityError):
        tracker.offer(bytes(bad))
    with pytest.raises(IntegrityError, match="another drive"):
        tracker.offer(wire_at(50, OTHER))
    assert tracker.current is current


def test_rollback_error_is_an_integrity_error() -> None:
    assert issubclass(RollbackError, IntegrityError)


# ----------------------------------------------------------------------------- mirror URLs

MIRRORS = ("https://cdn.example.org/drive", "http://127.0.0.1:8080/m")


def test_mirrors_round_trip_and_are_public() -> None:
    made = make_head(CAP, 3, root_entry(), LIST, created=1, mirrors=[*MIRRORS, MIRRORS[0] + "/"])
    assert made.mirrors == MIRRORS  # canonical form, duplicates dropped
    for cap in (CAP.read_cap(), CAP.read_cap().store_cap()):  # a store node sees them too
        assert open_head(made.wire, cap).mirrors == MIRRORS
    assert "mirrors" not in value_of(make_head(CAP, 3, root_entry(), LIST, created=1).wire)
    assert open_head(make_head(CAP, 3, root_entry(), LIST).wire, CAP).mirrors == ()


@pytest.mark.parametrize("mirrors", [
    [], "https://a.example/x", [b"https://a.example/x"], [1], ["ftp://a.example/x"],
    ["https://a.example/x/"], ["https://a.example/x", "https://a.example/x"],
    [f"https://a{i}.example/x" for i in range(9)], ["https://u:p@a.example/x"],
    ["https://a.example/x?sig=1"], ["https://a.example/" + "x" * 600],
])
def test_malformed_mirror_lists_are_refused(mirrors: object) -> None:
    wire = signed_value(CAP, 1, {**good_value(), "mirrors": mirrors})
    with pytest.raises(FormatError):
        open_head(wire, CAP.read_cap())


@settings(max_examples=200)
@given(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.binary(max_size=40),
                 st.lists(st.one_of(st.text(max_size=60), st.binary(max_size=20),
                                    st.integers(0, 2**32)), max_size=12)))
def test_arbitrary_mirror_fields_give_a_head_or_format_error(mirrors: object) -> None:
    wire = signed_value(CAP, 1, {**good_value(), "mirrors": mirrors})
    try:
        head = open_head(wire, CAP.read_cap())
    except FormatError:
        return
    assert list(head.mirrors) == mirrors and 1 <= len(head.mirrors) <= 8
