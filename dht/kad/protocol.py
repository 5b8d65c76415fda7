"""The datagram protocol: Kademlia RPC that bounds, checks and survives every datagram.

Also the 256-bit routing table, the parsing of contacts in replies, the
per-address rate limits and token checks (unverified sources), and the
liveness of contacts (a dead one costs one timeout, a departed one nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import KBucket, RoutingTable

from dht.records import (
    MAX_MUTABLE_WIRE,
)

from .keys import _is_key
from .limits import (
    _MSG_ID_LEN,
    _REQUEST,
    _RESPONSE,
    DEAD_AFTER_SILENCE,
    DEAD_CONTACT_MEMORY,
    KEY_LEN,
    MAX_DATAGRAM,
    MAX_DEAD_CONTACTS,
    MAX_HEARD,
    MAX_LIVENESS_CHECKS,
    MAX_NODES_IN_REPLY,
    MAX_TRACKED_ADDRESSES,
    MAX_WELCOME_VALUES,
    REQUEST_BURST,
    REQUESTS_PER_SECOND,
    TOKEN_LEN,
    TOKEN_ROTATE,
    UNVERIFIED_BYTES_BURST,
    UNVERIFIED_BYTES_PER_SECOND,
    UNVERIFIED_REPLY_MAX,
    UNVERIFIED_REQUEST_BURST,
    UNVERIFIED_REQUESTS_PER_SECOND,
    VERIFIED_TTL,
    VERIFY_PINGS_PER_SECOND,
)
from .storage import RecordStorage

log = logging.getLogger(__name__)

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



class WideRoutingTable(RoutingTable):
    """The package's routing table over a 256-bit id space instead of 160 bits."""

    def flush(self) -> None:
        self.buckets = [KBucket(0, 2**256, self.ksize)]

    def find_neighbors(self, node: Node, k: int | None = None,
                       exclude: Node | None = None) -> list[Node]:
        """The `k` contacts nearest to `node` by XOR distance, over the whole table.

        The package walks buckets outwards from `node`'s, alternating sides, and
        gives up as soon as the right-hand side runs out, after one more bucket
        on the left: a target whose bucket lies at the right end with sparse
        buckets next to it got a short list, or none at all, while the table held
        dozens of contacts (a 200-node DHT: 48 of 40,000 calls empty, 23 % short).
        An empty list made a lookup ask nobody and find nothing; a short one
        started it far from the key. A table holds a few hundred contacts at
        most, so a full scan costs little.

        A contact another layer saw vanish is left out while its liveness check
        runs (`PeerdriveProtocol.check_contact`): a reader killed a moment ago
        would otherwise be handed to the next newcomer, whose join then waits a
        whole RPC timeout on it, and to this node's own lookups.
        """
        k = k or self.ksize
        self.buckets[self.get_bucket_for(node)].touch_last_updated()  # as the package's walk did
        vanishing = self.protocol.vanishing
        candidates = (
            n for bucket in self.buckets for n in bucket.nodes.values()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
            and (n.ip, n.port) not in vanishing
        )
        return heapq.nsmallest(k, candidates, key=node.distance_to)

    def add_contact(self, node: Node) -> None:
        """The package's, but a full bucket's head is pinged as a tracked, bounded task.

        (The package fired `ensure_future(call_ping(...))` and forgot it: a task
        nobody cancels at stop, and a coroutine never awaited when no loop runs.)
        """
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # paper §4.2: split a full bucket that holds our own id (or at depth not 0 mod 5)
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol._check_stale([bucket.head()])


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
        # (ip, port) of contacts another layer saw vanish (a broken connection), while
        # their liveness check runs: handed to nobody until they answer it
        self.vanishing: set[tuple[str, int]] = set()

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
        if not self._start_task(lambda: self._verify(node)):
            self._verifying.discard(address)

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
                key = (node.ip, node.port)
                self.heard.pop(key, None)  # a timeout now marks it dead
                self._check_stale([node])
                if key in self._liveness_checks:  # left out of every neighbour list meanwhile
                    self.vanishing.add(key)
                return True
        return False

    def _check_stale(self, nodes: Iterable[Node]) -> None:
        """Ping these contacts now (bounded); one that does not answer leaves the table."""
        for node in nodes:
            key = (node.ip, node.port)
            if key in self._liveness_checks or len(self._liveness_checks) >= MAX_LIVENESS_CHECKS:
                continue
            self._liveness_checks.add(key)
            if not self._start_task(lambda n=node, a=key: self._liveness_check(n, a)):
                self._liveness_checks.discard(key)
                return

    async def _liveness_check(self, node: Node, key: tuple[str, int]) -> None:
        try:
            await self.call_ping(node)
        finally:
            self._liveness_checks.discard(key)
            self.vanishing.discard(key)

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

    def _start_task(self, make: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run the coroutine `make()` returns as this protocol's task; False if no loop runs.

        The coroutine is made only once a running loop is known to take it: one made
        first and then refused (`ensure_future` without a running loop, as when a
        unit test drives the handler directly) was dropped never awaited.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        task = loop.create_task(make())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

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
