"""How many other nodes hold a whole version of each drive a `serve` process serves.

`peerdrive publish --wait-copies N` and `peerdrive status` read it from the
node's status snapshot. A version's blocks are the ones its block list names
plus the list's own blocks; every provider this node knows (the DHT's, LAN
neighbours, the targets it pushes to) is asked with `have` frames which of
them it holds, and those that answer holding all count. Asked every
FAST_INTERVAL seconds for FAST_PERIOD after a new version (while hosts are
fetching it), every SLOW_INTERVAL after that.
"""

from __future__ import annotations

import logging
import time

import trio

from dht.errors import DhtError

from .blocklist import read_block_list
from .capability import StoreCap
from .head import Head
from .network import NetworkNode
from .storage import DriveStorage

log = logging.getLogger(__name__)

FAST_INTERVAL = 2.0
FAST_PERIOD = 600.0
SLOW_INTERVAL = 60.0
HAVE_TIMEOUT = 5.0


class CopyCounter:
    """Counts, per drive, the other nodes holding its newest version whole."""

    def __init__(self, net: NetworkNode, storage: DriveStorage) -> None:
        self.net = net
        self.storage = storage
        self.counts: dict[bytes, dict] = {}  # pubkey -> {"seq", "holders", "checked"}
        self._since: dict[bytes, tuple[int, float]] = {}  # pubkey -> (seq, first seen)

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
                if head is None or head.block_list is None:
                    continue
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

    async def _count(self, cap: StoreCap, head: Head) -> None:
        assert head.block_list is not None
        local = await trio.to_thread.run_sync(read_block_list, head.block_list,
                                              self.storage.store.get)
        if local.missing_list_blocks:
            return  # this node does not know the whole version: nothing to ask about
        ids = [*local.blocks, *local.list_blocks]
        try:
            fetcher = await self.net.start_fetcher(cap)
            holders = await fetcher.count_holders(ids, timeout=HAVE_TIMEOUT)
        except DhtError as exc:
            log.info("drive %s: counting copies failed: %s", cap.drive_id[:16], exc)
            return
        self.counts[cap.pubkey] = {"seq": head.seq, "holders": holders, "checked": time.time()}
