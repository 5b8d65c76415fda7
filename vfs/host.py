"""Hosting a drive with the store capability: keep every block of its newest version.

An always-on node (a NAS, a rented server) answers "no sources" when the
publisher is asleep. It is given the drive's *store* link (`peerdrive host
LINK`), so it can verify, keep and serve the ciphertext but never read it:
it holds no read key, and nothing it writes under its home is plaintext.

Rules, in the order a version goes through them (`HostedDrive`):

* The hosted drives are files under `PEERDRIVE_HOME/hosts/` (the store link,
  the quota, how many versions to keep), read by `peerdrive serve` every few
  seconds, so `host` and `host --remove` work whether or not it runs.
* `serve` follows each hosted drive's head (DHT, notices, pushes). A head
  without a block list (a version 1 head) cannot be hosted: refused.
* Quota: a version whose blocks (the signed head says how many bytes) plus
  its block list exceed the quota is refused before anything is fetched,
  with a message naming both sizes; nothing of it counts as hosted.
* Fetching: the block list is walked from the signed head (each list block
  checked against its id and the counts above it), then every listed block
  missing here is fetched at PIN priority from any source (providers, LAN
  neighbours, a publisher pushing to us, mirrors) and stored under the pin
  `host-pending:<drive>:<seq>`. A block is kept only if the list names it
  with that very size (`accept`): anything else is refused and counted.
* Complete: when every listed block and list block is here, one pin
  `host:<drive>:<seq>` takes them all (never evicted), the pending pin goes,
  and versions older than the newest `keep_versions` complete ones are
  released: their pins dropped and their blocks no other pin holds evicted.
  Only then is the version *hosted*; a version half fetched never is.
* A fetch that stalls (no source has a block within the fetch timeout) is
  retried every RETRY_AFTER seconds, keeping what it stored; a newer head
  replaces the version being fetched at once.

The hosts folder, the pins and what `serve` reports of them are read by
short commands too: they live in `vfs/host_list.py`, which loads no network.

The store, LMDB, holds ciphertext and list blocks only; the files here hold
store links and sizes. `tests/test_host.py` scans a host's whole home for
the plaintext of what it hosts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

from cache.errors import StoreError
from dht.errors import DhtError
from dht.types import Priority

from .blocklist import BlockListWalk
from .errors import (
    BlockUnavailable,
    FormatError,
    NoSpaceError,
    unwrap_group,
)
from .head import Head
from .head_follower import HeadFollower
from .host_list import (
    HostEntry,
    HostList,
    NotHostable,
    QuotaExceeded,
    host_pending_pin,
    host_pin,
    hosted_versions,
    release_versions,
)
from .network import NetworkNode
from .storage import DriveStorage
from .units import format_size

log = logging.getLogger(__name__)

FETCH_CONCURRENCY = 32  # blocks asked for at once; the fetcher spreads them over sources
STORE_BATCH_BYTES = 16 * 1024 * 1024  # fetched blocks stored per commit, at most
RETRY_AFTER = 10.0  # seconds before a stalled version is tried again
SYNC_INTERVAL = 2.0  # seconds between looks at the hosts folder


# ----------------------------------------------------------------------------- hosting


@dataclass
class HostState:
    """What hosting one drive is doing (plain data for the node's status snapshot)."""

    drive: str
    quota: int | None
    keep_versions: int
    state: str = "waiting"  # waiting, fetching, complete, refused, stalled, failed
    message: str = "waiting for a version of the drive"
    seq: int | None = None  # the version being fetched, or the newest hosted
    hosted_seq: int | None = None  # the newest complete version, or None
    hosted_versions: list[int] = field(default_factory=list)
    blocks_total: int = 0
    blocks_have: int = 0
    bytes_total: int = 0
    bytes_have: int = 0
    list_blocks: int = 0
    refused_blocks: int = 0  # blocks handed to us that the signed version does not list

    def as_json(self) -> dict:
        return asdict(self)


class HostedDrive:
    """Keeps one drive's newest version complete on this node, from its store capability."""

    KEEP_BY_SEQ = False  # a host keeps the newest `keep_versions` it hosted, whatever their seqs

    def __init__(self, entry: HostEntry, storage: DriveStorage, net: NetworkNode) -> None:
        self.entry = entry
        self.cap = entry.cap
        self.storage = storage
        self.store = storage.store
        self.net = net
        self.state = HostState(entry.cap.drive_id, entry.quota, entry.keep_versions)
        self.follower = HeadFollower(self.cap, storage, net)
        self._changed = trio.Event()
        self._wanted: dict[bytes, int] = {}  # block id -> size, of the version being fetched
        self._refresh_hosted()

    def _refresh_hosted(self) -> None:
        versions = hosted_versions(self.store, self.cap.pubkey)
        self.state.hosted_versions = versions
        self.state.hosted_seq = versions[-1] if versions else None

    def update(self, entry: HostEntry) -> None:
        """New limits from `peerdrive host` while serving: a refused version is tried again."""
        if entry != self.entry:
            self.entry = entry
            self.state.quota, self.state.keep_versions = entry.quota, entry.keep_versions
            if self.state.state == "refused":
                self._set(self.state.seq or 0, "waiting", "trying again with the new limits")
            self._changed.set()

    async def run(self) -> None:
        self.net.serve_drive(self.cap, on_head=self.follower.notice)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.follower.run, self._on_new)
            nursery.start_soon(self._look_up_head)
            await self._follow()

    async def _look_up_head(self) -> None:
        """The head the DHT holds, once at start (the follower polls it from then on)."""
        wire = await self.net.lookup_head(self.cap)
        if wire is not None and self.follower.offer(wire) is not None:
            self._changed.set()

    async def _on_new(self, head: Head) -> None:
        self._changed.set()

    async def _follow(self) -> None:
        retry_at = float("inf")
        while True:
            self._changed = trio.Event()  # whatever happens from here on wakes the wait below
            head = self.follower.tracker.current
            st = self.state
            if head is not None and (st.hosted_seq is None or head.seq > st.hosted_seq):
                failed = st.state in ("refused", "stalled", "failed") and st.seq == head.seq
                if not failed or trio.current_time() >= retry_at:
                    retry_at = await self._attempt(head)
                    continue
            elif head is not None:
                if st.state != "complete" and head.seq == st.hosted_seq:
                    self._held_already(head)  # hosted before this serve started
                await trio.to_thread.run_sync(self._release)  # the limits may have changed
            with trio.move_on_at(retry_at):
                await self._changed.wait()

    async def _attempt(self, head: Head) -> float:
        """Host `head` until done or a newer head arrives; when to try again if it failed."""
        with trio.CancelScope() as scope:
            tracker = self.follower.tracker

            async def watch_newer() -> None:
                while tracker.current is head:
                    changed = self._changed
                    await changed.wait()
                    if self._changed is changed:
                        self._changed = trio.Event()
                scope.cancel()  # a newer version supersedes this one at once

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_newer)
                    await self._host(head)
                    nursery.cancel_scope.cancel()
            except BaseException as raised:  # nurseries wrap errors in groups: look inside
                exc = unwrap_group(raised)
                if isinstance(exc, QuotaExceeded | NotHostable):
                    self._set(head.seq, "refused", str(exc))
                    log.warning("%s", exc)
                    return float("inf")
                if isinstance(exc, DhtError | BlockUnavailable):
                    self._set(head.seq, "stalled", f"version {head.seq}: {exc}; trying again "
                              f"in {RETRY_AFTER:g} s")
                    return trio.current_time() + RETRY_AFTER
                if isinstance(exc, NoSpaceError | StoreError):
                    self._set(head.seq, "failed", f"version {head.seq} could not be stored: "
                              f"{exc}")
                    log.warning("drive %s: %s", self.cap.drive_id[:16], self.state.message)
                    return trio.current_time() + 6 * RETRY_AFTER
                raise
        return float("inf")

    def _held_already(self, head: Head) -> None:
        st = self.state
        if head.block_list is not None:
            st.blocks_total = st.blocks_have = head.block_list.nblocks
            st.bytes_total = st.bytes_have = head.block_list.nbytes
        self._set(head.seq, "complete", f"version {head.seq} hosted")

    def _set(self, seq: int, state: str, message: str) -> None:
        self.state.seq, self.state.state, self.state.message = seq, state, message

    async def _host(self, head: Head) -> None:
        """Fetch, check and pin every block of `head`'s version; then release older ones."""
        ref = head.block_list
        drive = self.cap.drive_id[:16]
        if ref is None:
            raise NotHostable(f"version {head.seq} of drive {drive} has no block list (it was "
                              "published by an older peerdrive): it cannot be hosted")
        self._check_quota(head.seq, ref.nbytes)
        st = self.state
        self._set(head.seq, "fetching", f"fetching version {head.seq}")
        st.blocks_total, st.bytes_total = ref.nblocks, ref.nbytes
        st.blocks_have = st.bytes_have = st.list_blocks = 0
        pending = host_pending_pin(self.cap.pubkey, head.seq)
        fetcher = await self.net.start_fetcher(self.cap)

        # the block list, from the signed head down
        walk = BlockListWalk(ref)
        while not walk.done:
            got = await self._get_list_blocks(walk.wanted(), fetcher)
            try:
                for block_id, data in got:
                    walk.feed(block_id, data)
            except FormatError as exc:
                raise NotHostable(f"version {head.seq} of drive {drive}: its block list does "
                                  f"not check out: {exc}") from exc
            await trio.to_thread.run_sync(self._store, pending, got)
            fetcher.stored([block_id for block_id, _ in got])
        try:
            blocks = walk.blocks()
        except FormatError as exc:
            raise NotHostable(f"version {head.seq} of drive {drive}: {exc}") from exc
        st.list_blocks = len(walk.list_blocks)
        self._check_quota(head.seq, ref.nbytes + sum(walk.list_blocks.values()))

        # what is here already (an earlier version, a partial fetch) counts at once
        missing = set(await trio.to_thread.run_sync(self.store.missing, list(blocks)))
        present = [i for i in blocks if i not in missing]
        await trio.to_thread.run_sync(self.store.add_to_pin, pending, present)
        await trio.to_thread.run_sync(self.store.add_members, self.cap.discovery_key, present)
        st.blocks_have = len(present)
        st.bytes_have = sum(blocks[i] for i in present)
        self._wanted = blocks
        try:
            await self._fetch_missing([i for i in blocks if i in missing], fetcher, pending)
        finally:
            self._wanted = {}

        # complete: one pin takes the version, then older ones go
        all_ids = [*blocks, *walk.list_blocks]

        def commit() -> None:
            self.store.set_pin(host_pin(self.cap.pubkey, head.seq), all_ids)
            self.store.unpin(pending)

        await trio.to_thread.run_sync(commit)
        self._refresh_hosted()
        await trio.to_thread.run_sync(self._release)
        self._set(head.seq, "complete",
                  f"version {head.seq} hosted: {ref.nblocks} blocks, {format_size(ref.nbytes)}")
        log.info("drive %s: %s", drive, self.state.message)

    def _check_quota(self, seq: int, need: int) -> None:
        quota = self.entry.quota
        if quota is not None and need > quota:
            raise QuotaExceeded(
                f"version {seq} of drive {self.cap.drive_id[:16]} needs {format_size(need)}, "
                f"more than this host's quota of {format_size(quota)}: refused (raise it with "
                "peerdrive host LINK --quota SIZE)")

    def _release(self) -> None:
        released = release_versions(self.store, self.cap.pubkey, self.entry.keep_versions,
                                    pending_below=self.state.hosted_seq,
                                    by_seq=self.KEEP_BY_SEQ)
        if released:
            log.info("drive %s: released %s of older versions", self.cap.drive_id[:16],
                     format_size(released))
        self._refresh_hosted()

    async def _get_list_blocks(self, ids: list[bytes], fetcher) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []

        async def one(block_id: bytes) -> None:
            data = await trio.to_thread.run_sync(self.store.get, block_id)
            if data is None:
                data = await fetcher.fetch(block_id, Priority.PIN)
            out.append((block_id, data))

        async with trio.open_nursery() as nursery:
            for block_id in ids:
                nursery.start_soon(one, block_id)
        return out

    def accept(self, block_id: bytes, data: bytes) -> bool:
        """Keep a fetched block only if the version being hosted lists it, with this size.

        The fetcher checked the bytes against the id; this checks the id
        against the signed list, so no peer can make this node store anything
        the drive's key did not vouch for. Refusals are counted.
        """
        size = self._wanted.get(block_id)
        if size is None or size != len(data):
            self.state.refused_blocks += 1
            log.warning("drive %s: refused block %s: not in version %s%s",
                        self.cap.drive_id[:16], block_id.hex()[:16], self.state.seq,
                        "" if size is None else f" with {len(data)} bytes (listed: {size})")
            return False
        return True

    def _store(self, pin: str, blocks: list[tuple[bytes, bytes]]) -> None:
        try:
            # tagged with the drive, so this node serves them to that drive's clients only
            self.store.put_pinned(pin, blocks, ids_checked=True, tag=self.cap.discovery_key)
        except self.storage.full_errors as exc:
            raise NoSpaceError(f"the device is full: {exc}") from exc

    async def _fetch_missing(self, ids: list[bytes], fetcher, pending: str) -> None:
        """Fetch `ids` at PIN priority, FETCH_CONCURRENCY at a time, storing in batches."""
        if not ids:
            return
        todo = iter(ids)
        send, receive = trio.open_memory_channel[tuple[bytes, bytes]](FETCH_CONCURRENCY)
        st = self.state

        async def worker(out: trio.MemorySendChannel[tuple[bytes, bytes]]) -> None:
            async with out:
                for block_id in todo:
                    data = await fetcher.fetch(block_id, Priority.PIN)
                    if self.accept(block_id, data):
                        await out.send((block_id, data))

        async def storer() -> None:
            async with receive:
                async for first in receive:
                    batch, size = [first], len(first[1])
                    while size < STORE_BATCH_BYTES:
                        try:
                            item = receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        batch.append(item)
                        size += len(item[1])
                    await trio.to_thread.run_sync(self._store, pending, batch)
                    # in the store now: the fetcher's copies kept for other readers until
                    # then go (held until pushed out, 16 MiB of a long-running host's memory)
                    fetcher.stored([block_id for block_id, _ in batch])
                    st.blocks_have += len(batch)
                    st.bytes_have += size

        async with trio.open_nursery() as nursery:
            nursery.start_soon(storer)
            async with send:
                for _ in range(min(FETCH_CONCURRENCY, len(ids))):
                    nursery.start_soon(worker, send.clone())


class HostManager:
    """In `peerdrive serve`: hosts every drive listed under the hosts folder, as it changes."""

    def __init__(self, hosts_dir: Path, storage: DriveStorage, net: NetworkNode) -> None:
        self.hosts = HostList(hosts_dir)
        self.storage = storage
        self.net = net
        self.drives: dict[bytes, tuple[HostedDrive, trio.CancelScope]] = {}

    def snapshot(self) -> list[dict]:
        return [hosted.state.as_json() for hosted, _ in self.drives.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.sync(nursery)  # hosted drives are served before anything else claims them
            task_status.started()
            while True:
                await trio.sleep(SYNC_INTERVAL)
                self.sync(nursery)

    def sync(self, nursery: trio.Nursery) -> None:
        entries = {e.cap.pubkey: e for e in self.hosts.entries()}
        for pubkey, (_hosted, scope) in list(self.drives.items()):
            if pubkey not in entries:
                scope.cancel()
                del self.drives[pubkey]
                log.info("drive %s is no longer hosted", pubkey.hex()[:16])
        for pubkey, entry in entries.items():
            if pubkey in self.drives:
                self.drives[pubkey][0].update(entry)
                continue
            hosted = HostedDrive(entry, self.storage, self.net)
            scope = trio.CancelScope()
            self.drives[pubkey] = (hosted, scope)
            nursery.start_soon(self._run_one, hosted, scope)

    async def _run_one(self, hosted: HostedDrive, scope: trio.CancelScope) -> None:
        with scope:
            await hosted.run()


