"""A drive's history: walking versions back, what changed, merging two writers' trees.

Every head names the head before it (`Head.prev`, the SHA-256 of its signed
bytes), and the publisher stores that previous head as a block of the new
version, so any node can walk a drive's versions back from its newest head,
fetching old heads and their directory nodes lazily like any other block.
Each old head is verified like the newest one (signature, drive key) and
must have a lower seq than the one naming it, so a chain always ends.

Tree walks here are iterative (a folder nested thousands deep is fine) and
skip subtrees whose directory node is the same block on both sides: a
version shares every unchanged folder with the one before, so comparing
two versions costs the folders that changed, not the whole drive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dht.types import Priority

from .capability import StoreCap
from .crypto import Ref
from .errors import BlockUnavailable, FormatError, IntegrityError, UsageError
from .formats import KIND_DIR, Entry, build_directory, dir_totals
from .head import Head, open_head
from .merge import Recurse, merge_dir
from .tree import Tree

# Paths listed per kind of change (added, removed, modified) per version, by default.
CHANGE_LIST_LIMIT = 20
# Versions a walk goes back, at most (a chain is finite anyway: seqs strictly decrease).
MAX_WALK = 1_000_000

GetBlock = Callable[[bytes], Awaitable[bytes]]


# ----------------------------------------------------------------------------- the chain


async def previous_head(head: Head, cap: StoreCap, get_block: GetBlock) -> Head | None:
    """The version `head` was committed on top of, verified; None at the first version.

    `get_block(id)` returns a block's bytes (from the store or a peer, checked
    against its id). Raises IntegrityError for a previous head that is not
    this drive's or does not come before `head`.
    """
    if head.prev is None:
        return None
    wire = await get_block(head.prev)
    if hashlib.sha256(wire).digest() != head.prev:
        raise IntegrityError(f"the head before version {head.seq} does not match its id")
    prev = open_head(wire, cap)
    if prev.seq >= head.seq:
        raise IntegrityError(f"version {head.seq} names version {prev.seq} as the one before it")
    return prev


async def find_version(head: Head, seq: int, cap: StoreCap, get_block: GetBlock) -> Head:
    """The version numbered `seq` in `head`'s history (FormatError if it is not there)."""
    current: Head | None = head
    while current is not None and current.seq > seq:
        current = await previous_head(current, cap, get_block)
    if current is None or current.seq != seq:
        raise UsageError(f"version {seq} is not in the drive's history (its history goes "
                          f"from version {head.seq} back"
                          + (f" to version {current.seq})" if current is not None else ")"))
    return current


async def common_base(a: Head, b: Head, cap: StoreCap, get_block: GetBlock) -> Head | None:
    """The newest version both `a` and `b` descend from (None: no common one is known,
    such as when a chain reaches a version 2 head that names no previous one)."""
    seen_a: dict[int, bytes] = {a.seq: a.id}
    seen_b: dict[int, bytes] = {b.seq: b.id}
    heads = {a.id: a, b.id: b}
    x: Head | None = a
    y: Head | None = b
    for _ in range(MAX_WALK):
        if x is not None and y is not None and x.id == y.id:
            return x
        if x is not None and seen_b.get(x.seq) == x.id:
            return x
        if y is not None and seen_a.get(y.seq) == y.id:
            return heads[y.id]
        # step back the newer side (both when equal)
        if x is None and y is None:
            return None
        if y is None or (x is not None and x.seq >= y.seq):
            x = await previous_head(x, cap, get_block)
            if x is not None:
                seen_a[x.seq] = x.id
                heads[x.id] = x
        else:
            y = await previous_head(y, cap, get_block)
            if y is not None:
                seen_b[y.seq] = y.id
                heads[y.id] = y
    raise FormatError("the drive's history is longer than this peerdrive walks")


def is_ancestor(candidate: Head, chain: list[Head]) -> bool:
    return any(h.id == candidate.id for h in chain)


# ----------------------------------------------------------------------------- what a version holds


@dataclass
class TreeFigures:
    """Counted once per directory node block, shared by every version that holds it."""

    memo: dict[bytes, tuple[int, int]] = field(default_factory=dict)


async def count_tree(tree: Tree, root: Entry, figures: TreeFigures) -> tuple[int, int]:
    """(files, bytes of file content) under `root`; subtrees counted before are reused."""
    return await _postorder(tree, root, figures.memo, _count_leaf)


def _count_leaf(entries: list[Entry], kids: list[tuple[int, int]]) -> tuple[int, int]:
    files = sum(1 for e in entries if e.is_file)
    size = sum(e.size for e in entries if e.is_file)
    return files + sum(k[0] for k in kids), size + sum(k[1] for k in kids)


async def _postorder(tree: Tree, root: Entry, memo: dict, combine) -> tuple[int, int]:
    """Fold a tree bottom up (iteratively), once per distinct directory node."""
    assert root.node is not None
    stack: list[tuple[Entry, list[Entry] | None]] = [(root, None)]
    while stack:
        entry, entries = stack.pop()
        assert entry.node is not None
        key = entry.node.block_id
        if key in memo:
            continue
        if entries is None:
            _, listed = await tree.read_directory(entry.node, Priority.READ)
            stack.append((entry, listed))
            stack.extend((e, None) for e in listed if e.is_dir
                         and e.node is not None and e.node.block_id not in memo)
            continue
        memo[key] = combine(entries, [memo[e.node.block_id] for e in entries
                                      if e.is_dir and e.node is not None])
    return memo[root.node.block_id]


# ----------------------------------------------------------------------------- what changed


@dataclass
class Changes:
    """Paths added, removed and modified between two versions (each list bounded)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"added": 0, "removed": 0,
                                                            "modified": 0})

    def note(self, kind: str, path: bytes, limit: int) -> None:
        self.counts[kind] += 1
        paths = getattr(self, kind)
        if len(paths) < limit:
            paths.append(path.decode("utf-8", "backslashreplace"))

    def as_json(self) -> dict:
        return {"added": self.added, "removed": self.removed, "modified": self.modified,
                "counts": dict(self.counts)}


async def changes_between(tree: Tree, old: Entry | None, new: Entry,
                          limit: int = CHANGE_LIST_LIMIT) -> Changes:
    """What changed from `old` to `new` (root entries; None: nothing before), name by
    name: a file or link added, removed or changed; a folder added or removed counts as
    one path (`dir/`); identical subtrees are skipped unread."""
    out = Changes()
    stack: list[tuple[bytes, Entry | None, Entry | None]] = [(b"", old, new)]
    while stack:
        path, a, b = stack.pop()
        if a is not None and b is not None and a.node == b.node:
            continue
        a_entries = {e.name: e for e in (await _listing(tree, a))}
        b_entries = {e.name: e for e in (await _listing(tree, b))}
        for name in sorted(a_entries.keys() | b_entries.keys(), reverse=True):
            x, y = a_entries.get(name), b_entries.get(name)
            p = path + name
            if x == y:
                continue
            if x is not None and y is not None and x.is_dir and y.is_dir:
                stack.append((p + b"/", x, y))
            elif y is None:
                out.note("removed", p + (b"/" if x.is_dir else b""), limit)  # type: ignore[union-attr]
            elif x is None:
                out.note("added", p + (b"/" if y.is_dir else b""), limit)
            elif x.is_dir or y.is_dir:  # a file became a folder or the other way round
                out.note("removed", p + (b"/" if x.is_dir else b""), limit)
                out.note("added", p + (b"/" if y.is_dir else b""), limit)
            else:
                out.note("modified", p, limit)
    for kind in ("added", "removed", "modified"):
        getattr(out, kind).sort()
    return out


async def _listing(tree: Tree, entry: Entry | None) -> list[Entry]:
    if entry is None or entry.node is None:
        return []
    _, entries = await tree.read_directory(entry.node, Priority.READ)
    return entries


# ----------------------------------------------------------------------------- merging trees


@dataclass
class MergedTree:
    root: Entry
    conflicts: list[str]  # the conflict copies made, as paths


async def merge_trees(tree: Tree, base: Entry | None, ours: Entry, theirs: Entry,
                      emit: Callable[[bytes], Ref], device: str, date: str) -> MergedTree:
    """Rebase the changes from `base` to `ours` onto `theirs` (root directory entries).

    Directories changed on both sides are merged name by name (`vfs.merge`),
    bottom up; each merged directory's nodes go to `emit` (encrypt and
    store). A directory that only one side changed is taken whole, unread.
    """
    if _node(theirs) in (_node(base), _node(ours)):
        return MergedTree(ours, [])
    if _node(ours) == _node(base):
        return MergedTree(theirs, [])
    conflicts: list[str] = []
    root_job = Recurse(b"", base, ours, theirs)
    built: dict[int, Entry | None] = {}
    # (job, path, child jobs once listed, entries kept as they are)
    stack: list[tuple[Recurse, bytes, list[Recurse] | None, list[Entry]]] = [
        (root_job, b"", None, [])]
    while stack:
        job, path, kids, kept = stack.pop()
        if kids is None:
            dm = merge_dir(await _listing(tree, job.base), await _listing(tree, job.ours),
                           await _listing(tree, job.theirs), device, date)
            conflicts.extend((path + new).decode("utf-8", "backslashreplace")
                             for _, new in dm.conflicts)
            stack.append((job, path, dm.recurse, dm.entries))
            stack.extend((r, path + r.name + b"/", None, []) for r in dm.recurse)
            continue
        entries = list(kept)
        for r in kids:
            merged = built.pop(id(r))
            if merged is not None:
                entries.append(merged)
                if r.conflict_of is not None:
                    conflicts.append((path + r.name).decode("utf-8", "backslashreplace"))
        one_side = job.ours is None or job.theirs is None
        if job is not root_job and one_side and not entries:
            built[id(job)] = None  # removed on one side, nothing changed in it on the other
            continue
        entries.sort(key=lambda e: e.name)
        ref = build_directory(entries, emit)
        meta = _dir_meta(job)
        files, size = dir_totals(entries)
        built[id(job)] = Entry(job.name if job is not root_job else ours.name,
                               KIND_DIR, meta[0], meta[1], node=ref,
                               nsubdirs=sum(1 for e in entries if e.is_dir),
                               nentries=len(entries), total_files=files, total_bytes=size)
    root = built[id(root_job)]
    assert root is not None
    return MergedTree(root, sorted(conflicts))


def _node(e: Entry | None) -> Ref | None:
    return None if e is None else e.node


def _dir_meta(job: Recurse) -> tuple[int, int]:
    """Mode and mtime of a merged folder: ours' mode if ours changed it, else theirs';
    the later mtime (an attribute only, it orders nothing)."""
    sides = [e for e in (job.ours, job.theirs) if e is not None]
    mode = sides[0].mode
    if job.ours is not None and job.theirs is not None:
        mode = job.ours.mode if job.base is not None and job.ours.mode != job.base.mode \
            else job.theirs.mode
    return mode, max(e.mtime_ns for e in sides)


# ----------------------------------------------------------------------------- the log


@dataclass
class VersionInfo:
    """One line of `peerdrive log`."""

    seq: int
    created: int  # unix seconds the writer stamped: informative, orders nothing
    id: bytes
    prev: bytes | None
    files: int | None  # None: the version's folders are on no device reachable now
    bytes: int | None
    changes: Changes | None  # None: not known (that, or the version before, is unreachable)
    missing: str | None = None  # why figures are missing (a released version)

    def as_json(self) -> dict:
        return {"seq": self.seq, "time": self.created, "id": self.id.hex(),
                "prev": self.prev.hex() if self.prev else None, "files": self.files,
                "bytes": self.bytes,
                "changes": self.changes.as_json() if self.changes is not None else None,
                "missing": self.missing}


async def version_log(head: Head, cap: StoreCap, tree: Tree, get_block: GetBlock, *,
                      versions: int, paths: int = CHANGE_LIST_LIMIT) -> list[VersionInfo]:
    """The newest `versions` versions from `head` back, newest first, each with its
    files, bytes and what changed since the one before (at most `paths` paths per kind).
    Every head is kept by its writer, so every version has its line; figures a version
    cannot have (its folders released everywhere reachable) are None, with the reason.

    Old heads and their directory nodes are fetched through `get_block`/`tree` as
    needed; folders shared between versions are read and counted once.
    """
    chain: list[Head] = [head]
    while len(chain) <= versions:  # one more than shown: the last one's changes need it
        older = await previous_head(chain[-1], cap, get_block)
        if older is None:
            break
        chain.append(older)
    figures = TreeFigures()
    out = []
    for i, h in enumerate(chain[:versions]):
        if h.root is None:
            raise FormatError("the log needs the read key")
        before = chain[i + 1] if i + 1 < len(chain) else None
        files = size = None
        changes: Changes | None = None
        missing = None
        try:  # a version whose blocks every device released still has its line
            files, size = await count_tree(tree, h.root, figures)
            if before is not None:
                changes = await changes_between(tree, before.root, h.root, paths)
            elif h.prev is None:  # the first version: everything in it was added
                changes = await changes_between(tree, None, h.root, paths)
        except BlockUnavailable as exc:
            missing = str(exc)
        out.append(VersionInfo(h.seq, h.created, h.id, h.prev, files, size, changes, missing))
    return out
