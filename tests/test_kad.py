"""The Kademlia DHT on 127.0.0.1: verified storage, lookups, hostile datagrams and peers.

All nodes of a test run in this process, each on its own UDP port of 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from contextlib import asynccontextmanager
from functools import partial

import msgpack
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dht.errors import DhtError
from dht.kad import (
    MAX_DATAGRAM,
    TAG_MUTABLE,
    TAG_PROVIDER,
    Dht,
    KadError,
    RecordStorage,
    provider_key,
)
from dht.records import (
    MUTABLE_SIGNATURE_PREFIX,
    MutableRecord,
    ProviderRecord,
    RecordError,
    discovery_key,
)
from tests.helpers import run_trio

LOCAL = "127.0.0.1"
TEST_TIMEOUT = 25
RPC_TIMEOUT = 5.0  # generous: a stalled test machine must not look like a dead node


def pub(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def seed(i: int) -> bytes:
    return hashlib.sha256(b"kad test key %d" % i).digest()


def mutable(seed_bytes: bytes, seq: int, value: bytes = b"head") -> MutableRecord:
    return MutableRecord.create(seed_bytes, seq, value)[0]


def provider(seed_bytes: bytes, dk: bytes, port: int, now: float | None = None) -> ProviderRecord:
    now = time.time() if now is None else now
    return ProviderRecord.create(seed_bytes, dk, [(LOCAL, port)], now=now)[0]


def tag(t: int, wire: bytes) -> bytes:
    return bytes([t]) + wire


def forged_mutable(victim: bytes, signer: bytes, seq: int) -> bytes:
    """A record naming the victim's public key, signed by someone else."""
    body = msgpack.packb({"v": 1, "pk": pub(victim), "seq": seq, "value": b"evil"})
    sig = Ed25519PrivateKey.from_private_bytes(signer).sign(MUTABLE_SIGNATURE_PREFIX + body)
    return msgpack.packb([body, sig])


def run(async_fn) -> None:
    run_trio(lambda _nursery: async_fn(), TEST_TIMEOUT)


@asynccontextmanager
async def swarm(count: int, **kwargs):
    """`count` DHT nodes on 127.0.0.1, each bootstrapped from the first."""
    async with trio.open_nursery() as nursery:
        first = Dht(rpc_timeout=RPC_TIMEOUT, **kwargs)
        port = await nursery.start(first.run, LOCAL, 0, [])
        nodes = [first]
        for _ in range(count - 1):
            node = Dht(rpc_timeout=RPC_TIMEOUT, **kwargs)
            await nursery.start(node.run, LOCAL, 0, [(LOCAL, port)])
            nodes.append(node)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


async def raw_request(port: int, name, args, *, timeout: float = 5.0):
    """Send one RPC request the way a kademlia node would and return the decoded reply."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((LOCAL, 0))
        msg_id = os.urandom(20)
        await sock.sendto(b"\x00" + msg_id + msgpack.packb([name, args]), (LOCAL, port))
        with trio.fail_after(timeout):
            while True:
                data, _ = await sock.recvfrom(65536)
                if data[:1] == b"\x01" and data[1:21] == msg_id:
                    return msgpack.unpackb(data[21:])


async def raw_send(port: int, datagrams: list[bytes]) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((LOCAL, 0))
        for datagram in datagrams:
            await sock.sendto(datagram, (LOCAL, port))


# ============================================================ storage (no network)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_storage_mutable_rules():
    clock = Clock()
    store = RecordStorage(clock=clock)
    dk = discovery_key(pub(seed(1)))
    r1, r2, r2b = mutable(seed(1), 1), mutable(seed(1), 2), mutable(seed(1), 2, b"other")
    assert store.offer(dk, tag(TAG_MUTABLE, r1.wire))
    assert store.offer(dk, tag(TAG_MUTABLE, r2.wire))  # higher seq replaces
    assert not store.offer(dk, tag(TAG_MUTABLE, r1.wire))  # lower refused
    assert store.offer(dk, tag(TAG_MUTABLE, r2.wire))  # same bytes again: fine
    # equal seq, other bytes (a fork of two writers): the larger wire is kept, whichever
    # came first, as every reader orders them
    small, large = sorted((r2, r2b), key=lambda r: r.wire)
    for first, second in ((small, large), (large, small)):
        fork = RecordStorage(clock=clock)
        assert fork.offer(dk, tag(TAG_MUTABLE, first.wire))
        assert fork.offer(dk, tag(TAG_MUTABLE, second.wire)) == (second is large)
        assert fork.mutable(dk) == large


def test_storage_refuses_forged_misplaced_and_garbage():
    store = RecordStorage(clock=Clock())
    dk_a = discovery_key(pub(seed(1)))
    record_b = mutable(seed(2), 5)
    assert not store.offer(dk_a, tag(TAG_MUTABLE, record_b.wire))  # valid, wrong key
    assert not store.offer(dk_a, tag(TAG_MUTABLE, forged_mutable(seed(1), seed(2), 9)))
    for garbage in (b"", b"\x01", b"\x01garbage", b"\x07" + record_b.wire, os.urandom(300)):
        assert not store.offer(dk_a, garbage)
    assert not store.offer(b"short key", tag(TAG_MUTABLE, mutable(seed(1), 1).wire))
    with pytest.raises(RecordError):
        store[dk_a] = b"\x01junk"
    assert store.mutable(dk_a) is None
    assert len(store) == 0 and list(store) == []


def test_storage_key_spaces_are_separate():
    clock = Clock()
    store = RecordStorage(clock=clock)
    dk = discovery_key(pub(seed(1)))
    prov = provider(seed(3), dk, 4000, now=clock.now)
    # a provider record offered under the mutable key, and the reverse, are refused
    assert not store.offer(dk, tag(TAG_PROVIDER, prov.wire))
    assert not store.offer(provider_key(dk), tag(TAG_MUTABLE, mutable(seed(1), 1).wire))
    assert store.offer(provider_key(dk), tag(TAG_PROVIDER, prov.wire))
    assert store.offer(dk, tag(TAG_MUTABLE, mutable(seed(1), 1).wire))
    assert store.providers(provider_key(dk)) == [prov]
    assert store.mutable(dk).seq == 1
    assert provider_key(dk) != dk
    assert provider_key(dk) == hashlib.sha256(b"peerdrive providers" + dk).digest()


def test_storage_provider_sets_merge_and_expire():
    clock = Clock()
    store = RecordStorage(clock=clock, providers_per_key=3)
    dk = os.urandom(32)
    key = provider_key(dk)
    records = [provider(seed(10 + i), dk, 4000 + i, now=clock.now) for i in range(3)]
    for r in records:
        assert store.offer(key, tag(TAG_PROVIDER, r.wire))
    assert {r.node_id for r in store.providers(key)} == {r.node_id for r in records}
    # full of fresh records: a fourth node is refused, however late it expires (a set
    # spreads its places over sources and stale records instead: tests/test_records.py)
    clock.now += 10
    late = provider(seed(20), dk, 5000, now=clock.now)
    assert not store.offer(key, tag(TAG_PROVIDER, late.wire))
    # once the others' owners have missed two republishes, it takes a stale one's place
    clock.now += 2400
    late = provider(seed(20), dk, 5000, now=clock.now)
    assert store.offer(key, tag(TAG_PROVIDER, late.wire))
    assert len(store.providers(key)) == 3 and late in store.providers(key)
    clock.now += 3599
    assert store.providers(key) == [late]
    clock.now += 1
    assert store.providers(key) == [] and len(store) == 0
    # expired on arrival
    assert not store.offer(key, tag(TAG_PROVIDER, records[0].wire))


def test_storage_mutable_ttl_and_capacity():
    clock = Clock()
    store = RecordStorage(clock=clock, mutable_ttl=100, max_keys=2)
    recs = [mutable(seed(30 + i), 1) for i in range(3)]
    for r in recs:
        assert store.offer(r.key, tag(TAG_MUTABLE, r.wire))
        clock.now += 1
    assert store.mutable(recs[0].key) is None  # oldest evicted at capacity
    assert store.mutable(recs[2].key) == recs[2]
    assert [k for k, _ in store.iter_older_than(1.5)] == [recs[1].key]
    clock.now += 98.5  # recs[1] stored 100 s ago
    assert store.mutable(recs[1].key) is None
    assert store.offer(recs[2].key, tag(TAG_MUTABLE, recs[2].wire))  # re-store refreshes
    clock.now += 60
    assert store.mutable(recs[2].key) == recs[2]


def test_storage_reply_budget():
    clock = Clock()
    store = RecordStorage(clock=clock)
    dk = os.urandom(32)
    key = provider_key(dk)
    for i in range(20):
        assert store.offer(key, tag(TAG_PROVIDER, provider(seed(40 + i), dk, 1, clock.now).wire))
    values = store.values(key, budget=1000)
    assert 0 < len(values) < 20 and sum(len(v) for v in values) <= 1000
    assert len(store.values(key)) == 20


# ============================================================ nodes on 127.0.0.1


def test_run_reports_port_and_refuses_use_before_or_after():
    async def main():
        dht = Dht()
        with pytest.raises(KadError):
            await dht.get_mutable(b"k" * 32)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(dht.run, LOCAL, 0, [])
            assert isinstance(port, int) and port > 0 and dht.port == port
            with pytest.raises(KadError):
                await dht.find_providers(b"short")
            with pytest.raises(RecordError):
                await dht.announce(b"d" * 32, b"not a record")
            nursery.cancel_scope.cancel()
        with pytest.raises(KadError):
            await dht.put_mutable(mutable(seed(1), 1).wire)

    run(main)


def test_listen_on_a_taken_port_is_a_clear_error():
    async def main():
        taken = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with taken:
            await taken.bind((LOCAL, 0))
            port = taken.getsockname()[1]
            async with trio.open_nursery() as nursery:
                with pytest.raises(KadError, match="cannot listen"):
                    await nursery.start(Dht().run, LOCAL, port, [])
                with pytest.raises(KadError, match="IPv4"):
                    await nursery.start(Dht().run, "::1", 0, [])
                with pytest.raises(KadError, match="IPv4"):
                    await nursery.start(Dht().run, "localhost", 0, [])
                with pytest.raises(KadError, match="port"):
                    await nursery.start(Dht().run, LOCAL, 70000, [])
        assert issubclass(KadError, DhtError)

    run(main)


def test_put_get_highest_seq_wins_and_lower_is_refused():
    async def main():
        async with swarm(6) as nodes:
            r1, r2 = mutable(seed(1), 1, b"v1"), mutable(seed(1), 2, b"v2")
            assert await nodes[1].put_mutable(r1.wire) >= 5
            got = await nodes[4].get_mutable(r1.key)
            assert got == r1
            assert await nodes[2].put_mutable(r2.wire) >= 5
            assert await nodes[3].put_mutable(r1.wire) == 0  # every node holds seq 2
            for node in nodes:
                assert (await node.get_mutable(r1.key)) == r2
            assert nodes[5].lookup_stats.kind == "mutable"
            assert await nodes[0].get_mutable(discovery_key(pub(seed(99)))) is None

    run(main)


def test_lookup_returns_newest_not_most_common_and_repairs():
    async def main():
        async with swarm(6) as nodes:
            old, new = mutable(seed(2), 1), mutable(seed(2), 7)
            assert await nodes[0].put_mutable(old.wire) >= 5
            # only one node learns of seq 7 (as if the others missed the store)
            assert nodes[3].storage.offer(new.key, tag(TAG_MUTABLE, new.wire))
            assert await nodes[5].get_mutable(new.key) == new
            # the lookup pushed the newest record to the close nodes that were stale
            for node in nodes:
                if node is not nodes[5]:
                    assert node.storage.mutable(new.key) == new

    run(main)


def test_forged_misplaced_and_garbage_stores_are_refused_over_the_wire():
    async def main():
        async with swarm(3) as nodes:
            target = nodes[1]
            dk_a = discovery_key(pub(seed(1)))
            honest = mutable(seed(1), 3)
            assert await nodes[0].put_mutable(honest.wire) >= 3
            me = os.urandom(32)
            cases = [
                tag(TAG_MUTABLE, forged_mutable(seed(1), seed(2), 100)),  # forged signature
                tag(TAG_MUTABLE, mutable(seed(2), 100).wire),  # valid record, wrong key
                tag(TAG_MUTABLE, mutable(seed(1), 2).wire),  # rollback
                tag(TAG_PROVIDER, provider(seed(3), dk_a, 1).wire),  # wrong key space
                b"\x01" + os.urandom(200),
                b"",
            ]
            for value in cases:
                assert await raw_request(target.port, "store", [me, dk_a, value]) is False
            target._server.protocol.forget(me)  # the raw client is gone: spare lookups a timeout
            assert target.storage.mutable(dk_a) == honest
            assert await nodes[2].get_mutable(dk_a) == honest
            newer = mutable(seed(1), 4)
            assert await raw_request(target.port, "store",
                                     [me, dk_a, tag(TAG_MUTABLE, newer.wire)]) is True

    run(main)


def test_providers_from_three_nodes_are_all_found():
    async def main():
        async with swarm(7) as nodes:
            dk = os.urandom(32)
            announced = []
            for i in range(3):
                record = provider(seed(50 + i), dk, 7000 + i)
                assert await nodes[i].announce(dk, record.wire) >= 6
                announced.append(record)
            for node in nodes:
                found = await node.find_providers(dk)
                assert {r.node_id for r in found} == {r.node_id for r in announced}
                assert {p.port for r in found for p in r.to_peer_addrs()} == {7000, 7001, 7002}
            # a provider only one node knows of is still part of the union
            extra = provider(seed(60), dk, 7100)
            assert nodes[6].storage.offer(provider_key(dk), tag(TAG_PROVIDER, extra.wire))
            found = await nodes[2].find_providers(dk)
            assert len(found) == 4 and extra in found
            stats = nodes[2].lookup_stats
            assert stats.kind == "providers" and stats.hops is not None and stats.values >= 4
            with pytest.raises(RecordError):  # a record for another key is the caller's bug
                await nodes[0].announce(os.urandom(32), extra.wire)

    run(main)


def test_garbage_datagrams_never_crash_a_node():
    async def main():
        async with swarm(3) as nodes:
            victim = nodes[1]
            own_id = victim.node_id
            nid, key = os.urandom(32), os.urandom(32)

            def req(body) -> bytes:
                return b"\x00" + os.urandom(20) + msgpack.packb(body)

            datagrams = [
                b"",
                b"\x00",
                os.urandom(21),
                os.urandom(500),
                b"\x00" + os.urandom(20) + b"\xc1",  # never-used msgpack byte
                b"\x00" + os.urandom(20) + b"\x91" * 5000,  # nesting far too deep
                b"\x00" + os.urandom(20) + b"\xdd\xff\xff\xff\xff",  # huge array header
                req("just a string"),
                req(["stun", [nid]]),
                req(["__init__", [nid]]),
                req(["ping", []]),
                req(["ping", [b"short id"]]),
                req(["ping", [own_id]]),
                req(["ping", [nid], "extra"]),
                req(["store", [nid, key, "text, not bytes"]]),
                req(["store", [nid, key, b"\x01" + b"x" * (MAX_DATAGRAM - 100)]]),
                req(["find_node", [nid, b"x" * 31]]),
                req(["find_value", [nid, 12345]]),
                req([b"ping", [nid]]),
                req({"ping": [nid]}),
                b"\x01" + os.urandom(20) + msgpack.packb([[nid, LOCAL, 1]]),  # unsolicited
                b"\x07" + os.urandom(20) + msgpack.packb(None),
                os.urandom(MAX_DATAGRAM + 1),
                b"\x00" * 60000,
            ]
            await raw_send(victim.port, datagrams)
            # the node still answers, and still stores and serves records
            with trio.fail_after(10):
                while victim.dropped_datagrams < len(datagrams) - 2:
                    await trio.sleep(0.05)
            assert await raw_request(victim.port, "ping", [nid]) == own_id
            victim._server.protocol.forget(nid)  # the raw client is gone: spare lookups a timeout
            record = mutable(seed(5), 1)
            assert await victim.put_mutable(record.wire) >= 3
            assert await nodes[2].get_mutable(record.key) == record
            contact_ids = {c[0] for c in victim.contacts()}
            assert own_id not in contact_ids

    run(main)


async def fake_node(reply_for, *, task_status=trio.TASK_STATUS_IGNORED):
    """A UDP endpoint that answers every kademlia request with `reply_for(name, args)`."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((LOCAL, 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65536)
            name, args = msgpack.unpackb(data[21:])
            reply = reply_for(name, args)
            await sock.sendto(b"\x01" + data[1:21] + msgpack.packb(reply), addr)


@pytest.mark.parametrize("mode", ["garbage contacts", "forged values", "misplaced values"])
def test_a_node_that_answers_garbage_is_ignored(mode):
    liar_id = os.urandom(32)
    honest = mutable(seed(7), 5)
    other = mutable(seed(8), 50)
    dk = honest.key

    def reply_for(name, args):
        if name == "ping":
            return liar_id
        if name == "store":
            return True
        if mode == "garbage contacts":
            bogus = [[b"x", "not an ip", 0], [os.urandom(32), "evil.example.org", 1]]
            return bogus if name == "find_node" else {"values": [], "nodes": bogus}
        if name == "find_node":
            return []
        if mode == "forged values":
            value = tag(TAG_MUTABLE, forged_mutable(seed(7), seed(9), 999))
        else:
            value = tag(TAG_MUTABLE, other.wire)
        return {"values": [value], "nodes": []}

    async def main():
        async with swarm(3) as nodes, trio.open_nursery() as nursery:
            liar_port = await nursery.start(fake_node, reply_for)
            newcomer = Dht(rpc_timeout=RPC_TIMEOUT)
            await nursery.start(newcomer.run, LOCAL, 0, [(LOCAL, liar_port), (LOCAL, nodes[0].port)])
            assert await nodes[1].put_mutable(honest.wire) >= 3
            assert await newcomer.get_mutable(dk) == honest
            assert liar_id not in {c[0] for c in newcomer.contacts()}
            nursery.cancel_scope.cancel()

    run(main)


def test_keep_announcing_and_mutable_republish():
    async def main():
        dk = os.urandom(32)
        calls = []

        def get_records():
            calls.append(time.time())
            return [provider(seed(70), dk, 9000).wire]

        async with swarm(3, mutable_republish_interval=0.2) as nodes, \
                trio.open_nursery() as nursery:
            await nursery.start(partial(nodes[0].keep_announcing, get_records, interval=0.1))
            while len(calls) < 2:  # fresh records are asked for every round
                await trio.sleep(0.01)
            while not await nodes[2].find_providers(dk):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
            assert (await nodes[2].find_providers(dk))[0].addrs == ((LOCAL, 9000),)

            # a node re-stores the records it put, so they come back after being dropped
            record = mutable(seed(71), 1)
            assert await nodes[1].put_mutable(record.wire) >= 3
            for node in nodes:
                node.storage._mutable.clear()
            while nodes[2].storage.mutable(record.key) is None:
                await trio.sleep(0.05)
            assert nodes[2].storage.mutable(record.key) == record

    run(main)


def test_a_lookup_in_flight_when_the_node_stops_fails_with_kad_error():
    silent_id = os.urandom(32)

    def reply_for(name, args):
        if name == "ping":
            return silent_id
        if name == "find_node":
            return []
        return None  # find_value: answered below by never replying

    asked = trio.Event()  # the lookup is in flight: its find_value reached the silent node

    async def silent_on_find_value(*, task_status=trio.TASK_STATUS_IGNORED):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind((LOCAL, 0))
            task_status.started(sock.getsockname()[1])
            while True:
                data, addr = await sock.recvfrom(65536)
                name, args = msgpack.unpackb(data[21:])
                if name == "find_value":
                    asked.set()
                else:
                    reply = msgpack.packb(reply_for(name, args))
                    await sock.sendto(b"\x01" + data[1:21] + reply, addr)

    async def main():
        async with trio.open_nursery() as outer:
            silent_port = await outer.start(silent_on_find_value)
            dht = Dht(rpc_timeout=30.0)
            outcome = []
            lookup_done = trio.Event()

            async def lookup():
                try:
                    await dht.find_providers(os.urandom(32))
                except KadError as exc:
                    outcome.append(exc)
                finally:
                    lookup_done.set()

            async with trio.open_nursery() as nursery:
                await nursery.start(dht.run, LOCAL, 0, [(LOCAL, silent_port)])
                assert dht.contacts()
                outer.start_soon(lookup)  # outside the node's nursery: not cancelled with it
                with trio.fail_after(25):  # below the 30 s RPC timeout: still in flight
                    await asked.wait()
                nursery.cancel_scope.cancel()
            await lookup_done.wait()
            assert len(outcome) == 1 and "stopped" in str(outcome[0])
            outer.cancel_scope.cancel()

    run(main)


def test_a_node_whose_contacts_all_vanished_bootstraps_again():
    async def main():
        async with swarm(4) as nodes:
            dk = os.urandom(32)
            record = provider(seed(80), dk, 9100)
            assert await nodes[1].announce(dk, record.wire) >= 4
            lonely = nodes[3]
            lonely._server.protocol.router.flush()  # as if every contact had timed out
            lonely.storage._providers.clear()
            assert lonely.contacts() == []
            assert await lonely.find_providers(dk) == [record]
            assert lonely.contacts()

    run(main)
