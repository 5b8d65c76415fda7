"""The Kademlia DHT: the `kademlia` package, made to hold only verified records, run from trio.

The `kademlia` package (asyncio, msgpack RPC over UDP) stores whatever any node
sends, overwrites a key on every store and returns the most common answer of a
lookup. Here its classes are subclassed so that a node:

- keeps two key spaces apart: mutable records under their discovery key and
  provider sets under ``SHA-256(b"peerdrive providers" || dk)``; every stored
  value also carries a one-byte tag naming its kind (see `TAG_MUTABLE`);
- verifies every value before it stores or believes it (`RecordStorage.offer`),
  refusing garbage, forgeries, records under the wrong key and rollbacks;
- merges provider records into a bounded `ProviderSet` instead of overwriting;
- crawls a lookup through all of the k closest nodes and returns the highest
  valid sequence number (mutable) or the union of valid providers;
- never dies of a datagram: every datagram is bounded, parsed defensively, and
  a node that answers garbage is dropped from the routing table and ignored.

The id space is 256 bits (the package's is 160): keys are SHA-256 values, and a
DHT node's routing id is 32 random bytes unless one is given.

`Dht` is the trio-facing class. It runs the asyncio code on a trio-asyncio loop
inside the trio program (see docs/dht.md for why not a thread).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import trio
import trio_asyncio
from kademlia.crawling import NodeSpiderCrawl, ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node, NodeHeap
from kademlia.protocol import KademliaProtocol
from kademlia.routing import KBucket, RoutingTable
from kademlia.storage import IStorage

from dht.errors import DhtError
from dht.records import (
    MAX_MUTABLE_WIRE,
    MAX_PROVIDERS_PER_KEY,
    PROVIDER_REPUBLISH_INTERVAL,
    MutableRecord,
    ProviderRecord,
    ProviderSet,
    RecordError,
    RecordExpired,
    newest_mutable,
    source_group,
)
from dht.types import DISCOVERY_KEY_LEN

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_LEN = 32
"""Every DHT key and routing id is 32 bytes (a 256-bit Kademlia id space)."""

PROVIDER_KEY_PREFIX = b"peerdrive providers"

TAG_MUTABLE = 0x01
"""First byte of a stored value holding a `MutableRecord` wire."""
TAG_PROVIDER = 0x02
"""First byte of a stored value holding a `ProviderRecord` wire."""

MAX_DATAGRAM = 16 * 1024
"""Largest DHT datagram sent or accepted; larger ones are dropped unread."""

FIND_VALUE_BUDGET = 12 * 1024
"""Bytes of stored values one find_value reply may carry (the rest of a datagram is nodes)."""

MAX_NODES_IN_REPLY = 64
"""A reply listing more contacts than this is garbage (an honest one lists at most k)."""

MAX_STORED_KEYS = 8192
"""Per kind (mutable / provider sets): a node stores at most this many keys for others."""

MAX_LOOKUP_PROVIDERS = 100
"""Most provider records a lookup returns (the union over all answers, latest-expiring first)."""

MUTABLE_STORE_TTL = 24 * 3600
"""A stored mutable record is dropped this long after it was last stored (or re-stored)."""

MUTABLE_REPUBLISH_INTERVAL = 3600
"""How often a node re-stores the mutable records it put, so they outlive MUTABLE_STORE_TTL."""

REFRESH_INTERVAL = 15 * 60
"""How often the routing table's idle buckets are refreshed and storage culled."""

BOOTSTRAP_RETRY_INTERVAL = 30
"""How often a node with an empty routing table tries its bootstrap contacts again."""

DEAD_CONTACT_MEMORY = 120.0
"""Seconds an address that did not answer stays skipped by lookups (unless it speaks first)."""

DEAD_AFTER_SILENCE = 10.0
"""A timeout marks an address dead only if nothing came from it for this long: a node that
answered a moment ago and missed one reply is slow (a loaded machine), not gone."""

MAX_DEAD_CONTACTS = 1024
"""Addresses remembered as dead, at most (oldest forgotten first)."""

MAX_LIVENESS_CHECKS = 16
"""Liveness pings outstanding at once, at most."""

MAX_HEARD = 4096
"""Addresses whose last datagram time is remembered, at most."""

UNVERIFIED_REPLY_MAX = 1280
"""Largest reply sent to an address that has not shown it receives our datagrams.

A request's source address is unauthenticated: a forged one makes us answer a
victim. Replies to an unverified address are cut to this (about 12 times a
~100-byte request, a full find_node contact list) and carry a token instead of
what did not fit; asking again with the token proves the address and gets all.
"""

TOKEN_LEN = 16
TOKEN_ROTATE = 300.0
"""Seconds between two token secrets; a token is valid for one to two of these."""

VERIFIED_TTL = 1800.0
"""An address that answered one of our requests counts as verified this long."""

MAX_TRACKED_ADDRESSES = 4096
"""Bound of every per-address table (verified addresses, tokens held, rate buckets)."""

REQUESTS_PER_SECOND = 100.0
REQUEST_BURST = 400.0
"""Requests one source address (ip, port) may send: a sustained rate and a burst."""

UNVERIFIED_REQUESTS_PER_SECOND = 200.0
UNVERIFIED_REQUEST_BURST = 800.0
"""Requests all unverified addresses of one IP may send (a spoofer varies the source port)."""

UNVERIFIED_BYTES_PER_SECOND = 64 * 1024
UNVERIFIED_BYTES_BURST = 256 * 1024
"""Reply bytes all unverified addresses of one IP may draw, so a spoofed flood stays small."""

VERIFY_PINGS_PER_SECOND = 50.0
"""Pings sent to check that a new contact really is at its source address, at most."""

MAX_WELCOME_VALUES = 8
"""Values handed to a newly verified contact that is closer to their keys (paper §2.5)."""

MAX_CRAWL_ROUNDS = 24
"""Rounds a lookup may take (1000 nodes need 3-6): a node feeding fake contacts ends there."""

CRAWL_HEAP_LIMIT = 4
"""A lookup keeps at most this many times k candidate contacts."""

_REQUEST = 0x00
_RESPONSE = 0x01
_MSG_ID_LEN = 20


class _Buckets:
    """Token buckets per key (an address or an IP), the least recently used dropped past a bound."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float],
                 max_keys: int = MAX_TRACKED_ADDRESSES) -> None:
        self.rate, self.burst, self._clock, self._max = rate, burst, clock, max_keys
        self._state: OrderedDict[Any, tuple[float, float]] = OrderedDict()

    def take(self, key: Any, amount: float = 1.0) -> bool:
        """Take `amount` from `key`'s bucket; False (nothing taken) if it holds less."""
        now = self._clock()
        level, last = self._state.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        ok = level >= amount
        if ok:
            level -= amount
        self._state[key] = (level, now)
        if len(self._state) > self._max:
            self._state.popitem(last=False)
        return ok


class KadError(DhtError):
    """The DHT cannot do what was asked (not running, cannot listen, bad argument)."""


def provider_key(dk: bytes) -> bytes:
    """DHT key of the provider set of discovery key `dk`."""
    _check_dk(dk)
    return hashlib.sha256(PROVIDER_KEY_PREFIX + dk).digest()


def _check_dk(dk: bytes) -> None:
    if not isinstance(dk, bytes) or len(dk) != DISCOVERY_KEY_LEN:
        raise KadError(f"a discovery key is {DISCOVERY_KEY_LEN} bytes")


def _is_key(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_LEN


# --------------------------------------------------------------------------- storage


class _KeysBySource:
    """Which source group stored each key, so a full table evicts from the group holding most.

    Node keys and drive keys are free: a sender signing thousands of junk records
    must not flush everyone else's (the table used to evict the oldest key, whoever
    stored it). Each key counts for the group (/24, /48; None: this node) that
    stored it last; the victim is the oldest key of the largest group, so a
    flooder churns its own keys. O(groups) per eviction, O(1) otherwise.
    """

    def __init__(self) -> None:
        self._group: dict[bytes, Hashable] = {}
        self._keys: dict[Hashable, OrderedDict[bytes, None]] = {}

    def stored(self, key: bytes, group: Hashable) -> None:
        self.forget(key)
        self._group[key] = group
        self._keys.setdefault(group, OrderedDict())[key] = None

    def forget(self, key: bytes) -> None:
        if key in self._group:
            group = self._group.pop(key)
            keys = self._keys[group]
            del keys[key]
            if not keys:
                del self._keys[group]

    def victim(self) -> bytes | None:
        if not self._keys:
            return None
        return next(iter(max(self._keys.values(), key=len)))


class RecordStorage(IStorage):
    """What one DHT node holds for others: verified records only, bounded, expiring.

    Values handed in and out are *tagged*: one tag byte (`TAG_MUTABLE` or
    `TAG_PROVIDER`) followed by the record's wire bytes. `offer` is the single
    door in; it decodes and verifies, checks that the record belongs under the
    key, and applies the replacement rules.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        mutable_ttl: float = MUTABLE_STORE_TTL,
        max_keys: int = MAX_STORED_KEYS,
        providers_per_key: int = MAX_PROVIDERS_PER_KEY,
    ) -> None:
        self._clock = clock
        self._mutable_ttl = mutable_ttl
        self._max_keys = max_keys
        self._providers_per_key = providers_per_key
        # key -> (time last stored, record); oldest first
        self._mutable: OrderedDict[bytes, tuple[float, MutableRecord]] = OrderedDict()
        # key -> provider set; least recently offered first
        self._providers: OrderedDict[bytes, ProviderSet] = OrderedDict()
        # every key held, sorted: the keys XOR-closest to an id sit around its position
        self._index: list[bytes] = []
        self._mutable_from = _KeysBySource()
        self._providers_from = _KeysBySource()

    def _indexed(self, key: bytes) -> None:
        i = bisect.bisect_left(self._index, key)
        if i == len(self._index) or self._index[i] != key:
            self._index.insert(i, key)

    def _unindexed(self, key: bytes) -> None:
        if key not in self._mutable:
            self._mutable_from.forget(key)
        if key not in self._providers:
            self._providers_from.forget(key)
        if key in self._mutable or key in self._providers:
            return
        i = bisect.bisect_left(self._index, key)
        if i < len(self._index) and self._index[i] == key:
            del self._index[i]

    def keys_near(self, node_id: bytes, count: int) -> list[bytes]:
        """Up to `count` held keys sharing the longest prefixes with `node_id` (O(log n + count)).

        Keys with a common prefix of at least L bits with `node_id` form one run
        of the sorted index around its position, so the nearest by XOR are among
        its neighbours there.
        """
        i = bisect.bisect_left(self._index, node_id)
        return self._index[max(0, i - count // 2) : i + (count + 1) // 2]

    # -- the door in

    def offer(self, key: bytes, value: bytes, source: str | None = None) -> bool:
        """Verify and store a tagged value under `key`; False (and nothing stored) if refused.

        `source` is the IP address the value came from (None: this node), which a
        full provider set uses to spread its places over senders (`ProviderSet`).
        """
        if not _is_key(key) or not isinstance(value, bytes) or len(value) < 2:
            return False
        tag, wire = value[0], value[1:]
        group = None if source is None else source_group(source)
        try:
            if tag == TAG_MUTABLE:
                return self._offer_mutable(key, MutableRecord.decode(wire), group)
            if tag == TAG_PROVIDER:
                now = self._clock()
                return self._offer_provider(key, ProviderRecord.decode(wire, now=now), now,
                                            group)
        except RecordError as exc:
            log.debug("refused a value for %s: %s", key.hex()[:16], exc)
        return False

    def _offer_mutable(self, key: bytes, record: MutableRecord, group: str | None) -> bool:
        if record.key != key:
            return False
        now = self._clock()
        self._cull_mutable(now)
        current = self._mutable.get(key)
        if current is not None:
            held = current[1]
            if record.seq < held.seq:
                return False
            if record.seq == held.seq:
                if record.wire != held.wire:
                    return False  # equal seq, other bytes: keep what we have
                record = held
            del self._mutable[key]
        elif len(self._mutable) >= self._max_keys:
            victim = self._mutable_from.victim()
            del self._mutable[victim]
            self._unindexed(victim)
        self._mutable[key] = (now, record)
        self._mutable_from.stored(key, group)
        self._indexed(key)
        return True

    def _offer_provider(self, key: bytes, record: ProviderRecord, now: float,
                        group: str | None) -> bool:
        if provider_key(record.dk) != key:
            return False
        pset = self._providers.pop(key, None)
        if pset is None:
            if len(self._providers) >= self._max_keys:
                self.cull()
            if len(self._providers) >= self._max_keys:
                victim = self._providers_from.victim()
                del self._providers[victim]
                self._unindexed(victim)
            pset = ProviderSet(record.dk, self._providers_per_key)
        accepted = pset.offer(record, now, group)
        if len(pset):
            self._providers[key] = pset
            if accepted:
                self._providers_from.stored(key, group)
            self._indexed(key)
        else:
            self._unindexed(key)
        return accepted

    # -- reads

    def mutable(self, key: bytes) -> MutableRecord | None:
        """The live mutable record stored under `key`, if any (amortised O(1))."""
        self._cull_mutable(self._clock())
        entry = self._mutable.get(key)
        return None if entry is None else entry[1]

    def providers(self, key: bytes) -> list[ProviderRecord]:
        """Live provider records under `key`, latest-expiring first.

        Only this key's set is culled: a read costs O(one set), never O(every set)
        (a find_value is a request any stranger may send).
        """
        pset = self._providers.get(key)
        if pset is None:
            return []
        records = pset.records(self._clock())
        if not records:
            del self._providers[key]
            self._unindexed(key)
        return records

    def values(self, key: bytes, budget: int = FIND_VALUE_BUDGET) -> list[bytes]:
        """Tagged values under `key` for a find_value reply, at most `budget` bytes in all."""
        out: list[bytes] = []
        used = 0
        record = self.mutable(key)
        if record is not None:
            out.append(bytes([TAG_MUTABLE]) + record.wire)
            used += len(record.wire) + 1
        for provider in self.providers(key):
            size = len(provider.wire) + 1
            if used + size > budget:
                break
            out.append(bytes([TAG_PROVIDER]) + provider.wire)
            used += size
        return out

    def _cull_mutable(self, now: float) -> None:
        """Drop mutable records not re-stored within their TTL (oldest first: amortised O(1))."""
        while self._mutable:
            key, (stored, _) = next(iter(self._mutable.items()))
            if stored > now - self._mutable_ttl:
                break
            del self._mutable[key]
            self._unindexed(key)

    def cull(self) -> None:
        """Drop stale mutable records and expired provider records: O(stored), for upkeep only."""
        now = self._clock()
        self._cull_mutable(now)
        for key in list(self._providers):
            pset = self._providers[key]
            pset.expire(now)
            if not len(pset):
                del self._providers[key]
                self._unindexed(key)

    def __len__(self) -> int:
        self.cull()
        return len(self._mutable) + sum(len(p) for p in self._providers.values())

    # -- the kademlia IStorage interface

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if not self.offer(key, value):
            raise RecordError("the DHT storage refused this value (invalid, stale or misplaced)")

    def __getitem__(self, key: bytes) -> list[bytes]:
        values = self.values(key)
        if not values:
            raise KeyError(key)
        return values

    def get(self, key: bytes, default: Any = None) -> Any:
        return self.values(key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Mutable records last stored more than `seconds_old` ago (tagged).

        Provider records are re-signed and republished by their owners, never by
        the nodes that store them, so they are not listed.
        """
        self.cull()
        limit = self._clock() - seconds_old
        return [
            (key, bytes([TAG_MUTABLE]) + record.wire)
            for key, (stored, record) in self._mutable.items()
            if stored <= limit
        ]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self.cull()
        items: list[tuple[bytes, bytes]] = [
            (key, bytes([TAG_MUTABLE]) + record.wire) for key, (_, record) in self._mutable.items()
        ]
        now = self._clock()
        for key, pset in self._providers.items():
            items.extend((key, bytes([TAG_PROVIDER]) + r.wire) for r in pset.records(now))
        return iter(items)


# --------------------------------------------------------------------------- routing


class WideRoutingTable(RoutingTable):
    """The package's routing table over a 256-bit id space instead of 160 bits."""

    def flush(self) -> None:
        self.buckets = [KBucket(0, 2**256, self.ksize)]


def _parse_contact(item: Any) -> Node | None:
    """A (node id, ip, port) triple from a reply, or None if it is not a valid one."""
    if not isinstance(item, list | tuple) or len(item) != 3:
        return None
    node_id, ip, port = item
    if not _is_key(node_id) or type(port) is not int or not 1 <= port <= 65535:
        return None
    if not _valid_ip(ip):
        return None
    return Node(node_id, ip, port)


def _valid_ip(ip: Any) -> bool:
    """An IPv4 literal (host names never: resolving one would block the loop)."""
    if not isinstance(ip, str) or len(ip) > 15:
        return False
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- protocol


class PeerdriveProtocol(KademliaProtocol):
    """Kademlia RPC that bounds, checks and survives every datagram, and stores only records.

    The request/response framing is the package's (one kind byte, a 20-byte
    message id, a msgpack body), but parsing and sending are redone here so that
    no datagram can raise out of `datagram_received` (under trio-asyncio an
    exception there would tear down the whole loop), no reply can be forged by a
    third address, and no request larger than `MAX_DATAGRAM` is sent.
    """

    def __init__(
        self, source_node: Node, storage: RecordStorage, ksize: int, *, wait_timeout: float
    ) -> None:
        KademliaProtocol.__init__(self, source_node, storage, ksize)
        self.router = WideRoutingTable(self, ksize, source_node)
        self.storage: RecordStorage = storage
        self._wait_timeout = wait_timeout
        self.dropped_datagrams = 0
        self.rate_limited = 0  # requests dropped by a per-address or per-IP limit
        self.truncated_replies = 0  # replies cut for an unverified address
        self._arity = {"ping": (1,), "store": (3,), "find_node": (2,), "find_value": (2, 3),
                       "bye": (1,)}
        self._clock = time.monotonic
        self._secrets = [os.urandom(32), os.urandom(32)]
        self._secret_since = self._clock()
        self._verified: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._tokens: OrderedDict[tuple[str, int], bytes] = OrderedDict()  # theirs, for us
        self._requests = _Buckets(REQUESTS_PER_SECOND, REQUEST_BURST, self._clock)
        self._unverified_bytes = _Buckets(UNVERIFIED_BYTES_PER_SECOND, UNVERIFIED_BYTES_BURST,
                                          self._clock)
        self._unverified_requests = _Buckets(UNVERIFIED_REQUESTS_PER_SECOND,
                                             UNVERIFIED_REQUEST_BURST, self._clock)
        self._verify_pings = _Buckets(VERIFY_PINGS_PER_SECOND, VERIFY_PINGS_PER_SECOND,
                                      self._clock, max_keys=1)
        self._verifying: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Future] = set()
        # (ip, port) -> when it last failed to answer; such contacts are not asked again
        # for DEAD_CONTACT_MEMORY seconds: one dead node costs a lookup one timeout at most
        self.dead: OrderedDict[tuple[str, int], float] = OrderedDict()
        # (ip, port) -> when a valid datagram last came from it
        self.heard: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._liveness_checks: set[tuple[str, int]] = set()

    # -- transport events

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail_outstanding()

    def error_received(self, exc: Exception) -> None:
        log.debug("DHT socket error: %s", exc)

    def fail_outstanding(self) -> None:
        """Resolve every pending request as unanswered (the socket is gone)."""
        pending, self._outstanding = self._outstanding, {}
        for future, timer, _ in pending.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self._handle_datagram(data, addr)
        except Exception:  # a bug must cost one datagram, never the node
            self.dropped_datagrams += 1
            log.warning("dropped a datagram from %s that broke its handler", addr, exc_info=True)

    def _drop(self, addr: Any, why: str) -> None:
        self.dropped_datagrams += 1
        log.debug("dropped a datagram from %s: %s", addr, why)

    def _handle_datagram(self, data: bytes, addr: Any) -> None:
        if not 1 + _MSG_ID_LEN < len(data) <= MAX_DATAGRAM:
            self._drop(addr, f"size {len(data)}")
            return
        kind, msg_id = data[0], data[1 : 1 + _MSG_ID_LEN]
        try:
            body = msgpack.unpackb(data[1 + _MSG_ID_LEN :], raw=False, strict_map_key=True)
        except Exception:
            self._drop(addr, "not msgpack")
            return
        if kind in (_REQUEST, _RESPONSE):
            self._heard_from(addr)
        if kind == _REQUEST:
            self._handle_request(msg_id, body, addr)
        elif kind == _RESPONSE:
            self._handle_response(msg_id, body, addr)
        else:
            self._drop(addr, "unknown kind")

    def _handle_request(self, msg_id: bytes, body: Any, addr: Any) -> None:
        if not (isinstance(body, list) and len(body) == 2):
            self._drop(addr, "request is not [name, args]")
            return
        name, args = body
        arities = self._arity.get(name) if isinstance(name, str) else None
        if arities is None or not isinstance(args, list) or len(args) not in arities:
            self._drop(addr, f"unknown call or wrong arguments: {name!r}")
            return
        nodeid = args[0]
        if not _is_key(nodeid) or nodeid == self.source_node.id:
            self._drop(addr, "bad sender node id")
            return
        if len(args) >= 2 and not _is_key(args[1]):
            self._drop(addr, "bad key")
            return
        if name == "store" and not (
            isinstance(args[2], bytes) and len(args[2]) <= MAX_MUTABLE_WIRE + 1
        ):
            self._drop(addr, "bad store value")
            return
        if name == "find_value" and len(args) == 3 and not isinstance(args[2], bytes):
            self._drop(addr, "bad token")
            return
        address = (addr[0], addr[1])
        if not self._requests.take(address):
            self.rate_limited += 1
            return
        if name == "bye":
            self._bye(nodeid, address)  # no answer: the sender has gone
            return
        verified = self.is_verified(address) or self._is_contact(nodeid, address)
        if not verified and name == "find_value" and len(args) == 3:
            verified = self._token_ok(address, args[2])
            if verified:
                self._mark_verified(address)
        if not verified and not self._unverified_requests.take(address[0]):
            # each may cost a signature check (store); ports are free to a spoofer
            self.rate_limited += 1
            return
        self._note_sender(Node(nodeid, address[0], address[1]), verified)
        if name == "ping":
            response: Any = self.source_node.id
        elif name == "store":
            response = self.storage.offer(args[1], args[2], source=address[0])
        elif name == "find_node":
            response = self._contacts_for(args[1], address)
        else:
            response = {"values": self.storage.values(args[1]),
                        "nodes": self._contacts_for(args[1], address)}
        reply = self._encode_reply(msg_id, response)
        if not verified and len(reply) > UNVERIFIED_REPLY_MAX:
            self.truncated_replies += 1
            reply = self._encode_reply(msg_id, self._cut(response, address))
        if len(reply) > MAX_DATAGRAM:
            log.warning("not sending a %d-byte reply to %s (limit %d)", len(reply), addr,
                        MAX_DATAGRAM)
            return
        if not verified and not self._unverified_bytes.take(address[0], len(reply)):
            self.rate_limited += 1
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    @staticmethod
    def _encode_reply(msg_id: bytes, response: Any) -> bytes:
        return bytes([_RESPONSE]) + msg_id + msgpack.packb(response, use_bin_type=True)

    def _cut(self, response: Any, address: tuple[str, int]) -> Any:
        """`response` shrunk to fit UNVERIFIED_REPLY_MAX; a find_value reply gets a token."""
        budget = UNVERIFIED_REPLY_MAX - 1 - _MSG_ID_LEN
        if isinstance(response, list):
            while response and len(msgpack.packb(response, use_bin_type=True)) > budget:
                response = response[:-1]
            return response
        cut = {"values": [], "nodes": list(response["nodes"]), "token": self._token(address)}
        while cut["nodes"] and len(msgpack.packb(cut, use_bin_type=True)) > budget:
            cut["nodes"].pop()
        for value in response["values"]:
            cut["values"].append(value)
            if len(msgpack.packb(cut, use_bin_type=True)) > budget:
                cut["values"].pop()
                break
        return cut

    def _contacts_for(self, key: bytes, address: tuple[str, int]) -> list[list[Any]]:
        exclude = Node(bytes(KEY_LEN), address[0], address[1])
        return [list(n) for n in self.router.find_neighbors(Node(key), exclude=exclude)]

    # -- source addresses: verified, tokens, rate limits

    def is_verified(self, address: tuple[str, int]) -> bool:
        """Whether `address` answered a request of ours (or showed our token) lately."""
        until = self._verified.get(address)
        if until is None:
            return False
        if until < self._clock():
            del self._verified[address]
            return False
        return True

    def _is_contact(self, node_id: bytes, address: tuple[str, int]) -> bool:
        """Whether the routing table holds `node_id` at `address` (it was verified to get there)."""
        node = Node(node_id)
        known = self.router.buckets[self.router.get_bucket_for(node)].nodes.get(node_id)
        return known is not None and (known.ip, known.port) == address

    def _mark_verified(self, address: tuple[str, int]) -> None:
        self._verified.pop(address, None)
        self._verified[address] = self._clock() + VERIFIED_TTL
        if len(self._verified) > MAX_TRACKED_ADDRESSES:
            self._verified.popitem(last=False)

    def _token(self, address: tuple[str, int], secret: bytes | None = None) -> bytes:
        now = self._clock()
        if now - self._secret_since >= TOKEN_ROTATE:
            self._secrets = [os.urandom(32), self._secrets[0]]
            self._secret_since = now
        message = f"{address[0]}:{address[1]}".encode()
        key = secret if secret is not None else self._secrets[0]
        return hmac.new(key, message, hashlib.sha256).digest()[:TOKEN_LEN]

    def _token_ok(self, address: tuple[str, int], token: bytes) -> bool:
        self._token(address)  # rotates the secrets when due
        return any(hmac.compare_digest(self._token(address, secret), token)
                   for secret in self._secrets)

    def _note_sender(self, node: Node, verified: bool) -> None:
        """Learn the sender of a request: at once if its address is verified, else after a ping.

        A request's source address may be forged, so an unverified sender is never
        put into the routing table (nor handed values) on its word; it is pinged
        (a datagram smaller than its request, rate-limited) and welcomed once it
        answers from that address with that id.
        """
        if verified:
            self.welcome_if_new(node)
            return
        address = (node.ip, node.port)
        bucket = self.router.buckets[self.router.get_bucket_for(node)]
        if (
            not bucket.is_new_node(node)
            # a full bucket far from us would not take it anyway (one that holds our
            # own id splits, so there a newcomer is worth a ping)
            or (len(bucket) >= bucket.ksize and not bucket.has_in_range(self.source_node))
            or address in self._verifying
            or len(self._verifying) >= MAX_TRACKED_ADDRESSES
            or not self._verify_pings.take(None)
        ):
            return
        self._verifying.add(address)
        try:
            task = asyncio.ensure_future(self._verify(node))
        except RuntimeError:  # no running loop (a unit test driving the handler directly)
            self._verifying.discard(address)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _verify(self, node: Node) -> None:
        try:
            answered, node_id = await self.ping((node.ip, node.port), self.source_node.id)
        finally:
            self._verifying.discard((node.ip, node.port))
        if answered and node_id == node.id:
            self.welcome_if_new(node)

    def _handle_response(self, msg_id: bytes, body: Any, addr: Any) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is None:
            self._drop(addr, "reply to nothing we asked (or too late)")
            return
        future, timer, address = entry
        if tuple(addr[:2]) != tuple(address[:2]):
            self._drop(addr, "reply from another address than the one asked")
            return
        del self._outstanding[msg_id]
        timer.cancel()
        self._mark_verified((address[0], address[1]))  # it received our random message id
        if not future.done():
            future.set_result((True, body))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None:
            address = (entry[2][0], entry[2][1])
            heard = self.heard.get(address)
            if heard is None or time.monotonic() - heard > DEAD_AFTER_SILENCE:
                # silent for a while, not merely slow on a busy machine: skip it from now on
                self._mark_dead(address)
            if not entry[0].done():
                entry[0].set_result((False, None))

    # -- liveness: a dead contact costs one timeout, a departed one nothing

    def _heard_from(self, addr: Any) -> None:
        key = (addr[0], addr[1])
        self.dead.pop(key, None)
        self.heard.pop(key, None)
        self.heard[key] = time.monotonic()
        while len(self.heard) > MAX_HEARD:
            self.heard.popitem(last=False)

    def _mark_dead(self, addr: Any) -> None:
        key = (addr[0], addr[1])
        self.dead.pop(key, None)
        self.dead[key] = time.monotonic()
        while len(self.dead) > MAX_DEAD_CONTACTS:
            self.dead.popitem(last=False)

    def is_dead(self, ip: str, port: int) -> bool:
        """True if (ip, port) failed to answer within DEAD_CONTACT_MEMORY and was not heard since."""
        when = self.dead.get((ip, port))
        if when is None:
            return False
        if time.monotonic() - when > DEAD_CONTACT_MEMORY:
            del self.dead[(ip, port)]
            return False
        return True

    def handle_call_response(self, result: Any, node: Node) -> Any:
        """The package's, without a warning per timeout (a departed node is normal)."""
        if not result[0]:
            log.debug("no response from %s, removing it from the routing table", node)
            self.router.remove_contact(node)
            return result
        self.welcome_if_new(node)
        return result

    def _bye(self, node_id: bytes, address: tuple[str, int]) -> None:
        """A contact is leaving: forget it, if it is the one at that address."""
        if self._is_contact(node_id, address):
            self.router.remove_contact(Node(node_id, address[0], address[1]))
            self._mark_dead(address)

    def check_contact(self, node_id: bytes) -> bool:
        """Ping the contact with this id now (its node may have died); False if unknown."""
        for bucket in self.router.buckets:
            node = bucket.nodes.get(node_id)
            if node is not None:
                self.heard.pop((node.ip, node.port), None)  # a timeout now marks it dead
                self._check_stale([node])
                return True
        return False

    def _check_stale(self, nodes: Iterable[Node]) -> None:
        """Ping these contacts now (bounded); one that does not answer leaves the table."""
        for node in nodes:
            key = (node.ip, node.port)
            if key in self._liveness_checks or len(self._liveness_checks) >= MAX_LIVENESS_CHECKS:
                continue
            self._liveness_checks.add(key)
            try:
                task = asyncio.ensure_future(self._liveness_check(node, key))
            except RuntimeError:  # no running loop (a unit test driving the handler directly)
                self._liveness_checks.discard(key)
                return
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _liveness_check(self, node: Node, key: tuple[str, int]) -> None:
        try:
            await self.call_ping(node)
        finally:
            self._liveness_checks.discard(key)

    def say_bye(self) -> int:
        """Tell every contact this node is leaving (one datagram each, no answer awaited)."""
        if self.transport is None or self.transport.is_closing():
            return 0
        sent = 0
        body = msgpack.packb(["bye", [self.source_node.id]], use_bin_type=True)
        for bucket in self.router.buckets:
            for node in bucket.get_nodes():
                data = bytes([_REQUEST]) + os.urandom(_MSG_ID_LEN) + body
                with contextlib.suppress(OSError):
                    self.transport.sendto(data, (node.ip, node.port))
                    sent += 1
        return sent

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- outgoing requests (these replace rpcudp's __getattr__ magic)

    def _request(self, address: Any, name: str, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        if (
            self.transport is None
            or self.transport.is_closing()
            or not isinstance(address, tuple | list)
            or len(address) < 2
            or not _valid_ip(address[0])
            or type(address[1]) is not int
            or not 1 <= address[1] <= 65535
        ):
            future.set_result((False, None))
            return future
        address = (address[0], address[1])
        msg_id = os.urandom(_MSG_ID_LEN)
        data = bytes([_REQUEST]) + msg_id + msgpack.packb([name, list(args)], use_bin_type=True)
        if len(data) > MAX_DATAGRAM:
            log.warning("not sending a %d-byte %s request (limit %d)", len(data), name,
                        MAX_DATAGRAM)
            future.set_result((False, None))
            return future
        self.transport.sendto(data, address)
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer, address)
        return future

    def ping(self, address: Any, nodeid: bytes) -> asyncio.Future:
        return self._request(address, "ping", nodeid)

    def store(self, address: Any, nodeid: bytes, key: bytes, value: bytes) -> asyncio.Future:
        return self._request(address, "store", nodeid, key, value)

    def find_node(self, address: Any, nodeid: bytes, key: bytes) -> asyncio.Future:
        return self._request(address, "find_node", nodeid, key)

    def find_value(self, address: Any, nodeid: bytes, key: bytes,
                   token: bytes | None = None) -> asyncio.Future:
        if token is None:
            return self._request(address, "find_value", nodeid, key)
        return self._request(address, "find_value", nodeid, key, token)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> Any:
        """find_value, asked again with the token when the reply was cut for an unverified us.

        The token is kept per address, so later requests carry it from the start.
        """
        address = (node_to_ask.ip, node_to_ask.port)
        token = self._tokens.get(address)
        result = await self.find_value(address, self.source_node.id, node_to_find.id, token)
        body = result[1]
        if result[0] and isinstance(body, dict) and isinstance(body.get("token"), bytes):
            token = body["token"][:TOKEN_LEN]
            self._tokens.pop(address, None)
            self._tokens[address] = token
            if len(self._tokens) > MAX_TRACKED_ADDRESSES:
                self._tokens.popitem(last=False)
            again = await self.find_value(address, self.source_node.id, node_to_find.id, token)
            if again[0]:
                result = again
        return self.handle_call_response(result, node_to_ask)

    # -- routing table upkeep

    def get_refresh_ids(self) -> list[bytes]:
        ids = []
        for bucket in self.router.lonely_buckets():
            low, high = bucket.range
            ids.append(random.randint(low, min(high, 2**256 - 1)).to_bytes(KEY_LEN, "big"))
        return ids

    def welcome_if_new(self, node: Node) -> None:
        """Add a verified new contact; hand it the values it is now among the closest to (§2.5).

        Only called for a node that answered us, or whose address is verified:
        never on the word of one datagram. The work is bounded: the few held keys
        nearest to its id are considered (a sorted index, not a scan of storage),
        and at most MAX_WELCOME_VALUES values are sent. (The package's version
        hashed stored keys again with SHA-1 and scanned them all.)
        """
        if not self.router.is_new_node(node):
            return
        sent = 0
        for key in self.storage.keys_near(node.id, 2 * MAX_WELCOME_VALUES):
            if sent >= MAX_WELCOME_VALUES:
                break
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                last = neighbors[-1].distance_to(keynode)
                new_node_close = node.distance_to(keynode) < last
                first = neighbors[0].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < first
            if not neighbors or (new_node_close and this_closest):
                for value in self.storage.values(key)[: MAX_WELCOME_VALUES - sent]:
                    # the reply only matters to the new node; nothing awaits it
                    self.store((node.ip, node.port), self.source_node.id, key, value)
                    sent += 1
        self.router.add_contact(node)

    def parse_nodes(self, payload: Any) -> list[Node] | None:
        """Contacts from a find_node reply, or None if the reply is garbage."""
        if not isinstance(payload, list) or len(payload) > MAX_NODES_IN_REPLY:
            return None
        nodes = []
        for item in payload:
            node = _parse_contact(item)
            if node is None:
                return None
            if node.id != self.source_node.id and not self.is_dead(node.ip, node.port):
                nodes.append(node)
        return nodes

    def parse_find_value(self, payload: Any) -> tuple[list[bytes], list[Node]] | None:
        """(tagged values, contacts) from a find_value reply, or None if it is garbage."""
        if not isinstance(payload, dict) or not (
            set(payload) == {"values", "nodes"} or set(payload) == {"values", "nodes", "token"}
        ):
            return None
        values = payload["values"]
        if not isinstance(values, list) or not all(isinstance(v, bytes) for v in values):
            return None
        nodes = self.parse_nodes(payload["nodes"])
        if nodes is None:
            return None
        return values, nodes

    def forget(self, node_id: bytes) -> None:
        """Drop a contact that answered garbage."""
        self.router.remove_contact(Node(node_id))


# --------------------------------------------------------------------------- crawling


class BoundedNodeHeap(NodeHeap):
    """The package's candidate heap, trimmed to the nearest `limit` nodes after every push.

    The package's heap keeps every contact ever pushed (and checks membership by
    a scan), so a node answering with endless fresh contacts grew a lookup's
    memory and its cost per reply without bound.
    """

    def __init__(self, node: Node, maxsize: int, limit: int) -> None:
        super().__init__(node, maxsize)
        self.limit = limit
        self._ids: set[bytes] = set()

    def __contains__(self, node: Any) -> bool:
        return node.id in self._ids

    def push(self, nodes: Any) -> None:
        if not isinstance(nodes, list):
            nodes = [nodes]
        for node in nodes:
            if node.id not in self._ids:
                heapq.heappush(self.heap, (self.node.distance_to(node), node))
                self._ids.add(node.id)
        if len(self.heap) > self.limit:
            self.heap = heapq.nsmallest(self.limit, self.heap)  # sorted: still a heap
            self._ids = {n.id for _, n in self.heap}

    def remove(self, peers: Any) -> None:
        super().remove(peers)
        self._ids = {n.id for _, n in self.heap}


class _BoundedCrawl:
    """An iterative lookup of at most MAX_CRAWL_ROUNDS rounds (the package's recursed unbounded).

    Each round asks alpha uncontacted nodes among the k nearest known (all of
    them when the last round brought nothing nearer), as the package does; a
    subclass's `_take` digests one round's answers.
    """

    protocol: PeerdriveProtocol
    nearest: BoundedNodeHeap
    rounds: int

    def _bound(self, node: Node, peers: list[Node], ksize: int) -> None:
        self.nearest = BoundedNodeHeap(node, ksize, CRAWL_HEAP_LIMIT * ksize)
        self.nearest.push(list(peers))
        self.rounds = 0
        self.ignored: set[bytes] = set()

    async def _crawl(self, rpcmethod: Callable[..., Any]) -> None:
        last_ids: list[bytes] | None = None
        while self.rounds < MAX_CRAWL_ROUNDS and not self.nearest.have_contacted_all():
            self.rounds += 1
            ids = self.nearest.get_ids()
            count = len(self.nearest) if ids == last_ids else self.alpha  # type: ignore[attr-defined]
            last_ids = ids
            asked = self.nearest.get_uncontacted()[:count]
            for peer in asked:
                self.nearest.mark_contacted(peer)
            results = await asyncio.gather(*(rpcmethod(peer, self.node) for peer in asked))  # type: ignore[attr-defined]
            self._take(dict(zip((p.id for p in asked), results, strict=True)))

    def _take(self, responses: dict[bytes, Any]) -> None:
        raise NotImplementedError


class CheckedNodeSpiderCrawl(_BoundedCrawl, NodeSpiderCrawl):
    """The package's node lookup: bounded, counting rounds, ignoring peers that answer garbage."""

    def __init__(self, protocol: PeerdriveProtocol, node: Node, peers: list[Node], ksize: int,
                 alpha: int) -> None:
        NodeSpiderCrawl.__init__(self, protocol, node, peers, ksize, alpha)
        self._bound(node, peers, ksize)

    async def find(self) -> list[Node]:
        await self._crawl(self.protocol.call_find_node)
        return list(self.nearest)

    def _take(self, responses: dict[bytes, Any]) -> None:
        toremove = []
        for peerid, (answered, payload) in responses.items():
            nodes = self.protocol.parse_nodes(payload) if answered else None
            if nodes is None:
                if answered:
                    self.protocol.forget(peerid)
                    self.ignored.add(peerid)
                toremove.append(peerid)
                continue
            self.nearest.push([n for n in nodes if n.id not in self.ignored])
        self.nearest.remove(toremove)


class RecordSpiderCrawl(_BoundedCrawl, ValueSpiderCrawl):
    """A value lookup that collects every valid record from all of the k closest nodes.

    The package stops at the first round that sees any value and returns the
    most common one, which lets a few colluding nodes answer for a key. This
    crawl goes on until the k closest known nodes have all been asked (or
    MAX_CRAWL_ROUNDS), passes each value to `accept` (which verifies it,
    returns the record, None for a record that is valid but no longer useful,
    or raises RecordError), and ignores every value of a node that sent
    anything invalid.
    """

    def __init__(
        self,
        protocol: PeerdriveProtocol,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        accept: Callable[[bytes], Any],
    ) -> None:
        ValueSpiderCrawl.__init__(self, protocol, node, peers, ksize, alpha)
        self._bound(node, peers, ksize)
        self.accept = accept
        self.first_value_round: int | None = None
        self.found: list[tuple[bytes, Any]] = []
        self.answered: set[bytes] = set()  # peers whose whole reply was valid

    async def find(self) -> list[tuple[bytes, Any]]:
        await self._crawl(self.protocol.call_find_value)
        return self.found

    def _take(self, responses: dict[bytes, Any]) -> None:
        toremove = []
        for peerid, (answered, payload) in responses.items():
            parsed = self.protocol.parse_find_value(payload) if answered else None
            records = None
            if parsed is not None:
                try:
                    records = [r for r in map(self.accept, parsed[0]) if r is not None]
                except RecordError as exc:
                    log.info("ignoring a DHT node that answered an invalid record: %s", exc)
            if parsed is None or records is None:
                if answered:
                    self.protocol.forget(peerid)
                    self.ignored.add(peerid)
                toremove.append(peerid)
                continue
            if records and self.first_value_round is None:
                self.first_value_round = self.rounds
            self.answered.add(peerid)
            self.found.extend((peerid, r) for r in records)
            self.nearest.push([n for n in parsed[1] if n.id not in self.ignored])
        self.nearest.remove(toremove)


@dataclass(frozen=True, slots=True)
class LookupStats:
    """How one DHT operation went, for figures and debugging.

    `rounds`: iterations of the lookup (each asks up to alpha nodes, or all
    uncontacted of the k closest when a round made no progress).
    `hops`: the round in which the first valid value arrived (None if none did;
    0 if this node held it). `contacted`: distinct nodes asked. `values`: valid
    records received (with repeats across nodes).
    """

    kind: str
    rounds: int
    contacted: int
    hops: int | None
    values: int


# --------------------------------------------------------------------------- server


class DhtServer(Server):
    """The package's `Server`, listening without timers (trio drives upkeep) and storing records."""

    protocol_class = PeerdriveProtocol
    protocol: PeerdriveProtocol
    storage: RecordStorage

    def __init__(
        self,
        *,
        node_id: bytes,
        storage: RecordStorage,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout: float = 5.0,
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        self.storage = storage  # the package's `storage or ...` would replace an empty one
        self.rpc_timeout = rpc_timeout

    def _create_protocol(self) -> PeerdriveProtocol:
        return PeerdriveProtocol(self.node, self.storage, self.ksize,
                                 wait_timeout=self.rpc_timeout)

    async def listen(self, port: int, interface: str = "0.0.0.0") -> None:
        loop = asyncio.get_running_loop()
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port)
        )

    async def listen_on(self, sock: socket.socket) -> None:
        """Serve on an already bound UDP socket (so bind errors surface before any loop runs)."""
        loop = asyncio.get_running_loop()
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, sock=sock
        )

    def stop(self) -> None:
        super().stop()
        if self.protocol is not None:
            self.protocol.fail_outstanding()
            self.protocol.cancel_tasks()

    @property
    def bound_port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        gathered = await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))
        nodes = [n for n in gathered if n is not None]
        if not nodes:
            return []
        spider = CheckedNodeSpiderCrawl(self.protocol, self.node, nodes, self.ksize, self.alpha)
        return await spider.find()

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        answered, node_id = await self.protocol.ping(addr, self.node.id)
        if not answered or not _is_key(node_id) or node_id == self.node.id:
            return None
        return Node(node_id, addr[0], addr[1])

    async def refresh(self) -> None:
        """Look up a random id in every bucket nobody touched for an hour (paper §2.3)."""
        crawls = []
        for node_id in self.protocol.get_refresh_ids():
            target = Node(node_id)
            nearest = self.protocol.router.find_neighbors(target, self.alpha)
            crawls.append(
                CheckedNodeSpiderCrawl(self.protocol, target, nearest, self.ksize,
                                       self.alpha).find()
            )
        await asyncio.gather(*crawls)

    async def store_value(self, key: bytes, value: bytes) -> tuple[int, LookupStats]:
        """Store a tagged value on the k nodes closest to `key` (and here if among them).

        Returns how many nodes accepted it.
        """
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        nodes: list[Node] = []
        rounds = 0
        contacted = 0
        if nearest:
            spider = CheckedNodeSpiderCrawl(self.protocol, target, nearest, self.ksize,
                                            self.alpha)
            nodes = await spider.find()
            rounds, contacted = spider.rounds, len(spider.nearest.contacted)
        accepted = 0
        if len(nodes) < self.ksize or self.node.distance_to(target) < max(
            n.distance_to(target) for n in nodes
        ):
            accepted += self.storage.offer(key, value)
        results = await asyncio.gather(
            *(self.protocol.call_store(n, key, value) for n in nodes)
        )
        accepted += sum(1 for answered, reply in results if answered and reply is True)
        return accepted, LookupStats("store", rounds, contacted, None, accepted)

    async def find_values(
        self, key: bytes, accept: Callable[[bytes], Any], kind: str
    ) -> tuple[list[tuple[bytes | None, Any]], RecordSpiderCrawl | None, LookupStats]:
        """Every valid record under `key`: this node's own and those of the k closest nodes."""
        found: list[tuple[bytes | None, Any]] = []
        for value in self.storage.values(key):
            record = accept(value)
            if record is not None:
                found.append((None, record))
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        if not nearest:
            stats = LookupStats(kind, 0, 0, 0 if found else None, len(found))
            return found, None, stats
        spider = RecordSpiderCrawl(self.protocol, target, nearest, self.ksize, self.alpha,
                                   accept)
        found.extend(await spider.find())
        hops = 0 if found and found[0][0] is None else spider.first_value_round
        stats = LookupStats(kind, spider.rounds, len(spider.nearest.contacted), hops, len(found))
        return found, spider, stats


# --------------------------------------------------------------------------- trio side


class Dht:
    """One DHT node, for trio code.

    Start it with ``port = await nursery.start(dht.run, host, port, bootstrap)``;
    the other methods may then be called from any task until `run` ends.
    """

    def __init__(
        self,
        *,
        node_id: bytes | None = None,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        refresh_interval: float = REFRESH_INTERVAL,
        mutable_republish_interval: float = MUTABLE_REPUBLISH_INTERVAL,
    ) -> None:
        if node_id is not None and not _is_key(node_id):
            raise KadError(f"a DHT node id is {KEY_LEN} bytes")
        self.node_id = node_id if node_id is not None else os.urandom(KEY_LEN)
        self.storage = RecordStorage(clock=clock)
        self.port: int | None = None
        self.lookup_stats: LookupStats | None = None
        self._ksize = ksize
        self._alpha = alpha
        self._rpc_timeout = rpc_timeout
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._republish_interval = mutable_republish_interval
        self._loop: Any = None
        self._server: DhtServer | None = None
        self._bootstrap: list[tuple[str, int]] = []
        self._own_mutable: dict[bytes, MutableRecord] = {}
        self._started = trio.Event()

    @property
    def dropped_datagrams(self) -> int:
        """Datagrams this node received and ignored as malformed, oversize or unsolicited."""
        return 0 if self._server is None else self._server.protocol.dropped_datagrams

    def contacts(self) -> list[tuple[bytes, str, int]]:
        """(routing id, ip, port) of every contact in the routing table."""
        if self._server is None:
            return []
        return [(n.id, n.ip, n.port) for b in self._server.protocol.router.buckets
                for n in b.get_nodes()]

    # -- lifecycle

    async def run(
        self,
        listen_host: str,
        port: int,
        bootstrap: Iterable[tuple[str, int]] = (),
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on UDP `listen_host:port` (0 picks a port), join via `bootstrap`, serve forever.

        Reports the bound port through `task_status` once the node has listened and
        tried its bootstrap contacts (an unreachable bootstrap is retried later).
        """
        if self._server is not None:
            raise KadError("this DHT node is already running")
        try:
            version = ipaddress.ip_address(listen_host).version
        except ValueError:
            raise KadError(f"the DHT listens on an IPv4 address, not {listen_host!r}") from None
        if version != 4:
            raise KadError(f"the DHT speaks IPv4 only for now; cannot listen on {listen_host}")
        if type(port) is not int or not 0 <= port <= 65535:
            raise KadError(f"DHT port {port!r} is not in 0..65535")
        self._bootstrap = await _resolve(bootstrap)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((listen_host, port))
        except OSError as exc:
            sock.close()
            raise KadError(
                f"cannot listen for DHT traffic on UDP {listen_host}:{port}: "
                f"{exc.strerror or exc}"
            ) from exc
        async with trio_asyncio.open_loop() as loop:
            server = DhtServer(node_id=self.node_id, storage=self.storage, ksize=self._ksize,
                               alpha=self._alpha, rpc_timeout=self._rpc_timeout)
            try:
                try:
                    await loop.run_aio_coroutine(server.listen_on(sock))
                except BaseException:
                    sock.close()
                    raise
                self._loop, self._server = loop, server
                self.port = server.bound_port
                if self._bootstrap:
                    await self._aio(server.bootstrap(self._bootstrap))
                self._started.set()
                task_status.started(self.port)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._refresh_forever)
                    nursery.start_soon(self._republish_forever)
            finally:
                self._loop = self._server = None
                with contextlib.suppress(Exception):
                    server.protocol.say_bye()  # a clean stop: contacts forget us now
                server.stop()

    async def _aio(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run asyncio-side work on this node's loop from any trio task."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise KadError("the DHT node is not running")
        try:
            result = await loop.run_aio_coroutine(coro)
        except asyncio.CancelledError:
            # the loop shut down under us (run() ended); a trio cancel is trio.Cancelled
            raise KadError("the DHT node stopped during the operation") from None
        if self._loop is not loop:
            # stopping fails pending requests as unanswered: the answer is not to be trusted
            raise KadError("the DHT node stopped during the operation")
        return result

    def _running(self) -> DhtServer:
        if self._server is None:
            raise KadError("the DHT node is not running")
        return self._server

    async def _joined(self) -> DhtServer:
        """The running server, bootstrapped again first if its routing table has emptied.

        A node whose contacts all timed out (a network outage, a stalled machine)
        would otherwise answer every lookup from its own storage alone.
        """
        server = self._running()
        if self._bootstrap and not server.protocol.router.find_neighbors(server.node):
            await self._aio(server.bootstrap(self._bootstrap))
        return server

    async def _refresh_forever(self) -> None:
        next_refresh = trio.current_time() + self._refresh_interval
        while True:
            await trio.sleep(min(BOOTSTRAP_RETRY_INTERVAL, self._refresh_interval))
            server = await self._joined()
            if trio.current_time() >= next_refresh:
                next_refresh = trio.current_time() + self._refresh_interval
                await self._aio(server.refresh())
                self.storage.cull()

    async def _republish_forever(self) -> None:
        while True:
            await trio.sleep(self._republish_interval)
            for record in list(self._own_mutable.values()):
                server = self._running()
                await self._aio(server.store_value(record.key, _tag(TAG_MUTABLE, record.wire)))

    async def keep_announcing(
        self,
        get_records: Callable[[], Iterable[bytes]],
        *,
        interval: float = PROVIDER_REPUBLISH_INTERVAL,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Announce fresh provider records now and every `interval` seconds, forever.

        `get_records()` returns newly signed provider wires (one per discovery key
        this node serves: per drive, never per block); it is called each time so
        that every round carries a fresh expiry. A record that fails to announce
        is logged and retried next round. Waits for `run` to have started first.
        """
        task_status.started()
        await self._started.wait()
        while True:
            for wire in list(get_records()):
                try:
                    record = ProviderRecord.decode(wire, now=self._clock())
                    await self.announce(record.dk, wire)
                except DhtError as exc:
                    log.warning("could not announce a provider record: %s", exc)
            await trio.sleep(interval)

    # -- operations

    def check_contact(self, node_id: bytes) -> bool:
        """Ping the routing-table contact with this id soon: another layer saw it vanish.

        If it does not answer within the RPC timeout it leaves the routing
        table, so it is not handed to newcomers. False if the node is not running.
        """
        if self._server is None or self._loop is None:
            return False
        # run on the asyncio side, where the ping's task belongs
        self._loop.call_soon(self._server.protocol.check_contact, node_id)
        return True

    async def wait_started(self) -> None:
        """Return once `run` listens and has tried its bootstrap contacts."""
        await self._started.wait()

    async def add_contacts(self, addrs: Iterable[tuple[str, int]]) -> int:
        """Join through more known nodes (say, neighbours found on the LAN).

        They are also kept as bootstrap contacts for a later re-join. Returns
        how many answered.
        """
        server = self._running()
        new = [(h, p) for h, p in addrs if (h, p) not in self._bootstrap]
        if not new:
            return 0
        self._bootstrap.extend(new)
        nodes = await self._aio(server.bootstrap(new))
        return len(nodes)

    async def announce(self, dk: bytes, provider_wire_record: bytes) -> int:
        """Store a provider record for `dk` on the k closest nodes; returns how many accepted.

        Raises RecordError if the record is invalid, expired or for another key.
        """
        _check_dk(dk)
        record = ProviderRecord.decode(provider_wire_record, now=self._clock())
        if record.dk != dk:
            raise RecordError("this provider record announces another discovery key")
        server = await self._joined()
        accepted, stats = await self._aio(
            server.store_value(provider_key(dk), _tag(TAG_PROVIDER, record.wire))
        )
        self.lookup_stats = stats
        return accepted

    async def find_providers(self, dk: bytes) -> list[ProviderRecord]:
        """Valid, unexpired providers of `dk`: the union of what the k closest nodes hold."""
        _check_dk(dk)
        now = self._clock()

        def accept(value: bytes) -> ProviderRecord | None:
            if value[:1] != bytes([TAG_PROVIDER]):
                raise RecordError("a non-provider value under a provider key")
            try:
                record = ProviderRecord.decode(value[1:], now=now)
            except RecordExpired:
                return None  # the holder's clock differs a little from ours
            if record.dk != dk:
                raise RecordError("a provider record for another discovery key")
            return record

        server = await self._joined()
        found, _, stats = await self._aio(server.find_values(provider_key(dk), accept,
                                                             "providers"))
        self.lookup_stats = stats
        merged = ProviderSet(dk, max_size=MAX_LOOKUP_PROVIDERS)
        for holder, record in found:
            merged.offer(record, now, holder)  # spread over the DHT nodes that answered
        return merged.records(now)

    async def put_mutable(self, wire: bytes) -> int:
        """Store a signed mutable record on the k closest nodes; returns how many accepted.

        Nodes holding a higher seq refuse it (so 0 means the network has newer).
        The node keeps re-storing the newest record it was given every hour.
        """
        record = MutableRecord.decode(wire)
        server = await self._joined()
        current = self._own_mutable.get(record.key)
        if current is None or record.sort_key() > current.sort_key():
            self._own_mutable[record.key] = record
        accepted, stats = await self._aio(
            server.store_value(record.key, _tag(TAG_MUTABLE, record.wire))
        )
        self.lookup_stats = stats
        return accepted

    async def get_mutable(self, dk: bytes) -> MutableRecord | None:
        """The highest-seq valid mutable record under `dk`, or None if no node holds one.

        Close nodes that answered with an older record (or none) are sent the
        newest one, so a lookup also repairs the key.
        """
        _check_dk(dk)

        def accept(value: bytes) -> MutableRecord:
            if value[:1] != bytes([TAG_MUTABLE]):
                raise RecordError("a non-mutable value under a mutable-record key")
            record = MutableRecord.decode(value[1:])
            if record.key != dk:
                raise RecordError("a mutable record stored under another key")
            return record

        server = await self._joined()
        return await self._aio(self._get_mutable(server, dk, accept))

    async def _get_mutable(
        self, server: DhtServer, dk: bytes, accept: Callable[[bytes], MutableRecord]
    ) -> MutableRecord | None:
        found, spider, stats = await server.find_values(dk, accept, "mutable")
        self.lookup_stats = stats
        candidates = [record for _, record in found]
        own = self._own_mutable.get(dk)
        if own is not None:
            candidates.append(own)
        best = newest_mutable(candidates)
        if best is None or spider is None:
            return best
        up_to_date = {peer for peer, record in found if peer is not None and record == best}
        stale = [n for n in spider.nearest if n.id in spider.answered and n.id not in up_to_date]
        if stale:
            await asyncio.gather(
                *(server.protocol.call_store(n, dk, _tag(TAG_MUTABLE, best.wire))
                  for n in stale)
            )
        return best


def _tag(tag: int, wire: bytes) -> bytes:
    return bytes([tag]) + wire


async def _resolve(addrs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Bootstrap contacts as IP literals (names resolved once, with trio; failures skipped)."""
    out: list[tuple[str, int]] = []
    for host, port in addrs:
        if type(port) is not int or not 1 <= port <= 65535:
            raise KadError(f"bootstrap port {port!r} is not in 1..65535")
        if _valid_ip(host):
            out.append((host, port))
            continue
        try:
            infos = await trio.socket.getaddrinfo(host, port, family=socket.AF_INET,
                                                  type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("cannot resolve bootstrap host %s: %s", host, exc)
            continue
        if infos:
            out.append((infos[0][4][0], port))
    return out
