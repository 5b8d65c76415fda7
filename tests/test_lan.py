"""LAN discovery: the datagram codec (pure) and two nodes finding each other by multicast.

The multicast test runs both nodes as separate processes inside a network
namespace this test creates (loopback with a route for 239.0.0.0/8), so the
host's interfaces and routes are never touched. This file is also the program
those processes run (``python test_lan.py peer ...``).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.errors import DhtError
from dht.lan import (
    LAN_DATAGRAM_TARGET,
    MAX_LAN_DATAGRAM,
    MAX_RECORDS_PER_DATAGRAM,
    LanDiscovery,
    LanError,
    decode_lan_datagram,
    encode_lan_datagrams,
    peers_seen_from,
)
from dht.records import ProviderRecord
from dht.types import PeerAddr

NOW = 1_700_000_000
GROUP = "239.255.77.77"


def record(i: int, dk: bytes = b"d" * 32, now: float = NOW, ttl: int = 120, host="10.0.0.5"):
    seed = i.to_bytes(32, "big")
    return ProviderRecord.create(seed, dk, [(host, 4000 + i)], now=now, ttl=ttl)[0]


# ---------------------------------------------------------------- codec


def test_round_trip_packs_records_into_frame_sized_datagrams():
    records = [record(i, dk=bytes([i]) * 32) for i in range(1, 40)]
    datagrams = encode_lan_datagrams(r.wire for r in records)
    assert len(datagrams) > 1
    assert all(len(d) <= LAN_DATAGRAM_TARGET for d in datagrams)
    decoded = []
    for d in datagrams:
        got, refused = decode_lan_datagram(d, now=NOW)
        assert refused == 0 and len(got) <= MAX_RECORDS_PER_DATAGRAM
        decoded.extend(got)
    assert decoded == records
    assert encode_lan_datagrams([]) == []


def test_large_record_goes_alone_and_fits():
    big = ProviderRecord.create(b"\x01" * 32, b"d" * 32, [("h" * 253, 1)] * 4, now=NOW)[0]
    datagrams = encode_lan_datagrams([big.wire, big.wire])
    assert len(datagrams) == 2
    assert all(len(d) <= MAX_LAN_DATAGRAM for d in datagrams)
    assert all(decode_lan_datagram(d, now=NOW) == ([big], 0) for d in datagrams)
    with pytest.raises(LanError):
        encode_lan_datagrams([b"x" * 5000])


def test_bad_records_are_refused_one_by_one():
    good = record(1)
    expired = record(2, now=NOW - 1000, ttl=60)
    forged = bytearray(record(3).wire)
    forged[-1] ^= 1
    datagram = msgpack.packb([b"peerdrive-lan", 1, [good.wire, expired.wire, bytes(forged),
                                                    "text", b"junk"]])
    records, refused = decode_lan_datagram(datagram, now=NOW)
    assert records == [good] and refused == 4


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"\xc1",
        msgpack.packb([b"other-magic", 1, []]),
        msgpack.packb([b"peerdrive-lan", 2, []]),
        msgpack.packb([b"peerdrive-lan", True, []]),
        msgpack.packb([b"peerdrive-lan", 1, b"not a list"]),
        msgpack.packb([b"peerdrive-lan", 1, [b""] * (MAX_RECORDS_PER_DATAGRAM + 1)]),
        msgpack.packb({"peerdrive-lan": 1}),
        b"\x00" * (MAX_LAN_DATAGRAM + 1),
    ],
)
def test_malformed_datagrams_raise_lan_error(datagram):
    with pytest.raises(LanError):
        decode_lan_datagram(datagram, now=NOW)
    assert issubclass(LanError, DhtError)


def test_peers_seen_from_lists_the_advertised_addresses_then_the_source():
    # a server bound to one address advertises it; the datagram's source (the
    # interface multicast went out of) is only a fallback: issue 9
    r = ProviderRecord.create(b"\x05" * 32, b"d" * 32, [("10.0.0.5", 4000), ("10.9.9.9", 4001)],
                              now=NOW)[0]
    peers = peers_seen_from(r, "192.168.1.20")
    assert peers == [
        PeerAddr(r.node_id, "10.0.0.5", 4000),
        PeerAddr(r.node_id, "10.9.9.9", 4001),
        PeerAddr(r.node_id, "192.168.1.20", 4000),
        PeerAddr(r.node_id, "192.168.1.20", 4001),
    ]
    assert peers_seen_from(r, "10.0.0.5") == [
        PeerAddr(r.node_id, "10.0.0.5", 4000),
        PeerAddr(r.node_id, "10.9.9.9", 4001),
        PeerAddr(r.node_id, "10.0.0.5", 4001),
    ]


def test_constructor_checks_arguments():
    def nothing(*_):
        return []

    with pytest.raises(LanError):
        LanDiscovery(b"short", 45777, nothing, nothing, block_port=1)
    with pytest.raises(LanError):
        LanDiscovery(b"\x01" * 32, 0, nothing, nothing, block_port=1)
    with pytest.raises(LanError):
        LanDiscovery(b"\x01" * 32, 45777, nothing, nothing, block_port=70000)
    with pytest.raises(LanError):
        LanDiscovery(b"\x01" * 32, 45777, nothing, nothing, block_port=1, interface="eth0")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=MAX_LAN_DATAGRAM + 10))
def test_prop_arbitrary_bytes_raise_only_lan_error(data):
    try:
        records, _ = decode_lan_datagram(data, now=NOW)
    except LanError:
        return
    assert records == []


_GOOD_DATAGRAM = encode_lan_datagrams([record(1).wire, record(2).wire])[0]


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(_GOOD_DATAGRAM) - 1), flip=st.integers(1, 255))
def test_prop_byte_flips_never_yield_an_unsigned_record(index, flip):
    mutated = bytearray(_GOOD_DATAGRAM)
    mutated[index] ^= flip
    originals = {record(1), record(2)}
    try:
        records, _ = decode_lan_datagram(bytes(mutated), now=NOW)
    except LanError:
        return
    assert set(records) <= originals


# ---------------------------------------------------------------- multicast in a netns


def _peer_main(seed_hex: str, dk_hex: str, block_port: str, lan_port: str) -> None:
    """Run one LAN discovery node on 127.0.0.1, printing what it hears as JSON lines."""
    import trio

    async def main() -> None:
        def on_provider(rec: ProviderRecord, peers: list[PeerAddr]) -> None:
            print(json.dumps({"event": "provider", "node_id": rec.node_id.hex(),
                              "dk": rec.dk.hex(), "peers": [[p.host, p.port] for p in peers]}),
                  flush=True)

        lan = LanDiscovery(bytes.fromhex(seed_hex), int(lan_port), lambda: [bytes.fromhex(dk_hex)],
                           on_provider, block_port=int(block_port), interface="127.0.0.1",
                           interval=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(lan.run)
            print(json.dumps({"event": "ready", "host": lan.advertised_host}), flush=True)
            last = None
            while True:
                now = (lan.refused_records, lan.dropped_datagrams)
                if now != last:
                    print(json.dumps({"event": "stats", "refused": now[0], "dropped": now[1]}),
                          flush=True)
                    last = now
                await trio.sleep(0.1)

    trio.run(main)


def _garbage_main(lan_port: str) -> None:
    """Send hostile datagrams to the group: garbage, oversize, a forged and an expired record."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    forged = bytearray(ProviderRecord.create(b"\x66" * 32, b"f" * 32, [("127.0.0.1", 9)],
                                             now=time.time())[1])
    forged[-3] ^= 0x40
    expired = ProviderRecord.create(b"\x67" * 32, b"f" * 32, [("127.0.0.1", 9)],
                                    now=time.time() - 1000, ttl=60)[1]
    for datagram in (
        os.urandom(300),
        b"\x00" * 5000,
        msgpack.packb([b"peerdrive-lan", 1, [bytes(forged), expired]]),
    ):
        sock.sendto(datagram, (GROUP, int(lan_port)))
    sock.close()


class Lines:
    """Non-blocking reader of JSON lines from several child processes."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffers = {name: b"" for name in procs}
        for name, proc in procs.items():
            os.set_blocking(proc.stdout.fileno(), False)
            self.selector.register(proc.stdout, selectors.EVENT_READ, name)

    def read(self, timeout: float) -> list[tuple[str, dict]]:
        out = []
        for key, _ in self.selector.select(timeout):
            chunk = key.fileobj.read()
            if not chunk:
                continue
            self.buffers[key.data] += chunk
            *lines, self.buffers[key.data] = self.buffers[key.data].split(b"\n")
            out.extend((key.data, json.loads(line)) for line in lines if line.strip())
        return out


@pytest.mark.netns
def test_two_nodes_find_each_other_by_multicast_in_a_netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    from tests.netns_helpers import in_netns  # here: this file is also the peers' program
    ns = f"pdlan-{os.getpid()}-{os.urandom(3).hex()}"
    lan_port = "45777"
    seeds = {"a": b"\x0a" * 32, "b": b"\x0b" * 32}
    dks = {"a": b"\xaa" * 32, "b": b"\xbb" * 32}
    node_ids = {name: record_node_id(seed) for name, seed in seeds.items()}
    procs: dict[str, subprocess.Popen] = {}
    created = False
    try:
        made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
        created = True
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "set", "lo", "multicast", "on"],
                    ["ip", "route", "add", "239.0.0.0/8", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True)
        for name, block_port in (("a", "4001"), ("b", "4002")):
            procs[name] = subprocess.Popen(
                in_netns(ns, sys.executable, __file__, "peer",
                         seeds[name].hex(), dks[name].hex(), block_port, lan_port),
                stdout=subprocess.PIPE,
            )
        lines = Lines(procs)
        heard: dict[str, dict] = {}
        stats = {"a": {"refused": 0, "dropped": 0}, "b": {"refused": 0, "dropped": 0}}
        ready = set()
        garbage_at: float | None = None  # seconds from the start until it was sent
        # A bound only a hang breaks: three interpreters start (two peers, then the
        # garbage sender), each importing this file, which at load 30 on two cores
        # takes seconds apiece; 40 s for all of it was a timing, not a hang check.
        started = time.monotonic()
        deadline = started + 120
        while time.monotonic() < deadline:
            for name, event in lines.read(0.2):
                if event["event"] == "ready":
                    assert event["host"] == "127.0.0.1"
                    ready.add(name)
                elif event["event"] == "provider":
                    heard.setdefault(name, {})[event["node_id"]] = event
                elif event["event"] == "stats":
                    stats[name] = event
            if ready == {"a", "b"} and garbage_at is None:
                subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "garbage",
                                lan_port], check=True, timeout=120)
                garbage_at = time.monotonic() - started
            both_heard = all(node_ids[o].hex() in heard.get(n, {})
                             for n, o in (("a", "b"), ("b", "a")))
            garbage_seen = all(s["refused"] >= 2 and s["dropped"] >= 2 for s in stats.values())
            if both_heard and garbage_seen:
                break
            for name, proc in procs.items():
                assert proc.poll() is None, f"LAN peer {name} exited with {proc.returncode}"
        else:
            pytest.fail(f"LAN discovery incomplete after {time.monotonic() - started:.0f} s: "
                        f"ready={sorted(ready)} garbage sent at {garbage_at} heard={heard} "
                        f"stats={stats}")
        event = heard["a"][node_ids["b"].hex()]
        assert event["dk"] == dks["b"].hex()
        assert event["peers"][0] == ["127.0.0.1", 4002]
        assert heard["b"][node_ids["a"].hex()]["dk"] == dks["a"].hex()
        # only the two real nodes were ever reported: never the forged or expired one
        assert set(heard["a"]) == {node_ids["b"].hex()}
        assert set(heard["b"]) == {node_ids["a"].hex()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
        if created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def record_node_id(seed: bytes) -> bytes:
    return ProviderRecord.create(seed, b"d" * 32, [("127.0.0.1", 1)], now=NOW)[0].node_id


if __name__ == "__main__":
    if sys.argv[1] == "peer":
        _peer_main(*sys.argv[2:])
    elif sys.argv[1] == "garbage":
        _garbage_main(*sys.argv[2:])
