"""The working tree of a writable mount: a version plus the changes made since.

Rules:

* Every name the mount has looked at is a `WNode` with an inode number that
  stays its own while it lives (renames keep it). A node that came from a
  version keeps that version's entry as `base`; until it changes, the next
  version names exactly that entry again (a Merkle tree: an untouched folder
  costs nothing to republish).
* A folder's names are looked up one by one in its directory node (`lookup`:
  a node for that name only, in `partial`) until the folder is listed or
  changed; then all of them are loaded (`children`: in name order, each given
  a listing cookie; a name looked up before keeps its node and inode). A new
  name gets the next cookie, so a listing carried on by cookie after names
  were removed or added neither skips nor repeats any of the names that
  stayed (`rm -rf`). So a lookup (a `stat`, an open) in a folder of 10^5
  files costs one node, not 10^5.
* Any change marks the node and every folder above it `changed`; `build`
  makes new directory nodes only for changed folders, and new entries only
  for changed names, bottom up. A file's bytes live in a `FileContent`
  (vfs/write_buffer.py) from its first write until a version names them.
* Nothing here does I/O itself: the `Base` reads a version's folders and
  chunk lists, `build` gets a function that cuts a file's dirty bytes and
  one that stores a metadata block. The caller serialises changes and builds
  (one lock): every method assumes no other change runs meanwhile.
* Errors are vfs.errors' PathError types; vfs/fs.py turns them into errno.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from .crypto import Ref
from .errors import (
    DirectoryNotEmpty,
    EntryExists,
    FormatError,
    InvalidChange,
    IsADirectory,
    NameTooLong,
    NoSuchEntry,
    NotADirectory,
)
from .formats import (
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    MAX_INLINE_CHUNKS,
    MAX_LINK_TARGET,
    MAX_NAME,
    ChunkListRef,
    Entry,
    Kinded,
    build_directory,
    check_name,
    dir_totals,
    encode_chunk_list,
    split_chunk_list,
)
from .write_buffer import FileContent

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Base(Protocol):
    """Reads of the version a working tree starts from."""

    async def directory(self, entry: Entry) -> list[Entry]: ...

    async def lookup(self, entry: Entry, name: bytes) -> Entry | None: ...

    async def chunks(self, entry: Entry) -> tuple[Ref, ...]: ...


@dataclass(eq=False, slots=True)
class WNode(Kinded):
    ino: int
    name: bytes
    parent: WNode | None
    kind: int
    mode: int
    mtime_ns: int
    base: Entry | None = None  # the entry in the version it came from
    changed: bool = False  # its entry differs from `base`
    content: FileContent | None = None  # a file's bytes while they differ from base's
    target: bytes | None = None  # a symlink's
    children: dict[bytes, WNode] | None = None  # a folder's, once loaded
    partial: dict[bytes, WNode] | None = None  # names looked up before it was loaded
    cookie: int = 0  # its place in its folder's listing
    next_cookie: int = 1  # a folder's next cookie
    lookups: int = 0  # the kernel's references
    attached: bool = True  # False once unlinked (open handles may still hold it)
    subdirs: int = field(default=0)

    @property
    def size(self) -> int:
        if self.kind == KIND_FILE:
            if self.content is not None:
                return self.content.size
            return self.base.size if self.base is not None else 0
        if self.kind == KIND_LINK:
            return len(self.target or b"")
        return 4096

    @property
    def nsubdirs(self) -> int:
        if self.children is not None:
            return self.subdirs
        return self.base.nsubdirs if self.base is not None else 0


def _now() -> int:
    return time.time_ns()


def _checked(name: bytes) -> bytes:
    if len(name) > MAX_NAME:
        raise NameTooLong(f"a name is at most {MAX_NAME} bytes")
    try:
        return check_name(name)
    except FormatError as exc:
        raise InvalidChange(str(exc)) from None


class WorkTree:
    """The mutable tree: nodes by inode, the changes, and building the next version's root."""

    def __init__(self, root: Entry, base: Base, root_ino: int = 1,
                 next_ino: int | None = None) -> None:
        self.base = base
        # a tree started over keeps counting: the kernel may still hold the old numbers
        self._next_ino = next_ino if next_ino is not None else root_ino + 1
        self.root = WNode(root_ino, root.name, None, KIND_DIR, root.mode, root.mtime_ns,
                          base=root)
        self.nodes: dict[int, WNode] = {root_ino: self.root}
        self.dirty_files: set[WNode] = set()  # files holding dirty bytes in memory
        self.generation = 0  # bumped by every change

    # -- nodes -----------------------------------------------------------------------

    def _new(self, name: bytes, parent: WNode, kind: int, mode: int, mtime_ns: int,
             base: Entry | None = None) -> WNode:
        node = WNode(self._next_ino, name, parent, kind, mode, mtime_ns, base=base)
        self._next_ino += 1
        self.nodes[node.ino] = node
        if base is not None and base.is_link:
            node.target = base.target
        return node

    @property
    def next_ino(self) -> int:
        return self._next_ino

    def node(self, ino: int) -> WNode:
        node = self.nodes.get(ino)
        if node is None:
            raise NoSuchEntry(f"inode {ino} is not known")
        return node

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None or node is self.root:
            return
        node.lookups -= n
        if node.lookups <= 0 and not node.attached:
            del self.nodes[ino]
            self.dirty_files.discard(node)

    async def children(self, d: WNode) -> dict[bytes, WNode]:
        if not d.is_dir:
            raise NotADirectory("not a folder")
        if d.children is None:
            entries = await self.base.directory(d.base) if d.base is not None else []
            if d.children is None:  # nobody loaded it while we waited
                known = d.partial or {}
                kids: dict[bytes, WNode] = {}
                for e in entries:
                    kid = known.get(e.name)  # looked up before: the same node and inode
                    if kid is None:
                        kid = self._new(e.name, d, e.kind, e.mode, e.mtime_ns, base=e)
                    kid.cookie = d.next_cookie
                    d.next_cookie += 1
                    kids[e.name] = kid
                d.children = kids
                d.partial = None
                d.subdirs = sum(1 for e in entries if e.is_dir)
        return d.children

    async def lookup(self, d: WNode, name: bytes) -> WNode | None:
        """The node of `name` in `d`, or None; the folder is not loaded whole for it."""
        if not d.is_dir:
            raise NotADirectory("not a folder")
        if d.children is not None:
            return d.children.get(name)
        if d.partial is not None and name in d.partial:
            return d.partial[name]
        entry = await self.base.lookup(d.base, name) if d.base is not None else None
        if d.children is not None:  # loaded whole while we waited
            return d.children.get(name)
        if entry is None:
            return None
        if d.partial is None:
            d.partial = {}
        node = d.partial.get(name)  # another lookup of it may have come first
        if node is None:
            node = self._new(entry.name, d, entry.kind, entry.mode, entry.mtime_ns, base=entry)
            d.partial[name] = node
        return node

    async def load_changed(self, d: WNode) -> None:
        """A folder some of whose looked-up names changed is loaded whole (a version
        needs all its names)."""
        if d.children is None and d.partial and any(k.changed for k in d.partial.values()):
            await self.children(d)

    def path_of(self, node: WNode) -> list[bytes]:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return parts[::-1]

    # -- changes ---------------------------------------------------------------------

    def touch(self, node: WNode, *, mtime: bool = False) -> None:
        """`node`'s entry changed: so does every folder's above it."""
        self.generation += 1
        if mtime:
            node.mtime_ns = _now()
        while node is not None and not node.changed:
            node.changed = True
            node = node.parent  # type: ignore[assignment]

    def _attach(self, d: WNode, node: WNode) -> None:
        assert d.children is not None
        node.parent = d
        node.cookie = d.next_cookie
        d.next_cookie += 1
        node.attached = True
        d.children[node.name] = node
        if node.is_dir:
            d.subdirs += 1
        self.touch(d, mtime=True)

    def _detach(self, d: WNode, node: WNode) -> None:
        assert d.children is not None
        del d.children[node.name]
        if node.is_dir:
            d.subdirs -= 1
        node.attached = False
        self.touch(d, mtime=True)
        self._drop(node)

    def _drop(self, node: WNode) -> None:
        """A detached node: forget it (and what is below it) unless the kernel holds it."""
        stack = [node]
        while stack:
            n = stack.pop()
            n.attached = False
            if n.children:
                stack.extend(n.children.values())
            if n.partial:
                stack.extend(n.partial.values())
            if n.lookups <= 0 and n is not self.root:
                self.nodes.pop(n.ino, None)
                self.dirty_files.discard(n)

    async def create(self, d: WNode, name: bytes, kind: int, mode: int,
                     target: bytes | None = None) -> WNode:
        name = _checked(name)
        kids = await self.children(d)
        if name in kids:
            raise EntryExists("the name is taken")
        if kind == KIND_LINK:
            if not target or len(target) > MAX_LINK_TARGET or b"\x00" in target:
                raise NameTooLong(f"a symlink's target is 1 to {MAX_LINK_TARGET} bytes")
        node = self._new(name, d, kind, mode & 0o7777, _now())
        node.changed = True
        if kind == KIND_DIR:
            node.children = {}
        elif kind == KIND_FILE:
            node.content = FileContent()
        else:
            node.target = target
        self._attach(d, node)
        return node

    async def unlink(self, d: WNode, name: bytes, *, want_dir: bool) -> None:
        kids = await self.children(d)
        node = kids.get(name)
        if node is None:
            raise NoSuchEntry("no such name")
        if want_dir:
            if not node.is_dir:
                raise NotADirectory("not a folder")
            if await self.children(node):
                raise DirectoryNotEmpty("the folder is not empty")
        elif node.is_dir:
            raise IsADirectory("a folder: use rmdir")
        self._detach(d, node)

    async def rename(self, d1: WNode, n1: bytes, d2: WNode, n2: bytes, flags: int = 0) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise InvalidChange("only RENAME_NOREPLACE is supported")
        n2 = _checked(n2)
        src_kids = await self.children(d1)
        node = src_kids.get(n1)
        if node is None:
            raise NoSuchEntry("no such name")
        dst_kids = await self.children(d2)
        up = d2
        while up is not None:
            if up is node:
                raise InvalidChange("a folder cannot move into itself")
            up = up.parent  # type: ignore[assignment]
        old = dst_kids.get(n2)
        if old is node:
            return
        if old is not None:
            if flags & RENAME_NOREPLACE:
                raise EntryExists("the name is taken")
            if node.is_dir:
                if not old.is_dir:
                    raise NotADirectory("a folder cannot replace a file")
                if await self.children(old):
                    raise DirectoryNotEmpty("the folder to replace is not empty")
            elif old.is_dir:
                raise IsADirectory("a file cannot replace a folder")
            self._detach(d2, old)
        self._detach_for_move(d1, node)
        node.name = n2
        self._attach(d2, node)
        self.touch(node)

    def _detach_for_move(self, d: WNode, node: WNode) -> None:
        assert d.children is not None
        del d.children[node.name]
        if node.is_dir:
            d.subdirs -= 1
        self.touch(d, mtime=True)

    async def unlink_any(self, d: WNode, name: bytes) -> None:
        """Remove `name` from `d`, a folder with everything below it (a watched folder's
        name that is gone)."""
        node = (await self.children(d)).get(name)
        if node is not None:
            self._detach(d, node)

    def set_chunks(self, node: WNode, chunks: list[Ref], mode: int, mtime_ns: int) -> None:
        """The file's bytes are now these stored chunks (a watched folder's file read again)."""
        node.content = FileContent(chunks)
        node.mode = mode & 0o7777
        node.mtime_ns = mtime_ns
        self.dirty_files.discard(node)
        self.touch(node)

    async def content(self, node: WNode) -> FileContent:
        """The file's bytes as a FileContent (made from its chunk list the first time)."""
        if not node.is_file:
            raise IsADirectory("not a file") if node.is_dir else InvalidChange("not a file")
        if node.content is None:
            chunks = await self.base.chunks(node.base) if node.base is not None else ()
            if node.content is None:
                node.content = FileContent(chunks)
        return node.content

    def wrote(self, node: WNode) -> None:
        """The file's bytes changed (a write or a truncate)."""
        if node.content is not None and node.content.dirty_bytes:
            self.dirty_files.add(node)
        self.touch(node, mtime=True)

    def set_mode(self, node: WNode, mode: int) -> None:
        node.mode = mode & 0o7777
        self.touch(node)

    def set_mtime(self, node: WNode, mtime_ns: int) -> None:
        node.mtime_ns = mtime_ns
        self.touch(node)

    @property
    def has_changes(self) -> bool:
        return self.root.changed

    # -- the next version --------------------------------------------------------------

    async def build(self, settle_file: Callable[[WNode], Awaitable[tuple[Ref, ...]]],
                    emit: Callable[[bytes], Ref]) -> tuple[Entry, Callable[[], None]]:
        """The root entry of the tree as it is now; new nodes only for what changed.

        `settle_file(node)` cuts a changed file's dirty bytes and returns its
        chunks; `emit(plaintext)` encrypts and queues one metadata block.
        Returns the root entry and `done`, to call once the emitted blocks are
        stored: only then does each node built take its new entry as `base`
        and become clean. A build that fails (a full disk) changes no node, so
        the next one builds everything again and no entry names a block that
        was never stored.
        """
        built: dict[WNode, Entry] = {}
        stack: list[tuple[WNode, bool]] = [(self.root, False)]
        while stack:
            node, ready = stack.pop()
            if not ready and node.is_dir and node.changed:
                await self.load_changed(node)
            if not ready and node.is_dir and node.changed and node.children is not None:
                stack.append((node, True))
                stack.extend((kid, False) for kid in node.children.values() if kid.changed)
                continue
            if node.changed:
                built[node] = await self._entry(node, built, settle_file, emit)

        def done() -> None:
            for node, entry in built.items():
                node.base = entry
                node.changed = False
                if node.is_file:
                    node.content = None  # its bytes are the entry's chunks now
                    self.dirty_files.discard(node)

        root = built.get(self.root, self.root.base)
        assert root is not None
        return root, done

    async def _entry(self, node: WNode, built: dict[WNode, Entry],
                     settle_file: Callable[[WNode], Awaitable[tuple[Ref, ...]]],
                     emit: Callable[[bytes], Ref]) -> Entry:
        if node.is_dir:
            if node.children is None:  # renamed or chmod-ed, never opened
                assert node.base is not None
                return dataclasses.replace(node.base, name=node.name, mode=node.mode,
                                           mtime_ns=node.mtime_ns)
            kids = sorted(node.children.values(), key=lambda k: k.name)
            entries = [built[k] if k.changed else k.base for k in kids]
            assert all(e is not None for e in entries)
            ref = build_directory(entries, emit)  # type: ignore[arg-type]
            files, size = dir_totals(entries)  # type: ignore[arg-type]
            return Entry(node.name, KIND_DIR, node.mode, node.mtime_ns, node=ref,
                         nsubdirs=sum(1 for k in kids if k.is_dir), nentries=len(kids),
                         total_files=files, total_bytes=size)
        if node.is_link:
            assert node.target is not None
            return Entry(node.name, KIND_LINK, node.mode, node.mtime_ns,
                         size=len(node.target), target=node.target)
        if node.content is None:
            assert node.base is not None
            return dataclasses.replace(node.base, name=node.name, mode=node.mode,
                                       mtime_ns=node.mtime_ns)
        chunks = await settle_file(node)
        return file_entry(node.name, node.mode, node.mtime_ns, chunks, emit)


def file_entry(name: bytes, mode: int, mtime_ns: int, chunks: tuple[Ref, ...],
               emit: Callable[[bytes], Ref]) -> Entry:
    """A file's entry: chunks inline, or in chunk-list blocks past MAX_INLINE_CHUNKS."""
    size = sum(r.length for r in chunks)
    if len(chunks) <= MAX_INLINE_CHUNKS:
        return Entry(name, KIND_FILE, mode, mtime_ns, size=size, chunks=chunks)
    lists = []
    for part in split_chunk_list(chunks):
        ref = emit(encode_chunk_list(part))
        lists.append(ChunkListRef(ref, len(part), sum(r.length for r in part)))
    return Entry(name, KIND_FILE, mode, mtime_ns, size=size, chunk_lists=tuple(lists))
