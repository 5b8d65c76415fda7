"""How many other holders keep a whole version of each drive a `serve` process serves.

`peerdrive publish --wait-copies N` and `peerdrive status` read it from the
node's status snapshot. Nodes say which trees they keep whole with Whole
frames (dht/frames.py), pushed to every client as it connects and whenever
it changes: a reader's complete pins, a publisher's or host's complete
versions, each named by its top directory node id; a version's root
directory node id is its head's root block, which a serve (holding only the
store capability) knows too. So counting asks no question per block: every
provider this node knows (the DHT's, LAN neighbours, the targets it pushes
to, the nodes pushing to it: a host behind a publisher's push can dial
nobody else) is pinged, and those that announced the head's root block
count, and so does each mirror whose signed head names the version
(`NetworkNode.whole_map`). Hosted drives are counted like published ones.
This node is not among them: `status` adds it when it holds the version
whole, as the `copies` xattr adds the device it is read on.
Counted every FAST_INTERVAL seconds for FAST_PERIOD after a new version
(while hosts are fetching it), every SLOW_INTERVAL after that.

The serve announces its own whole versions the same way: once per version,
when every block of it is here (`version_presence`, from the block list, in
a worker thread), looked at again every OWN_RECHECK seconds until then.
"""

from __future__ import annotations

import logging
import time

import trio

from dht.errors import DhtError
from dht.timescale import scaled

from .capability import StoreCap
from .head import Head
from .host_list import version_presence
from .network import NetworkNode
from .storage import DriveStorage

log = logging.getLogger(__name__)

FAST_INTERVAL = 2.0
FAST_PERIOD = scaled(600.0)  # dht/timescale.py
SLOW_INTERVAL = scaled(60.0)
WHOLE_TIMEOUT = 5.0
# A version not yet whole here (a host fetching it) is looked at again this often.
OWN_RECHECK = 10.0


class CopyCounter:
    """Counts, per drive, the other nodes keeping its newest version whole; announces
    the versions this node keeps whole."""

    def __init__(self, net: NetworkNode, storage: DriveStorage) -> None:
        self.net = net
        self.storage = storage
        self.counts: dict[bytes, dict] = {}  # pubkey -> {"seq", "holders", "checked"}
        self._since: dict[bytes, tuple[int, float]] = {}  # pubkey -> (seq, first seen)
        # pubkey -> (seq, whole here, when to look again if not)
        self._own: dict[bytes, tuple[int, bool, float]] = {}

    def snapshot(self) -> dict[str, dict]:
        return {pubkey.hex(): dict(c) for pubkey, c in self.counts.items()}

    async def run(self, drives, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """`drives()` gives the StoreCaps to count for; runs until cancelled."""
        task_status.started()
        next_at: dict[bytes, float] = {}
        while True:
            now = trio.current_time()
            for cap in list(drives()):
                head = self.storage.load_head(cap)
                if head is None:
                    continue
                await self._announce_own(cap, head, now)
                seen = self._since.get(cap.pubkey)
                if seen is None or seen[0] != head.seq:
                    self._since[cap.pubkey] = (head.seq, now)
                    next_at[cap.pubkey] = now
                if now < next_at.get(cap.pubkey, now):
                    continue
                await self._count(cap, head)
                fast = now - self._since[cap.pubkey][1] < FAST_PERIOD
                next_at[cap.pubkey] = now + (FAST_INTERVAL if fast else SLOW_INTERVAL)
            await trio.sleep(FAST_INTERVAL / 2)

    async def _announce_own(self, cap: StoreCap, head: Head, now: float) -> None:
        """Announce `head`'s version as kept whole here once every block of it is."""
        own = self._own.get(cap.pubkey)
        if own is not None and own[0] == head.seq and (own[1] or now < own[2]):
            return
        if head.block_list is None:
            whole = False  # a version 1 head: nothing to count its blocks from
        else:
            presence = await trio.to_thread.run_sync(version_presence, self.storage.store, head)
            whole = bool(presence["complete"])
        self._own[cap.pubkey] = (head.seq, whole, now + OWN_RECHECK)
        self.net.announce_whole(cap, [head.root_block] if whole else [])

    async def _count(self, cap: StoreCap, head: Head) -> None:
        try:
            announced = await self.net.whole_map(cap, WHOLE_TIMEOUT)
        except DhtError as exc:
            log.info("drive %s: counting copies failed: %s", cap.drive_id[:16], exc)
            return
        holders = sum(1 for held in announced.values() if head.root_block in held)
        self.counts[cap.pubkey] = {"seq": head.seq, "holders": holders, "checked": time.time()}
