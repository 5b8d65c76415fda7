"""The DHT's datagram handling without sockets: hostile input never raises, replies stay bounded.

These drive `PeerdriveProtocol._handle_datagram` directly (below the last-resort
catch in `datagram_received`), so a parsing gap shows up as an exception here.
"""

from __future__ import annotations

import gc
import os
import time
import warnings

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node

from dht.kad import (
    MAX_DATAGRAM,
    TAG_PROVIDER,
    PeerdriveProtocol,
    RecordStorage,
    provider_key,
)
from dht.records import ProviderRecord

SENDER = ("127.0.0.1", 40000)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name, default=None):
        return default


def make_protocol() -> tuple[PeerdriveProtocol, FakeTransport]:
    protocol = PeerdriveProtocol(Node(os.urandom(32)), RecordStorage(), 20, wait_timeout=1.0)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def request(name, args) -> bytes:
    return b"\x00" + os.urandom(20) + msgpack.packb([name, args])


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
keyish = st.binary(min_size=32, max_size=32) | msgpack_values


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=2000))
def test_prop_arbitrary_datagrams_never_raise(data):
    protocol, transport = make_protocol()
    protocol._handle_datagram(data, SENDER)
    protocol._handle_datagram(b"\x00" + data, SENDER)
    protocol._handle_datagram(b"\x01" + data, SENDER)
    assert len(protocol.storage) == 0
    assert all(len(d) <= MAX_DATAGRAM for d, _ in transport.sent)


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(["ping", "store", "find_node", "find_value", "stun", "_timeout"])
    | st.text(max_size=12) | msgpack_values,
    args=st.lists(keyish, max_size=4) | msgpack_values,
)
def test_prop_arbitrary_requests_never_raise(name, args):
    protocol, transport = make_protocol()
    try:
        datagram = request(name, args)
    except (TypeError, ValueError, OverflowError):
        return
    protocol._handle_datagram(datagram, SENDER)
    assert len(protocol.storage) == 0  # nothing unsigned is ever stored
    for data, addr in transport.sent:
        assert addr == SENDER and data[:1] == b"\x01" and len(data) <= MAX_DATAGRAM


@settings(max_examples=300, deadline=None)
@given(payload=msgpack_values)
def test_prop_reply_parsers_return_none_or_checked_contacts(payload):
    protocol, _ = make_protocol()
    nodes = protocol.parse_nodes(payload)
    assert nodes is None or all(len(n.id) == 32 and 1 <= n.port <= 65535 for n in nodes)
    parsed = protocol.parse_find_value(payload)
    assert parsed is None or all(isinstance(v, bytes) for v in parsed[0])


def test_find_value_reply_with_largest_provider_records_fits_a_datagram():
    protocol, transport = make_protocol()
    dk = os.urandom(32)
    key = provider_key(dk)
    now = time.time()
    for i in range(20):
        wire = ProviderRecord.create(os.urandom(32), dk, [("h" * 253, 65535)] * 4, now=now,
                                     ttl=3600 - i)[1]
        assert protocol.storage.offer(key, bytes([TAG_PROVIDER]) + wire)
    # the asking node must also be known for a full contact list
    for _ in range(30):
        protocol.router.add_contact(Node(os.urandom(32), "127.0.0.1", 30000))
    # the asker is a contact (so its address is verified and it gets a full reply)
    asker = os.urandom(32)
    protocol.router.add_contact(Node(asker, *SENDER))
    protocol._handle_datagram(request("find_value", [asker, key]), SENDER)
    (reply, addr), = transport.sent
    assert addr == SENDER and len(reply) <= MAX_DATAGRAM
    body = msgpack.unpackb(reply[21:])
    assert 0 < len(body["values"]) < 20  # trimmed to the budget, latest-expiring first
    records = [ProviderRecord.decode(v[1:], now=now) for v in body["values"]]
    assert [r.expires for r in records] == sorted((r.expires for r in records), reverse=True)
    assert len(body["nodes"]) == 20


def _nearest_by_scan(protocol, target: Node, k: int = 20) -> list[bytes]:
    contacts = [n for b in protocol.router.buckets for n in b.get_nodes() if n.id != target.id]
    return [n.id for n in sorted(contacts, key=target.distance_to)[:k]]


def test_neighbours_of_a_key_at_the_right_end_come_from_the_whole_table():
    """A sparse right end: the package's bucket walk stopped there and returned nothing.

    Our id is all zeros and every contact is near it, so the table splits into
    buckets down the left end and those towards the right end stay empty. The
    package walked from the key's bucket alternately left and right and gave up
    once the right side ran out, one bucket later: a key at the right end got no
    neighbours at all from a table of 40 contacts, so its lookup asked nobody.
    """
    protocol = PeerdriveProtocol(Node(bytes(32)), RecordStorage(), 20, wait_timeout=1.0)
    for i in range(1, 41):
        protocol.router.add_contact(Node((i << 100).to_bytes(32, "big"), "127.0.0.1", 30000 + i))
    assert len(protocol.router.buckets) > 3
    for key in (2**256 - 1, 2**255, 2**254 + 5):
        target = Node(key.to_bytes(32, "big"))
        got = [n.id for n in protocol.router.find_neighbors(target)]
        assert len(got) == 20
        assert got == _nearest_by_scan(protocol, target)


@settings(max_examples=200, deadline=None)
@given(
    own=st.sampled_from([bytes(32), b"\xff" * 32]) | st.binary(min_size=32, max_size=32),
    shifts=st.lists(st.integers(0, 255), min_size=1, max_size=120),
    target_shift=st.integers(0, 256),
    seed=st.binary(min_size=32, max_size=32),
)
def test_prop_neighbours_are_the_k_nearest_contacts(own, shifts, target_shift, seed):
    """Whatever the table's shape, `find_neighbors` is the k nearest contacts by XOR."""
    protocol = PeerdriveProtocol(Node(own), RecordStorage(), 20, wait_timeout=1.0)
    base = int.from_bytes(own, "big")
    noise = int.from_bytes(seed, "big")
    for i, shift in enumerate(shifts):  # contacts at every depth, many near our own id
        distance = ((noise * (i + 1)) % 2**256) >> shift or 1
        protocol.router.add_contact(Node((base ^ distance).to_bytes(32, "big"), "127.0.0.1",
                                         1000 + i))
    target = Node((base ^ (noise >> target_shift)).to_bytes(32, "big"))
    got = [n.id for n in protocol.router.find_neighbors(target)]
    assert got == _nearest_by_scan(protocol, target)


def test_a_valid_request_is_answered_and_its_sender_learned_only_once_verified():
    protocol, transport = make_protocol()
    sender_id = os.urandom(32)
    protocol._handle_datagram(request("ping", [sender_id]), SENDER)
    (reply, _), = transport.sent
    assert msgpack.unpackb(reply[21:]) == protocol.source_node.id
    # the source address of one datagram proves nothing: not a contact on its word
    assert [n.id for b in protocol.router.buckets for n in b.get_nodes()] == []
    protocol._mark_verified(SENDER)  # as when it answers one of our requests
    protocol._handle_datagram(request("ping", [sender_id]), SENDER)
    assert [n.id for b in protocol.router.buckets for n in b.get_nodes()] == [sender_id]


def test_a_sender_checked_without_a_running_loop_leaves_no_task_nor_coroutine():
    """Driven without an event loop, the handler skips the verification ping cleanly.

    It used to make the `_verify` coroutine first and hand it to `ensure_future`,
    which either refused it (no loop: the coroutine was dropped, "never awaited",
    seen in clean-clone runs) or queued it on a loop that never runs.
    """
    protocol, _ = make_protocol()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        protocol._handle_datagram(request("ping", [os.urandom(32)]), SENDER)
        protocol._check_stale([Node(os.urandom(32), "127.0.0.1", 40001)])
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert not protocol._tasks
    assert not protocol._verifying and not protocol._liveness_checks
