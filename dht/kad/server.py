"""The package's `Server`, listening without timers (trio drives upkeep) and storing records."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from .crawl import CheckedNodeSpiderCrawl, LookupStats, RecordSpiderCrawl
from .keys import _is_key
from .protocol import PeerdriveProtocol
from .storage import RecordStorage


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
