"""Signed records the DHT stores: mutable records and provider records (pure, sans-io).

A DHT node accepts a value only if it can check it on its own, so every record
here carries the public key that signed it and is verified on receipt:

- a `MutableRecord` (like BitTorrent BEP 44) is one signed, versioned value per
  public key: the drive layer stores its signed head in it. Its DHT key is the
  discovery key of its public key, so a record can only ever sit under the key
  of the key pair that signed it, and the highest sequence number wins.
- a `ProviderRecord` says "this node, reachable at these addresses, serves
  discovery key D until T", signed by the node's own key. A key holds a bounded
  `ProviderSet` of them, never a single overwritten value.

Wire form of both: msgpack ``[body_bytes, signature]`` where ``body_bytes`` is a
msgpack map. The signature covers the exact body bytes received (behind a
domain-separation prefix), never a re-encoding, and the outer two-element array
must be in canonical msgpack form so that equal records have equal wire bytes.
Every decoder bounds every length and raises `RecordError` for anything that is
not a well-formed, correctly signed record.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dht.errors import DhtError
from dht.timescale import scaled, scaled_int
from dht.types import DISCOVERY_KEY_LEN, PeerAddr

RECORD_VERSION = 1

PUBKEY_LEN = 32
SIGNATURE_LEN = 64
MAX_SEQ = 2**64 - 1

DISCOVERY_KEY_PREFIX = b"peerdrive discovery"
MUTABLE_SIGNATURE_PREFIX = b"peerdrive mutable v1\x00"
PROVIDER_SIGNATURE_PREFIX = b"peerdrive provider v1\x00"

MAX_MUTABLE_VALUE = 8 * 1024
"""Largest value a mutable record may hold (bytes)."""

MAX_MUTABLE_WIRE = MAX_MUTABLE_VALUE + 256
"""Upper bound of an encoded mutable record; anything longer is refused unread."""

MAX_PROVIDER_ADDRS = 4
"""A provider record lists at most this many (host, port) addresses."""

MAX_HOST_LEN = 253
"""Longest host accepted in a provider address (the longest DNS name)."""

MAX_PROVIDER_WIRE = 1536
"""Upper bound of an encoded provider record; anything longer is refused unread."""

PROVIDER_TTL = scaled_int(3600)  # dht/timescale.py
"""Default lifetime of a provider record (seconds): one hour."""

MAX_PROVIDER_TTL = scaled_int(3600)
"""A provider record may not be valid for longer than this after it is checked."""

CLOCK_SKEW = 300
"""Tolerance for clocks that run ahead: a record may expire this much past the TTL cap."""

PROVIDER_REPUBLISH_INTERVAL = scaled(20 * 60)
"""How often an owner should sign and announce fresh provider records (seconds)."""

MAX_PROVIDERS_PER_KEY = 20
"""How many provider records a `ProviderSet` (one DHT key) keeps."""

_MUTABLE_FIELDS = frozenset({"v", "pk", "seq", "value"})
_PROVIDER_FIELDS = frozenset({"v", "dk", "pk", "addrs", "expires"})
_HOST_RE = re.compile(r"[A-Za-z0-9._:%\-]+")


class RecordError(DhtError):
    """Bytes are not a valid signed record (malformed, wrong signature, wrong key)."""


class RecordExpired(RecordError):
    """A provider record is well formed and signed, but its expiry time has passed."""


def discovery_key(pubkey: bytes) -> bytes:
    """The 32-byte DHT discovery key of a drive (or any Ed25519) public key.

    ``SHA-256(b"peerdrive discovery" || pubkey)``: DHT nodes see this, not the key.
    """
    if not isinstance(pubkey, bytes) or len(pubkey) != PUBKEY_LEN:
        raise RecordError(f"a public key is {PUBKEY_LEN} bytes")
    return hashlib.sha256(DISCOVERY_KEY_PREFIX + pubkey).digest()


def node_id_of(pubkey: bytes) -> bytes:
    """Node id of a node public key: SHA-256 of the raw Ed25519 key."""
    return hashlib.sha256(pubkey).digest()


def _private_key(key: Ed25519PrivateKey | bytes) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, bytes) and len(key) == 32:
        return Ed25519PrivateKey.from_private_bytes(key)
    raise RecordError("a signing key is an Ed25519 private key or its 32 raw bytes")


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _verify(pubkey: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pubkey).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, what: str) -> Any:
    """msgpack-decode untrusted bytes; every failure becomes a RecordError."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on hostile input
        raise RecordError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _split_wire(wire: bytes, max_len: int, what: str) -> tuple[bytes, bytes]:
    """Decode the outer ``[body, sig]`` envelope, insisting on its canonical form."""
    if not isinstance(wire, bytes | bytearray | memoryview):
        raise RecordError(f"{what} must be bytes")
    wire = bytes(wire)
    if len(wire) > max_len:
        raise RecordError(f"{what} is {len(wire)} bytes, more than the limit of {max_len}")
    outer = _unpack(wire, what)
    if not (isinstance(outer, list) and len(outer) == 2):
        raise RecordError(f"{what} is not a [body, signature] pair")
    body, sig = outer
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise RecordError(f"{what} body and signature must be byte strings")
    if len(sig) != SIGNATURE_LEN:
        raise RecordError(f"{what} signature must be {SIGNATURE_LEN} bytes")
    if _pack([body, sig]) != wire:
        raise RecordError(f"{what} envelope is not canonically encoded")
    return body, sig


def _body_map(body: bytes, fields: frozenset[str], what: str) -> dict[str, Any]:
    obj = _unpack(body, f"{what} body")
    if not isinstance(obj, dict):
        raise RecordError(f"{what} body is not a map")
    if set(obj) != fields:
        raise RecordError(f"{what} body must have exactly the fields {sorted(fields)}")
    version = obj["v"]
    if type(version) is not int or version != RECORD_VERSION:
        raise RecordError(f"{what} has unsupported version {version!r} (expected 1)")
    return obj


def _check_pubkey(pk: Any, what: str) -> bytes:
    if not isinstance(pk, bytes) or len(pk) != PUBKEY_LEN:
        raise RecordError(f"{what} public key must be {PUBKEY_LEN} bytes")
    return pk


def _check_seq(seq: Any) -> int:
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise RecordError("mutable record seq must be an integer in [0, 2**64)")
    return seq


def _check_value(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) > MAX_MUTABLE_VALUE:
        raise RecordError(f"mutable record value must be bytes of at most {MAX_MUTABLE_VALUE}")
    return value


def _check_dk(dk: Any) -> bytes:
    if not isinstance(dk, bytes) or len(dk) != DISCOVERY_KEY_LEN:
        raise RecordError(f"a discovery key is {DISCOVERY_KEY_LEN} bytes")
    return dk


def _check_addrs(addrs: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(addrs, list | tuple) or not 1 <= len(addrs) <= MAX_PROVIDER_ADDRS:
        raise RecordError(f"a provider record lists 1 to {MAX_PROVIDER_ADDRS} addresses")
    out: list[tuple[str, int]] = []
    for item in addrs:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise RecordError("a provider address is a (host, port) pair")
        host, port = item
        if (
            not isinstance(host, str)
            or not 1 <= len(host) <= MAX_HOST_LEN
            or _HOST_RE.fullmatch(host) is None
        ):
            raise RecordError(f"provider host {host!r} is not a valid host name or address")
        if type(port) is not int or not 1 <= port <= 65535:
            raise RecordError(f"provider port {port!r} is not in 1..65535")
        out.append((host, port))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MutableRecord:
    """One signed, versioned value per public key (BEP 44 style).

    `wire` is the exact encoding received or created; store and forward it as is.
    """

    pk: bytes
    seq: int
    value: bytes
    wire: bytes = field(repr=False)

    @property
    def key(self) -> bytes:
        """The DHT key this record lives under: ``discovery_key(pk)``."""
        return discovery_key(self.pk)

    @classmethod
    def create(
        cls, private_key: Ed25519PrivateKey | bytes, seq: int, value: bytes
    ) -> tuple[MutableRecord, bytes]:
        """Sign `value` as version `seq` of the key pair's record; returns (record, wire)."""
        key = _private_key(private_key)
        pk = _raw_public(key)
        body = _pack({"v": RECORD_VERSION, "pk": pk, "seq": _check_seq(seq),
                      "value": _check_value(value)})
        sig = key.sign(MUTABLE_SIGNATURE_PREFIX + body)
        wire = _pack([body, sig])
        return cls(pk=pk, seq=seq, value=value, wire=wire), wire

    @classmethod
    def decode(cls, wire: bytes) -> MutableRecord:
        """Parse and verify a wire record; raises RecordError on any problem."""
        body, sig = _split_wire(wire, MAX_MUTABLE_WIRE, "mutable record")
        obj = _body_map(body, _MUTABLE_FIELDS, "mutable record")
        pk = _check_pubkey(obj["pk"], "mutable record")
        seq = _check_seq(obj["seq"])
        value = _check_value(obj["value"])
        if not _verify(pk, sig, MUTABLE_SIGNATURE_PREFIX + body):
            raise RecordError("mutable record signature does not verify")
        return cls(pk=pk, seq=seq, value=value, wire=bytes(wire))

    def sort_key(self) -> tuple[int, bytes]:
        """Order of preference: highest seq, then (for equal seq) the larger wire bytes."""
        return (self.seq, self.wire)


def newest_mutable(records: Iterable[MutableRecord]) -> MutableRecord | None:
    """The record to believe among several valid ones: highest seq, ties by max wire bytes."""
    best: MutableRecord | None = None
    for record in records:
        if best is None or record.sort_key() > best.sort_key():
            best = record
    return best


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A node's signed claim that it serves discovery key `dk` at `addrs` until `expires`."""

    dk: bytes
    pk: bytes
    addrs: tuple[tuple[str, int], ...]
    expires: int
    wire: bytes = field(repr=False)

    @property
    def node_id(self) -> bytes:
        """SHA-256 of the node's public key: what the TLS dialer pins."""
        return node_id_of(self.pk)

    @classmethod
    def create(
        cls,
        private_key: Ed25519PrivateKey | bytes,
        dk: bytes,
        addrs: Sequence[tuple[str, int]],
        *,
        now: float,
        ttl: int = PROVIDER_TTL,
    ) -> tuple[ProviderRecord, bytes]:
        """Sign a provider record valid for `ttl` seconds from `now`; returns (record, wire)."""
        if type(ttl) is not int or not 1 <= ttl <= MAX_PROVIDER_TTL:
            raise RecordError(f"provider TTL must be 1..{MAX_PROVIDER_TTL} seconds")
        key = _private_key(private_key)
        pk = _raw_public(key)
        checked = _check_addrs(list(addrs))
        expires = int(now) + ttl
        body = _pack({
            "v": RECORD_VERSION,
            "dk": _check_dk(dk),
            "pk": pk,
            "addrs": [list(a) for a in checked],
            "expires": expires,
        })
        sig = key.sign(PROVIDER_SIGNATURE_PREFIX + body)
        wire = _pack([body, sig])
        return cls(dk=dk, pk=pk, addrs=checked, expires=expires, wire=wire), wire

    @classmethod
    def decode(cls, wire: bytes, *, now: float) -> ProviderRecord:
        """Parse and verify a wire record as of unix time `now`.

        Raises `RecordExpired` if it has expired and `RecordError` for anything
        else wrong, including an expiry further than the TTL cap (plus clock
        skew) in the future.
        """
        body, sig = _split_wire(wire, MAX_PROVIDER_WIRE, "provider record")
        obj = _body_map(body, _PROVIDER_FIELDS, "provider record")
        dk = _check_dk(obj["dk"])
        pk = _check_pubkey(obj["pk"], "provider record")
        addrs = _check_addrs(obj["addrs"])
        expires = obj["expires"]
        if type(expires) is not int or not 0 <= expires <= MAX_SEQ:
            raise RecordError("provider record expiry must be a non-negative integer")
        if not _verify(pk, sig, PROVIDER_SIGNATURE_PREFIX + body):
            raise RecordError("provider record signature does not verify")
        if expires > now + MAX_PROVIDER_TTL + CLOCK_SKEW:
            raise RecordError(
                "provider record expires too far in the future "
                f"(more than {MAX_PROVIDER_TTL + CLOCK_SKEW} s from now)"
            )
        if expires <= now:
            raise RecordExpired("provider record has expired")
        return cls(dk=dk, pk=pk, addrs=addrs, expires=expires, wire=bytes(wire))

    def sort_key(self) -> tuple[int, bytes]:
        """Order of preference between two records of one node: later expiry, then max wire."""
        return (self.expires, self.wire)

    def to_peer_addrs(self) -> list[PeerAddr]:
        """Where to dial this provider, one PeerAddr per listed address."""
        node_id = self.node_id
        return [PeerAddr(node_id=node_id, host=h, port=p) for h, p in self.addrs]


STALE_AFTER = 2 * PROVIDER_REPUBLISH_INTERVAL
"""A provider record not refreshed for this long (two missed republishes) may be displaced."""

MAX_SAME_SOURCE = 8
"""Records of one source group a full set keeps before a newcomer from another group displaces one."""


_RNG = random.Random()


class ProviderSet:
    """The bounded set of provider records one DHT key holds (pure merge policy).

    Records are signed by their node keys, but node keys are free: an attacker
    can sign records for as many "nodes" as it likes. So the policy never
    lets a newcomer win by a number it chose, and spreads a full set over the
    sources the records came from (a source is what the caller knows of the
    sender: an address prefix for a DHT store, see `source_group`).

    Rules, applied by `offer`:

    - only records for this set's discovery key are accepted;
    - expired records are dropped (on every offer and read);
    - an expiry is counted at most `MAX_PROVIDER_TTL` from now (the clock-skew
      allowance a decoder grants gives no advantage here);
    - one record per node id: a newer record (later expiry; equal expiry: larger
      wire bytes) replaces that node's older one, an older one is refused; an
      owner that keeps republishing keeps its place;
    - at most `max_size` nodes; when full, a newcomer displaces
      1. the stalest record, if one was not refreshed for `STALE_AFTER`
         (its owner missed two republishes), else
      2. a random record of the source group holding the most records, if that
         group holds more than `MAX_SAME_SOURCE` and more than the newcomer's
         group would with it (one source that filled the set gives way to
         every other source, one record at a time), else
      3. nothing: the newcomer is refused (newest-expiry-wins let twenty keys
         re-signing far expiries keep every real seeder out).
    """

    def __init__(self, dk: bytes, max_size: int = MAX_PROVIDERS_PER_KEY, *,
                 rng: random.Random | None = None) -> None:
        self.dk = _check_dk(dk)
        if max_size < 1:
            raise ValueError("a provider set holds at least one record")
        self.max_size = max_size
        self._by_node: dict[bytes, ProviderRecord] = {}
        self._source: dict[bytes, Hashable] = {}
        self._rng = rng or _RNG  # one shared generator: a node holds thousands of sets

    def __len__(self) -> int:
        return len(self._by_node)

    def expire(self, now: float) -> None:
        """Drop every record whose expiry has passed."""
        for node_id in [n for n, r in self._by_node.items() if r.expires <= now]:
            del self._by_node[node_id]
            self._source.pop(node_id, None)

    def offer(self, record: ProviderRecord, now: float, source: Hashable = None) -> bool:
        """Merge one verified record that came from `source`; True if the set now holds it."""
        if record.dk != self.dk:
            raise RecordError("provider record is for another discovery key")
        self.expire(now)
        if record.expires <= now:
            return False
        node_id = record.node_id
        current = self._by_node.get(node_id)
        if current is not None:
            if record.sort_key() < current.sort_key():
                return False
            self._by_node[node_id] = record
            self._source[node_id] = source
            return True
        if len(self._by_node) >= self.max_size:
            victim = self._displaced_by(source, now)
            if victim is None:
                return False
            del self._by_node[victim]
            self._source.pop(victim, None)
        self._by_node[node_id] = record
        self._source[node_id] = source
        return True

    def _displaced_by(self, source: Hashable, now: float) -> bytes | None:
        cap = now + MAX_PROVIDER_TTL
        stalest_id, stalest = min(self._by_node.items(),
                                  key=lambda kv: (min(kv[1].expires, cap), kv[1].wire))
        if min(stalest.expires, cap) <= cap - STALE_AFTER:
            return stalest_id
        groups: dict[Hashable, list[bytes]] = {}
        for node_id in self._by_node:
            groups.setdefault(self._source.get(node_id), []).append(node_id)
        heaviest = max(groups.values(), key=len)
        mine = len(groups.get(source, ()))
        if len(heaviest) > MAX_SAME_SOURCE and len(heaviest) > mine + 1:
            return self._rng.choice(heaviest)
        return None

    def records(self, now: float) -> list[ProviderRecord]:
        """Live records, those expiring latest first."""
        self.expire(now)
        return sorted(self._by_node.values(), key=lambda r: r.sort_key(), reverse=True)


def source_group(ip: str) -> str:
    """The group a DHT sender counts in for `ProviderSet`: its /24 (IPv4) or /48 (IPv6).

    One machine, or one rented range, is one group: signing more node keys
    does not make an attacker more sources.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
