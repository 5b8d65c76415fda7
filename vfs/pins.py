"""Pins as paths: keep a file or folder whole on this device, following new versions.

A pin is a named pin set in the store, so it survives restarts and the
cache never evicts what it holds. Its name reveals no path: it is
`pin:<drive>:<tag>`, the tag an HMAC of the path under a key derived from
the read key; the path itself is kept beside it in a store record
(`pinpath:<drive><tag>`), sealed with AES-GCM under that key. The store is
"ciphertext only": someone who copies data.mdb learns how many pins a drive
has and how big they are, not what they are. Pins named by path (before
this) are renamed when the drive is mounted. Its set is every block
needed to read the path offline: the directory nodes from the root down to
it, every directory node, chunk list and chunk below it. When the drive moves
to a new version the set is recomputed and replaced atomically: new blocks
are fetched, blocks no longer referenced are released.

Fetching runs in the background at PIN priority, so a read of another file
always goes first (the fetcher serves READ before PIN). The set is streamed
from the folder figures a directory at a time; the missing blocks are asked
for in windows of thousands (runs of up to 120 a WantRun frame) and stored
a window a transaction, and
each pin keeps its own counters (`progress`), which is what `peerdrive pin`
polls: no poll ever walks the tree.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator
from urllib.parse import unquote_to_bytes

import msgpack
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cache.errors import StoreError
from dht.frames import MAX_WHOLE_IDS
from dht.timescale import scaled
from dht.types import Priority

from .capability import ReadCap
from .crypto import HASH_LEN, Ref
from .drive import Drive
from .errors import BlockUnavailable, PeerdriveError, UsageError
from .formats import Entry
from .xattrs import PIN_COMPLETE, PIN_FETCHING, PIN_LISTING, PIN_RETRYING, PIN_WAITING, PinProgress

log = logging.getLogger(__name__)

# Blocks added to the pin being built in one store transaction (a worker thread), from as
# many directories as it takes: a pin of 10^5 small files is 50 transactions, not 1,000.
# The missing ones of a chunk are fetched as one window (`BlockReader.fetch_and_store`:
# asked for together, so they go to peers in runs of up to 120 blocks a WantRun frame,
# and stored in one commit), or several when they add up to more than FETCH_WINDOW_BYTES.
# 2,048: a transaction's changed pages stay in the mount's heap (vfs/blocks.py,
# STORE_BATCH_BLOCKS), and the fetcher's requests of PIN_WINDOWS windows are in memory.
PIN_RETRY = 10.0  # seconds before a pin that could not complete is tried again
PIN_RECHECK = scaled(300.0)  # ... and before complete pins are looked at anyway
HOLD_CHUNK = 2048
FETCH_WINDOW_BYTES = 16 * 1024 * 1024
# Windows fetched at once: while one is being stored (or its last blocks are coming) the
# next keeps the peers busy. Bounds what a pin holds in memory: PIN_WINDOWS windows.
PIN_WINDOWS = 2
# Folders announced as kept whole at most (one Whole frame); past that some go unsaid, and
# peers count fewer copies than there are, never more.
MAX_WHOLE = MAX_WHOLE_IDS
# The pin being built for a new round is this pin's name with this suffix (see sync_one).
BUILDING = "~next"


_PATH_RECORD = b"pinpath:"
_TAG = 16  # bytes of HMAC: no two paths of one drive collide in practice
_NONCE = 12


def _keys(read_key: bytes) -> tuple[bytes, bytes]:
    """(name key, seal key): derived from the read key, for nothing else."""
    return (hmac.new(read_key, b"peerdrive pin name", hashlib.sha256).digest(),
            hmac.new(read_key, b"peerdrive pin path", hashlib.sha256).digest())


def pin_name(cap: ReadCap, path: list[bytes]) -> str:
    """The store's name for the pin of `path` (components have no '/', so joining is exact)."""
    tag = hmac.new(_keys(cap.read_key)[0], b"/".join(path), hashlib.sha256).digest()[:_TAG]
    return f"pin:{cap.drive_id}:{tag.hex()}"


def _record_key(cap: ReadCap, name: str) -> bytes:
    return _PATH_RECORD + cap.pubkey + bytes.fromhex(name.rsplit(":", 1)[1])


def seal_path(cap: ReadCap, name: str, path: list[bytes]) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(_keys(cap.read_key)[1]).encrypt(
        nonce, msgpack.packb(path), name.encode())


def open_path(cap: ReadCap, name: str, sealed: bytes) -> list[bytes] | None:
    """The path sealed for pin `name`, or None if it does not open (another key, corrupt)."""
    try:
        plain = AESGCM(_keys(cap.read_key)[1]).decrypt(
            sealed[:_NONCE], sealed[_NONCE:], name.encode())
        path = msgpack.unpackb(plain)
    except Exception:  # noqa: BLE001 - a record we cannot read is one we do not use
        return None
    if type(path) is not list or not all(type(p) is bytes for p in path):
        return None
    return path


def _old_path_of(name: str, drive_id: str) -> list[bytes] | None:
    """The path of a pin named the old way, in clear (`pin:<drive>:/<quoted path>`)."""
    prefix = f"pin:{drive_id}:/"
    if not name.startswith(prefix):
        return None
    raw = unquote_to_bytes(name[len(prefix):])
    return [p for p in raw.split(b"/") if p]


class Pins:
    """The pins of one mounted drive."""

    def __init__(self, drive: Drive) -> None:
        self.drive = drive
        self.cap = drive.cap
        self.store = drive.storage.store
        self.drive_id = drive.cap.drive_id
        self._wake = trio.Event()
        self.errors: dict[str, str] = {}
        self.progress: dict[str, PinProgress] = {}  # by pin name: the pin's own counters
        # by pin name: the node id of the folder a complete pin keeps whole (announced to
        # the peers, who count copies from it: vfs/answers.py)
        self.whole: dict[str, bytes] = {}
        self._announced: list[bytes] | None = None
        # by pin name: the cancel scope of its round running now. An unpin ends the round:
        # left running it went on fetching the whole path into a pin being built that
        # nobody would keep (`_hold` made it anew), and a following evict found those
        # blocks held by it and fought the fetches for the store
        self._rounds: dict[str, trio.CancelScope] = {}
        self.migrate()

    def migrate(self) -> int:
        """Rename this drive's pins named by path in clear; returns how many."""
        done = 0
        for old in self.store.pin_names():
            path = _old_path_of(old, self.drive_id)
            if path is None:
                continue
            new = pin_name(self.cap, path)
            self.store.put_record(_record_key(self.cap, new), seal_path(self.cap, new, path))
            self.store.add_to_pin(new, self.store.pin_ids(old))  # held by both for a moment
            self.store.unpin(old)
            done += 1
        if done:
            log.info("renamed %d pin(s) of drive %s so their names reveal no path", done,
                     self.drive_id[:16])
        return done

    # -- what is pinned --------------------------------------------------------------

    def pinned(self) -> list[tuple[str, list[bytes]]]:
        """(pin name, path) of every pin of this drive."""
        out = []
        prefix = _PATH_RECORD + self.cap.pubkey
        for key, sealed in self.store.records(prefix):
            name = f"pin:{self.drive_id}:{key[len(prefix):].hex()}"
            path = open_path(self.cap, name, sealed)
            if path is not None and self.store.has_pin(name):
                out.append((name, path))
        return out

    def pinned_paths(self) -> list[list[bytes]]:
        return [path for _, path in self.pinned()]

    def is_pinned(self, path: list[bytes]) -> bool:
        """True if this path or a folder above it is pinned."""
        return any(path[:len(p)] == p for p in self.pinned_paths())

    def pin(self, path: list[bytes]) -> None:
        name = pin_name(self.cap, path)
        if not self.store.has_pin(name):
            # the sealed path first: a pin never exists without a way back to its path
            self.store.put_record(_record_key(self.cap, name), seal_path(self.cap, name, path))
            self.store.set_pin(name, [])
        progress = self.progress.get(name)
        if progress is None or progress.complete:
            # complete for this version, perhaps, but a poll must wait for a fresh look
            self.progress[name] = PinProgress()
        self._wake.set()

    def unpin(self, path: list[bytes]) -> None:
        name = pin_name(self.cap, path)
        scope = self._rounds.get(name)
        if scope is not None:
            scope.cancel()  # run() drops what the round was building once it has stopped
        self.store.unpin(name + BUILDING)
        if not self.store.unpin(name):
            if self.is_pinned(path):
                raise UsageError("this path is pinned through a folder above it; unpin that "
                                 "folder instead")
        self.store.delete_record(_record_key(self.cap, name))
        self.errors.pop(name, None)
        self.progress.pop(name, None)
        self.whole.pop(name, None)
        self._announce()

    def _announce(self) -> None:
        """Tell the peers which folders this device keeps whole, if that changed."""
        ids = sorted(set(self.whole.values()))[:MAX_WHOLE]
        if ids != self._announced and self.drive.announce_whole is not None:
            self._announced = ids
            self.drive.announce_whole(ids)

    def refresh(self) -> None:
        """A new version arrived: recompute every pin's block set.

        A pin complete for the old version is not complete for this one: its
        progress goes back to waiting until a round on this version ends, so
        "complete" always means the pin holds, under its own name, every
        block the current version needs, stored here.
        """
        for name, progress in list(self.progress.items()):
            if progress.complete:
                self.progress[name] = PinProgress()
        self._wake.set()

    def progress_of(self, path: list[bytes]) -> PinProgress | None:
        """The progress of the pin holding `path` (its own, else the nearest folder's)."""
        for k in range(len(path), -1, -1):
            progress = self.progress.get(pin_name(self.cap, path[:k]))
            if progress is not None:
                return progress
        return None

    # -- the blocks a path needs -----------------------------------------------------

    async def _resolve(self, path: list[bytes]) -> tuple[Entry, list[Ref], bytes | None]:
        """The entry at `path`, the directory nodes on the way to it, its folder's node id."""
        tree = self.drive.tree
        entry = self.drive.root_entry()
        refs: list[Ref] = []
        folder = None
        for name in path:
            if not entry.is_dir or entry.node is None:
                raise UsageError(f"{b'/'.join(path)!r} no longer exists in this version")
            folder = entry.node.block_id
            refs.extend(await tree.node_refs(entry.node, Priority.PIN))
            child = await tree.lookup(entry.node, name)
            if child is None:
                raise UsageError(f"{b'/'.join(path)!r} no longer exists in this version")
            entry = child
        return entry, refs, folder

    async def _batches(self, entry: Entry, on_way: list[Ref], folder: bytes | None
                       ) -> AsyncIterator[tuple[list[tuple[bytes, int]], bytes | None]]:
        """The blocks `entry` needs, streamed a directory at a time: ([(id, length)], folder).

        Built from the folder figures (each directory read once, iteratively,
        each shared subtree once), never from one list of the whole tree.
        """
        yield [(r.block_id, r.length) for r in on_way], None
        if entry.is_file:
            pairs = [(cl.ref.block_id, cl.ref.length) for cl in entry.chunk_lists or ()]
            chunks = (await self.drive.tree.chunk_map(entry, Priority.PIN)).chunks
            pairs.extend((r.block_id, r.length) for r in chunks)
            yield pairs, folder
        elif entry.is_dir and entry.node is not None:
            async for d in self.drive.figures.subtree(entry.node, Priority.PIN):
                pairs = [(r.block_id, r.length) for r in d.nodes]
                ids, lengths = d.record()
                pairs.extend((ids[k * HASH_LEN:(k + 1) * HASH_LEN], max(lengths[k], 1))
                             for k in range(len(lengths)))
                yield pairs, d.node_id

    async def sync_one(self, path: list[bytes]) -> None:
        """Make the pin of `path` hold exactly what `path` needs now, and fetch what is missing.

        Streamed: the blocks of each directory are added to a pin being built
        (`<name>~next`, so nothing the old set holds is released meanwhile)
        and their missing ones fetched while the walk goes on, a chunk of
        HOLD_CHUNK blocks at a time: each chunk's missing blocks are one
        window (split by FETCH_WINDOW_BYTES), asked for together so they go
        to peers in long runs and stored in one commit, PIN_WINDOWS windows
        at once. The pin's own counters say how far it is. At the end the pin built
        replaces the old one in one step, which releases what an older
        version needed. No set of the pin's ids is ever held in memory: a
        block that directories in two chunks share is counted (and looked up)
        once per chunk.
        """
        name = pin_name(self.cap, path)
        building = name + BUILDING
        version = self.drive.version  # the round works on this version's tree
        progress = self.progress[name] = PinProgress(phase=PIN_LISTING)
        entry, on_way, folder = await self._resolve(path)
        # a process that stopped mid-round may have left its partial set: the pin keeps it
        await trio.to_thread.run_sync(self._keep_partial, name, building)
        failures: list[str] = []
        blocks = self.drive.blocks
        figures = self.drive.figures

        async def fetch_windows(receive: trio.MemoryReceiveChannel[
                dict[bytes, tuple[int, bytes | None]]], nursery: trio.Nursery) -> None:
            """Fetch and store windows of missing blocks, one after the other."""
            async with receive:
                async for window in receive:
                    def stored(ids: list[bytes], window: dict = window) -> None:
                        for i in ids:
                            n, changes = window[i]
                            progress.blocks += 1
                            progress.bytes += n
                            figures.fetched(i, changes)
                    try:
                        await blocks.fetch_and_store(list(window), Priority.PIN, stored)
                    except (PeerdriveError, StoreError) as exc:
                        # a block no peer serves now: stop this round (the rest would most
                        # likely wait out the same timeout) and let `run` try again soon
                        failures.append(str(exc))
                        nursery.cancel_scope.cancel()

        async def hold_and_fetch(chunk: dict[bytes, tuple[int, bytes | None]],
                                 send: trio.MemorySendChannel[
                                     dict[bytes, tuple[int, bytes | None]]]) -> None:
            """Add a chunk of blocks to the pin being built, then fetch the missing ones."""
            missing = set(await trio.to_thread.run_sync(self._hold, building, list(chunk)))
            progress.total_blocks += len(chunk)
            progress.total_bytes += sum(n for n, _ in chunk.values())
            window: dict[bytes, tuple[int, bytes | None]] = {}
            window_bytes = 0
            for i, (n, changes) in chunk.items():
                if i not in missing:
                    progress.blocks += 1
                    progress.bytes += n
                    continue
                if window and window_bytes + n > FETCH_WINDOW_BYTES:
                    await send.send(window)
                    window, window_bytes = {}, 0
                window[i] = (n, changes)
                window_bytes += n
            if window:
                await send.send(window)

        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[dict[bytes, tuple[int, bytes | None]]](0)
            async with receive:
                for _ in range(PIN_WINDOWS):
                    nursery.start_soon(fetch_windows, receive.clone(), nursery)
            async with send:
                # blocks of several directories at once: one store transaction per chunk
                chunk: dict[bytes, tuple[int, bytes | None]] = {}
                async for pairs, changes in self._batches(entry, on_way, folder):
                    for i, n in pairs:
                        chunk[i] = (n, changes)
                    if len(chunk) >= HOLD_CHUNK:
                        await hold_and_fetch(chunk, send)
                        chunk = {}
                if chunk:
                    await hold_and_fetch(chunk, send)
            if not failures:
                progress.phase = PIN_FETCHING
        if failures:
            # what this round fetched stays held by the pin until a round completes
            await trio.to_thread.run_sync(self._keep_partial, name, building)
            still = progress.total_blocks - progress.blocks
            raise BlockUnavailable(
                f"{still} of {progress.total_blocks} blocks still missing; the pin stays and "
                f"completes when a peer serves them ({failures[0]})")
        await trio.to_thread.run_sync(self._finish, name, building)
        # complete only once the pin holds the set under its own name (the line above),
        # and only for the version still current: a newer one gets its own round
        progress.phase = PIN_COMPLETE if self.drive.version == version else PIN_WAITING
        if entry.is_dir and entry.node is not None and self.store.has_pin(name):
            self.whole[name] = entry.node.block_id
            self._announce()

    def _keep_partial(self, name: str, building: str) -> None:
        """A round cut short: the pin keeps what it built (worker thread); unless unpinned."""
        if self.store.has_pin(name):
            self.store.merge_pin(name, building)
        else:
            self.store.unpin(building)

    def _drop_building(self, name: str) -> None:
        """A round ended by an unpin: what it was building goes, unless pinned again."""
        if not self.store.has_pin(name):
            self.store.unpin(name + BUILDING)

    def _finish(self, name: str, building: str) -> None:
        """The pin built replaces the pin (worker thread); unless it was unpinned meanwhile."""
        if not self.store.has_pin(name):
            self.store.unpin(building)
        elif self.store.has_pin(building):
            self.store.replace_pin(name, building)
        else:  # nothing below the path: no block was ever added
            self.store.set_pin(name, [])

    def _hold(self, name: str, ids: list[bytes]) -> list[bytes]:
        """Add `ids` to the pin (so nothing evicts them from now on); the ones missing."""
        self.store.add_to_pin(name, ids)
        return self.store.missing(ids)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every pin complete: at start, when pins change, on new versions, on retry.

        Nothing a drive holds can end this task: a pin that fails for any
        reason is reported in its progress and the mount log, and retried.
        """
        task_status.started()
        while True:
            self._wake = trio.Event()
            failed = False
            pinned = self.pinned()
            names = {name for name, _ in pinned}
            for gone in [n for n in self.progress if n not in names]:
                del self.progress[gone]
            for gone in [n for n in self.whole if n not in names]:
                del self.whole[gone]
            self._announce()
            for name, path in pinned:
                try:
                    with trio.CancelScope() as scope:
                        self._rounds[name] = scope
                        await self.sync_one(path)
                    if scope.cancelled_caught:
                        # unpinned meanwhile: a store call in a worker thread may have
                        # finished after the unpin and added to the pin being built again
                        await trio.to_thread.run_sync(self._drop_building, name)
                        continue
                    self.errors.pop(name, None)
                except Exception as exc:  # noqa: BLE001 - a hostile drive must not end the mount
                    failed = True
                    self.errors[name] = str(exc) or type(exc).__name__
                    progress = self.progress.setdefault(name, PinProgress())
                    progress.phase = PIN_RETRYING
                    progress.error = self.errors[name]
                    # the message may name the path: only with -v (the log is on disk)
                    log.warning("pin %s incomplete (%s)", name.rsplit(":", 1)[1][:8],
                                type(exc).__name__)
                    if isinstance(exc, PeerdriveError | StoreError):
                        log.debug("pin %s: %s", name, exc)
                    else:
                        log.exception("pin %s failed", name.rsplit(":", 1)[1][:8])
                finally:
                    self._rounds.pop(name, None)
            with trio.move_on_after(PIN_RETRY if failed else PIN_RECHECK):
                await self._wake.wait()
