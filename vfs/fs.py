"""The FUSE operations of a mounted drive: the one place errors become errno.

This class translates kernel requests into calls on the drive (`vfs.drive`):
it keeps the inode table and the open file handles, and nothing else. A
version's content never changes, so entries and attributes get long kernel
timeouts and files open with `keep_cache`; when a new version arrives the
drive tells us and we invalidate what changed.

The mount is read-only, but it is not mounted `ro`: the kernel would then
refuse `setxattr` before asking us, and setting `user.peerdrive.pinned` is
how pinning works. Every write operation answers EROFS here instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyfuse3
import trio

from cache.errors import StoreFull

from . import xattrs
from .drive import Drive, OpenFile
from .errors import (
    BlockUnavailable,
    DirectoryNotEmpty,
    EntryExists,
    FormatError,
    IntegrityError,
    InvalidChange,
    IsADirectory,
    NameTooLong,
    NoSpaceError,
    NoSuchEntry,
    NotADirectory,
    NotPermitted,
    PathError,
    PeerdriveError,
    UsageError,
    unwrap_group,
)
from .formats import KIND_DIR, KIND_FILE, KIND_LINK, Entry
from .head import Head
from .refresh import FolderRefresh

if TYPE_CHECKING:  # a read-only mount never loads the writing modules (vfs/node.py)
    from .worktree import WNode, WorkTree
    from .writer import WriteSession

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 3600.0

T = TypeVar("T")

_PATH_ERRNO = {
    NoSuchEntry: errno.ENOENT,
    EntryExists: errno.EEXIST,
    DirectoryNotEmpty: errno.ENOTEMPTY,
    NotADirectory: errno.ENOTDIR,
    IsADirectory: errno.EISDIR,
    NotPermitted: errno.EPERM,
    InvalidChange: errno.EINVAL,
    NameTooLong: errno.ENAMETOOLONG,
}


def fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn the drive's exceptions into FUSEError(errno), logging the ones that matter.

    A request named in its Operations' `STOPPED_AT_SHUTDOWN` runs in a cancel
    scope that `stop_waits` cancels, and is then answered EIO (see there).
    Each call is counted in the Operations' `requests` (`counted`).
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        ops = args[0]
        ops.requests[fn.__name__] += 1
        if fn.__name__ in ops.STOPPED_AT_SHUTDOWN:
            if ops.stopping:
                raise pyfuse3.FUSEError(errno.EIO)
            with trio.CancelScope() as scope:
                ops._waits.add(scope)
                try:
                    return await _errnos(fn, args)
                finally:
                    ops._waits.discard(scope)
            log.info("%s: answered EIO, the mount is stopping", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO)
        return await _errnos(fn, args)

    return wrapper


def counted(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Count a request that answers no errno (forget, release, ...) in `requests`.

    Every request the kernel sends us is counted by kind, so what a walk or a
    read costs the mount is a figure anyone can read (`peerdrive status
    --json`, the mount's `requests`), not a guess: a warm `find` should send
    nothing at all.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        args[0].requests[fn.__name__] += 1
        return await fn(*args)

    return wrapper


async def _errnos(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    """`fn(*args)`, the drive's exceptions turned into FUSEError(errno)."""
    try:
        try:
            return await fn(*args)
        except BaseExceptionGroup as group:  # a nursery below: its one real error
            leaf = unwrap_group(group)
            if leaf is group:
                raise
            raise leaf from None
    except pyfuse3.FUSEError:
        raise
    except PathError as exc:  # a writable mount refusing a change: the caller's doing
        raise pyfuse3.FUSEError(_PATH_ERRNO.get(type(exc), errno.EINVAL)) from None
    except (BlockUnavailable, IntegrityError) as exc:  # messages name blocks, not paths
        log.warning("%s: %s", fn.__name__, exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except FormatError as exc:
        # a malformed record's message may quote names of the drive: the log (on disk)
        # gets them only with -v (docs/security.md, local user)
        log.warning("%s: the drive holds a malformed record (-v for details)", fn.__name__)
        log.debug("%s: %s", fn.__name__, exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except (NoSpaceError, StoreFull) as exc:
        log.warning("%s: %s", fn.__name__, exc)
        raise pyfuse3.FUSEError(errno.ENOSPC) from None
    except UsageError as exc:
        log.info("%s: %s", fn.__name__, exc)
        raise pyfuse3.FUSEError(errno.EINVAL) from None
    except PeerdriveError as exc:
        log.warning("%s: %s", fn.__name__, exc)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except Exception:
        log.exception("%s failed", fn.__name__)
        raise pyfuse3.FUSEError(errno.EIO) from None


def _stat_quietly(paths: list[bytes]) -> None:
    """stat(2) each path, whatever fails (a worker thread's job: see _refresh_folders)."""
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            os.stat(path, follow_symlinks=False)


@dataclass(slots=True)
class Inode:
    ino: int
    parent: int
    name: bytes
    entry: Entry
    version: int
    lookups: int = 0
    # A file of an older version whose bytes changed: the kernel may still hold it
    # (open handles, its size and page cache), so it keeps its entry for good and
    # the name gets a new inode. Forgotten when the kernel forgets it.
    frozen: bool = False
    # we asked the kernel to forget its name (trim_inodes); it has not yet
    asked: bool = False


def needs_new_inode(old: Entry, new: Entry | None) -> bool:
    """A file whose bytes (or kind) differ in a new version cannot stay the same inode.

    The kernel keeps size and cached pages per inode, so a handle opened on
    the old version would read the new size (zeros past its old end, or a
    cut-off file) if the inode changed under it.
    """
    if not old.is_file:
        return False
    if new is None or not new.is_file:
        return True
    return (old.size, old.chunks, old.chunk_lists) != (new.size, new.chunks, new.chunk_lists)


# pyfuse3 built with patches/pyfuse3-*-cache-readdir.patch (scripts/setup does) lets
# opendir ask the kernel to cache a directory's listing; a plain pyfuse3 cannot.
KERNEL_CACHES_LISTINGS = hasattr(pyfuse3.FileInfo, "cache_readdir")
# With the patch's readdir_by_inode, directories are never opened: opendir answers ENOSYS
# once, after which the kernel sends no OPENDIR or RELEASEDIR at all and caches every
# listing by itself (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE are its default then); READDIR
# then names the directory by inode. A warm walk of 200 folders sends nothing to us.
LISTINGS_BY_INODE = KERNEL_CACHES_LISTINGS and hasattr(pyfuse3.Operations, "readdir_by_inode")
# pyfuse3 built with patches/pyfuse3-*-read-parts.patch takes a READ's reply as a tuple of
# buffers and has the kernel gather them (fuse_reply_iov): a 1 MiB reply of several chunks
# is not joined into one copy on the event loop first. A plain pyfuse3 gets the joined bytes.
READ_REPLY_PARTS = bool(getattr(pyfuse3, "read_reply_parts", False))


async def read_reply(drive: Drive, of: OpenFile, off: int,
                     size: int) -> bytes | memoryview | tuple[memoryview, ...]:
    """What a FUSE READ of a drive's file answers: its bytes, one buffer or a tuple of them."""
    if not READ_REPLY_PARTS:
        return await drive.read(of, off, size)
    parts = await drive.read_parts(of, off, size)
    if len(parts) > 1:
        return parts
    return parts[0] if parts else b""


# Listings remembered by (inode, tag), so a reader still going through an older version's
# listing of a directory goes on with that listing (see DriveOperations._listing_of).
LISTINGS_REMEMBERED = 4096

# Inodes the kernel may hold us to before we ask it to let the oldest go: it holds an
# inode (and so do we: its entry, name and parent) for as long as it keeps the dentry,
# which after a `find` over a million files is every one of them (FORGET comes only
# under memory pressure). Past INODES_HIGH the oldest names are invalidated down to
# three quarters of it; the kernel then forgets what nobody uses, and looks it up again if asked.
INODES_HIGH = 65536  # `mount --max-inodes` (at least vfs/options.py's MIN_INODES)

# Linux's bound on a path a system call takes (bytes, the final NUL included).
PATH_MAX = 4096

# A readdir offset is (listing tag << LISTING_TAG_SHIFT) | (index + 1).
LISTING_TAG_SHIFT = 40
LISTING_INDEX_MASK = (1 << LISTING_TAG_SHIFT) - 1


def listing_tag(dir_entry: Entry) -> int:
    """22 bits of the directory node's id: the same listing, the same tag."""
    assert dir_entry.node is not None
    return int.from_bytes(dir_entry.node.block_id[:3], "big") >> 2


def listing_offset(dir_entry: Entry, index: int) -> int:
    """The readdir offset after entry `index` of the listing of `dir_entry`.

    The kernel fills its cached listing of a directory in the order replies
    come, and appends a reply only where the cached part ends, which it
    recognises by offset. The tag (22 bits of the directory node's id: the
    same listing, the same tag) keeps a handle still reading an older listing
    from ever continuing a cache being filled with a newer one. Below 2**62.
    A directory holds at most formats.MAX_DIR_ENTRIES (2**32) entries, so the
    index never reaches the tag's bits; a listing that claims more is refused
    rather than handed out offsets that would wrap and list it for ever.
    """
    if not 0 <= index < LISTING_INDEX_MASK:
        raise FormatError(f"directory listing index {index} is past what offsets can hold")
    return (listing_tag(dir_entry) << LISTING_TAG_SHIFT) | (index + 1)


class DriveOperations(pyfuse3.Operations):
    """pyfuse3 operations over one mounted drive."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    readdir_by_inode = LISTINGS_BY_INODE
    # The requests that only look (the network is all they may wait on: a block, a
    # directory node, a folder's figures): `stop_waits` cuts them short. Whatever
    # changes the drive or the device is left to finish.
    STOPPED_AT_SHUTDOWN = frozenset({"lookup", "getattr", "readlink", "opendir", "readdir",
                                     "open", "read", "listxattr", "getxattr"})

    def __init__(self, drive: Drive, max_inodes: int = INODES_HIGH) -> None:
        super().__init__()
        self.stopping = False
        self._waits: set[trio.CancelScope] = set()
        self.drive = drive
        self.uid = os.getuid()
        self.gid = os.getgid()
        root = drive.root_entry()
        self.inodes: dict[int, Inode] = {
            pyfuse3.ROOT_INODE: Inode(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, b"", root,
                                      drive.version)}
        self.by_name: dict[tuple[int, bytes], int] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, Inode] = {}
        self._listings: OrderedDict[tuple[int, int], Inode] = OrderedDict()
        self._next_fh = 1
        self._table_full = trio.Event()
        # names a listing handed the kernel from an older version than the drive's by the
        # time it answered (see readdir): dropped from the kernel's cache by `run`
        self._stale_names: list[tuple[int, bytes]] = []
        self._stale_listed = trio.Event()
        self.max_inodes = max_inodes
        self._asked = 0  # inodes asked to be forgotten and still here
        self.trimmed = 0  # inodes we asked the kernel to forget (what the tests look at)
        self.made = 0  # inodes made, ever (a walk the kernel answers alone makes none)
        self.forgotten = 0  # inodes the kernel forgot, ever (asked for or not)
        # requests the kernel sent, by kind (fuse_errors, counted): the status snapshot's
        # `requests`, so what a walk sends the mount is measured, not guessed (issue 12)
        self.requests: Counter[str] = Counter()
        # folders listed to their end, stat-ed by the mount itself once settled so that
        # the next walk's stat(2) of each needs no GETATTR (vfs/refresh.py); off (None)
        # until vfs/node.py names the mount point
        self.mountpoint: bytes | None = None
        self._refresh = FolderRefresh()
        self._refresh_wanted = trio.Event()
        self.refreshed = 0  # folders the mount stat-ed (what the tests look at)
        # set once the kernel's INIT has been answered (see vfs.mount.serve_fuse)
        self.initialized = trio.Event()
        self._switching = trio.Lock()  # one version switch at a time
        if not KERNEL_CACHES_LISTINGS:
            log.warning("this pyfuse3 lacks patches/pyfuse3-*-cache-readdir.patch (run "
                        "scripts/setup): every directory listing will reach this process")

    def init(self) -> None:
        """pyfuse3 calls this while answering the kernel's INIT, just before the reply."""
        self.initialized.set()

    def stop_waits(self) -> None:
        """Answer EIO to every looking request in progress (and to any that comes after).

        pyfuse3 runs each request in the task that read it from the kernel,
        and its main loop ends, after `pyfuse3.terminate()`, only once every
        one of them has been answered: a READ waiting on a frozen peer kept a
        mount that was told to stop (SIGTERM, an unmount) alive until the
        fetch timed out, up to `--fetch-timeout`. The mount calls this first
        (vfs/mount.py). A write, fsync or other change is not cut: a writable
        mount's local changes finish and go into its last version.
        """
        self.stopping = True
        for scope in list(self._waits):
            scope.cancel()

    # -- inode table ---------------------------------------------------------------

    async def _current(self, ino: int) -> Inode:
        """The inode, its entry brought up to the drive's current version.

        A file whose bytes changed or that is gone is frozen at its old
        version instead (whoever asks: a lookup, a getattr or an open racing
        `new_version` as much as `new_version` itself), and its name will get
        a new inode: an inode never holds the bytes of two versions, so a
        handle opened on the old one never sees the new size or pages
        (issue 13 part 5). The entry is looked up in the parent of the very
        version it is tagged with: if a newer version arrives during the
        lookup, it is looked up again.
        """
        node = self.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        while node.version != self.drive.version and not node.frozen:
            version = self.drive.version
            if ino == pyfuse3.ROOT_INODE:
                node.entry = self.drive.root_entry()
                node.version = version
                break
            parent = await self._current(node.parent)
            fresh = None
            if parent.entry.is_dir:
                fresh = await self.drive.lookup(parent.entry, node.name)
            if self.drive.version != version or parent.version != version:
                continue  # a newer version came while we looked: look again
            if node.frozen or node.version == version:
                break  # another request brought it up to date meanwhile
            if needs_new_inode(node.entry, fresh):
                self._freeze(node)
                break
            if fresh is None:
                raise pyfuse3.FUSEError(errno.ENOENT)  # gone in the new version
            node.entry = fresh
            node.version = version
        return node

    def _freeze(self, node: Inode) -> None:
        """Keep `node` at its version for whoever holds it; its name is free for a new inode."""
        node.frozen = True
        key = (node.parent, node.name)
        if self.by_name.get(key) == node.ino:
            del self.by_name[key]

    def _remember(self, parent: int, entry: Entry, version: int) -> Inode:
        """The inode for `entry` in `parent` (stable by path), holding `entry` of `version`."""
        key = (parent, entry.name)
        ino = self.by_name.get(key)
        if ino is not None:
            node = self.inodes[ino]
            if version < node.version:
                return node  # a listing of an older version: the newer entry stands
            if not needs_new_inode(node.entry, entry):
                node.entry = entry
                node.version = version
                return node
            self._freeze(node)
        ino = self._next_ino
        self._next_ino += 1
        self.made += 1
        self.by_name[key] = ino
        node = self.inodes[ino] = Inode(ino, parent, entry.name, entry, version)
        if len(self.inodes) > self.max_inodes:
            self._table_full.set()
        return node

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Keep the inode table bounded (`max_inodes`) and drop stale listed names, for as
        long as the mount runs."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drop_stale_names)
            nursery.start_soon(self._refresh_folders)
            task_status.started()
            while True:
                await self._table_full.wait()
                self._table_full = trio.Event()
                await self.trim_inodes(self.max_inodes * 3 // 4)

    async def _drop_stale_names(self) -> None:
        """Make the kernel forget names a listing answered with an older version's entry.

        The kernel makes a dentry and an inode, with their attributes (mode,
        size) for ATTR_TIMEOUT, of every name in a READDIRPLUS reply that it
        did not hold; a version switch's notifications cannot reach an inode
        the kernel does not hold yet. So a listing answered while a new
        version came (or one continuing an older listing) names its entries
        here and each is invalidated: the next use of the name looks it up
        in the current version. The notification waits for the listing's
        getdents(2) to end (it takes the folder's lock), so it runs in a
        worker thread, after the request that made the reply.
        """
        while True:
            await self._stale_listed.wait()
            self._stale_listed = trio.Event()
            names, self._stale_names = self._stale_names, []

            def notify(names: list[tuple[int, bytes]] = names) -> None:
                for parent, name in names:
                    with contextlib.suppress(OSError):
                        pyfuse3.invalidate_entry(parent, name)

            await trio.to_thread.run_sync(notify)

    async def _refresh_folders(self) -> None:
        """Stat each folder listed to its end once it settled (vfs/refresh.py).

        The kernel marks a folder's atime stale after every READDIR, so the
        next stat(2) of it (a warm `find` stats every folder) sent a GETATTR
        however long the attribute timeout: our own stat sends it now,
        during the walk that listed the folder. The stats run in a worker
        thread (their GETATTRs are answered by this event loop), a batch at
        a time; the task does not wait for a batch when cancelled: a stat
        left running ends as soon as the kernel has its answer or the
        mount's connection closes.
        """
        while True:
            due_at = self._refresh.next_due()
            if due_at is None:
                await self._refresh_wanted.wait()
                self._refresh_wanted = trio.Event()
                continue
            # a little past the first one: the folders listed meanwhile go in the same batch
            await trio.sleep_until(due_at + self._refresh.settle / 2)
            paths = [path for ino in self._refresh.due(trio.current_time())
                     if (path := self._mount_path(ino)) is not None]
            if paths and not self.stopping:
                await trio.to_thread.run_sync(_stat_quietly, paths, abandon_on_cancel=True)
                self.refreshed += len(paths)

    def _mount_path(self, ino: int) -> bytes | None:
        """The path of folder `ino` under the mount point, if the kernel holds it and it
        is a folder of the current version (else nothing is worth a stat)."""
        node = self.inodes.get(ino)
        if self.mountpoint is None or node is None or node.frozen or node.asked:
            return None
        parts: list[bytes] = []
        length = len(self.mountpoint)
        while node.ino != pyfuse3.ROOT_INODE:
            if node.lookups <= 0 or not node.entry.is_dir:
                return None
            parts.append(node.name)
            length += 1 + len(node.name)
            if length >= PATH_MAX:
                return None  # too deep to name: its walk pays the GETATTR, as before
            parent = self.inodes.get(node.parent)
            if parent is None:
                return None
            node = parent
        return b"/".join([self.mountpoint, *reversed(parts)])

    async def trim_inodes(self, keep: int) -> int:
        """Ask the kernel to forget whole folders until about `keep` inodes are left.

        The unit is a folder: invalidating its name makes the kernel drop it
        and every unused name below it (one notification for a folder of
        files, not one per file: each also drops the parent's cached
        listing). Files and empty folders right under the root go one by one.
        Which folders: the table's recent end (the last `max_inodes // 8`
        inodes made: what is in use now) stays; of the rest, the most
        recently listed go first. A walk over more names than the bound
        therefore keeps the folders it listed first in the kernel and the
        next walk finds them there (no request reaches us for them); evicting
        the oldest instead made every walk drop each folder just before the
        next walk came back to it, so a warm `find` past the bound re-made
        every inode and re-decoded every folder (issue 17). One pass over the
        table per trim, and a trim frees a quarter of it: O(1) per inode made.
        The kernel answers with FORGET for each inode nobody uses (an open
        file or a process's working directory stays, and so here); a later
        lookup makes a fresh inode. The notifications run in a worker thread:
        the kernel may wait on a request this event loop has to answer first.
        """
        excess = len(self.inodes) - self._asked - keep
        if excess <= 0:
            return 0
        units = self._trim_units()
        recent = self._next_ino - self.max_inodes // 8
        order = ([u for u in units if u[0] <= recent]
                 + [u for u in reversed(units) if u[0] > recent])  # old ones last resort
        names: list[tuple[int, bytes]] = []
        marked = 0
        for _, name, members in order:
            if marked >= excess:
                break
            fresh = [n for n in members if not n.asked]
            if not fresh:
                continue
            for n in fresh:
                n.asked = True
            marked += len(fresh)
            names.append(name)

        def notify() -> None:
            for parent, name in names:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_entry(parent, name)

        self._asked += marked
        await trio.to_thread.run_sync(notify)
        self.trimmed += marked
        return marked

    def _trim_units(self) -> list[tuple[int, tuple[int, bytes], list[Inode]]]:
        """What `trim_inodes` may ask the kernel to forget, the most recently listed first.

        Each is (when listed: the newest inode made in it, the name to
        invalidate, the inodes that go with it): every folder below the root
        holding inodes, with them; every other name right under the root,
        alone. Frozen inodes (an older version's file someone may hold) are
        never asked for, nor is the root.
        """
        held: dict[int, list[Inode]] = {}
        for ino, node in self.inodes.items():
            if ino == pyfuse3.ROOT_INODE or node.frozen or node.asked:
                continue
            held.setdefault(node.parent, []).append(node)
        units: list[tuple[int, tuple[int, bytes], list[Inode]]] = []
        for parent, members in held.items():
            if parent == pyfuse3.ROOT_INODE:
                units.extend((n.ino, (n.parent, n.name), [n]) for n in members
                             if n.ino not in held)
                continue
            folder = self.inodes.get(parent)
            if folder is None or folder.frozen:
                continue  # its names go with the folder above it, or when it is forgotten
            newest = max(n.ino for n in members)
            units.append((newest, (folder.parent, folder.name), [folder, *members]))
        units.sort(key=lambda u: u[0], reverse=True)
        return units

    def _attrs(self, node: Inode) -> pyfuse3.EntryAttributes:
        e = node.entry
        return self._attributes(node.ino, e, e.size if not e.is_dir else 4096,
                                timeout=ATTR_TIMEOUT, blksize=128 * 1024)

    def _attributes(self, ino: int, item: Entry | WNode, size: int, *, timeout: float,
                    blksize: int) -> pyfuse3.EntryAttributes:
        """What the kernel is told of an entry of a version or a working-tree node alike."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        # a drive's content is untrusted: no setuid/setgid bit is shown (and so none is
        # kept by `cp -p` out of the mount); the mount is nosuid anyway (vfs/mount.py)
        a.st_mode = item.st_mode & ~(stat.S_ISUID | stat.S_ISGID)
        a.st_nlink = 2 + item.nsubdirs if item.is_dir else 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_rdev = 0
        a.st_size = size
        a.st_blksize = blksize
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = item.mtime_ns
        return a

    # -- lookups and attributes ----------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = await self._current(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = await self._current(parent.parent)
        else:
            entry, version = await self._lookup_in_version(parent_inode, name)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = self._remember(parent_inode, entry, version)
        self._looked_up(node)
        return self._attrs(node)

    def _looked_up(self, node: Inode) -> None:
        """The kernel holds `node` once more (a LOOKUP, or an entry of READDIRPLUS)."""
        if node.asked:  # it kept the inode, and holds it under a fresh name now
            node.asked = False
            self._asked -= 1
        node.lookups += 1

    async def _lookup_in_version(self, parent_inode: int, name: bytes
                                 ) -> tuple[Entry | None, int]:
        """`name` in its parent, and the version it was found in (one version: a switch
        during the lookup means looking again, never an old entry tagged as new)."""
        while True:
            version = self.drive.version
            parent = await self._current(parent_inode)
            if not parent.entry.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            entry = await self.drive.lookup(parent.entry, name)
            if self.drive.version == version and parent.version == version:
                return entry, version

    @counted
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        gone = 0
        for ino, n in inode_list:
            node = self.inodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.inodes[ino]
                gone += 1
                if node.asked:
                    self._asked -= 1
                if self.by_name.get((node.parent, node.name)) == ino:
                    del self.by_name[(node.parent, node.name)]
        self.forgotten += gone
        self.drive.memory.freed(gone)  # a trim gives the heap back once enough went

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(await self._current(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._current(inode)
        if not node.entry.is_link or node.entry.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        used, limit = self.drive.cache_usage()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = max(used, limit or used) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories ---------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo | int:
        """A handle on the directory's listing in the current version.

        The kernel may cache the listing (cache_readdir) and keep it across
        opens (keep_cache): a version never changes, so a second getdents(2)
        of the same directory is answered by the kernel alone, and
        `new_version` drops the listings that changed. With LISTINGS_BY_INODE
        there are no handles at all: ENOSYS tells the kernel so, once.
        """
        if LISTINGS_BY_INODE:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = await self._current(inode)
        if not node.entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        # a listing keeps the version it started with: offsets stay valid
        self._dirs[fh] = Inode(node.ino, node.parent, node.name, node.entry, node.version)
        if not KERNEL_CACHES_LISTINGS:
            return fh
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List a directory from `start_id` (`fh` is its inode with LISTINGS_BY_INODE)."""
        if LISTINGS_BY_INODE:
            snap = await self._listing_of(fh, start_id)
        else:
            found = self._dirs.get(fh)
            if found is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            snap = found
            if start_id == 0 and snap.version != self.drive.version:
                snap = await self._restart_listing(fh, snap)
        if start_id == 0:
            self.drive.listed(snap.entry)
        replied: list[bytes] = []
        try:
            async for index, entry in self.drive.entries(snap.entry,
                                                         start_id & LISTING_INDEX_MASK):
                # an entry of an older version is refreshed on its next use
                node = self._remember(snap.ino, entry, snap.version)
                if not pyfuse3.readdir_reply(token, entry.name, self._attrs(node),
                                             listing_offset(snap.entry, index)):
                    return
                self._looked_up(node)
                replied.append(entry.name)
            if not replied and self.mountpoint is not None:
                # the empty reply that ends the listing: the kernel now marks the folder's
                # atime stale; its attributes are refreshed before the next walk asks
                self._refresh.listed(snap.ino, trio.current_time())
                self._refresh_wanted.set()
        finally:
            if replied and snap.version != self.drive.version:
                # a switch came while this listing was read (or it continues an older
                # one): the kernel may make inodes of names it did not hold with this
                # older version's attributes, which no switch notification reaches
                self._stale_names.extend((snap.ino, name) for name in replied)
                self._stale_listed.set()

    async def _listing_of(self, ino: int, start_id: int) -> Inode:
        """The listing a READDIR of directory `ino` from `start_id` continues.

        From the top: the current version's. Further on: the listing the
        offset's tag names, if it is still remembered (a reader that was part
        way through a directory when a new version came goes on with the
        listing it started); else the current one from the same index. The
        kernel caches a listing only from offset 0 on, so a continuation of
        an older listing never enters the cache of the new one. A directory
        gone from the new version keeps listing what it had.
        """
        try:
            node = await self._current(ino)
        except pyfuse3.FUSEError:
            gone = self.inodes.get(ino)
            if gone is None:
                raise
            node = gone
        if not node.entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        snap = Inode(node.ino, node.parent, node.name, node.entry, node.version)
        if start_id:
            tag = start_id >> LISTING_TAG_SHIFT
            if tag != listing_tag(snap.entry):
                snap = self._listings.get((ino, tag), snap)
        key = (ino, listing_tag(snap.entry))
        self._listings[key] = snap
        self._listings.move_to_end(key)
        while len(self._listings) > LISTINGS_REMEMBERED:
            self._listings.popitem(last=False)
        return snap

    async def _restart_listing(self, fh: int, snap: Inode) -> Inode:
        """A handle opened before the version changed starts (again) from the top.

        It lists the current version, not the one it was opened in: the
        kernel may be filling its cached listing from this very read, after
        `new_version` dropped the old one. (Offsets handed out before a
        rewinddir(3) need not stay valid.) A directory gone from the new
        version keeps listing what it had: no new open can reach it.
        """
        try:
            node = await self._current(snap.ino)
        except pyfuse3.FUSEError:
            return snap
        if not node.entry.is_dir:
            return snap
        snap = self._dirs[fh] = Inode(node.ino, node.parent, node.name, node.entry,
                                      node.version)
        return snap

    @counted
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files ---------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = await self._current(inode)
        if node.entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not node.entry.is_file:
            raise pyfuse3.FUSEError(errno.EINVAL)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = await self.drive.open(node.entry, self._folder_of(node))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview | tuple[memoryview, ...]:
        of = self._files.get(fh)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await read_reply(self.drive, of, off, size)

    @counted
    async def release(self, fh: int) -> None:
        of = self._files.pop(fh, None)
        if of is not None:
            self.drive.close(of)

    # -- extended attributes: status and pinning -----------------------------------

    def _folder_of(self, node: Inode) -> bytes | None:
        """The node id of the directory holding `node` (whose figures its blocks change)."""
        parent = self.inodes.get(node.parent)
        if parent is None or parent.entry.node is None or node.ino == pyfuse3.ROOT_INODE:
            return None
        return parent.entry.node.block_id

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        await self._current(inode)
        return [xattrs.full_name(n).encode() for n in self.drive.answers.names()]

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self._current(inode)
        short = xattrs.short_name(name)
        if short is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP if xattrs.foreign_namespace(name)
                                    else pyfuse3.ENOATTR)
        value = await self.drive.answers.get(self._path(node), node.entry, short)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = await self._current(inode)
        short = xattrs.short_name(name)
        if short is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not await self.drive.answers.set(self._path(node), node.entry, short, value,
                                            self._folder_of(node)):
            raise pyfuse3.FUSEError(errno.EROFS)
        if short == xattrs.EVICT:
            await self._drop_kernel_pages(node)

    async def _drop_kernel_pages(self, top: Inode) -> None:
        """After an evict: the kernel's cached pages of the files under `top` go too.

        Files open with keep_cache, so the kernel would otherwise keep serving
        an evicted file from memory, and "evicted" would not mean "read from
        the network next time". Only data pages are dropped: the inode lock
        that setxattr holds is not needed for that.
        """
        inos = [ino for ino in self.inodes if self._is_under(ino, top.ino)]

        def notify() -> None:
            for ino in inos:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(ino, attr_only=False)

        await trio.to_thread.run_sync(notify)

    def _is_under(self, ino: int, top: int) -> bool:
        """Whether inode `ino` is `top` or below it (through the known parents)."""
        for _ in range(4096):
            if ino == top:
                return True
            node = self.inodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                return False
            ino = node.parent
        return False

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    def _path(self, node: Inode) -> list[bytes]:
        parts: list[bytes] = []
        while node.ino != pyfuse3.ROOT_INODE:
            parts.append(node.name)
            parent = self.inodes.get(node.parent)
            if parent is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            node = parent
        return parts[::-1]

    # -- everything that would write -----------------------------------------------

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    # -- live versions ---------------------------------------------------------------

    async def new_version(self) -> None:
        """After the drive moved to a new version: tell the kernel what changed.

        Every known inode is brought up to the new version, except files whose
        bytes changed or that are gone: those stay, frozen, as the inode of the
        old version (open handles keep reading it, with its size) and their
        name gets a new inode on the next lookup. The kernel forgets, for every
        inode that changed, its attributes and cached pages: a file's bytes,
        a directory's cached listing (a directory changes whenever anything
        below it does: its node is a Merkle tree, so the root always does).
        Names are dropped only where a name no longer leads to the same inode
        (a frozen file, anything gone or that could not be checked): the
        dentries, and the cached listings, of everything unchanged stay. The
        notifications run in a worker thread: they are system calls into the
        kernel, which may wait on requests this event loop has to answer.
        """
        # what each inode held before the switch, taken before the first await (taking
        # the lock is one): a request answered meanwhile may bring an inode up to date
        # first, and the kernel must still hear that it changed
        before = [(ino, node, node.entry, node.frozen) for ino, node in self.inodes.items()]
        async with self._switching:
            await self._new_version(before)

    async def _new_version(self, before: list[tuple[int, Inode, Entry, bool]]) -> None:
        data_changed: list[int] = []
        attr_changed: list[int] = []
        names: list[tuple[int, bytes]] = []
        for ino, node, old, was_frozen in before:
            named = ino != pyfuse3.ROOT_INODE
            try:
                fresh = (await self._current(ino)).entry
            except (pyfuse3.FUSEError, PeerdriveError) as exc:
                if isinstance(exc, PeerdriveError):
                    log.warning("could not refresh inode %d: %s", ino, exc)
                # gone, or not known: a directory's cached listing goes as well
                (data_changed if old.is_dir else attr_changed).append(ino)
                if named:
                    names.append((node.parent, node.name))
                continue
            if node.frozen and not was_frozen:
                names.append((node.parent, node.name))
            elif fresh != old:
                data_changed.append(ino)
                if named and fresh.kind != old.kind:
                    names.append((node.parent, node.name))

        def notify() -> None:
            for ino in data_changed:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(ino, attr_only=False)
            for ino in attr_changed:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(ino, attr_only=True)
            for parent, name in names:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_entry(parent, name)

        await trio.to_thread.run_sync(notify)
        self.drive.memory.freed(len(data_changed))  # the older version's entries went


# ----------------------------------------------------------------------------- writable

# A writable mount's attributes change with every write; the kernel learns of its own
# changes, but asks again soon so nothing it caches is ever long out of date.
WRITABLE_ATTR_TIMEOUT = 1.0
# The block size a writable mount reports: `cp` and others size their buffers by it, and
# each write(2) of one buffer reaches us as one request (libfuse allows 1 MiB, max_pages
# 256), so a copy costs 8 times fewer requests than with 128 KiB.
WRITABLE_BLKSIZE = 1024 * 1024


@dataclass(slots=True)
class WritableHandle:
    """An open file of a writable mount: its node, and the drive's read handle while the
    file has no unpublished bytes (reads then take the drive's read path, readahead and all).
    """

    node: WNode
    clean: OpenFile | None = None


class WritableOperations(DriveOperations):
    """The operations of a mount of a write link: the drive's tree, changed in place.

    The tree is the session's `WorkTree` (vfs/worktree.py); bytes and
    versions are the `WriteSession`'s (vfs/writer.py). Inodes are the work
    tree's nodes, which keep their number across renames and versions this
    mount makes. Listings are by cookie (see vfs/worktree.py), so a directory
    changed while it is listed neither skips nor repeats a name that stayed.
    """

    # open may truncate (O_TRUNC): a change, left to finish
    STOPPED_AT_SHUTDOWN = DriveOperations.STOPPED_AT_SHUTDOWN - {"open"}

    def __init__(self, drive: Drive, session: WriteSession) -> None:
        super().__init__(drive)
        self.session = session
        self._handles: dict[int, WritableHandle] = {}
        self._dir_handles: dict[int, int] = {}

    @property
    def tree(self) -> WorkTree:
        return self.session.tree

    def _wattrs(self, node: WNode) -> pyfuse3.EntryAttributes:
        return self._attributes(node.ino, node, node.size, timeout=WRITABLE_ATTR_TIMEOUT,
                                blksize=WRITABLE_BLKSIZE)

    def _looked_up(self, node: WNode) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._wattrs(node)

    async def _dir(self, ino: int) -> WNode:
        node = self.tree.node(ino)
        if not node.is_dir:
            raise NotADirectory("not a folder")
        return node

    # -- names ---------------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = await self._dir(parent_inode)
        if name == b".":
            return self._looked_up(parent)
        if name == b"..":
            return self._looked_up(parent.parent or parent)
        node = await self.tree.lookup(parent, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._looked_up(node)

    @counted
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.tree.forget(ino, n)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._wattrs(self.tree.node(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        if not node.is_link or node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        st = os.statvfs(self.session.store.path)
        used, limit = self.drive.cache_usage()
        free = st.f_bavail * st.f_frsize
        if limit is not None:
            free = min(free, max(0, limit - self.session.store.pinned_bytes))
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (used + free) // 4096
        s.f_bfree = s.f_bavail = free // 4096
        s.f_files = len(self.tree.nodes) + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = 255
        return s

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo | int:
        if LISTINGS_BY_INODE:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        await self._dir(inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = inode
        if not KERNEL_CACHES_LISTINGS:
            return fh
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List by cookie: each reply's offset is the entry's cookie in its folder."""
        ino = fh if LISTINGS_BY_INODE else self._dir_handles.get(fh)
        if ino is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        d = await self._dir(ino)
        kids = sorted((k for k in (await self.tree.children(d)).values()
                       if k.cookie > start_id), key=lambda k: k.cookie)
        for kid in kids:
            if not pyfuse3.readdir_reply(token, kid.name, self._wattrs(kid), kid.cookie):
                return
            kid.lookups += 1

    @counted
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # -- changes to names ------------------------------------------------------------------

    async def _change(self, fn: Callable[[], Awaitable[T]]) -> T:
        async with self.session.lock:
            out = await fn()
        self.session.changed()
        return out

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = await self._dir(parent_inode)
        node = await self._change(lambda: self.tree.create(parent, name, KIND_DIR, mode))
        return self._looked_up(node)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise NotPermitted("a drive holds files, folders and symlinks only")
        parent = await self._dir(parent_inode)
        node = await self._change(lambda: self.tree.create(parent, name, KIND_FILE, mode))
        return self._looked_up(node)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = await self._dir(parent_inode)
        node = await self._change(lambda: self.tree.create(parent, name, KIND_LINK, 0o777,
                                                            target=target))
        return self._looked_up(node)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = await self._dir(parent_inode)
        await self._change(lambda: self.tree.unlink(parent, name, want_dir=False))

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = await self._dir(parent_inode)
        await self._change(lambda: self.tree.unlink(parent, name, want_dir=True))

    @fuse_errors
    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        d1 = await self._dir(old_parent)
        d2 = await self._dir(new_parent)
        await self._change(lambda: self.tree.rename(d1, old_name, d2, new_name, flags))

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise NotPermitted("a drive holds no hard links")

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.tree.node(inode)
        if fields.update_size:
            if not node.is_file:
                raise IsADirectory("only a file has a size to set")
            await self.session.truncate(node, attr.st_size)
        if fields.update_mode or fields.update_mtime:
            async def meta() -> None:
                if fields.update_mode:
                    self.tree.set_mode(node, attr.st_mode)
                if fields.update_mtime:
                    self.tree.set_mtime(node, attr.st_mtime_ns)
            await self._change(meta)
        # owners are not part of a drive: chown changes nothing and is not refused
        return self._wattrs(node)

    # -- files -----------------------------------------------------------------------------

    async def _handle(self, node: WNode) -> int:
        handle = WritableHandle(node)
        if node.content is None and node.base is not None:
            handle.clean = await self.drive.open(node.base)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.tree.node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not node.is_file:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            await self.session.truncate(node, 0)
        fh = await self._handle(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        parent = await self._dir(parent_inode)
        node = await self._change(lambda: self.tree.create(parent, name, KIND_FILE, mode))
        fh = await self._handle(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False), self._looked_up(node)

    def _handle_of(self, fh: int) -> WritableHandle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview | tuple[memoryview, ...]:
        handle = self._handle_of(fh)
        node = handle.node
        if node.content is None:
            if handle.clean is None or handle.clean.entry is not node.base:
                # published since it was opened (or new and published empty): read that
                if node.base is None:
                    return b""
                handle.clean = await self.drive.open(node.base)
            return await read_reply(self.drive, handle.clean, off, size)
        return await self.session.read(node, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle_of(fh)
        return await self.session.write(handle.node, off, buf)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.session.sync()

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.session.sync()

    @counted
    async def flush(self, fh: int) -> None:
        pass

    @counted
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.clean is not None:
            self.drive.close(handle.clean)

    # -- status attributes -----------------------------------------------------------------

    async def _local_usage(self, node: WNode) -> tuple[int, int]:
        """(bytes on this device, total bytes) of a node with unpublished changes.

        Its own bytes are here (dirty in memory, holes, or chunks stored
        under the write pin); chunks it still shares with the published
        version count only if stored here; what below it is unchanged
        answers from the published figures.
        """
        if not node.changed and node.base is not None:
            return await self.drive.answers.usage(node.base)
        if node.is_file:
            content = node.content
            if content is None:  # a new mode or name only: the published bytes
                return await self.drive.answers.usage(node.base) if node.base else (0, 0)
            from .write_buffer import STORED  # loaded with the session: a lookup here

            stored = [s.ref for s in content.segs if s.kind == STORED and s.ref is not None]
            gone = await self.drive.answers._missing([r.block_id for r in stored])
            return content.size - sum(r.length for r in stored if r.block_id in gone), \
                content.size
        if node.is_dir:
            await self.tree.load_changed(node)
            if node.children is None:  # renamed or chmod-ed, never listed: as published
                return await self.drive.answers.usage(node.base) if node.base else (0, 0)
            have = total = 0
            for kid in list(node.children.values()):
                h, t = await self._local_usage(kid)
                have += h
                total += t
            return have, total
        return 0, 0

    async def _unpublished_value(self, node: WNode, short: str) -> bytes | None:
        """A status answer for a node with unpublished changes: from this device alone
        (no peer holds bytes that were never published)."""
        if short in (xattrs.PINNED, xattrs.PROGRESS):
            return self.drive.answers.pin_value(self.tree.path_of(node), short)
        if short == xattrs.VERSIONS:
            return await self.drive.answers.versions() if node is self.tree.root else None
        if short not in (xattrs.STATE, xattrs.CACHED, xattrs.SIZE, xattrs.COPIES):
            return None
        have, total = await self._local_usage(node)
        if short == xattrs.CACHED:
            return xattrs.encode_int(have)
        if short == xattrs.SIZE:
            return xattrs.encode_int(total)
        if short == xattrs.COPIES:
            return xattrs.encode_int(1 if total and have >= total else 0)
        return xattrs.state_of(have, total).encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.tree.node(inode)
        return [xattrs.full_name(n).encode()
                for n in (*self.drive.answers.names(), xattrs.PUBLISHED)]

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.node(inode)
        short = xattrs.short_name(name)
        if short is None and xattrs.foreign_namespace(name):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # as a read-only mount: no labels, no ACLs
        if short is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if short == xattrs.PUBLISHED:
            return xattrs.encode_flag(not node.changed and node.base is not None)
        if node.changed or node.base is None:
            value = await self._unpublished_value(node, short)
        else:
            value = await self.drive.answers.get(self.tree.path_of(node), node.base, short)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        """Pins are by path: a path with unpublished changes (a folder holding a file
        being written, a new folder) is pinned like any other, and its new blocks
        are held by the pin once they are published (until then the write pin
        holds them). An evict frees only published blocks nothing pins."""
        node = self.tree.node(inode)
        short = xattrs.short_name(name)
        if short is None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)  # a drive keeps no other attributes
        parent = node.parent
        folder = parent.base.node.block_id if parent is not None and parent.base is not None \
            and parent.base.node is not None and not parent.changed else None
        if not await self.drive.answers.set(self.tree.path_of(node), node.base, short, value,
                                            folder):
            raise pyfuse3.FUSEError(errno.EINVAL)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    # -- versions --------------------------------------------------------------------------

    async def new_version(self) -> None:
        """A head this mount did not make (another writer of the drive) was taken.

        A mount with no unpublished change starts over from the new version
        (every name the kernel knows is dropped); one with changes keeps them,
        and the commit step (vfs.publish.commit_version) merges them per file
        onto the newest version when it publishes.
        """
        head = self.drive.head
        if head.root_block == self.session.head.root_block or head.seq <= self.session.head.seq:
            return  # our own version (or an older one) come back from the network
        if self.tree.has_changes or self.session.has_pending:
            log.warning("drive %s: version %d came from another writer while this mount has "
                        "unpublished changes; its next version is made from this mount's tree",
                        self.session.cap.drive_id[:16], head.seq)
            return
        log.warning("drive %s: version %d came from another writer; this mount starts over "
                    "from it (it had no unpublished change)", self.session.cap.drive_id[:16],
                    head.seq)
        await self.start_over(head)

    async def start_over(self, head: Head) -> None:
        """The tree becomes `head`'s (another writer's version, or one the commit step merged
        with it): every name the kernel knows is dropped, numbers are not reused."""
        old = list(self.tree.nodes.values())
        self.session.restart_from(head)
        names = [(n.parent.ino, n.name) for n in old if n.parent is not None]

        def notify() -> None:
            for parent, name in names:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_entry(parent, name)
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(pyfuse3.ROOT_INODE, attr_only=False)

        await trio.to_thread.run_sync(notify)
