"""Three-way merge of one directory's entries: two writers' changes, nothing lost (pure code).

Two devices holding one write link can both publish from the same version.
The one that commits second rebases its changes onto the other's: for every
name of a directory it compares the entry in the common *base* version, in
*ours* (the tree being committed) and in *theirs* (the newest version seen),
entries compared whole (kind, mode, mtime, content refs):

* the same on both sides (also: gone on both)  -> that
* changed on one side only                     -> that side's
* a folder on both sides, changed on both      -> merged name by name (RECURSE)
* removed on one side, changed on the other    -> the change stays (a folder:
  merged against an empty side, so what the other side did not touch goes)
* changed differently on both sides            -> theirs keeps NAME, ours is
  kept beside it as `NAME (conflict DEVICE YYYY-MM-DD).EXT`; a folder that
  the other side replaced by a file keeps only what changed inside it

DEVICE is a short name of the device whose change was renamed (the first 8
hex digits of its node id, as `peerdrive keys` prints it); the date is that
device's local date, a label only: which version comes first is decided by
seq and by which writer committed second, never by a clock. The conflict
name is made unique within the directory and fits in MAX_NAME bytes.

This module decides per name; `vfs/history.py` walks the trees (loading
directory nodes) and builds the merged nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import MAX_NAME, Entry


@dataclass(frozen=True, slots=True)
class Recurse:
    """A folder changed on both sides: merge its entries (`base` may be None: empty)."""

    name: bytes
    base: Entry | None
    ours: Entry | None  # None: ours removed it (merged against an empty folder)
    theirs: Entry | None  # None: theirs removed it
    conflict_of: bytes | None = None  # ours' folder kept beside theirs' file under `name`


@dataclass(slots=True)
class DirMerge:
    """What one directory becomes: entries to keep, folders to merge further, conflicts."""

    entries: list[Entry]
    recurse: list[Recurse]
    conflicts: list[tuple[bytes, bytes]]  # (name, the conflict copy's name)


def conflict_name(name: bytes, device: str, date: str, taken: set[bytes]) -> bytes:
    """`NAME (conflict DEVICE DATE).EXT`, not in `taken`, at most MAX_NAME bytes.

    The extension is what follows the last dot (not a leading one, as in
    `.bashrc`); a folder's name is split the same way, so one rule holds.
    """
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    if len(ext) > 32:  # not an extension, just a dot in a long name
        stem, ext = name, b""
    for n in range(1, 10_000):
        tag = f" (conflict {device} {date}{'' if n == 1 else f' {n}'})".encode()
        room = MAX_NAME - len(tag) - len(ext)
        short = stem[:room]
        while short and not _utf8_boundary(stem, len(short)):
            short = short[:-1]  # never cut a UTF-8 character in two
        candidate = short + tag + ext
        if candidate not in taken:
            return candidate
    raise AssertionError("no free conflict name")  # 10,000 conflicts of one name in one folder


def _utf8_boundary(data: bytes, i: int) -> bool:
    return i >= len(data) or data[i] & 0xC0 != 0x80


def merge_dir(base: list[Entry] | None, ours: list[Entry], theirs: list[Entry],
              device: str, date: str) -> DirMerge:
    """Merge one directory's entries (each list sorted or not; names unique per list)."""
    b = {e.name: e for e in base or ()}
    o = {e.name: e for e in ours}
    t = {e.name: e for e in theirs}
    out: dict[bytes, Entry] = {}
    recurse: list[Recurse] = []
    renamed: list[Entry] = []  # ours' side of a conflict, named once every name is known
    for name in sorted(b.keys() | o.keys() | t.keys()):
        be, oe, te = b.get(name), o.get(name), t.get(name)
        if same(oe, te):
            if oe is not None:
                out[name] = oe if oe != be and te == be else te
        elif same(oe, be):
            if te is not None:
                out[name] = te
        elif same(te, be):
            if oe is not None:
                out[name] = oe
        elif _is_dir(oe) and _is_dir(te):
            recurse.append(Recurse(name, be if _is_dir(be) else None, oe, te))
        elif oe is None or te is None:
            kept = te if oe is None else oe
            assert kept is not None
            if _is_dir(kept) and _is_dir(be):
                # removed on one side, changed inside on the other: keep only the changes
                recurse.append(Recurse(name, be, oe, te))
            else:
                out[name] = kept
        else:
            # changed both ways and not both folders: theirs keeps the name. A folder that
            # the other side replaced by a file keeps only the changes made inside it
            # (merged against an empty side), as a one-sided removal would.
            if _is_dir(te) and _is_dir(be):
                recurse.append(Recurse(name, be, None, te))
            else:
                out[name] = te
            renamed.append((oe, be))
    taken = set(out) | {r.name for r in recurse}
    conflicts = []
    for e, be in renamed:
        new = conflict_name(e.name, device, date, taken)
        taken.add(new)
        if e.is_dir and _is_dir(be):
            recurse.append(Recurse(new, be, e, None, conflict_of=e.name))
        else:
            conflicts.append((e.name, new))
            out[new] = _renamed(e, new)
    return DirMerge([out[n] for n in sorted(out)], recurse, conflicts)


def same(a: Entry | None, b: Entry | None) -> bool:
    """Same kind, mode and content (mtime aside); None is the same only as None."""
    if a is None or b is None:
        return a is b
    return (a.kind, a.mode, a.size, a.chunks, a.chunk_lists, a.node, a.target) == \
        (b.kind, b.mode, b.size, b.chunks, b.chunk_lists, b.node, b.target)


def device_name(node_id: bytes) -> str:
    """The short name of a device in conflict names: its node id's first 8 hex digits."""
    return node_id.hex()[:8]


def _is_dir(e: Entry | None) -> bool:
    return e is not None and e.is_dir


def _renamed(e: Entry, name: bytes) -> Entry:
    return Entry(name, e.kind, e.mode, e.mtime_ns, size=e.size, chunks=e.chunks,
                 chunk_lists=e.chunk_lists, node=e.node, nsubdirs=e.nsubdirs,
                 nentries=e.nentries, target=e.target, total_files=e.total_files,
                 total_bytes=e.total_bytes)
