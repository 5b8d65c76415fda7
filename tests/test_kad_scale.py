"""The DHT at scale: 200 nodes on 127.0.0.1 in one process; every provider lookup must succeed.

Writes one JSON line with the lookup figures (median hops, rounds and nodes
contacted) to stdout and to the test report (junit `record_property`).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time

import trio

from dht.kad import Dht
from dht.records import MutableRecord, ProviderRecord

NODES = 200
LOOKUPS = 20
LOCAL = "127.0.0.1"
RPC_TIMEOUT = 10.0  # all nodes share one process: a stalled machine must not look like loss


def test_provider_lookups_in_a_200_node_dht(record_property, capsys):
    rng = random.Random(20240601)
    figures: dict[str, object] = {}

    async def main():
        nodes: list[Dht] = []
        async with trio.open_nursery() as nursery:
            # generous: 200 nodes and their asyncio loops share one process here; each new
            # contact also answers a verification ping (docs/dht.md), ~2x the datagrams of a join
            with trio.fail_after(240):
                started = time.monotonic()
                first = Dht(rpc_timeout=RPC_TIMEOUT)
                await nursery.start(first.run, LOCAL, 0, [])
                nodes.append(first)

                async def join() -> None:
                    contacts = [(LOCAL, n.port) for n in rng.sample(nodes, min(3, len(nodes)))]
                    node = Dht(rpc_timeout=RPC_TIMEOUT)
                    await nursery.start(node.run, LOCAL, 0, contacts)
                    nodes.append(node)

                while len(nodes) < NODES:  # join in small waves, as a network would grow
                    async with trio.open_nursery() as wave:
                        for _ in range(min(10, NODES - len(nodes))):
                            wave.start_soon(join)
                join_seconds = time.monotonic() - started

                hops, rounds, contacted = [], [], []
                for i in range(LOOKUPS):
                    announcer, seeker = rng.sample(nodes, 2)
                    dk = os.urandom(32)
                    _, wire = ProviderRecord.create(
                        os.urandom(32), dk, [(LOCAL, 10_000 + i)], now=time.time()
                    )
                    assert await announcer.announce(dk, wire) >= 10
                    found = await seeker.find_providers(dk)
                    assert [r.wire for r in found] == [wire], f"lookup {i} failed"
                    stats = seeker.lookup_stats
                    hops.append(stats.hops)
                    rounds.append(stats.rounds)
                    contacted.append(stats.contacted)

                for _ in range(5):
                    writer, reader = rng.sample(nodes, 2)
                    record, wire = MutableRecord.create(os.urandom(32), 3, b"head")
                    assert await writer.put_mutable(wire) >= 10
                    assert await reader.get_mutable(record.key) == record

                figures.update(
                    test="dht_provider_lookup_scale",
                    nodes=len(nodes),
                    lookups=LOOKUPS,
                    succeeded=LOOKUPS,
                    median_hops=statistics.median(hops),
                    max_hops=max(hops),
                    median_rounds=statistics.median(rounds),
                    median_nodes_contacted=statistics.median(contacted),
                    join_seconds=round(join_seconds, 2),
                )
            nursery.cancel_scope.cancel()

    trio.run(main)
    line = json.dumps(figures, sort_keys=True)
    record_property("dht_scale", line)
    with capsys.disabled():
        print(line)
