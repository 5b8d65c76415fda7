"""Following one drive's newest head while it is served or mounted.

`vfs/head.py` verifies heads and refuses rollbacks (`HeadTracker`, pure
code); this module feeds it from the network: the DHT is polled every
`HEAD_POLL_INTERVAL` seconds and heads that peers push over open connections
(Notice frames) are queued here. A newer verified head is saved in the store,
so a restart offline starts from it, and handed to the caller's `on_new`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from cache.errors import StoreError

from .capability import StoreCap
from .errors import DriveNotFound, FormatError, IntegrityError, RollbackError
from .head import Head, HeadTracker
from .network import HEAD_POLL_INTERVAL
from .storage import DriveStorage

log = logging.getLogger(__name__)


async def join_for_head(net, cap: StoreCap, storage: DriveStorage, known: Head | None,
                        mirrors: list[str], wait: float = 20.0) -> Head:
    """A short-lived node (`mirror`, `log`) on the network: serve the drive, follow its
    heads and return the newest found (DriveNotFound if none within `wait`, or at once
    with nobody to ask). `mirrors` are the ones given by hand; the head's own are added."""
    follower = HeadFollower(cap, storage, net)
    net.serve_drive(cap, on_head=follower.notice)
    net.set_mirrors(cap, [*(known.mirrors if known else ()), *mirrors])
    lonely = not net.bootstrap and not net.lan
    head = await follower.first_head(0 if lonely else wait)
    net.set_mirrors(cap, [*head.mirrors, *mirrors])
    return head


class HeadSource(Protocol):
    """Where heads are looked up: `vfs.network.NetworkNode` in practice."""

    async def lookup_head(self, cap: StoreCap) -> bytes | None: ...


class HeadFollower:
    """Keeps one drive at its newest verified head: from the DHT, from peers' notices.

    Anything older than what we have is refused (rollback); a newer head is
    saved, so a restart offline starts from it, and handed to `on_new`.
    """

    def __init__(self, cap: StoreCap, storage: DriveStorage, net: HeadSource) -> None:
        self.cap = cap
        self.storage = storage
        self.net = net
        self.tracker = HeadTracker(cap, storage.load_head(cap))
        self._inbox_send, self._inbox = trio.open_memory_channel[bytes](16)

    def offer(self, wire: bytes) -> Head | None:
        """Verify and keep `wire` if it is newer; the head to switch to, or None.

        Never raises for what other processes or the disk do: the follower must
        outlive a racing writer and a full store, or the mount would end.
        """
        try:
            head = self.tracker.offer(wire)
        except RollbackError as exc:  # a stale copy (a mirror, the DHT): expected, refused
            log.info("kept the newer head of drive %s: %s", self.cap.drive_id[:16], exc)
            return None
        except (IntegrityError, FormatError) as exc:
            log.warning("ignored a head for drive %s: %s", self.cap.drive_id[:16], exc)
            return None
        if head is not None:
            head = self._save(head)
        return head

    def _save(self, head: Head) -> Head:
        """Store `head`; if another process of this node stored a newer one meanwhile
        (a publish, a second mount), follow that one instead. A store that cannot
        take it (full, failing) keeps the old head on disk: the mount follows the
        new one in memory and saves it with the next version."""
        try:
            self.storage.save_head(head)
        except RollbackError:
            stored = self.storage.load_head(self.cap)
            if stored is not None and stored.seq > head.seq:
                log.info("drive %s: this node already stored version %d; following it",
                         self.cap.drive_id[:16], stored.seq)
                self.tracker.current = stored
                return stored
        except StoreError as exc:
            log.warning("drive %s: version %d is followed but could not be saved: %s",
                        self.cap.drive_id[:16], head.seq, exc)
        return head

    def notice(self, wire: bytes) -> None:
        """From a peer connection's reader: queue, never block it."""
        try:
            self._inbox_send.send_nowait(wire)
        except trio.WouldBlock:
            pass

    async def first_head(self, wait: float) -> Head:
        wire = await self.net.lookup_head(self.cap)
        if wire is not None:
            self.offer(wire)
        with trio.move_on_after(wait if self.tracker.current is None else 0):
            while self.tracker.current is None:
                await trio.sleep(0.5)
                wire = await self.net.lookup_head(self.cap)
                if wire is not None:
                    self.offer(wire)
        if self.tracker.current is None:
            raise DriveNotFound(f"no version of drive {self.cap.drive_id[:16]} was found locally "
                                "or on the network; is a peer serving it, and is --bootstrap "
                                "(or --mirror) right?")
        return self.tracker.current

    async def run(self, on_new: Callable[[Head], Awaitable[None]], *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            async def poll() -> None:
                while True:
                    await trio.sleep(HEAD_POLL_INTERVAL)
                    wire = await self.net.lookup_head(self.cap)
                    if wire is not None and (head := self.offer(wire)) is not None:
                        await on_new(head)

            nursery.start_soon(poll)
            async for wire in self._inbox:
                if (head := self.offer(wire)) is not None:
                    await on_new(head)
