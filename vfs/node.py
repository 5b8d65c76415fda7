"""Wiring one node together: store, identity, network, drive, FUSE.

The command line calls `run_mount_foreground` and `run_serve`; everything
they start lives in one trio nursery and ends with them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from cache.store import BlockStore
from dht.identity import NodeIdentity

from .blocks import BlockReader
from .capability import ReadCap, StoreCap, WriteCap
from .drive import Drive
from .errors import PeerdriveError
from .fs import DriveOperations, WritableOperations
from .head import Head
from .head_follower import HeadFollower
from .home import Home
from .memory import Releaser, limit_arenas
from .mount import LAST_VERSION_SECONDS, check_mountpoint, report_ready, serve_fuse
from .network import HEAD_POLL_INTERVAL, NetworkNode, parse_hostport
from .options import MOUNT_LISTEN, SERVE_LISTEN, MountOptions, ResolvedNodeOptions, ServeOptions
from .process import start_time
from .pushes import Pushes, parse_push_target
from .storage import DriveStorage
from .units import parse_size

if TYPE_CHECKING:
    from .watch import Published
    from .writer import WriteSession

log = logging.getLogger(__name__)

HEAD_WAIT = 20.0


def open_store(home: Home, cache_size: str | None) -> BlockStore:
    """The node's store; a given size becomes its (persistent) limit, else the stored one stays."""
    if cache_size is None:
        return BlockStore(home.store_path)
    return BlockStore(home.store_path, limit_bytes=parse_size(cache_size))


def network_for(home: Home, store: BlockStore, opts: ResolvedNodeOptions) -> NetworkNode:
    identity = NodeIdentity.load_or_create(home.node_key_path)
    return NetworkNode(
        identity, store,
        listen=parse_hostport(opts.listen),
        bootstrap=[parse_hostport(b) for b in opts.bootstrap],
        lan=opts.lan,
        fetch_timeout=opts.fetch_timeout,
        run_dir=home.run_dir,
    )


def run_mount_foreground(home: Home, cap: ReadCap, mountpoint: Path, opts: MountOptions) -> None:
    limit_arenas()  # before any worker thread: see vfs/memory.py
    # held while this process lives: a second mount of this path from this home is refused
    with home.mount_lock(mountpoint):
        check_mountpoint(mountpoint, opts.nonempty)
        node_opts = opts.resolve(home.config(), MOUNT_LISTEN)
        store = open_store(home, node_opts.cache_size)
        try:
            trio.run(_mount_main, home, cap, mountpoint, opts, node_opts, store)
        finally:
            home.unregister_mount(mountpoint)
            store.close()


async def _mount_main(home: Home, cap: ReadCap, mountpoint: Path, opts: MountOptions,
                      node_opts: ResolvedNodeOptions, store: BlockStore) -> None:
    storage = DriveStorage(store)
    net = network_for(home, store, node_opts)
    pushes = Pushes(net, storage, [parse_push_target(t) for t in node_opts.push])
    net.snapshot_extra["pushes"] = pushes.snapshot
    async with _stopped_by_signals() as nursery:
        await nursery.start(net.run)
        follower = HeadFollower(cap, storage, net)
        net.serve_drive(cap, on_head=follower.notice)

        def use_mirrors(head: Head | None) -> None:
            """The head's mirrors and the ones given by hand (--mirror, the config)."""
            net.set_mirrors(cap, [*(head.mirrors if head else ()), *node_opts.mirrors])

        use_mirrors(follower.tracker.current)  # a mirror can supply the first head too
        await nursery.start(pushes.run)
        pushes.add_drive(cap)
        lonely = not net.bootstrap and not net.lan  # nobody to ask: do not wait
        head = await follower.first_head(0 if lonely else HEAD_WAIT)
        use_mirrors(head)
        net.mark("head")
        # A reader seeds the drive: it offers the head it holds as well as the blocks,
        # so a reader that finds only it (the publisher offline) can still mount.
        nursery.start_soon(net.publish_head, cap, head.wire)
        if opts.at_seq is not None:  # LINK@SEQ: that version, its old heads fetched lazily
            from .history import find_version
            from .versions import block_getter

            reader = BlockReader(store, cap.read_key, net.fetch_function(cap),
                                 tag=cap.discovery_key)
            head = await find_version(head, opts.at_seq, cap, block_getter(reader))
        drive = Drive(cap, storage, head, fetch=net.fetch_function(cap),
                      holders=net.holders_function(cap), whole=net.whole_function(cap),
                      announce_whole=lambda ids: net.announce_whole(cap, ids))
        session: WriteSession | None = None
        if isinstance(cap, WriteCap) and opts.at_seq is None:  # LINK@SEQ: read-only
            async def on_version(new: Head) -> None:
                """This mount made version `new`: readers, pins and the DHT follow."""
                if follower.tracker.current is None or new.seq > follower.tracker.current.seq:
                    follower.tracker.current = new
                use_mirrors(new)
                drive.set_head(new)
                nursery.start_soon(net.publish_head, cap, new.wire)

            session = write_session(net, cap, storage, drive.tree, head, opts.publish_delay,
                                    on_version=on_version)
            await session.recover()  # what an fsync made durable before a crash goes first
            head = session.head
            writable = WritableOperations(drive, session)
            session.on_merged = writable.start_over
            ops: DriveOperations = writable
        else:
            ops = DriveOperations(drive)
        if opts.max_inodes:
            ops.max_inodes = opts.max_inodes
        ops.mountpoint = os.fsencode(os.path.abspath(mountpoint))
        net.snapshot_extra["inodes"] = lambda: {"held": len(ops.inodes),
                                                "forget_asked": ops.trimmed,
                                                "made": ops.made,
                                                "forgotten": ops.forgotten,
                                                "dirs_decoded": drive.tree.decodes,
                                                "dirs_summed": drive.figures.walks,
                                                "folders_refreshed": ops.refreshed}
        net.snapshot_extra["requests"] = lambda: dict(ops.requests)

        async def on_new(new: Head) -> None:
            if session is not None and new.seq <= session.head.seq:
                return  # this mount's own version, back from the network
            use_mirrors(new)
            drive.set_head(new)
            nursery.start_soon(net.publish_head, cap, new.wire)
            await ops.new_version()

        def ready() -> None:
            # the start time makes the record name this process, not whatever gets its pid
            home.register_mount(mountpoint, {"pid": os.getpid(), "start": start_time(os.getpid()),
                                             "mountpoint": str(mountpoint),
                                             "drive": cap.drive_id, "port": net.port,
                                             "log": opts.log_file, "seq": opts.at_seq,
                                             "writable": session is not None})
            log.info("mounted drive %s version %d at %s", cap.drive_id[:16], head.seq,
                     mountpoint)
            net.mark("ready")
            report_ready(opts.ready_fd)

        async def background(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with trio.open_nursery() as inner:
                await inner.start(drive.run)
                if opts.at_seq is None:  # an old version stays what it is
                    await inner.start(follower.run, on_new)
                if session is not None:
                    await inner.start(session.run)
                await inner.start(ops.run)  # keeps the inode table bounded
                task_status.started()

        try:
            await serve_fuse(ops, mountpoint, background, ready, allow_other=opts.allow_other)
        finally:
            if session is not None:  # also after Ctrl-C: the changes are not left behind
                await _last_version(session)
        await net.leave()
        nursery.cancel_scope.cancel()


def write_session(net: NetworkNode, cap: WriteCap, storage: DriveStorage, tree, head: Head,
                  publish_delay: float, **kwargs) -> WriteSession:
    """A session that makes versions of `cap` from this node (a writable mount, `--watch`).

    The writing modules (the session, the work tree, the write buffer and
    journal, publishing) are imported here and nowhere at the top of this
    module or of vfs/fs.py: a read-only mount never needs them, and their
    import was a part of every mount's start-up CPU.
    """
    from .merge import device_name
    from .writer import WriteSession

    return WriteSession(cap, storage, tree, head, publish_delay,
                        device=device_name(net.identity.node_id),
                        fetch=net.fetch_function(cap), lookup=lambda: net.lookup_head(cap),
                        **kwargs)


@contextlib.asynccontextmanager
async def _stopped_by_signals() -> AsyncIterator[trio.Nursery]:
    """The mount's nursery, cancelled by SIGTERM, SIGINT or SIGHUP outside the FUSE session.

    The session has a receiver of its own (serve_fuse: a signal unmounts).
    This one is open from before the node starts until it has stopped, so a
    signal outside the session stops the node cleanly too, and its DHT says
    its bye: `fusermount -u` and then SIGTERM (what a script or a service
    manager does), or a SIGTERM while the mount starts, killed the process by
    default, and the publisher kept the departed reader in its routing table
    and handed it to newcomers (issue 9).
    """
    stopped_by: list[int] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    stopped_by.append(signum)
                    nursery.cancel_scope.cancel()  # the DHT says its bye as it ends
                    return

            nursery.start_soon(stop_on_signal)
            yield nursery
    if stopped_by == [signal.SIGINT]:
        raise KeyboardInterrupt  # stopped cleanly; Ctrl-C still exits 130 (interrupted)


async def _last_version(session: WriteSession) -> None:
    """An unmounted writable mount publishes what changed since its last version.

    A signal meanwhile (`peerdrive unmount` giving up, a service manager's
    stop, a second Ctrl-C) does not cut it short: SIGTERM's default would kill
    the process part-way and leave the writes no fsync made durable lost. The
    publish is bounded by LAST_VERSION_SECONDS; SIGKILL still stops it at once.
    """
    log.info("publishing the changes since the last version (at most %.0f s)",
             LAST_VERSION_SECONDS)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_note_signals_while_publishing, signals)
            with trio.move_on_after(LAST_VERSION_SECONDS) as scope:
                scope.shield = True
                try:
                    head = await session.publish_now()
                except PeerdriveError as exc:
                    log.warning("the last changes were not published: %s (the journal keeps "
                                "what fsync made durable; it is published at the next mount)",
                                exc)
                else:
                    if head is not None:
                        log.info("published version %d as the mount ended", head.seq)
            nursery.cancel_scope.cancel()


async def _note_signals_while_publishing(signals) -> None:
    async for signum in signals:
        log.warning("signal %d while the last version is published: it is finished first "
                    "(at most %.0f s from its start; SIGKILL stops at once)", signum,
                    LAST_VERSION_SECONDS)


def run_serve(home: Home, opts: ServeOptions, on_ready,
              also: Callable[[NetworkNode, DriveStorage], Awaitable[None]] | None = None
              ) -> None:
    """Serve every drive of this node until a signal; `also(net, storage)` runs beside
    (`publish --watch`), and the node stops if it fails."""
    limit_arenas()  # before any worker thread: see vfs/memory.py
    node_opts = opts.resolve(home.config(), SERVE_LISTEN)
    for target in node_opts.push:
        parse_push_target(target)  # a mistyped target is an error now, not a log line later
    store = open_store(home, node_opts.cache_size)
    try:
        trio.run(_serve_main, home, opts, node_opts, store, on_ready, also)
    finally:
        store.close()


def run_watch(home: Home, cap: WriteCap, source: Path, opts: ServeOptions, publish_delay: float,
              on_ready, on_published: Callable[[Published], None],
              on_warning: Callable[[str], None]) -> None:
    """`publish DIR --watch`: serve like `serve`, and publish the folder as it changes."""

    from .tree import Tree
    from .watch import FolderWatch

    async def watch(net: NetworkNode, storage: DriveStorage) -> None:
        head = storage.load_head(cap)
        assert head is not None  # the command line published the folder first
        tree = Tree(BlockReader(storage.store, cap.read_key, tag=cap.discovery_key))

        async def on_version(new: Head) -> None:
            await net.publish_head(cap, new.wire)

        session = write_session(net, cap, storage, tree, head, publish_delay,
                                on_version=on_version, adopt_merged=False)
        await session.recover()

        async def published(report: Published) -> None:
            on_published(report)

        await FolderWatch(source, session, publish_delay, published, on_warning).run()

    run_serve(home, opts, on_ready, watch)


async def _serve_main(home: Home, opts: ServeOptions, node_opts: ResolvedNodeOptions,
                      store: BlockStore, on_ready,
                      also: Callable[[NetworkNode, DriveStorage], Awaitable[None]] | None
                      ) -> None:
    """Serve every drive this node holds and hosts; publish new heads as they appear;
    push them to the --push targets; count the copies other nodes hold."""
    from .copies import CopyCounter  # a serving node's modules: a mount never loads them
    from .heapwatch import frames_wanted, watch_heap
    from .host import HostManager
    from .merge import device_name
    from .writers import WrittenDrive

    heap_frames = frames_wanted()  # PEERDRIVE_TRACEMALLOC: tests only
    storage = DriveStorage(store)
    net = network_for(home, store, node_opts)
    hosts = HostManager(home.hosts_dir, storage, net)
    pushes = Pushes(net, storage, [parse_push_target(t) for t in node_opts.push])
    copies = CopyCounter(net, storage)
    net.snapshot_extra.update(hosting=hosts.snapshot, pushes=pushes.snapshot,
                              copies=copies.snapshot)
    published: dict[bytes, int] = {}
    # A version handled (published, or hosted and followed) frees what it built, and
    # glibc keeps the freed chunks in its heaps: a serve's anonymous RSS sat 1-2 MB above
    # its live data with the traced Python heap flat. A trim once a new version is out
    # (vfs/memory.py; at most one per MIN_INTERVAL, in a worker thread) gives them back:
    # 30 versions, three pairs in turn, 0.7-2.2 MB less at the end in each serve
    # (docs/benchmarks.md, "A serve's memory per version").
    releaser = Releaser(after=1)
    net.snapshot_extra["memory"] = lambda: {"trims": releaser.trims}
    written: dict[bytes, WrittenDrive] = {}
    net.snapshot_extra["writing"] = lambda: [
        {**w.state.as_json(), "rejoined": w.rejoined} for w in written.values()]

    def sync_written(nursery: trio.Nursery) -> None:
        """Follow every drive this node can write (a new one as soon as it appears)."""
        hosted = {e.cap.pubkey for e in hosts.hosts.entries()}
        for cap in home.published_drives():
            if cap.pubkey in written or cap.pubkey in hosted:
                continue
            drive = written[cap.pubkey] = WrittenDrive(
                cap, storage, net, keep_versions=opts.keep_versions,
                device=device_name(net.identity.node_id))
            nursery.start_soon(drive.run)

    async def sync_drives() -> None:
        for pubkey in storage.known_drives():
            cap = StoreCap(pubkey)
            head = storage.load_head(cap)
            if head is None:
                continue
            if cap.discovery_key not in net.drives:  # a hosted drive is served by its host
                net.serve_drive(cap)
            pushes.add_drive(cap)
            if published.get(pubkey) != head.seq:
                published[pubkey] = head.seq
                net.set_mirrors(cap, [*head.mirrors, *node_opts.mirrors])
                await net.publish_head(cap, head.wire)
                releaser.freed(1)

    stopped_by: list[int] = []
    # SIGHUP too: a closed terminal stops the node cleanly, as a mount does. The receiver
    # is open before the node starts, so a signal that comes at once is not lost either.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def stop_on_signal() -> None:
                async for signum in signals:
                    stopped_by.append(signum)
                    if ready.is_set():
                        await net.leave()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            if heap_frames:
                nursery.start_soon(watch_heap, heap_frames)
            port = await nursery.start(net.run)
            await nursery.start(releaser.run)
            await nursery.start(hosts.run)  # hosted drives follow their heads from the start
            await nursery.start(pushes.run)
            await sync_drives()
            sync_written(nursery)
            await nursery.start(copies.run, lambda: [StoreCap(p) for p in published])
            on_ready(net, port, [StoreCap(p) for p in published])
            ready.set()
            if also is not None:
                nursery.start_soon(also, net, storage)
            while True:
                await trio.sleep(HEAD_POLL_INTERVAL)
                await sync_drives()
                sync_written(nursery)
                await trio.to_thread.run_sync(store.flush)  # persist batched read recency
    if stopped_by == [signal.SIGINT]:
        raise KeyboardInterrupt  # stopped cleanly; Ctrl-C still exits 130 (interrupted)
