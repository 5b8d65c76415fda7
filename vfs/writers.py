"""In `peerdrive serve`: the drives this node writes, followed, kept, and rejoined after a fork.

Every drive this node holds the write link of (a published folder, `peerdrive
new`, `publish --into`) is followed like a hosted drive (`vfs/host.py`):
each new version, whoever wrote it, is fetched whole and kept, the newest
`keep_versions` of them. So this device holds the other writers' versions
too, and its next `publish` merges with them even offline.

Two writers that cannot see each other (a partition, a laptop offline) can
both sign the same seq. Heads of one seq are ordered by their bytes
(`HeadTracker`), so every node ends on the same one, and the other is no
longer in the drive's history. The writer whose version lost notices it
here: the version it committed last (`DriveStorage.own_head`) is not among
the newest head's ancestors. It then rebases that version onto the newest
one (`vfs.publish.commit_version`, with the newest version both descend
from as the base) and publishes the result as the next seq: both writers'
changes are in it, a file changed on both sides kept twice (`vfs/merge.py`).
Nothing here reads a clock to decide which version wins.
"""

from __future__ import annotations

import logging

import trio

from cache.errors import StoreError
from dht.errors import DhtError

from .blocks import BlockReader
from .capability import StoreCap, WriteCap
from .errors import BlockUnavailable, FormatError, NoSpaceError
from .history import common_base, previous_head
from .host import HostedDrive
from .host_list import HostEntry
from .network import NetworkNode
from .publish import commit_version
from .storage import DriveStorage
from .versions import block_getter

log = logging.getLogger(__name__)

REJOIN_RETRY = 10.0  # seconds before a rejoin that could not get its blocks is tried again


class WrittenDrive(HostedDrive):
    """A drive this node can write: hosted in full, and rejoined when its version lost."""

    KEEP_BY_SEQ = True  # the versions within keep_versions seqs of the newest, as publish keeps

    def __init__(self, cap: WriteCap, storage: DriveStorage, net: NetworkNode, *,
                 keep_versions: int, device: str) -> None:
        super().__init__(HostEntry(StoreCap(cap.pubkey), None, keep_versions), storage, net)
        self.write_cap = cap
        self.device = device
        self.rejoined = 0  # versions this node made by rebasing its own lost version
        self._look = trio.Event()
        self._in_history: tuple[bytes, bytes] | None = None  # (own id, newest id) checked

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rejoin_loop)
            await super().run()

    async def _on_new(self, head) -> None:
        await super()._on_new(head)
        self._look.set()

    async def _rejoin_loop(self) -> None:
        while True:
            with trio.move_on_after(REJOIN_RETRY):
                await self._look.wait()
            self._look = trio.Event()
            try:
                await self.rejoin()
            except (BlockUnavailable, DhtError) as exc:
                log.info("drive %s: cannot rejoin this node's last version yet: %s",
                         self.cap.drive_id[:16], exc)
            except (NoSpaceError, StoreError, FormatError) as exc:
                log.warning("drive %s: rejoining this node's last version failed: %s",
                            self.cap.drive_id[:16], exc)

    async def rejoin(self) -> bool:
        """Rebase this node's last version onto the newest one if it is not in the newest
        one's history; True if a version was committed."""
        cap = self.write_cap
        own = self.storage.own_head(cap)
        newest = self.storage.load_head(cap)
        if own is None or newest is None or own.root is None:
            return False
        if self._in_history == (own.id, newest.id):
            return False
        get = block_getter(BlockReader(self.store, cap.read_key, self.net.fetch_function(cap),
                                       tag=cap.discovery_key))
        h = newest
        while h is not None and h.seq > own.seq:
            h = await previous_head(h, cap, get)
        if h is not None and h.id == own.id:
            self._in_history = (own.id, newest.id)
            return False
        base = await common_base(own, newest, cap, get)
        log.info("drive %s: this node's version %d lost to another writer's version %d; "
                 "rebasing it onto version %d", cap.drive_id[:16], own.seq,
                 h.seq if h is not None else own.seq, newest.seq)
        committed = await commit_version(
            self.storage, cap, own.root, base.root if base is not None else None,
            device=self.device, pending_pin=f"publish-pending:{cap.pubkey.hex()}:rejoin",
            keep_versions=self.entry.keep_versions, fetch=self.net.fetch_function(cap))
        self.rejoined += 1
        log.info("drive %s: version %d holds both writers' changes (%d conflict copies)",
                 cap.drive_id[:16], committed.head.seq, len(committed.conflicts))
        self.follower.offer(committed.head.wire)
        await self.net.publish_head(cap, committed.head.wire)
        return True
