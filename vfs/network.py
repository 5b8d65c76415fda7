"""One node on the network: the DHT, the block server, LAN discovery, fetchers.

`dht/` knows nothing of drives; this module hands it what it needs per drive:
the discovery key, the drive secret the handshake proves, the signed head to
publish and the provider record to announce (per drive, never per block).
Every node that holds blocks of a drive serves them and announces itself,
so readers become seeders.

Everything runs in the nursery of `NetworkNode.run`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from cache.store import BlockStore
from dht.client import PeerConnection
from dht.errors import DhtError, NodeStoppedError
from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.kad import Dht
from dht.lan import DEFAULT_LAN_PORT, LanDiscovery
from dht.mirror_layout import MirrorUrlError, check_base_url
from dht.push import PushedSource
from dht.records import PROVIDER_REPUBLISH_INTERVAL, MutableRecord, ProviderRecord
from dht.server import PeerServer
from dht.types import PeerAddr, Priority

from .capability import StoreCap
from .errors import BlockUnavailable, UsageError

if TYPE_CHECKING:
    from dht.http_source import HttpSource

log = logging.getLogger(__name__)

DEFAULT_PORT = 4100
HEAD_POLL_INTERVAL = 2.0
# A mirror's head file is asked for at most this often (a conditional GET: a 304 when
# unchanged); the DHT and peers' notices bring new heads sooner where there are any.
MIRROR_HEAD_INTERVAL = 10.0
DHT_RPC_TIMEOUT = 1.0  # seconds: a dead DHT contact costs a lookup this once, then is skipped
# Blocks this node starts fetching or receives are announced to its clients (Holding) in
# one frame per drive for everything gathered over this long, not one frame per block
HOLDING_GATHER = 0.02
MAX_LAN_PEERS = 256  # LAN neighbours remembered per drive (soonest-expiring dropped first)
PORT_PICKS = 64  # kernel-picked TCP ports tried for one whose UDP twin is free too


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    try:
        value = int(port)
    except ValueError:
        raise UsageError(f"{text!r}: the port must be a number") from None
    if not 0 <= value <= 65535 or not host:
        raise UsageError(f"{text!r} is not HOST:PORT")
    return host, value


def local_address_towards(host: str) -> str | None:
    """The local address the kernel would use to reach `host` (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]
    return None


def pick_port(host: str, dht_host: str, picks: int = PORT_PICKS) -> int:
    """A port number free for both the block server (TCP on `host`) and the DHT (UDP on
    `dht_host`), for a node told to listen on port 0.

    A node listens on one number for both (provider records and LAN neighbours
    give one port). The kernel's pick of a free TCP port says nothing of UDP:
    on a busy machine its UDP twin can belong to any other process, and the
    node then died at start ("cannot listen for DHT traffic ... Address already
    in use"). Each pick whose UDP twin is taken stays bound until a good one is
    found, so the kernel offers another number every time. The probes close
    just before the node binds the number for real.
    """
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    held: list[socket.socket] = []
    try:
        for _ in range(picks):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((dht_host, port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    continue
            return port
    finally:
        for sock in held:
            sock.close()
    raise OSError(errno.EADDRINUSE, f"no port free for both TCP on {host} and UDP on "
                                    f"{dht_host} in {picks} picks")


@dataclass
class DriveServing:
    cap: StoreCap
    fetcher: Fetcher | None = None
    fetcher_starting: trio.Event | None = None  # set once a start in progress ends
    # node id -> (every address heard for it, when its record expires)
    lan_peers: dict[bytes, tuple[list[PeerAddr], float]] = field(default_factory=dict)
    on_head: Callable[[bytes], None] | None = None
    # static HTTP mirrors of the drive, by base URL: from its head, the config, --mirror
    mirrors: dict[str, HttpSource] = field(default_factory=dict)
    mirror_heads_checked: float = -1e9  # trio time of the last look at the mirrors' heads


def _mirror_source(base: str) -> HttpSource:
    """The HTTP client of one mirror. Its modules (dht.http_source, dht.http_connection,
    h11: 20-35 ms of CPU) are imported here, once a mirror is set, not with this
    module: most mounts have no mirror."""
    from dht.http_source import HttpSource

    return HttpSource(base)


def _replace_file(tmp: Path, path: Path, text: str) -> None:
    """Write `text` to `tmp`, then rename it over `path` (a worker thread: see
    NetworkNode._write_snapshots)."""
    tmp.write_text(text)
    tmp.replace(path)


class NetworkNode:
    def __init__(self, identity: NodeIdentity, store: BlockStore, *,
                 listen: tuple[str, int] = ("0.0.0.0", 0),
                 bootstrap: list[tuple[str, int]] | None = None,
                 lan: bool = True, lan_port: int = DEFAULT_LAN_PORT,
                 fetch_timeout: float = 20.0, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self.identity = identity
        self.store = store
        self.listen = listen
        self.bootstrap = bootstrap or []
        self.lan = lan
        self.lan_port = lan_port
        self.fetch_timeout = fetch_timeout
        self.dht = Dht(node_id=identity.node_id, rpc_timeout=DHT_RPC_TIMEOUT)
        # our DHT routing id is our node id, so a client whose connection broke is
        # also a DHT contact to check: a killed reader leaves routing tables at once
        self.server = PeerServer(identity, store, self._secret, may_serve=self._may_serve,
                                 in_flight=self._in_flight_block,
                                 scope_by_tag=hasattr(store, "is_member"),
                                 on_client_lost=self.dht.check_contact,
                                 on_client_joined=self._client_joined)
        self.drives: dict[bytes, DriveServing] = {}  # by discovery key
        # by discovery key: the drive's `BlockReader.open_verified`, handed to its fetcher's
        # connections and mirrors (`DriveFetch.open_with`): blocks decrypted in their threads
        self._openers: dict[bytes, Callable[[bytes, bytes], None]] = {}
        self.port: int | None = None
        self._nursery: trio.Nursery | None = None
        self._lan: LanDiscovery | None = None
        self._started_at: float | None = None
        # milestone -> seconds since `run` began (network up, DHT joined, head found, ready):
        # where a slow start went, in the status snapshot
        self.timings: dict[str, float] = {}
        self._announce_now = trio.Event()
        self._holding: dict[bytes, list[bytes]] = {}  # discovery key -> ids to announce
        self._fetching: dict[bytes, list[bytes]] = {}  # ... ids being fetched, to announce
        self._holding_added = trio.Event()
        self._lan_contacts_send, self._lan_contacts = trio.open_memory_channel[
            tuple[str, int]](64)
        # A peer that dials us and serves a drive over its connection (dht/push.py): taken
        # as one more source of that drive; its notices are heads, as from any peer.
        self.server.on_push = self._on_push
        self.server.push_notice = self._on_notice
        # Nodes we push to (their ids learnt on connecting): asked like providers, so this
        # node can count the copies they hold even if the DHT does not list them.
        self.push_peers: dict[bytes, PeerAddr] = {}
        # More sections for the status snapshot (hosting, pushes): name -> () -> JSON data
        self.snapshot_extra: dict[str, Callable[[], object]] = {}

    # -- lifecycle -------------------------------------------------------------------

    def mark(self, milestone: str) -> None:
        """Note when a start-up milestone was reached (the first time only)."""
        if self._started_at is not None and milestone not in self.timings:
            self.timings[milestone] = round(time.monotonic() - self._started_at, 3)

    def snapshot(self) -> dict:
        """What this node is doing, for `peerdrive status` and tests (plain JSON types)."""
        drives = {}
        for dk, d in self.drives.items():
            peers = []
            if d.fetcher is not None:
                mirror_ids = {src.source_id for src in d.mirrors.values()}
                for ps in d.fetcher.peer_stats():
                    if ps.node_id in mirror_ids:
                        continue
                    peers.append({"node_id": ps.node_id.hex(), "addr": ps.addr,
                                  "connected": ps.connected, "blocks": ps.blocks,
                                  "bytes": ps.bytes, "failures": ps.failures,
                                  "incidents": ps.incidents, "bad_blocks": ps.bad_blocks,
                                  "in_flight": ps.in_flight})
            stats = {ps.node_id: ps for ps in d.fetcher.peer_stats()} if d.fetcher else {}
            mirrors = []
            for url, src in d.mirrors.items():
                ps = stats.get(src.source_id)
                mirrors.append({"url": url, "requests": src.requests, "bytes": src.bytes,
                                "blocks": ps.blocks if ps else 0,
                                "failures": ps.failures if ps else 0,
                                "incidents": ps.incidents if ps else 0,
                                "bad_blocks": ps.bad_blocks if ps else 0})
            drives[d.cap.drive_id] = {"discovery_key": dk.hex(), "peers": peers,
                                      "mirrors": mirrors}
        st = self.server.stats
        return {
            "pid": os.getpid(),
            "node_id": self.identity.node_id.hex(),
            "port": self.port,
            "server": {"blocks_served": st.blocks_served, "bytes_served": st.bytes_served,
                       "connections_active": st.connections_active,
                       "not_found": st.not_found, "pushes_accepted": st.pushes_accepted,
                       "wants_received": st.wants_received, "runs_received": st.runs_received},
            "dht_contacts": len(self.dht.contacts()),
            "dht_storage": self.dht.storage.counts(),
            "timings": dict(self.timings),
            "drives": drives,
            "time": time.time(),
            **{name: section() for name, section in self.snapshot_extra.items()},
        }

    async def _write_snapshots(self) -> None:
        """Keep `run/<pid>.json` under the node's home current (once a second).

        The snapshot is taken on the event loop (it reads live state); the file is
        written and renamed into place in a worker thread: on ext4 the rename over
        the old file waits for the new one's data to reach the disk, which during a
        cold read (the store writing ~100 MB/s) held the loop, and every FUSE
        request and block with it, for tens of milliseconds a second (py-spy of a
        mirror read: 3% of the loop's samples in `Path.replace`, issue 12)."""
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"{os.getpid()}.json"
        try:
            while True:
                tmp = path.with_suffix(".tmp")
                text = json.dumps(self.snapshot())
                try:
                    await trio.to_thread.run_sync(_replace_file, tmp, path, text)
                except OSError as exc:
                    # a full disk (or a read-only home) costs the status its freshness,
                    # never the node: a mount must keep serving reads then
                    log.warning("status snapshot %s not written: %s", path, exc)
                await trio.sleep(1.0)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve, join the DHT and the LAN until cancelled.

        Call `leave` first for a clean stop; the DHT's contacts get a "bye"
        as it ends (they drop it from their routing tables instead of handing
        it out to newcomers).
        """
        host, port = self.listen
        dht_host = host if host not in ("", "::") else "0.0.0.0"
        self._started_at = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if port == 0:
                    port = pick_port(host, dht_host)
                self.port = await nursery.start(self.server.serve, host, port)
                self.mark("serving")
                await nursery.start(self.dht.run, dht_host, self.port, self.bootstrap)
                self.mark("dht_joined")
                await nursery.start(self._announcer)
                nursery.start_soon(self._announce_holding)
                if self.lan:
                    block_host = host if host not in ("", "0.0.0.0", "::") else None
                    self._lan = LanDiscovery(self.identity.private_key, self.lan_port,
                                             lambda: list(self.drives), self._on_lan_provider,
                                             block_port=self.port, block_host=block_host)
                    await nursery.start(self._lan.run)
                nursery.start_soon(self._write_snapshots)
                nursery.start_soon(self._join_lan_contacts)
                try:
                    task_status.started(self.port)
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        for d in self.drives.values():
                            for src in d.mirrors.values():
                                await src.aclose()
        finally:
            self._nursery = None

    async def leave(self, grace: float = 1.0) -> None:
        """Say Goodbye to every client before the node is cancelled (a clean stop).

        Their fetchers turn to other peers at once instead of finding out by a
        broken read; the DHT says "bye" to its contacts by itself as `run` ends.
        """
        with trio.move_on_after(grace):
            await self.server.say_goodbye()

    def addresses(self) -> list[tuple[str, int]]:
        """Where other nodes can reach this one, as announced in provider records."""
        assert self.port is not None
        host = self.listen[0]
        if host not in ("0.0.0.0", "", "::"):
            return [(host, self.port)]
        found: list[str] = []
        for bhost, _ in self.bootstrap:
            addr = local_address_towards(bhost)
            if addr and addr not in found:
                found.append(addr)
        if not found:
            found.append(local_address_towards("192.0.2.1") or "127.0.0.1")
        return [(a, self.port) for a in found]

    # -- drives ----------------------------------------------------------------------

    def _may_serve(self, dk: bytes, block_id: bytes) -> bool:
        """Serve a client of drive `dk` only blocks stored for that drive (issue 11 item 6).

        The store tags every block with the discovery key it was published,
        fetched or pinned for; without the tag a client that proved one drive
        could read any drive's ciphertext here by id, and probe with `have`
        which blocks of other drives this node holds. (A source without tags,
        a test double, serves everything.)
        """
        is_member = getattr(self.store, "is_member", None)
        return True if is_member is None else is_member(dk, block_id)

    async def _in_flight_block(self, dk: bytes, block_id: bytes, timeout: float) -> bytes | None:
        """A block of drive `dk` our fetcher for it announced (Holding) and is still fetching
        or just got: only that drive's fetcher is asked, so the drive scoping above holds."""
        d = self.drives.get(dk)
        if d is None or d.fetcher is None:
            return None
        return await d.fetcher.in_flight_block(block_id, timeout=timeout)

    def _client_joined(self, dk: bytes, node_id: bytes) -> None:
        """A reader we did not know of connected: it provides the drive too; look again."""
        d = self.drives.get(dk)
        if d is not None and d.fetcher is not None and not d.fetcher.knows(node_id):
            d.fetcher.request_provider_refresh()

    def _secret(self, dk: bytes) -> bytes | None:
        d = self.drives.get(dk)
        return d.cap.pubkey if d is not None else None

    def serve_drive(self, cap: StoreCap, on_head: Callable[[bytes], None] | None = None) -> None:
        """Serve and announce a drive; `on_head` receives head records peers push to us."""
        d = self.drives.get(cap.discovery_key)
        if d is None:
            self.drives[cap.discovery_key] = DriveServing(cap, on_head=on_head)
            self._announce_now.set()
            if self._lan is not None:
                self._lan.announce_now()  # neighbours learn of it now, not in 30 s
        elif on_head is not None:
            d.on_head = on_head

    def _provider_wires(self) -> list[bytes]:
        now = time.time()
        addrs = self.addresses()
        return [ProviderRecord.create(self.identity.private_key, dk, addrs, now=now)[1]
                for dk in self.drives]

    async def _announcer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """Announce every drive now, whenever one is added, and every
        PROVIDER_REPUBLISH_INTERVAL (20 min; its records live an hour)."""
        task_status.started()
        await self.dht.wait_started()
        while True:
            self._announce_now = trio.Event()
            for wire in self._provider_wires():
                try:
                    rec = ProviderRecord.decode(wire, now=time.time())
                    await self.dht.announce(rec.dk, wire)
                except DhtError as exc:
                    log.warning("announce failed: %s", exc)
            with trio.move_on_after(PROVIDER_REPUBLISH_INTERVAL):
                await self._announce_now.wait()

    def _on_lan_provider(self, record: ProviderRecord, peers: list[PeerAddr]) -> None:
        d = self.drives.get(record.dk)
        if d is None or record.node_id == self.identity.node_id:
            return
        if peers:
            # a LAN neighbour is a DHT node too (same port number): join through it,
            # so heads and other providers are found without any bootstrap address
            with contextlib.suppress(trio.WouldBlock):
                self._lan_contacts_send.send_nowait((peers[0].host, peers[0].port))
            known = d.lan_peers.get(record.node_id)
            d.lan_peers[record.node_id] = (peers, float(record.expires))
            if known is None and len(d.lan_peers) > MAX_LAN_PEERS:
                # bounded: the neighbour whose record expires soonest goes
                soonest = min(d.lan_peers, key=lambda n: d.lan_peers[n][1])
                del d.lan_peers[soonest]
            if d.fetcher is not None and (known is None or known[0] != peers):
                d.fetcher.request_provider_refresh()

    async def _join_lan_contacts(self) -> None:
        async for host, port in self._lan_contacts:
            try:
                if await self.dht.add_contacts([(host, port)]):
                    self._announce_now.set()  # our provider records can now reach someone
            except DhtError as exc:
                log.info("could not join the DHT through LAN peer %s:%d: %s", host, port, exc)

    async def providers(self, dk: bytes) -> list[PeerAddr]:
        """Every known peer holding drive `dk`: DHT providers and LAN neighbours, minus us.

        A node heard of in several ways is listed with every address heard
        (LAN first, then its DHT record's): the fetcher dials them all and
        keeps the one that answers, so one wrong address never hides a peer.
        """
        out: dict[bytes, list[PeerAddr]] = {}
        d = self.drives.get(dk)
        now = time.time()
        if d is not None:
            for node_id, (addrs, expires) in list(d.lan_peers.items()):
                if expires < now:
                    del d.lan_peers[node_id]
                else:
                    out[node_id] = list(addrs)
        try:
            for rec in await self.dht.find_providers(dk):
                listed = out.setdefault(rec.node_id, [])
                listed.extend(a for a in rec.to_peer_addrs() if a not in listed)
        except DhtError as exc:
            log.info("provider lookup failed: %s", exc)
        for node_id, addr in self.push_peers.items():  # hosts this node pushes to
            listed = out.setdefault(node_id, [])
            if addr not in listed:
                listed.append(addr)
        out.pop(self.identity.node_id, None)
        return [addr for addrs in out.values() for addr in addrs]

    async def _on_push(self, conn: PeerConnection) -> None:
        """A peer serves us a drive over the connection it dialled: fetch from it too."""
        d = self.drives.get(conn.discovery_key)
        if d is None:  # stopped serving it since the handshake
            await conn.aclose()
            return
        fetcher = await self.start_fetcher(d.cap)
        source = PushedSource(conn)
        fetcher.add_source(source, source.wait_closed)
        log.info("drive %s: %s pushes to us", d.cap.drive_id[:16], conn.addr)

    def _on_notice(self, dk: bytes, record: bytes) -> None:
        d = self.drives.get(dk)
        if d is not None and d.on_head is not None:
            d.on_head(record)

    # -- heads -----------------------------------------------------------------------

    async def publish_head(self, cap: StoreCap, wire: bytes) -> None:
        """Put a drive's signed head into the DHT and push it to connected readers."""
        try:
            await self.dht.put_mutable(wire)
        except DhtError as exc:
            log.warning("could not store the head in the DHT: %s", exc)
        await self.server.notify(cap.discovery_key, wire)

    async def lookup_head(self, cap: StoreCap) -> bytes | None:
        """The newest signed head found in the DHT or on the drive's mirrors (unchecked seq).

        Mirrors are asked at most every MIRROR_HEAD_INTERVAL seconds. Only a
        record signed by the drive's key counts; the caller's HeadTracker
        refuses anything older than what it holds (a stale mirror never rolls
        a reader back).
        """
        found: list[bytes] = []

        async def from_dht() -> None:
            try:
                rec = await self.dht.get_mutable(cap.discovery_key)
            except DhtError as exc:
                log.info("head lookup failed: %s", exc)
                return
            if rec is not None:
                found.append(rec.wire)

        async def from_mirror(src: HttpSource) -> None:
            try:
                wire = await src.fetch_record()
            except DhtError as exc:
                log.info("no head from mirror %s: %s", src.base_url, exc)
                return
            if wire is not None:
                found.append(wire)

        d = self.drives.get(cap.discovery_key)
        now = trio.current_time()
        ask_mirrors = d is not None and d.mirrors and (
            now - d.mirror_heads_checked >= MIRROR_HEAD_INTERVAL)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(from_dht)
            if ask_mirrors:
                d.mirror_heads_checked = now
                for src in list(d.mirrors.values()):
                    nursery.start_soon(from_mirror, src)
        best: tuple[int, bytes] | None = None
        for wire in found:
            try:
                rec = MutableRecord.decode(wire)
            except DhtError as exc:
                log.warning("ignored a head for drive %s: %s", cap.drive_id[:16], exc)
                continue
            if rec.pk == cap.pubkey and (best is None or rec.seq > best[0]):
                best = (rec.seq, wire)
        return best[1] if best is not None else None

    # -- mirrors ---------------------------------------------------------------------

    def set_mirrors(self, cap: StoreCap, urls: list[str] | tuple[str, ...]) -> None:
        """Fetch drive `cap` from these static HTTP mirrors too (and only these).

        Unusable URLs are logged and skipped; a mirror already in use keeps its
        connections and its standing with the fetcher.
        """
        d = self.drives[cap.discovery_key]
        wanted: dict[str, HttpSource] = {}
        for url in urls:
            try:
                base = check_base_url(url)
            except MirrorUrlError as exc:
                log.warning("mirror ignored: %s", exc)
                continue
            wanted[base] = d.mirrors.get(base) or _mirror_source(base)
        if list(wanted) == list(d.mirrors):
            return
        dropped = [src for url, src in d.mirrors.items() if url not in wanted]
        d.mirrors = wanted
        d.mirror_heads_checked = -1e9  # ask the new set for its head at the next lookup
        if d.fetcher is not None:
            d.fetcher.set_sources(wanted.values())  # closes the dropped ones
        elif self._nursery is not None:
            for src in dropped:
                self._nursery.start_soon(src.aclose)

    def mirrors_of(self, cap: StoreCap) -> list[str]:
        d = self.drives.get(cap.discovery_key)
        return list(d.mirrors) if d is not None else []

    # -- fetching --------------------------------------------------------------------

    async def _announce_holding(self) -> None:
        """Tell our clients what we fetch and what we got, HOLDING_GATHER's worth of blocks
        per frame (Fetching, Holding).

        A sequential reader fetches a block every few milliseconds; a Holding
        frame each was a TLS record and a send per block on this event loop
        (a tenth of a cold read's busy samples of it, py-spy). Readers of a
        swarm still learn of a block within HOLDING_GATHER of its request. A
        block fetched and delivered within one gathering is announced as held
        only.
        """
        while True:
            await self._holding_added.wait()
            await trio.sleep(HOLDING_GATHER)
            self._holding_added = trio.Event()
            gathered, self._holding = self._holding, {}
            fetching, self._fetching = self._fetching, {}
            for discovery_key, ids in fetching.items():
                held = set(gathered.get(discovery_key, ()))
                ids = [i for i in dict.fromkeys(ids) if i not in held]
                if ids:
                    self.server.announce_fetching(discovery_key, ids)
            for discovery_key, ids in gathered.items():
                self.server.announce_holding(discovery_key, list(dict.fromkeys(ids)))

    async def start_fetcher(self, cap: StoreCap) -> Fetcher:
        # A checkpoint first: a caller cancelled by the node's own stop (its last
        # thread call ignored the cancel) sees Cancelled here, not a stopped node.
        await trio.lowlevel.checkpoint()
        d = self.drives[cap.discovery_key]
        # concurrent first fetches wait for one fetcher instead of each starting their own
        while d.fetcher is None and d.fetcher_starting is not None:
            await d.fetcher_starting.wait()
        if d.fetcher is not None:
            return d.fetcher

        def notice(dk: bytes, record: bytes) -> None:
            if d.on_head is not None:
                d.on_head(record)

        dk = cap.discovery_key  # a SHA-256 each time it is read: not twice per block

        def holding(block_id: bytes) -> None:
            self._holding.setdefault(dk, []).append(block_id)
            self._holding_added.set()

        def fetching(block_id: bytes) -> None:
            self._fetching.setdefault(dk, []).append(block_id)
            self._holding_added.set()

        openers = self._openers

        def verified(block_id: bytes, data: bytes) -> None:
            # in a connection's receive thread or a mirror's fetch thread: the drive's
            # reader, if it has said it wants them (`DriveFetch.open_with`)
            opener = openers.get(dk)
            if opener is not None:
                opener(block_id, data)

        fetcher = Fetcher(self.identity, cap.discovery_key, cap.pubkey,
                          lambda: self.providers(cap.discovery_key), on_notice=notice,
                          on_holding=holding, on_fetching=fetching,
                          config=FetchConfig(default_timeout=self.fetch_timeout),
                          on_verified=verified)
        if self._nursery is None:
            raise NodeStoppedError("the node is not running: start it before fetching")
        d.fetcher_starting = starting = trio.Event()
        try:
            await self._nursery.start(fetcher.run)
            fetcher.set_sources(d.mirrors.values())
            d.fetcher = fetcher
        finally:
            d.fetcher_starting = None
            starting.set()
        return fetcher

    def fetch_function(self, cap: StoreCap) -> DriveFetch:
        """A `vfs.blocks.Fetch` for one drive: verified ciphertext, or BlockUnavailable."""
        return DriveFetch(self, cap)

    def announce_whole(self, cap: StoreCap, node_ids: list[bytes]) -> None:
        """Tell every client of this drive, now and as each connects, which trees this node
        keeps whole (a Whole frame; it replaces what was said before)."""
        self.server.announce_whole(cap.discovery_key, node_ids)

    async def whole_map(self, cap: StoreCap, timeout: float) -> dict[bytes, frozenset[bytes]]:
        """What each reachable holder of a drive keeps whole: id -> directory node ids.

        The providers (and nodes pushing to us) say so in their Whole frames
        (`Fetcher.whole_map`). A mirror says it with its head file:
        `peerdrive mirror` writes every block of a version before the head
        that names it, so a mirror whose head verifies keeps that version
        whole, its root directory included (a claim, like a Whole frame; a
        mirror whose head does not verify, or that does not answer within
        `timeout`, counts for nothing). Raises DhtError if the fetcher fails.
        """
        fetcher = await self.start_fetcher(cap)
        d = self.drives.get(cap.discovery_key)
        mirrors = list(d.mirrors.values()) if d is not None else []
        out: dict[bytes, frozenset[bytes]] = {}

        async def from_mirror(src: HttpSource) -> None:
            from .errors import PeerdriveError
            from .head import open_head

            with trio.move_on_after(timeout):
                try:
                    wire = await src.fetch_record()
                    if wire is not None:
                        out[src.source_id] = frozenset([open_head(wire, cap).root_block])
                except (DhtError, PeerdriveError) as exc:
                    log.info("mirror %s: no head to count: %s", src.base_url, exc)

        peers: dict[bytes, frozenset[bytes]] = {}
        failed: list[DhtError] = []

        async def from_peers() -> None:
            try:
                peers.update(await fetcher.whole_map(timeout=timeout))
            except DhtError as exc:  # raised as itself, not in a nursery's group
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(from_peers)
            for src in mirrors:
                nursery.start_soon(from_mirror, src)
        if failed:
            raise failed[0]
        return {**peers, **out}

    def whole_function(self, cap: StoreCap):
        """A `vfs.drive.WholeMap` for one drive: what each reachable holder announced
        (`whole_map`)."""

        async def whole(timeout: float) -> dict[bytes, frozenset[bytes]]:
            try:
                return await self.whole_map(cap, timeout)
            except DhtError as exc:
                log.info("asking peers what they hold whole failed: %s", exc)
                return {}

        return whole

    def holders_function(self, cap: StoreCap):
        """A `vfs.drive.Holders` for one drive: which blocks each reachable provider holds."""

        async def holders(block_ids: list[bytes], timeout: float) -> dict[bytes, list[bool]]:
            fetcher = await self.start_fetcher(cap)
            try:
                return await fetcher.have_map(block_ids, timeout=timeout)
            except DhtError as exc:
                log.info("asking peers which blocks they hold failed: %s", exc)
                return {}

        return holders


class DriveFetch:
    """A `vfs.blocks.Fetch` for one drive (`Network.fetch_function`), with `ahead`: the
    blocks a reader will want next, asked for together so they go to a peer in runs."""

    def __init__(self, net: NetworkNode, cap: StoreCap) -> None:
        self.net = net
        self.cap = cap

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        fetcher = await self.net.start_fetcher(self.cap)
        try:
            return await fetcher.fetch(block_id, priority)
        except DhtError as exc:
            raise BlockUnavailable(f"block {block_id.hex()[:16]}: {exc}") from exc

    async def batch(self, block_ids: list[bytes], priority: Priority,
                    deliver: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]]) -> None:
        """`Fetcher.fetch_batch` (a pin's blocks, a readahead window's: in runs, no task per
        block); BlockUnavailable on a stall."""
        fetcher = await self.net.start_fetcher(self.cap)
        try:
            await fetcher.fetch_batch(block_ids, priority, deliver)
        except DhtError as exc:
            raise BlockUnavailable(str(exc)) from exc

    def open_with(self, opener: Callable[[bytes, bytes], None]) -> None:
        """Blocks of this drive fetched from now on are handed to `opener(block_id,
        ciphertext)` in the thread that checked them against their id (the mount's
        `BlockReader.open_verified`: decrypted there, issue 12). One per drive: the
        mount's reader; other readers of the drive decrypt on the event loop."""
        self.net._openers[self.cap.discovery_key] = opener

    def probe_now(self) -> bool:
        """`Fetcher.probe_now`: backed-off sources probed at once (False: none to ask)."""
        d = self.net.drives.get(self.cap.discovery_key)
        return d is not None and d.fetcher is not None and d.fetcher.probe_now()

    def hurry(self, block_id: bytes, priority: Priority) -> bool:
        """`Fetcher.hurry`: a fetch in flight moved up to `priority` (False: none here)."""
        d = self.net.drives.get(self.cap.discovery_key)
        return d is not None and d.fetcher is not None and d.fetcher.hurry(block_id, priority)

    def stored(self, block_ids: list[bytes]) -> None:
        """These blocks were committed to the store: the fetcher's copies of them go."""
        d = self.net.drives.get(self.cap.discovery_key)
        if d is not None and d.fetcher is not None:
            d.fetcher.stored(block_ids)

    async def ahead(self, block_ids: list[bytes], priority: Priority, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """`Fetcher.fetch_ahead`: started once they are queued; never raises (a hint)."""
        try:
            fetcher = await self.net.start_fetcher(self.cap)
            await fetcher.fetch_ahead(block_ids, priority, task_status=task_status)
        except DhtError:
            # raised only before the blocks were queued (the node or its fetcher stopped):
            # the reads that follow say so
            task_status.started()
