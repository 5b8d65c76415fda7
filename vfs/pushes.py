"""Pushing this node's drives to nodes that can be dialled, from behind NAT (`--push`).

`serve --push HOST:PORT` and `mount --push HOST:PORT` (repeatable, or `push =
[...]` in config.toml) keep one outbound push connection (`dht/push.py`) per
target and drive this node serves, so a host on the internet can fetch from a
publisher it could never dial. Each connection is redialled with backoff
while the target is unreachable; none of this is on the path of publishing.

The targets' node ids, learnt as they connect, are also asked as providers
(`NetworkNode.push_peers`), so this node counts the copies they hold
(`copies`, `publish --wait-copies`) even when the DHT does not list them.
"""

from __future__ import annotations

import trio

from dht.push import PushStatus, PushTarget, keep_pushing
from dht.types import PeerAddr

from .capability import StoreCap
from .errors import UsageError
from .network import NetworkNode, parse_hostport
from .storage import DriveStorage


def parse_push_target(text: str) -> PushTarget:
    """`HOST:PORT`, or `NODEID@HOST:PORT` to pin the target's key (64 hex digits)."""
    node_id = None
    if "@" in text:
        pin, _, text = text.partition("@")
        try:
            node_id = bytes.fromhex(pin)
        except ValueError:
            node_id = None
        if node_id is None or len(node_id) != 32:
            raise UsageError(f"{pin!r} is not a node id (64 hex digits) in --push NODEID@HOST:PORT")
    host, port = parse_hostport(text)
    return PushTarget(host, port, node_id)


class Pushes:
    """One push connection per (target, drive), each in its own task of `run`'s nursery."""

    def __init__(self, net: NetworkNode, storage: DriveStorage, targets: list[PushTarget]) -> None:
        self.net = net
        self.storage = storage
        self.targets = targets
        self.statuses: dict[tuple[PushTarget, bytes], PushStatus] = {}
        self._nursery: trio.Nursery | None = None
        self._waiting: list[StoreCap] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for cap in self._waiting:
                self.add_drive(cap)
            self._waiting.clear()
            task_status.started()
            await trio.sleep_forever()

    def add_drive(self, cap: StoreCap) -> None:
        """Push `cap`'s drive to every target from now on (again: no change)."""
        if self._nursery is None:
            self._waiting.append(cap)
            return
        for target in self.targets:
            key = (target, cap.pubkey)
            if key in self.statuses:
                continue
            status = self.statuses[key] = PushStatus(target)

            def connected(node_id: bytes, target: PushTarget = target) -> None:
                self.net.push_peers[node_id] = PeerAddr(node_id, target.host, target.port)

            self._nursery.start_soon(lambda c=cap, s=status, cb=connected: keep_pushing(
                self.net.server, s, c.discovery_key, c.pubkey,
                notice=lambda: self.storage.head_wire(c.pubkey), on_connected=cb))

    def snapshot(self) -> list[dict]:
        return [{"target": str(target), "drive": pubkey.hex(), "connected": s.connected,
                 "node_id": s.node_id.hex() if s.node_id else None, "sessions": s.sessions,
                 "failures": s.failures, "last_error": s.last_error,
                 "retry_in": round(s.retry_in, 1)}
                for (target, pubkey), s in self.statuses.items()]
