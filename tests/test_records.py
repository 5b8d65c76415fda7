"""Signed DHT records: encoding, verification, bounds and the provider-set merge policy."""

from __future__ import annotations

import hashlib
import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht.errors import DhtError
from dht.records import (
    MAX_MUTABLE_VALUE,
    MAX_MUTABLE_WIRE,
    MAX_PROVIDER_TTL,
    MAX_PROVIDER_WIRE,
    MAX_SAME_SOURCE,
    MAX_SEQ,
    MUTABLE_SIGNATURE_PREFIX,
    PROVIDER_SIGNATURE_PREFIX,
    MutableRecord,
    ProviderRecord,
    ProviderSet,
    RecordError,
    RecordExpired,
    discovery_key,
    newest_mutable,
)
from dht.types import PeerAddr

NOW = 1_700_000_000
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def raw_pub(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_body(seed: bytes, prefix: bytes, body: dict) -> bytes:
    """Hand-build a wire record (so tests can make ones our encoder never would)."""
    body_bytes = msgpack.packb(body, use_bin_type=True)
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(prefix + body_bytes)
    return msgpack.packb([body_bytes, sig], use_bin_type=True)


# ---------------------------------------------------------------- discovery key


def test_discovery_key_is_the_documented_hash():
    pk = raw_pub(KEY_A)
    assert discovery_key(pk) == hashlib.sha256(b"peerdrive discovery" + pk).digest()
    with pytest.raises(RecordError):
        discovery_key(b"short")


def test_record_error_is_a_dht_error():
    assert issubclass(RecordError, DhtError)
    assert issubclass(RecordExpired, RecordError)


# ---------------------------------------------------------------- mutable records


def test_mutable_round_trip_and_fields():
    record, wire = MutableRecord.create(KEY_A, 7, b"head bytes")
    assert record.wire == wire
    decoded = MutableRecord.decode(wire)
    assert decoded == record
    assert decoded.pk == raw_pub(KEY_A)
    assert decoded.seq == 7 and decoded.value == b"head bytes"
    assert decoded.key == discovery_key(decoded.pk)


def test_mutable_accepts_key_object_and_raw_bytes_identically():
    _, wire_raw = MutableRecord.create(KEY_A, 1, b"v")
    _, wire_obj = MutableRecord.create(Ed25519PrivateKey.from_private_bytes(KEY_A), 1, b"v")
    assert wire_raw == wire_obj  # Ed25519 is deterministic: same key, same bytes


def test_mutable_signature_covers_exact_body_and_domain():
    pk = raw_pub(KEY_A)
    body = {"v": 1, "pk": pk, "seq": 1, "value": b"x"}
    assert MutableRecord.decode(sign_body(KEY_A, MUTABLE_SIGNATURE_PREFIX, body)).seq == 1
    # the same body signed as a provider record (other domain) is refused
    with pytest.raises(RecordError, match="signature"):
        MutableRecord.decode(sign_body(KEY_A, PROVIDER_SIGNATURE_PREFIX, body))
    # a body with a different key order is a different (still valid) body: the
    # signature is over bytes, and it verifies because it was signed as such
    reordered = msgpack.packb({"value": b"x", "seq": 1, "pk": pk, "v": 1}, use_bin_type=True)
    sig = Ed25519PrivateKey.from_private_bytes(KEY_A).sign(MUTABLE_SIGNATURE_PREFIX + reordered)
    wire = msgpack.packb([reordered, sig], use_bin_type=True)
    assert MutableRecord.decode(wire).value == b"x"
    # but swapping the body under a signature made for the other ordering fails
    good = sign_body(KEY_A, MUTABLE_SIGNATURE_PREFIX, body)
    _, good_sig = msgpack.unpackb(good)
    with pytest.raises(RecordError):
        MutableRecord.decode(msgpack.packb([reordered, good_sig], use_bin_type=True))


def test_mutable_forged_with_another_key_is_refused():
    pk_a = raw_pub(KEY_A)
    body = {"v": 1, "pk": pk_a, "seq": 99, "value": b"evil"}
    with pytest.raises(RecordError, match="signature"):
        MutableRecord.decode(sign_body(KEY_B, MUTABLE_SIGNATURE_PREFIX, body))


@pytest.mark.parametrize(
    "body, message",
    [
        ({"v": 2, "seq": 1, "value": b""}, "version"),
        ({"v": True, "seq": 1, "value": b""}, "version"),
        ({"v": 1, "seq": -1, "value": b""}, "seq"),
        ({"v": 1, "seq": 1.0, "value": b""}, "seq"),
        ({"v": 1, "seq": True, "value": b""}, "seq"),
        ({"v": 1, "seq": 1, "value": "text"}, "value"),
        ({"v": 1, "seq": 1, "value": b"x" * (MAX_MUTABLE_VALUE + 1)}, "value|limit"),
        ({"v": 1, "seq": 1, "value": b"", "extra": 1}, "fields"),
        ({"v": 1, "seq": 1}, "fields"),
    ],
)
def test_mutable_bad_bodies_are_refused(body, message):
    full = {"pk": raw_pub(KEY_A), **body}
    with pytest.raises(RecordError, match=message):
        MutableRecord.decode(sign_body(KEY_A, MUTABLE_SIGNATURE_PREFIX, full))


def test_mutable_pk_must_be_32_bytes():
    body = {"v": 1, "pk": b"k" * 31, "seq": 1, "value": b""}
    with pytest.raises(RecordError, match="public key"):
        MutableRecord.decode(sign_body(KEY_A, MUTABLE_SIGNATURE_PREFIX, body))


def test_mutable_envelope_must_be_canonical():
    _, wire = MutableRecord.create(KEY_A, 1, b"v")
    body, sig = msgpack.unpackb(wire)
    # same content, body written with a bin16 header instead of bin8
    padded = b"\x92" + b"\xc5" + len(body).to_bytes(2, "big") + body + msgpack.packb(sig)
    assert msgpack.unpackb(padded) == [body, sig]
    with pytest.raises(RecordError, match="canonical"):
        MutableRecord.decode(padded)
    with pytest.raises(RecordError):
        MutableRecord.decode(wire + b"\x00")  # trailing bytes


def test_mutable_limits():
    _, wire = MutableRecord.create(KEY_A, MAX_SEQ, b"x" * MAX_MUTABLE_VALUE)
    assert len(wire) <= MAX_MUTABLE_WIRE
    assert MutableRecord.decode(wire).seq == MAX_SEQ
    with pytest.raises(RecordError):
        MutableRecord.create(KEY_A, 1, b"x" * (MAX_MUTABLE_VALUE + 1))
    with pytest.raises(RecordError):
        MutableRecord.create(KEY_A, -1, b"")
    with pytest.raises(RecordError):
        MutableRecord.create(b"short key", 1, b"")
    with pytest.raises(RecordError, match="limit"):
        MutableRecord.decode(b"\x00" * (MAX_MUTABLE_WIRE + 1))


def test_newest_mutable_prefers_seq_then_max_wire():
    r1, _ = MutableRecord.create(KEY_A, 1, b"a")
    r2, _ = MutableRecord.create(KEY_A, 2, b"a")
    r2b, _ = MutableRecord.create(KEY_A, 2, b"b")
    assert newest_mutable([]) is None
    assert newest_mutable([r2, r1]) == r2
    tie = newest_mutable([r2, r2b])
    assert tie == newest_mutable([r2b, r2])
    assert tie.wire == max(r2.wire, r2b.wire)


# ---------------------------------------------------------------- provider records


def make_provider(seed=KEY_A, dk=b"d" * 32, addrs=(("127.0.0.1", 4000),), now=NOW, ttl=3600):
    return ProviderRecord.create(seed, dk, list(addrs), now=now, ttl=ttl)


def test_provider_round_trip_and_peer_addrs():
    record, wire = make_provider(addrs=[("127.0.0.1", 4000), ("::1", 4001)])
    decoded = ProviderRecord.decode(wire, now=NOW)
    assert decoded == record
    assert decoded.node_id == hashlib.sha256(raw_pub(KEY_A)).digest()
    assert decoded.expires == NOW + 3600
    assert decoded.to_peer_addrs() == [
        PeerAddr(decoded.node_id, "127.0.0.1", 4000),
        PeerAddr(decoded.node_id, "::1", 4001),
    ]


def test_provider_expiry_checked_against_given_now():
    _, wire = make_provider(ttl=60)
    assert ProviderRecord.decode(wire, now=NOW + 59).expires == NOW + 60
    with pytest.raises(RecordExpired):
        ProviderRecord.decode(wire, now=NOW + 60)
    with pytest.raises(RecordExpired):
        ProviderRecord.decode(wire, now=NOW + 10_000)


def test_provider_absurd_future_expiry_refused():
    pk = raw_pub(KEY_A)
    body = {"v": 1, "dk": b"d" * 32, "pk": pk, "addrs": [["127.0.0.1", 1]],
            "expires": NOW + 10 * 24 * 3600}
    with pytest.raises(RecordError, match="future"):
        ProviderRecord.decode(sign_body(KEY_A, PROVIDER_SIGNATURE_PREFIX, body), now=NOW)
    with pytest.raises(RecordError):
        make_provider(ttl=MAX_PROVIDER_TTL + 1)
    with pytest.raises(RecordError):
        make_provider(ttl=0)


@pytest.mark.parametrize(
    "addrs",
    [
        [],
        [["127.0.0.1", 1]] * 5,
        [["127.0.0.1", 0]],
        [["127.0.0.1", 65536]],
        [["127.0.0.1", True]],
        [["", 1]],
        [["a" * 254, 1]],
        [["evil host", 1]],
        [["nul\x00", 1]],
        [[b"127.0.0.1", 1]],
        [["127.0.0.1"]],
        "127.0.0.1:1",
    ],
)
def test_provider_bad_addresses_refused(addrs):
    body = {"v": 1, "dk": b"d" * 32, "pk": raw_pub(KEY_A), "addrs": addrs, "expires": NOW + 60}
    with pytest.raises(RecordError):
        ProviderRecord.decode(sign_body(KEY_A, PROVIDER_SIGNATURE_PREFIX, body), now=NOW)


def test_provider_forged_and_bad_fields_refused():
    pk_a = raw_pub(KEY_A)
    body = {"v": 1, "dk": b"d" * 32, "pk": pk_a, "addrs": [["127.0.0.1", 1]], "expires": NOW + 60}
    with pytest.raises(RecordError, match="signature"):
        ProviderRecord.decode(sign_body(KEY_B, PROVIDER_SIGNATURE_PREFIX, body), now=NOW)
    with pytest.raises(RecordError, match="signature"):
        ProviderRecord.decode(sign_body(KEY_A, MUTABLE_SIGNATURE_PREFIX, body), now=NOW)
    for bad in ({"dk": b"d" * 31}, {"expires": -1}, {"expires": 1.5e9}, {"v": 0}):
        with pytest.raises(RecordError):
            ProviderRecord.decode(
                sign_body(KEY_A, PROVIDER_SIGNATURE_PREFIX, {**body, **bad}), now=NOW
            )


def test_provider_largest_record_fits_the_bound():
    _, wire = make_provider(addrs=[("h" * 253, 65535)] * 4)
    assert len(wire) <= MAX_PROVIDER_WIRE
    assert ProviderRecord.decode(wire, now=NOW).addrs[0][0] == "h" * 253


# ---------------------------------------------------------------- provider sets


def seed(i: int) -> bytes:
    return hashlib.sha256(b"seed%d" % i).digest()


def test_provider_set_newest_per_node_wins():
    pset = ProviderSet(b"d" * 32)
    old, _ = make_provider(now=NOW, ttl=600)
    new, _ = make_provider(now=NOW + 100, ttl=600)
    assert pset.offer(old, NOW)
    assert pset.offer(new, NOW)
    assert pset.records(NOW) == [new]
    assert not pset.offer(old, NOW)  # older record of the same node is refused
    assert pset.records(NOW) == [new]
    assert pset.offer(new, NOW)  # the same record again: still held
    assert len(pset) == 1


def test_provider_set_never_overwrites_other_providers_and_drops_expired():
    pset = ProviderSet(b"d" * 32)
    a, _ = make_provider(seed(1), ttl=100)
    b, _ = make_provider(seed(2), ttl=200)
    assert pset.offer(a, NOW) and pset.offer(b, NOW)
    assert [r.node_id for r in pset.records(NOW)] == [b.node_id, a.node_id]
    assert pset.records(NOW + 150) == [b]
    assert not pset.offer(a, NOW + 150)  # expired on arrival
    with pytest.raises(RecordError):
        pset.offer(make_provider(seed(3), dk=b"e" * 32)[0], NOW)


def forged_far_expiry(i: int, now: float = NOW) -> ProviderRecord:
    """A record signed to expire as late as a decoder accepts (TTL cap + clock skew)."""
    key = hashlib.sha256(b"sybil %d" % i).digest()
    body = msgpack.packb({"v": 1, "dk": b"d" * 32, "pk": raw_pub(key),
                          "addrs": [["10.9.9.9", 1]], "expires": int(now) + 3600 + 300},
                         use_bin_type=True)
    sig = Ed25519PrivateKey.from_private_bytes(key).sign(PROVIDER_SIGNATURE_PREFIX + body)
    return ProviderRecord.decode(msgpack.packb([body, sig], use_bin_type=True), now=now)


def test_provider_set_full_of_one_source_gives_way_to_other_sources_not_to_far_expiries():
    """Issue 11 item 8: newest-expiry-wins let 20 Sybil keys keep every real seeder out."""
    pset = ProviderSet(b"d" * 32, max_size=20)
    for i in range(20):
        assert pset.offer(forged_far_expiry(i), NOW, "sybil/24")
    # more Sybil keys from that source, however far their expiry: refused
    for i in range(20, 40):
        assert not pset.offer(forged_far_expiry(i), NOW, "sybil/24")
    # a real seeder from another source gets a place (a random Sybil record gives way)
    real, _ = make_provider(seed(50))
    assert pset.offer(real, NOW, "real/24")
    assert real.node_id in {r.node_id for r in pset.records(NOW)}
    # and keeps it while the flood goes on, and while it refreshes its record
    for i in range(40, 80):
        pset.offer(forged_far_expiry(i), NOW + 1, "sybil/24")
    refreshed, _ = make_provider(seed(50), now=NOW + 1200)
    assert pset.offer(refreshed, NOW + 1200, "real/24")
    assert refreshed in pset.records(NOW + 1200)
    # each further source takes a place, down to MAX_SAME_SOURCE records of the flood's
    for j in range(15):
        other, _ = make_provider(seed(100 + j))
        pset.offer(other, NOW + 1200, f"other{j}/24")
    sybils = sum(1 for r in pset.records(NOW + 1200) if r.addrs[0][0] == "10.9.9.9")
    assert sybils == MAX_SAME_SOURCE and len(pset) == 20


def test_provider_set_full_displaces_a_stale_record_and_keeps_refreshed_ones():
    pset = ProviderSet(b"d" * 32, max_size=3)
    fresh = [make_provider(seed(i))[0] for i in range(2)]
    stale, _ = make_provider(seed(2), now=NOW - 2500)  # its owner missed two republishes
    for r in [*fresh, stale]:
        assert pset.offer(r, NOW, "a")
    newcomer, _ = make_provider(seed(3))
    assert pset.offer(newcomer, NOW, "a")  # same source, but the stale one goes
    assert {r.node_id for r in pset.records(NOW)} == {*(r.node_id for r in fresh),
                                                      newcomer.node_id}
    another, _ = make_provider(seed(4))
    assert not pset.offer(another, NOW, "a")  # everything fresh, no source over its share
    # an owner's own refresh always replaces its record in place; an older one is refused
    older, _ = make_provider(seed(0), now=NOW - 10)
    assert not pset.offer(older, NOW, "a")
    newer, _ = make_provider(seed(0), now=NOW + 10)
    assert pset.offer(newer, NOW, "b")


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(seq=st.integers(0, MAX_SEQ), value=st.binary(max_size=MAX_MUTABLE_VALUE))
def test_prop_mutable_round_trip(seq, value):
    record, wire = MutableRecord.create(KEY_A, seq, value)
    assert MutableRecord.decode(wire) == record


addr_strategy = st.tuples(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-:", min_size=1, max_size=253),
    st.integers(1, 65535),
)


@settings(max_examples=60, deadline=None)
@given(
    dk=st.binary(min_size=32, max_size=32),
    addrs=st.lists(addr_strategy, min_size=1, max_size=4),
    ttl=st.integers(1, MAX_PROVIDER_TTL),
)
def test_prop_provider_round_trip(dk, addrs, ttl):
    record, wire = ProviderRecord.create(KEY_B, dk, addrs, now=NOW, ttl=ttl)
    assert ProviderRecord.decode(wire, now=NOW) == record
    assert [(a.host, a.port) for a in record.to_peer_addrs()] == addrs


_MUTABLE_WIRE = MutableRecord.create(KEY_A, 3, b"some head value")[1]
_PROVIDER_WIRE = make_provider()[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_prop_any_byte_flip_is_rejected(data):
    which = data.draw(st.sampled_from(["mutable", "provider"]))
    wire = _MUTABLE_WIRE if which == "mutable" else _PROVIDER_WIRE
    index = data.draw(st.integers(0, len(wire) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = bytearray(wire)
    mutated[index] ^= flip
    with pytest.raises(RecordError):
        if which == "mutable":
            MutableRecord.decode(bytes(mutated))
        else:
            ProviderRecord.decode(bytes(mutated), now=NOW)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_prop_arbitrary_bytes_raise_only_record_error(data):
    # never a record: random bytes carry no valid signature
    for decode in (MutableRecord.decode, lambda b: ProviderRecord.decode(b, now=NOW)):
        with pytest.raises(RecordError):
            decode(data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(body=msgpack_values, sig=st.binary(max_size=70))
def test_prop_structured_garbage_raises_only_record_error(body, sig):
    """Well-formed msgpack with arbitrary shapes: only RecordError, never a record."""
    for inner in (msgpack.packb(body, use_bin_type=True), body):
        try:
            wire = msgpack.packb([inner, sig], use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            continue
        for decode in (MutableRecord.decode, lambda b: ProviderRecord.decode(b, now=NOW)):
            with pytest.raises(RecordError):
                decode(wire)


@settings(max_examples=50, deadline=None)
@given(seq=st.integers(0, MAX_SEQ), value=st.binary(max_size=64))
def test_prop_record_for_one_key_never_verifies_for_another(seq, value):
    """A record re-labelled with another public key (a forgery) never decodes."""
    _, wire = MutableRecord.create(KEY_A, seq, value)
    body, sig = msgpack.unpackb(wire)
    fields = msgpack.unpackb(body)
    fields["pk"] = raw_pub(KEY_B)
    forged_body = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(RecordError):
        MutableRecord.decode(msgpack.packb([forged_body, sig], use_bin_type=True))


def test_random_records_from_many_keys_round_trip():
    for _ in range(20):
        seed_bytes = os.urandom(32)
        record, wire = MutableRecord.create(seed_bytes, 1, os.urandom(16))
        assert MutableRecord.decode(wire).key == discovery_key(raw_pub(seed_bytes))
