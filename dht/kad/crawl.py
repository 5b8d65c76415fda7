"""Iterative lookups: bounded node and record crawls that ignore peers answering garbage."""

from __future__ import annotations

import asyncio
import heapq
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, ValueSpiderCrawl
from kademlia.node import Node, NodeHeap

from dht.records import (
    RecordError,
)

from .limits import CRAWL_HEAP_LIMIT, MAX_CRAWL_ROUNDS
from .protocol import PeerdriveProtocol

log = logging.getLogger(__name__)

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


class _BoundedCrawl(ABC):
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

    @abstractmethod
    def _take(self, responses: dict[bytes, Any]) -> None:
        """Fold one round's answers into the crawl: the hook each crawl defines
        (CheckedNodeSpiderCrawl: verified contacts; RecordSpiderCrawl: records too)."""

    def _drop_peer(self, peerid: bytes, answered: bool, toremove: list[bytes]) -> None:
        """A peer that did not answer leaves this lookup; one that answered garbage also
        leaves the routing table and is never asked or listed again by this lookup."""
        if answered:
            self.protocol.forget(peerid)
            self.ignored.add(peerid)
        toremove.append(peerid)


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
                self._drop_peer(peerid, answered, toremove)
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
                self._drop_peer(peerid, answered, toremove)
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
