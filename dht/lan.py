"""LAN discovery: find peers on the local network by UDP multicast, without the DHT.

Two machines at home that share a drive should sync over the LAN even when
the DHT is unreachable (or slower). Every node periodically multicasts, with
TTL 1 so it never leaves the link, signed `ProviderRecord`s for the discovery
keys it holds (discovery keys only: drive keys never go on the wire), and
listens for the records of others. Each record is verified like one from the
DHT; a datagram is bounded in size and anything malformed is dropped.

The datagram codec (`encode_lan_datagrams` / `decode_lan_datagram`) is pure;
`LanDiscovery` is the trio task around a socket. The caller switches LAN
discovery off by simply not starting it.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dht.errors import DhtError
from dht.records import MAX_PROVIDER_WIRE, ProviderRecord, RecordError, RecordExpired
from dht.timescale import scaled, scaled_int
from dht.types import PeerAddr

log = logging.getLogger(__name__)

DEFAULT_GROUP = "239.255.77.77"
"""Administratively scoped (site-local) IPv4 multicast group used for announcements."""

DEFAULT_LAN_PORT = 45777
"""Default UDP port of the multicast group."""

LAN_MAGIC = b"peerdrive-lan"
LAN_VERSION = 1

LAN_DATAGRAM_TARGET = 1400
"""Announcements are packed into datagrams of at most this many bytes (one Ethernet frame)."""

MAX_LAN_DATAGRAM = 4096
"""Largest datagram accepted; larger ones are dropped unread."""

MAX_RECORDS_PER_DATAGRAM = 32

LAN_ANNOUNCE_INTERVAL = scaled(30.0)  # dht/timescale.py
"""Seconds between two announcements of a node."""

LAN_RECORD_TTL = max(scaled_int(120), 4 * scaled_int(30))
"""Lifetime of a LAN provider record: four announce intervals (also when scaled: a
scale's 1 s floor must not leave a record living no longer than its renewal)."""

_NEWCOMER_REPLY_GAP = 1.0
_MAX_SEEN = 1024

LAN_DATAGRAMS_PER_SECOND = 10.0
LAN_DATAGRAM_BURST = 40.0
"""Datagrams one source address may have verified (each holds up to 32 signatures to check).

An honest node sends one burst every 30 s (one datagram per 32 drives); a
neighbour flooding the group must not turn our CPU into its signature checker.
"""
_MAX_SOURCES = 256


class LanError(DhtError):
    """A LAN discovery datagram is malformed, or LAN discovery cannot start."""


# --------------------------------------------------------------------------- codec


def _frame(wires: list[bytes]) -> bytes:
    return msgpack.packb([LAN_MAGIC, LAN_VERSION, wires], use_bin_type=True)


def encode_lan_datagrams(
    wires: Iterable[bytes], max_size: int = LAN_DATAGRAM_TARGET
) -> list[bytes]:
    """Pack provider-record wires into as few datagrams as fit `max_size` bytes each.

    A record too large to share a datagram is sent alone (it is at most
    `MAX_PROVIDER_WIRE` bytes, which always fits `MAX_LAN_DATAGRAM`).
    """
    datagrams: list[bytes] = []
    batch: list[bytes] = []
    for wire in wires:
        if len(wire) > MAX_PROVIDER_WIRE:
            raise LanError(f"a provider record of {len(wire)} bytes is too large to announce")
        candidate = [*batch, wire]
        if batch and (len(_frame(candidate)) > max_size
                      or len(candidate) > MAX_RECORDS_PER_DATAGRAM):
            datagrams.append(_frame(batch))
            batch = [wire]
        else:
            batch = candidate
    if batch:
        datagrams.append(_frame(batch))
    return datagrams


def decode_lan_datagram(data: bytes, *, now: float) -> tuple[list[ProviderRecord], int]:
    """Verified provider records in a datagram, and how many records in it were refused.

    Raises `LanError` if the datagram itself is not a peerdrive announcement.
    Expired, forged or malformed records are refused one by one (counted, not
    returned), so one bad record does not hide the good ones beside it.
    """
    if len(data) > MAX_LAN_DATAGRAM:
        raise LanError(f"a {len(data)}-byte datagram is larger than {MAX_LAN_DATAGRAM}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on hostile input
        raise LanError(f"not a peerdrive LAN datagram ({type(exc).__name__})") from None
    if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == LAN_MAGIC):
        raise LanError("not a peerdrive LAN datagram")
    version, wires = obj[1], obj[2]
    if type(version) is not int or version != LAN_VERSION:
        raise LanError(f"unsupported LAN discovery version {version!r}")
    if not isinstance(wires, list) or len(wires) > MAX_RECORDS_PER_DATAGRAM:
        raise LanError("a LAN datagram carries a bounded list of records")
    records: list[ProviderRecord] = []
    refused = 0
    for wire in wires:
        try:
            if not isinstance(wire, bytes):
                raise RecordError("a record is a byte string")
            records.append(ProviderRecord.decode(wire, now=now))
        except RecordExpired:
            refused += 1
        except RecordError as exc:
            refused += 1
            log.debug("refused a LAN provider record: %s", exc)
    return records, refused


def peers_seen_from(record: ProviderRecord, source_host: str) -> list[PeerAddr]:
    """Where to dial the provider of a LAN record: what it advertises, then where it was heard.

    The advertised addresses are where its block server listens (a server
    bound to one address advertises that one); the datagram's source address,
    with each advertised port, follows as a fallback for a provider whose
    advertised address is not reachable from this link. Every address is
    dialled (the fetcher keeps the one that answers): a wrong one is a failed
    dial of that address, never a failed peer, and TLS key pinning (to
    `record.node_id`) makes it never a wrong peer.
    """
    node_id = record.node_id
    out: list[PeerAddr] = list(dict.fromkeys(record.to_peer_addrs()))
    for _, port in record.addrs:
        candidate = PeerAddr(node_id, source_host, port)
        if candidate not in out:
            out.append(candidate)
    return out


# --------------------------------------------------------------------------- trio task


def _private_key(key: Ed25519PrivateKey | bytes) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, bytes) and len(key) == 32:
        return Ed25519PrivateKey.from_private_bytes(key)
    raise LanError("the node key is an Ed25519 private key or its 32 raw bytes")


class LanDiscovery:
    """Announce this node's discovery keys on the LAN and report the providers heard.

    - `private_key`: the node's Ed25519 identity key (object or 32 raw bytes);
      records are signed with it, so their node id is the one TLS pins.
    - `port`: UDP port of the multicast group.
    - `get_discovery_keys()`: the discovery keys this node serves, asked before
      every announcement.
    - `on_provider(record, peers)`: called (synchronously, from the receive
      task) for every valid record of another node; `peers` lists where to dial
      it, the datagram's source address first.
    - `block_port`: the TCP port of this node's block server, advertised.
    - `block_host`: the address the block server listens on, when it listens
      on one address (say 127.0.0.1): advertised instead of the interface's,
      which would be refused there. None: it listens on every address.
    - `interface`: the IPv4 address of the interface to use ("0.0.0.0": the one
      the routing table picks for the group).
    """

    def __init__(
        self,
        private_key: Ed25519PrivateKey | bytes,
        port: int,
        get_discovery_keys: Callable[[], Iterable[bytes]],
        on_provider: Callable[[ProviderRecord, list[PeerAddr]], Any],
        *,
        block_port: int,
        block_host: str | None = None,
        interface: str = "0.0.0.0",
        group: str = DEFAULT_GROUP,
        interval: float = LAN_ANNOUNCE_INTERVAL,
        record_ttl: int = LAN_RECORD_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = _private_key(private_key)
        self._pk = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if type(port) is not int or not 1 <= port <= 65535:
            raise LanError(f"LAN discovery port {port!r} is not in 1..65535")
        if type(block_port) is not int or not 1 <= block_port <= 65535:
            raise LanError(f"block port {block_port!r} is not in 1..65535")
        for name, address in (("interface", interface), ("group", group)):
            try:
                socket.inet_aton(address)
            except OSError:
                raise LanError(f"LAN discovery {name} must be an IPv4 address, "
                               f"not {address!r}") from None
        self._port = port
        self._get_discovery_keys = get_discovery_keys
        self._on_provider = on_provider
        self._block_port = block_port
        self._block_host = block_host
        self._interface = interface
        self._group = group
        self._interval = interval
        self._record_ttl = record_ttl
        self._clock = clock
        self._wake = trio.Event()
        self._last_announce = float("-inf")
        self._seen: dict[bytes, float] = {}
        self.advertised_host: str | None = None
        self.refused_records = 0
        self.dropped_datagrams = 0
        self.rate_limited = 0  # datagrams dropped unverified: their source sent too many
        self._rates: dict[str, tuple[float, float]] = {}

    def announce_now(self) -> None:
        """Announce at once instead of at the next interval (e.g. after a drive was added)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the group, then announce and listen until cancelled."""
        self.advertised_host = self._block_host or await self._local_address()
        sock = await self._open_socket()
        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce_forever, sock)
                nursery.start_soon(self._receive_forever, sock)
                task_status.started()

    async def _local_address(self) -> str:
        """The address peers should dial: the chosen interface, or the one routing picks."""
        if self._interface != "0.0.0.0":
            return self._interface
        probe = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with probe:
            try:
                await probe.connect((self._group, self._port))  # sends nothing
            except OSError as exc:
                raise LanError(
                    f"no route to the LAN discovery group {self._group}: {exc.strerror}; "
                    "pass the interface address to use"
                ) from exc
            return probe.getsockname()[0]

    async def _open_socket(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # bound to the group address: unicast to this port is not ours to read
            await sock.bind((self._group, self._port))
            membership = socket.inet_aton(self._group) + socket.inet_aton(self._interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if self._interface != "0.0.0.0":
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                socket.inet_aton(self._interface))
        except OSError as exc:
            sock.close()
            raise LanError(
                f"cannot join LAN discovery group {self._group}:{self._port} on "
                f"{self._interface}: {exc.strerror or exc}"
            ) from exc
        return sock

    def _records(self) -> list[bytes]:
        assert self.advertised_host is not None
        now = self._clock()
        wires = []
        for dk in dict.fromkeys(self._get_discovery_keys()):
            _, wire = ProviderRecord.create(self._key, dk, [(self.advertised_host,
                                                             self._block_port)],
                                            now=now, ttl=self._record_ttl)
            wires.append(wire)
        return wires

    async def _announce_forever(self, sock: trio.socket.SocketType) -> None:
        while True:
            self._wake = trio.Event()
            self._last_announce = trio.current_time()
            for datagram in encode_lan_datagrams(self._records()):
                try:
                    await sock.sendto(datagram, (self._group, self._port))
                except OSError as exc:  # a LAN that comes and goes is normal
                    level = logging.DEBUG if exc.errno == errno.ENETUNREACH else logging.INFO
                    log.log(level, "LAN announcement not sent: %s", exc)
            with trio.move_on_after(self._interval):
                await self._wake.wait()
            # woken early (a newcomer, announce_now): still at most one burst per gap
            await trio.sleep_until(self._last_announce + _NEWCOMER_REPLY_GAP)

    def _within_rate(self, host: str) -> bool:
        """Take one datagram from `host`'s token bucket (LRU-bounded table of sources)."""
        now = trio.current_time()
        level, last = self._rates.pop(host, (LAN_DATAGRAM_BURST, now))
        level = min(LAN_DATAGRAM_BURST, level + (now - last) * LAN_DATAGRAMS_PER_SECOND)
        ok = level >= 1
        self._rates[host] = (level - 1 if ok else level, now)
        if len(self._rates) > _MAX_SOURCES:
            del self._rates[next(iter(self._rates))]
        return ok

    async def _receive_forever(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, source = await sock.recvfrom(MAX_LAN_DATAGRAM + 1)
            self.receive(data, source[0])

    def receive(self, data: bytes, source_host: str) -> None:
        """Handle one datagram heard from `source_host` (the receive task's work, testable)."""
        if not self._within_rate(source_host):
            self.rate_limited += 1
            return
        try:
            records, refused = decode_lan_datagram(data, now=self._clock())
        except LanError as exc:
            self.dropped_datagrams += 1
            log.debug("dropped a LAN datagram from %s: %s", source_host, exc)
            return
        self.refused_records += refused
        for record in records:
            if record.pk == self._pk:
                continue  # our own announcement, looped back
            self._note_sender(record.node_id)
            self._on_provider(record, peers_seen_from(record, source_host))

    def _note_sender(self, node_id: bytes) -> None:
        """Answer a node heard for the first time at once, so newcomers learn of us quickly."""
        now = trio.current_time()
        last = self._seen.get(node_id)
        self._seen[node_id] = now
        if len(self._seen) > _MAX_SEEN:
            oldest = min(self._seen, key=self._seen.__getitem__)
            del self._seen[oldest]
        if last is None or now - last > 3 * self._interval:
            self._wake.set()
