"""Wiring one node together: store, identity, network, drive, FUSE.

The command line calls `run_mount_foreground` and `run_serve`; everything
they start lives in one trio nursery and ends with them.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import trio

from cache.errors import StoreError
from cache.store import BlockStore
from dht.identity import NodeIdentity

from .capability import ReadCap, StoreCap
from .drive import Drive
from .errors import DriveNotFound, FormatError, IntegrityError, RollbackError
from .fs import DriveOperations
from .head import Head, HeadTracker
from .home import Config, Home
from .mount import check_mountpoint, report_ready, serve_fuse
from .network import HEAD_POLL_INTERVAL, NetworkNode, parse_hostport
from .storage import DriveStorage
from .units import parse_size

log = logging.getLogger(__name__)

HEAD_WAIT = 20.0


def open_store(home: Home, cache_size: str | None) -> BlockStore:
    """The node's store; a given size becomes its (persistent) limit, else the stored one stays."""
    if cache_size is None:
        return BlockStore(home.store_path)
    return BlockStore(home.store_path, limit_bytes=parse_size(cache_size))


def network_for(home: Home, store: BlockStore, args: argparse.Namespace,
                config: Config, default_listen: str) -> NetworkNode:
    identity = NodeIdentity.load_or_create(home.node_key_path)
    boots = list(args.bootstrap or []) or config.bootstrap
    listen = args.listen or config.listen or default_listen
    return NetworkNode(
        identity, store,
        listen=parse_hostport(listen),
        bootstrap=[parse_hostport(b) for b in boots],
        lan=config.lan and not getattr(args, "no_lan", False),
        fetch_timeout=getattr(args, "fetch_timeout", None) or config.fetch_timeout,
        run_dir=home.path / "run",
    )


class HeadFollower:
    """Keeps one drive at its newest verified head: from the DHT, from peers' notices.

    Anything older than what we have is refused (rollback); a newer head is
    saved, so a restart offline starts from it, and handed to `on_new`.
    """

    def __init__(self, cap: StoreCap, storage: DriveStorage, net: NetworkNode) -> None:
        self.cap = cap
        self.storage = storage
        self.net = net
        self.tracker = HeadTracker(cap, storage.load_head(cap))
        self.changed = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[bytes](16)

    def offer(self, wire: bytes) -> Head | None:
        """Verify and keep `wire` if it is newer; the head to switch to, or None.

        Never raises for what other processes or the disk do: the follower must
        outlive a racing writer and a full store, or the mount would end.
        """
        try:
            head = self.tracker.offer(wire)
        except (IntegrityError, FormatError) as exc:
            log.warning("ignored a head for drive %s: %s", self.cap.drive_id[:16], exc)
            return None
        if head is not None:
            head = self._save(head)
            self.changed.set()
            self.changed = trio.Event()
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
                                "right?")
        return self.tracker.current

    async def run(self, on_new, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
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


def run_mount_foreground(home: Home, cap: ReadCap, mountpoint: Path,
                         args: argparse.Namespace) -> None:
    check_mountpoint(mountpoint)
    config = home.config()
    store = open_store(home, args.cache_size or config.cache_size)
    try:
        trio.run(_mount_main, home, cap, mountpoint, args, config, store)
    finally:
        home.unregister_mount(mountpoint)
        store.close()


async def _mount_main(home: Home, cap: ReadCap, mountpoint: Path, args: argparse.Namespace,
                      config: Config, store: BlockStore) -> None:
    storage = DriveStorage(store)
    net = network_for(home, store, args, config, default_listen="0.0.0.0:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        follower = HeadFollower(cap, storage, net)
        net.serve_drive(cap, on_head=follower.notice)
        lonely = not net.bootstrap and not net.lan  # nobody to ask: do not wait
        head = await follower.first_head(0 if lonely else HEAD_WAIT)
        # A reader seeds the drive: it offers the head it holds as well as the blocks,
        # so a reader that finds only it (the publisher offline) can still mount.
        nursery.start_soon(net.publish_head, cap, head.wire)
        drive = Drive(cap, storage, head, fetch=net.fetch_function(cap),
                      holders=net.holders_function(cap))
        ops = DriveOperations(drive)

        async def on_new(new: Head) -> None:
            drive.set_head(new)
            nursery.start_soon(net.publish_head, cap, new.wire)
            await ops.new_version()

        def ready() -> None:
            home.register_mount(mountpoint, {"pid": os.getpid(), "mountpoint": str(mountpoint),
                                             "drive": cap.drive_id, "port": net.port})
            report_ready(args.ready_fd)

        async def background(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with trio.open_nursery() as inner:
                await inner.start(drive.run)
                await inner.start(follower.run, on_new)
                task_status.started()

        await serve_fuse(ops, mountpoint, background, ready)
        nursery.cancel_scope.cancel()


def run_serve(home: Home, args: argparse.Namespace, on_ready) -> None:
    config = home.config()
    store = open_store(home, args.cache_size or config.cache_size)
    try:
        trio.run(_serve_main, home, args, config, store, on_ready)
    finally:
        store.close()


async def _serve_main(home: Home, args: argparse.Namespace, config: Config, store: BlockStore,
                      on_ready) -> None:
    """Serve every drive this node holds; publish new heads as they appear."""
    import signal

    storage = DriveStorage(store)
    net = network_for(home, store, args, config, default_listen="0.0.0.0:4100")
    published: dict[bytes, int] = {}

    async def sync_drives() -> None:
        for pubkey in storage.known_drives():
            cap = StoreCap(pubkey)
            head = storage.load_head(cap)
            if head is None:
                continue
            if pubkey not in published:
                follower = HeadFollower(cap, storage, net)
                net.serve_drive(cap, on_head=follower.notice)
            if published.get(pubkey) != head.seq:
                published[pubkey] = head.seq
                await net.publish_head(cap, head.wire)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(net.run)
        await sync_drives()
        on_ready(net, port, [StoreCap(p) for p in published])
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            while True:
                await trio.sleep(HEAD_POLL_INTERVAL)
                await sync_drives()
                await trio.to_thread.run_sync(store.flush)  # persist batched read recency
