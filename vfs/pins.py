"""Pins as paths: keep a file or folder whole on this device, following new versions.

A pin is a named pin set in the store (`pin:<drive>:<path>`), so it survives
restarts and the cache never evicts what it holds. Its set is every block
needed to read the path offline: the directory nodes from the root down to
it, every directory node, chunk list and chunk below it. When the drive moves
to a new version the set is recomputed and replaced atomically: new blocks
are fetched, blocks no longer referenced are released.

Fetching runs in the background at PIN priority, so a read of another file
always goes first (the fetcher serves READ before PIN).
"""

from __future__ import annotations

import logging
from urllib.parse import quote_from_bytes, unquote_to_bytes

import trio

from cache.errors import StoreError
from dht.types import Priority

from .crypto import Ref
from .drive import Drive
from .errors import BlockUnavailable, PeerdriveError, UsageError
from .formats import Entry

log = logging.getLogger(__name__)

PIN_FETCH_CONCURRENCY = 16


def pin_name(drive_id: str, path: list[bytes]) -> str:
    return f"pin:{drive_id}:/{quote_from_bytes(b'/'.join(path), safe='/')}"


def path_of(name: str, drive_id: str) -> list[bytes] | None:
    prefix = f"pin:{drive_id}:/"
    if not name.startswith(prefix):
        return None
    raw = unquote_to_bytes(name[len(prefix):])
    return [p for p in raw.split(b"/") if p]


class Pins:
    """The pins of one mounted drive."""

    def __init__(self, drive: Drive) -> None:
        self.drive = drive
        self.store = drive.storage.store
        self.drive_id = drive.cap.drive_id
        self._wake = trio.Event()
        self.errors: dict[str, str] = {}

    # -- what is pinned --------------------------------------------------------------

    def pinned_paths(self) -> list[list[bytes]]:
        out = []
        for name in self.store.pin_names():
            path = path_of(name, self.drive_id)
            if path is not None:
                out.append(path)
        return out

    def is_pinned(self, path: list[bytes]) -> bool:
        """True if this path or a folder above it is pinned."""
        return any(path[:len(p)] == p for p in self.pinned_paths())

    def pin(self, path: list[bytes]) -> None:
        name = pin_name(self.drive_id, path)
        if not self.store.has_pin(name):
            self.store.set_pin(name, [])
        self._wake.set()

    def unpin(self, path: list[bytes]) -> None:
        name = pin_name(self.drive_id, path)
        if not self.store.unpin(name):
            if self.is_pinned(path):
                raise UsageError("this path is pinned through a folder above it; unpin that "
                                 "folder instead")
        self.errors.pop(name, None)

    def refresh(self) -> None:
        """A new version arrived: recompute every pin's block set."""
        self._wake.set()

    # -- the blocks a path needs -----------------------------------------------------

    async def _resolve(self, path: list[bytes]) -> tuple[Entry, list[Ref]]:
        """The entry at `path` and the directory nodes on the way to it."""
        tree = self.drive.tree
        entry = self.drive.root_entry()
        refs: list[Ref] = []
        for name in path:
            if not entry.is_dir or entry.node is None:
                raise UsageError(f"{b'/'.join(path)!r} no longer exists in this version")
            refs.extend(await tree.node_refs(entry.node, Priority.PIN))
            child = await tree.lookup(entry.node, name)
            if child is None:
                raise UsageError(f"{b'/'.join(path)!r} no longer exists in this version")
            entry = child
        return entry, refs

    async def blocks_under(self, entry: Entry) -> list[Ref]:
        """Every block needed to read `entry` whole (metadata and content)."""
        tree = self.drive.tree
        if entry.is_file:
            refs = [cl.ref for cl in entry.chunk_lists or ()]
            refs.extend((await tree.chunk_map(entry, Priority.PIN)).chunks)
            return refs
        if entry.is_dir and entry.node is not None:
            refs = await tree.node_refs(entry.node, Priority.PIN)
            async for _, child in tree.entries(entry.node, 0, Priority.PIN):
                refs.extend(await self.blocks_under(child))
            return refs
        return []

    async def sync_one(self, path: list[bytes]) -> None:
        name = pin_name(self.drive_id, path)
        entry, refs = await self._resolve(path)
        # metadata first: hold it, then walk below it (which fetches it)
        self.store.add_to_pin(name, [r.block_id for r in refs])
        refs.extend(await self.blocks_under(entry))
        self.store.set_pin(name, [r.block_id for r in refs])
        missing = set(self.store.missing([r.block_id for r in refs]))
        todo = list({r.block_id: r for r in refs if r.block_id in missing}.values())
        limiter = trio.Semaphore(PIN_FETCH_CONCURRENCY)
        failures: list[str] = []

        async def get(ref: Ref, nursery: trio.Nursery) -> None:
            try:
                await self.drive.blocks.ciphertext(ref, Priority.PIN)
            except (PeerdriveError, StoreError) as exc:
                # a block no peer serves now: stop this round (the rest would most likely
                # wait out the same timeout) and let `run` try again soon
                failures.append(str(exc))
                nursery.cancel_scope.cancel()
            finally:
                limiter.release()

        async with trio.open_nursery() as nursery:
            for ref in todo:
                await limiter.acquire()
                nursery.start_soon(get, ref, nursery)
        if failures:
            still = len(self.store.missing([r.block_id for r in todo]))
            total = len({r.block_id for r in refs})
            raise BlockUnavailable(
                f"{still} of {total} blocks still missing; the pin stays and completes when "
                f"a peer serves them ({failures[0]})")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every pin complete: at start, when pins change, on new versions, on retry."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            failed = False
            for path in self.pinned_paths():
                name = pin_name(self.drive_id, path)
                try:
                    await self.sync_one(path)
                    self.errors.pop(name, None)
                except (PeerdriveError, StoreError) as exc:
                    failed = True
                    self.errors[name] = str(exc)
                    log.warning("pin %s incomplete: %s", name, exc)
            with trio.move_on_after(10 if failed else 300):
                await self._wake.wait()
