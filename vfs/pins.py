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
always goes first (the fetcher serves READ before PIN).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from urllib.parse import unquote_to_bytes

import msgpack
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cache.errors import StoreError
from dht.types import Priority

from .capability import ReadCap
from .crypto import Ref
from .drive import Drive
from .errors import BlockUnavailable, PeerdriveError, UsageError
from .formats import Entry

log = logging.getLogger(__name__)

PIN_FETCH_CONCURRENCY = 16


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
        self._wake.set()

    def unpin(self, path: list[bytes]) -> None:
        name = pin_name(self.cap, path)
        if not self.store.unpin(name):
            if self.is_pinned(path):
                raise UsageError("this path is pinned through a folder above it; unpin that "
                                 "folder instead")
        self.store.delete_record(_record_key(self.cap, name))
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
        name = pin_name(self.cap, path)
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
            for name, path in self.pinned():
                try:
                    await self.sync_one(path)
                    self.errors.pop(name, None)
                except (PeerdriveError, StoreError) as exc:
                    failed = True
                    self.errors[name] = str(exc)
                    # the message may name the path: only with -v (the log is on disk)
                    log.warning("pin %s incomplete (%s)", name.rsplit(":", 1)[1][:8],
                                type(exc).__name__)
                    log.debug("pin %s: %s", name, exc)
            with trio.move_on_after(10 if failed else 300):
                await self._wake.wait()
