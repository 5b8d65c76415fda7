"""`Dht`: one DHT node for trio code.

Rule: only this class is called from trio. Everything else in this package
is asyncio code (the `kademlia` package, subclassed) running on this node's
trio-asyncio loop; `Dht` crosses into it with `loop.run_aio_coroutine` (its
`_aio`) and never lets an asyncio object escape to trio callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import trio
import trio_asyncio

from dht.errors import DhtError
from dht.records import (
    PROVIDER_REPUBLISH_INTERVAL,
    MutableRecord,
    ProviderRecord,
    ProviderSet,
    RecordError,
    RecordExpired,
    newest_mutable,
)

from .crawl import LookupStats
from .keys import KadError, _check_dk, _is_key, _tag, provider_key
from .limits import (
    BOOTSTRAP_RETRY_INTERVAL,
    KEY_LEN,
    MAX_LOOKUP_PROVIDERS,
    MUTABLE_REPUBLISH_INTERVAL,
    REFRESH_INTERVAL,
    TAG_MUTABLE,
    TAG_PROVIDER,
)
from .protocol import _valid_ip
from .server import DhtServer
from .storage import RecordStorage

log = logging.getLogger(__name__)

T = TypeVar("T")


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
