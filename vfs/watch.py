"""`peerdrive publish DIR --watch`: a folder published as it changes.

inotify (the asyncinotify package, read from trio through its descriptor)
says where something changed; the folder itself says what: each folder an
event names is listed again and compared with the working tree of the
drive's last version (vfs/worktree.py), and only files whose size, mtime or
mode differ, or that were written to, are read again. The changes go into a
`WriteSession` (vfs/writer.py), which makes the version, as a writable mount
does.

Rules:

* Bursts are coalesced: a version is made once no event came for
  `publish_delay` seconds (an editor's write-temporary-then-rename is one
  version, not three).
* A file written to and not yet closed (IN_MODIFY without IN_CLOSE_WRITE: a
  large copy in progress) is left as it was in the last version until it is
  closed, or until nothing touched it for STALE_WRITE seconds (a program
  that keeps its file open); a file that changes while it is read is read
  again at the next round, never published half old, half new.
* Watches are added before the first scan, so nothing changed during the
  scan is missed; an event queue overflow (IN_Q_OVERFLOW) rescans the whole
  folder, which costs one lstat per name.
* Folders are watched by path; one moved within the folder is watched again
  under its new path when its parent is listed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from asyncinotify import Inotify, Mask

from .chunker import CDC_MIN
from .crypto import Ref, encrypt_chunk
from .errors import PeerdriveError
from .formats import KIND_DIR, KIND_FILE, KIND_LINK, check_name
from .head import Head
from .publish import READ_WINDOW, _read_and_cut, _same_state
from .worktree import WNode
from .writer import RETRY_SECONDS, WriteSession

log = logging.getLogger(__name__)

STALE_WRITE = 30.0
WATCH_MASK = (Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.MODIFY
              | Mask.CLOSE_WRITE | Mask.ATTRIB | Mask.DELETE_SELF | Mask.MOVE_SELF
              | Mask.ONLYDIR | Mask.DONT_FOLLOW | Mask.EXCL_UNLINK)


@dataclass
class Published:
    """What one version of a watched folder changed (paths relative to the folder)."""

    head: Head
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_read: int = 0


class _Changed(Exception):
    """A file changed while it was read: read it again at the next round."""


def read_file(path: bytes, listed: os.stat_result, read_key: bytes,
              put: Callable[[list[tuple[Ref, bytes]]], None]) -> tuple[list[Ref], os.stat_result]:
    """Cut, encrypt and store one file (worker thread): its chunks and the state they are of.

    Read in windows like `publish` (bounded memory, pread); the file must be
    the one listed and must not change while it is read, else _Changed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise _Changed(str(exc)) from exc
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or before.st_ino != listed.st_ino:
            raise _Changed("replaced")
        refs: list[Ref] = []
        offset = 0
        carry = b""
        while True:
            buf, got, bounds = _read_and_cut(fd, offset, carry)
            offset += got
            eof = got < READ_WINDOW
            if not eof and len(bounds) > 1:
                keep, carry = bounds[:-1], buf[bounds[-1][0]:]
            else:
                keep, carry = bounds, b""
            if len(buf) <= CDC_MIN and buf and eof:
                keep = [(0, len(buf))]
            view = memoryview(buf)
            blocks = [encrypt_chunk(read_key, view[o:o + n]) for o, n in keep]
            view.release()
            put(blocks)
            refs += [r for r, _ in blocks]
            if eof:
                break
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if offset != after.st_size or not _same_state(before, after):
        raise _Changed("written to while it was read")
    return refs, after


class FolderWatch:
    """Keeps a drive's working tree equal to a folder, and publishes it as it changes."""

    def __init__(self, source: Path, session: WriteSession, publish_delay: float,
                 on_published: Callable[[Published], Awaitable[None]],
                 on_warning: Callable[[str], None] | None = None) -> None:
        self.source = os.fsencode(source.resolve())
        self.session = session
        self.tree = session.tree
        self.delay = publish_delay
        self.on_published = on_published
        self.on_warning = on_warning
        self._dirs: set[bytes] = set()  # relative folders to list again
        self._files: set[bytes] = set()  # relative files written to or with new attributes
        self._writing: dict[bytes, float] = {}  # modified, not closed yet: since when
        self._rescan = False
        self._read: set[bytes] = set()  # files read this round (a new folder's, say)
        self._last_event = 0.0
        self._wake = trio.Event()
        self._inotify: Inotify | None = None
        self._report = Published(session.head)

    # -- inotify -----------------------------------------------------------------------

    def _watch(self, rel: bytes) -> None:
        """Watch folder `rel` and every folder below it (under their current paths)."""
        assert self._inotify is not None
        stack = [rel]
        while stack:
            r = stack.pop()
            path = self._abs(r)
            try:
                watch = self._inotify.add_watch(path, WATCH_MASK)
                watch.path = Path(os.fsdecode(path))  # a moved folder: its new path
                with os.scandir(path) as it:
                    for de in it:
                        if de.is_dir(follow_symlinks=False):
                            stack.append(_join(r, os.fsencode(de.name)))
            except OSError:
                continue  # gone meanwhile: its parent's listing says so

    def _abs(self, rel: bytes) -> bytes:
        return self.source + b"/" + rel if rel else self.source

    def _rel(self, path: Path) -> bytes | None:
        p = os.fsencode(path)
        if p == self.source:
            return b""
        if p.startswith(self.source + b"/"):
            return p[len(self.source) + 1:]
        return None

    def _event(self, ev) -> None:  # noqa: ANN001 - asyncinotify.Event
        now = trio.current_time()
        self._last_event = now
        if Mask.Q_OVERFLOW in ev.mask:
            self._rescan = True
            return
        path = ev.path
        if path is None:
            return
        rel = self._rel(path)
        if rel is None:
            return
        if ev.name is None:  # the watched folder itself (deleted, moved, attributes)
            self._dirs.add(_parent(rel) if rel else b"")
            return
        self._dirs.add(_parent(rel))
        if Mask.MODIFY in ev.mask and Mask.ISDIR not in ev.mask:
            self._writing.setdefault(rel, now)
        if Mask.CLOSE_WRITE in ev.mask:
            self._writing.pop(rel, None)
            self._files.add(rel)
        if Mask.ATTRIB in ev.mask or Mask.MODIFY in ev.mask:
            self._files.add(rel)
        if Mask.ISDIR in ev.mask and (Mask.CREATE in ev.mask or Mask.MOVED_TO in ev.mask):
            self._dirs.add(rel)
            self._watch(rel)

    async def _read_events(self) -> None:
        assert self._inotify is not None
        while True:
            await trio.lowlevel.wait_readable(self._inotify.fd)
            while (ev := self._inotify.sync_get()) is not None:
                self._event(ev)
            self._wake.set()

    # -- the loop ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        with Inotify(sync_timeout=0) as inotify:
            self._inotify = inotify
            self._watch(b"")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_events)
                self._rescan = True  # the first round compares the whole folder
                task_status.started()
                while True:
                    await self._round()
                    # a file held back as being written is looked at again once stale
                    with trio.move_on_after(STALE_WRITE if self._writing else float("inf")):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    while True:  # the quiet period
                        quiet = trio.current_time() - self._last_event
                        if quiet >= self.delay:
                            break
                        await trio.sleep(self.delay - quiet)
                    self._wake = trio.Event()

    async def _round(self) -> None:
        """Bring the tree up to the folder where events said, then publish if it changed."""
        now = trio.current_time()
        held = {rel for rel, since in self._writing.items() if now - since < STALE_WRITE}
        if self._rescan:
            self._rescan = False
            dirs, files = [b""], set(self._files)
            full = True
        else:
            dirs, files = sorted(self._dirs, key=lambda r: r.count(b"/")), set(self._files)
            full = False
        self._dirs.clear()
        self._files.clear()
        self._read.clear()
        retry_dirs: set[bytes] = set()
        async with self.session.lock:
            for rel in dirs:
                if await self._sync_dir(rel, files, held, full, retry_dirs):
                    retry_dirs.add(rel)
        # what could not be read now (held, changing) is looked at again next round
        self._files |= {f for f in files if f in held}
        self._dirs |= retry_dirs | {_parent(f) for f in held}
        if self._dirs and not self._writing:
            self._wake.set()
        if not self.tree.has_changes and not self.session.has_pending:
            return
        try:
            head = await self.session.publish_now()
        except PeerdriveError as exc:  # a full disk: the changes stay, tried again later
            log.warning("could not publish: %s", exc)
            if self.on_warning is not None:
                self.on_warning(f"could not publish ({exc}); trying again in "
                                f"{RETRY_SECONDS:.0f} s")
            await trio.sleep(RETRY_SECONDS)
            self._wake.set()
            return
        if head is not None:
            report, self._report = self._report, Published(head)
            report.head = head
            await self.on_published(report)

    async def _node_at(self, rel: bytes) -> WNode | None:
        node: WNode | None = self.tree.root
        for part in rel.split(b"/") if rel else []:
            assert node is not None
            if not node.is_dir:
                return None
            node = await self.tree.lookup(node, part)
            if node is None:
                return None
        return node

    async def _sync_dir(self, rel: bytes, files: set[bytes], held: set[bytes], full: bool,
                        retry: set[bytes]) -> bool:
        """Make the tree's folder `rel` hold what the real one holds; True to look again."""
        d = await self._node_at(rel)
        if d is None or not d.is_dir:
            # its parent is not in the tree yet (or holds a file there): the parent's
            # listing, made first (shallower), brought it in whole or will
            return False
        try:
            listing = await trio.to_thread.run_sync(_list, self._abs(rel))
        except FileNotFoundError:
            return False  # gone: its parent's listing removes it
        except OSError as exc:
            log.warning("cannot list %s: %s", os.fsdecode(self._abs(rel)), exc)
            return True
        kids = await self.tree.children(d)
        again = False
        for name in [n for n in kids if n not in listing]:
            await self.tree.unlink_any(d, name)
            self._report.removed.append(os.fsdecode(_join(rel, name)))
        for name, st in listing.items():
            child = _join(rel, name)
            node = kids.get(name)
            kind = _kind(st.st_mode)
            if kind is None:
                continue  # a device or FIFO: not part of a drive
            if node is not None and node.kind != kind:
                await self.tree.unlink_any(d, name)
                node = None
            if kind == KIND_DIR:
                if node is None:
                    node = await self.tree.create(d, name, KIND_DIR, stat.S_IMODE(st.st_mode))
                    self._report.added.append(os.fsdecode(child) + "/")
                    again |= await self._sync_dir(child, files, held, True, retry)
                elif full:
                    again |= await self._sync_dir(child, files, held, True, retry)
                self._meta(node, st)
            elif kind == KIND_LINK:
                try:
                    target = os.readlink(self._abs(child))
                except OSError:
                    again = True
                    continue
                if node is None or node.target != target:
                    if node is not None:
                        await self.tree.unlink_any(d, name)
                    node = await self.tree.create(d, name, KIND_LINK, 0o777, target=target)
                    self._report.added.append(os.fsdecode(child))
                self._meta(node, st)
            else:
                if child in held or child in self._read:
                    continue
                if node is not None and child not in files and _same_file(node, st):
                    continue
                again |= not await self._read_into(d, name, node, st, child)
        return again

    def _meta(self, node: WNode, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if node.is_link:
            mode = node.mode
        if node.mode != mode:
            self.tree.set_mode(node, mode)
        if node.mtime_ns != st.st_mtime_ns:
            self.tree.set_mtime(node, st.st_mtime_ns)

    async def _read_into(self, d: WNode, name: bytes, node: WNode | None, st: os.stat_result,
                         rel: bytes) -> bool:
        """Read a file into the tree; False if it changed while read (tried again later)."""
        stored: list[bytes] = []

        def put(blocks: list[tuple[Ref, bytes]]) -> None:
            self.session._put(blocks)
            stored.extend(r.block_id for r, _ in blocks)

        try:
            refs, now = await trio.to_thread.run_sync(read_file, self._abs(rel), st,
                                                      self.session.cap.read_key, put)
        except _Changed:
            return False
        finally:
            self.session._stored.update(stored)
        if node is None:
            node = await self.tree.create(d, name, KIND_FILE, stat.S_IMODE(now.st_mode))
            self._report.added.append(os.fsdecode(rel))
        else:
            self._report.modified.append(os.fsdecode(rel))
        self.tree.set_chunks(node, refs, stat.S_IMODE(now.st_mode), now.st_mtime_ns)
        self._report.bytes_read += now.st_size
        self._read.add(rel)
        return True


def _same_file(node: WNode, st: os.stat_result) -> bool:
    return (node.is_file and node.size == st.st_size and node.mtime_ns == st.st_mtime_ns
            and node.mode == stat.S_IMODE(st.st_mode))


def _kind(mode: int) -> int | None:
    if stat.S_ISREG(mode):
        return KIND_FILE
    if stat.S_ISDIR(mode):
        return KIND_DIR
    if stat.S_ISLNK(mode):
        return KIND_LINK
    return None


def _list(path: bytes) -> dict[bytes, os.stat_result]:
    out = {}
    with os.scandir(path) as it:
        for de in it:
            name = os.fsencode(de.name)
            try:
                check_name(name)
                out[name] = de.stat(follow_symlinks=False)
            except (OSError, PeerdriveError):
                continue
    return out


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]
