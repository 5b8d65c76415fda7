"""A stored head's 24 h lifetime, seen on a virtual clock (no soak).

A DHT node drops a drive's signed head (a mutable record) `MUTABLE_STORE_TTL`
(24 h, scaled by `PEERDRIVE_TIME_SCALE`) after it was last stored, and the
node that put it re-stores the newest one every `MUTABLE_REPUBLISH_INTERVAL`
(1 h) while it runs (docs/dht.md, "Expiry and republish"). Every node that
holds a drive puts the head it verified: the publisher, a reader's mount, and
a host's serve (vfs/node.py: `_serve_main.sync_drives` puts the head of every
drive in its store, hosted ones included), so the head outlives its
publisher as long as one of them runs, and no longer.
tests/test_uptime.py runs real processes for less than the scaled 24 h, so it
never sees a head expire; here the storage lifetime runs on a clock the test
moves by hours at once (`Dht(clock=...)`), while the re-stores run on their
real timer made short. Each step waits for the re-store it needs (polled, a
generous bound), never on a timer's count.
"""

from __future__ import annotations

import trio

from dht.kad import Dht
from dht.kad.limits import MUTABLE_STORE_TTL
from tests.test_kad import LOCAL, RPC_TIMEOUT, Clock, mutable, run, seed

TTL = MUTABLE_STORE_TTL  # 24 h (the test process runs unscaled)
REPUBLISH = 0.05  # real seconds between re-stores (1 h in a node)
STEP = 0.75 * TTL  # the clock moves this far at once: less than a lifetime


async def start(nursery: trio.Nursery, clock: Clock, bootstrap: list[int], *,
                rpc_timeout: float = RPC_TIMEOUT) -> tuple[Dht, trio.CancelScope]:
    """A DHT node on the test's clock, and the scope that stops it (cleanly: it says bye)."""
    node = Dht(rpc_timeout=rpc_timeout, clock=clock, mutable_republish_interval=REPUBLISH)
    scope = trio.CancelScope()

    async def run_node(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(LOCAL, 0, [(LOCAL, port) for port in bootstrap], task_status=task_status)

    await nursery.start(run_node)
    return node, scope


async def restored(nodes: list[Dht], key: bytes) -> None:
    """Until each of `nodes` holds `key` stored (or re-stored) since the clock last moved."""
    with trio.fail_after(30):
        while any(key in dict(n.storage.iter_older_than(STEP / 2)) or n.storage.mutable(key) is None
                  for n in nodes):
            await trio.sleep(REPUBLISH / 2)


def test_a_head_lives_on_past_its_lifetime_while_its_publisher_runs() -> None:
    head = mutable(seed(90), 1)

    async def main() -> None:
        clock = Clock()
        async with trio.open_nursery() as nursery:
            publisher, _ = await start(nursery, clock, [])
            storing = [(await start(nursery, clock, [publisher.port]))[0] for _ in range(3)]
            assert await publisher.put_mutable(head.wire) >= 3
            for _ in range(3):  # 54 h: three re-stores, each before the last copy expired
                clock.now += STEP
                await restored(storing, head.key)
            reader, _ = await start(nursery, clock, [storing[0].port])
            assert await reader.get_mutable(head.key) == head
            nursery.cancel_scope.cancel()

    run(main)


def test_a_head_nobody_restores_is_gone_a_lifetime_after_its_publisher_left() -> None:
    head = mutable(seed(91), 1)

    async def main() -> None:
        clock = Clock()
        async with trio.open_nursery() as nursery:
            publisher, stop_publisher = await start(nursery, clock, [])
            storing = [(await start(nursery, clock, [publisher.port]))[0] for _ in range(3)]
            # (its lookup may still ask the publisher gone: a short wait for that answer;
            # the storages below say what the lookup's None means)
            reader, _ = await start(nursery, clock, [storing[0].port], rpc_timeout=0.5)
            assert await publisher.put_mutable(head.wire) >= 3
            stop_publisher.cancel()
            clock.now += TTL - 1  # a second short of a day: every copy is still there
            assert all(n.storage.mutable(head.key) == head for n in storing)
            clock.now += 2
            assert all(n.storage.mutable(head.key) is None for n in [*storing, reader])
            assert await reader.get_mutable(head.key) is None
            nursery.cancel_scope.cancel()

    run(main)


def test_a_host_keeps_the_head_found_past_its_lifetime_when_the_publisher_is_gone() -> None:
    """The promise of docs/dht.md: any node holding the drive puts the head it verified,
    which keeps it alive while the owner is offline. Here the DHT is the host alone once
    the publisher left (the host's own copy is re-stored, as a node re-stores locally
    when it has fewer than k contacts), and a reader that knows only the host finds the
    head two days later."""
    head = mutable(seed(92), 1)

    async def main() -> None:
        clock = Clock()
        async with trio.open_nursery() as nursery:
            publisher, stop_publisher = await start(nursery, clock, [])
            host, _ = await start(nursery, clock, [publisher.port])
            assert await publisher.put_mutable(head.wire) >= 2
            got = await host.get_mutable(head.key)  # the host verifies the head it holds...
            assert got == head
            assert await host.put_mutable(got.wire) >= 1  # ...and puts it, as its serve does
            stop_publisher.cancel()
            for _ in range(3):
                clock.now += STEP
                await restored([host], head.key)
            reader, _ = await start(nursery, clock, [host.port])
            assert await reader.get_mutable(head.key) == head
            nursery.cancel_scope.cancel()

    run(main)
