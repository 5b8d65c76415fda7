"""`peerdrive mirror`: a drive version's ciphertext as static files any web server can serve.

The directory it writes (docs/formats.md, "Mirror layout", paths from
`dht.mirror_layout`):

    DIR/head                    the signed head, exact bytes as signed
    DIR/blocks/ab/abcdef...     every block of the version (its block list's
                                blocks included), named by id in hex

Nothing in it is plaintext and nothing needs the read key: the blocks to
write are the ones the head's block list names (`vfs.blocklist`), walked and
checked from the signed head down, and every block is checked against its id
before it is written. Any static web server, object-store bucket or CDN can
serve the directory as it is; readers verify everything again.

Updates are safe to serve while they happen and to interrupt: each file is
written to a temporary name and renamed into place, every block of the
version is on disk (and synced) before the new head replaces the old one,
and a later run writes only the blocks that are not there yet. A head is
never replaced by an older one: a mirror does not roll its readers back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from dht.errors import DhtError
from dht.mirror_layout import BLOCKS_DIR, HEAD_PATH, block_path
from dht.types import Priority

from .blocklist import BlockListWalk
from .capability import StoreCap
from .errors import BlockUnavailable, FormatError, IntegrityError, NoSpaceError, UsageError
from .head import Head, open_head
from .head_follower import join_for_head
from .home import Home
from .options import MOUNT_LISTEN, MirrorOptions
from .storage import DriveStorage

# get_block(block_id) -> the block's bytes, from this node's store or the network
GetBlock = Callable[[bytes], Awaitable[bytes]]

CONCURRENCY = 16  # blocks fetched and written at once
_TMP_PREFIX = ".tmp-"
# held (flock) by a run for its whole length: two runs never write one directory at once
LOCK_NAME = ".peerdrive-mirror.lock"


@dataclass
class MirrorResult:
    directory: Path
    seq: int
    blocks: int = 0  # blocks of the version (its block list's included)
    bytes: int = 0  # their total size
    written: int = 0  # blocks this run wrote
    written_bytes: int = 0
    skipped: int = 0  # blocks already in the mirror
    head_written: bool = False  # False: the mirror already had this head


class MirrorWriter:
    """Writes one version of one drive into one directory; nothing below the CLI prints."""

    def __init__(self, directory: Path, cap: StoreCap, get_block: GetBlock,
                 on_progress: Callable[[int, int], None] | None = None,
                 concurrency: int = CONCURRENCY,
                 on_wait: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.cap = cap
        self.get_block = get_block
        self._progress = on_progress or (lambda done, total: None)
        self.concurrency = concurrency
        self._on_wait = on_wait  # another run holds the directory: we wait for it

    # -- the head already there ------------------------------------------------------

    def current_head(self) -> Head | None:
        """The head the mirror serves now, or None; UsageError if it is another drive's."""
        path = self.directory / HEAD_PATH
        try:
            wire = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return open_head(wire, StoreCap(self.cap.pubkey))
        except IntegrityError as exc:
            raise UsageError(f"{self.directory} holds a mirror of another drive, or a damaged "
                             f"head ({exc}); use an empty directory") from exc
        except FormatError as exc:
            raise UsageError(f"{path} is not a head this peerdrive reads ({exc}); "
                             "use an empty directory") from exc

    # -- the whole run ---------------------------------------------------------------

    async def run(self, head: Head) -> MirrorResult:
        """Bring the mirror to `head`: every block first, then the head itself."""
        if head.block_list is None:
            raise UsageError(f"version {head.seq} of drive {self.cap.drive_id[:16]} has no "
                             "block list (published by an older peerdrive): publish it again")
        self.current_head()  # another drive's mirror: refused before anything is written
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / BLOCKS_DIR).mkdir(exist_ok=True)
        async with _directory_lock(self.directory / LOCK_NAME, self._on_wait):
            # under the lock: another run may have moved the mirror on meanwhile
            current = self.current_head()
            if current is not None and current.seq > head.seq:
                raise UsageError(f"{self.directory} already serves version {current.seq}, "
                                 f"newer than version {head.seq} here: refusing to roll the "
                                 "mirror back")
            await trio.to_thread.run_sync(self._remove_stale_temporaries)
            return await self._run_locked(head, current)

    async def _run_locked(self, head: Head, current: Head | None) -> MirrorResult:
        result = MirrorResult(self.directory, head.seq)

        # the block list itself, from the signed head down, checked block by block
        walk = BlockListWalk(head.block_list)
        while not walk.done:
            for block_id in walk.wanted():
                walk.feed(block_id, await self.get_block(block_id))
        sizes = dict(walk.blocks())
        sizes.update(walk.list_blocks)
        result.blocks = len(sizes)
        result.bytes = sum(sizes.values())

        todo = await trio.to_thread.run_sync(self._missing, sizes)
        result.skipped = len(sizes) - len(todo)
        done = result.bytes - sum(sizes[b] for b in todo)
        self._progress(done, result.bytes)
        ids = iter(todo)

        async def worker() -> None:
            nonlocal done
            for block_id in ids:
                data = await self.get_block(block_id)
                if len(data) != sizes[block_id]:
                    raise IntegrityError(f"block {block_id.hex()[:16]} has {len(data)} bytes, "
                                         f"its block list says {sizes[block_id]}")
                await trio.to_thread.run_sync(self._write_block, block_id, data)
                result.written += 1
                result.written_bytes += len(data)
                done += len(data)
                self._progress(done, result.bytes)

        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(worker)

        if current is None or current.wire != head.wire:
            await trio.to_thread.run_sync(self._write_head, head)
            result.head_written = True
        return result

    # -- files (worker threads) ------------------------------------------------------

    def _remove_stale_temporaries(self) -> None:
        """Temporary files a run that was killed left behind (no other run holds the lock)."""
        for folder in (self.directory, *(self.directory / BLOCKS_DIR).iterdir()):
            if not folder.is_dir():
                continue
            for path in folder.glob(f"{_TMP_PREFIX}*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _missing(self, sizes: dict[bytes, int]) -> list[bytes]:
        """Blocks not in the mirror yet (a file of the right size counts as there)."""
        out = []
        for block_id, size in sizes.items():
            try:
                if os.stat(self.directory / block_path(block_id)).st_size == size:
                    continue
            except FileNotFoundError:
                pass
            out.append(block_id)
        return out

    def _write_block(self, block_id: bytes, data: bytes) -> None:
        if hashlib.sha256(data).digest() != block_id:  # never write what the id does not name
            raise IntegrityError(f"block {block_id.hex()[:16]} does not match its id")
        path = self.directory / block_path(block_id)
        path.parent.mkdir(mode=0o755, exist_ok=True)
        _write_atomically(path, data, sync=False)

    def _write_head(self, head: Head) -> None:
        # every block written so far reaches the disk before the head that names them
        _sync_filesystem(self.directory)
        _write_atomically(self.directory / HEAD_PATH, head.wire, sync=True)


@contextlib.asynccontextmanager
async def _directory_lock(path: Path, on_wait: Callable[[], None] | None):
    """flock(2) on `path` for the block, waited for without blocking the event loop.

    The kernel drops it when the holder exits however it exits, so a killed
    run never leaves the directory locked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait()
                told = True
                await trio.sleep(0.5)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes, *, sync: bool) -> None:
    """Write to a temporary name beside `path`, then rename: readers see all or nothing."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise NoSpaceError(f"no space left writing {path}") from exc
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    if sync:
        dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def _sync_filesystem(directory: Path) -> None:
    """syncfs(2) the filesystem holding `directory`: one call for every block written."""
    libc_name = ctypes.util.find_library("c")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc_name is not None:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            if libc.syncfs(fd) == 0:
                return
        os.sync()  # no syncfs: the whole machine, slower but just as safe
    finally:
        os.close(fd)


def local_then_network(store_get: Callable[[bytes], bytes | None],
                       fetch: GetBlock | None) -> GetBlock:
    """A GetBlock: this node's store first (checked against the id), then `fetch`."""

    async def get_block(block_id: bytes) -> bytes:
        data = await trio.to_thread.run_sync(_checked, store_get, block_id)
        if data is not None:
            return data
        if fetch is None:
            raise BlockUnavailable(f"block {block_id.hex()[:16]} is not on this node")
        return await fetch(block_id)

    return get_block


def _checked(store_get: Callable[[bytes], bytes | None], block_id: bytes) -> bytes | None:
    data = store_get(block_id)
    if data is None or hashlib.sha256(data).digest() != block_id:
        return None
    return bytes(data)


# ----------------------------------------------------------------------------- the command


def run_mirror(home: Home, cap: StoreCap, directory: Path, opts: MirrorOptions,
               on_progress: Callable[[int, int], None] | None = None,
               on_wait: Callable[[], None] | None = None) -> MirrorResult:
    """`peerdrive mirror`: bring `directory` to the newest version this node can find.

    From this node's store alone when it holds the head and every block (the
    publisher, a host); otherwise it joins the network like a mount (the
    DHT, LAN, the head's mirrors) and fetches what is missing.
    """
    from .node import network_for, open_store

    node_opts = opts.resolve(home.config(), MOUNT_LISTEN)
    store = open_store(home, None)
    try:
        return trio.run(_mirror_main, home, cap, directory, node_opts, store, on_progress,
                        on_wait, network_for)
    finally:
        store.close()


async def _mirror_main(home, cap, directory, node_opts, store, on_progress, on_wait,
                       network_for) -> MirrorResult:
    storage = DriveStorage(store)
    head = storage.load_head(cap)
    if head is not None:
        writer = MirrorWriter(directory, cap, local_then_network(store.get, None), on_progress,
                              on_wait=on_wait)
        try:
            return await writer.run(head)
        except BlockUnavailable:
            pass  # some blocks are elsewhere: ask the network for them (and for a newer head)
    net = network_for(home, store, node_opts)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        head = await join_for_head(net, cap, storage, head, node_opts.mirrors)
        fetch = net.fetch_function(cap)

        async def from_network(block_id: bytes) -> bytes:
            try:
                return await fetch(block_id, Priority.PIN)
            except DhtError as exc:
                raise BlockUnavailable(str(exc)) from exc

        writer = MirrorWriter(directory, cap, local_then_network(store.get, from_network),
                              on_progress, on_wait=on_wait)
        result = await writer.run(head)
        nursery.cancel_scope.cancel()
    return result
