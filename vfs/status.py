"""`peerdrive status`: the node, or one path inside a mount, as data.

A path's status is read through the same extended attributes any tool can
read (`user.peerdrive.*`), so the command and `getfattr` can never disagree.
These functions return plain JSON types; `vfs/cli.py` prints them (as JSON
or as text) and the dashboard serves the same shapes at `/api/...`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from . import xattrs
from .errors import BlockUnavailable, UsageError
from .home import Home


def path_status(path: Path, only: tuple[str, ...] | None = None) -> dict:
    """The status of one path from its xattrs; `only` reads just those (copies asks peers).

    With `only`, the names are read directly, without listing them first: one
    request to the mount per name (a dashboard lists a folder this way).

    Whenever `figures` is among the names (listed, or in `only`: `peerdrive
    status`, the dashboard), it is read first and never waits: while a folder's first figures of a version are being counted
    (every directory below it read once), `state`, `cached` and `copies`
    (which would wait for that count) are left out, and the answer says
    `complete: false` with the count's progress and the folder's files and
    size from the drive's aggregates.
    """
    if only is None:
        try:
            names = [s for n in os.listxattr(path) if (s := xattrs.short_name(n)) is not None]
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from exc
    else:
        names = list(only)
    raw = {}
    figures = None
    if xattrs.FIGURES in names:
        names.remove(xattrs.FIGURES)
        value = _read(path, xattrs.FIGURES)
        if value is not None:
            figures = xattrs.FiguresState.decode(value)
            if figures.error:  # the count found a directory it could not read
                raise BlockUnavailable(f"{path}: its figures could not be counted: "
                                       f"{figures.error}")
            if not figures.complete:
                names = [n for n in names if n not in (xattrs.STATE, xattrs.CACHED,
                                                       xattrs.COPIES)]
                if figures.size is not None:
                    names = [n for n in names if n != xattrs.SIZE]
    for n in names:
        try:
            raw[n] = os.getxattr(path, xattrs.full_name(n))
        except OSError as exc:
            if exc.errno == errno.EIO:  # the mount could not load what the answer needs
                raise BlockUnavailable(f"{path}: its status needs data that is not on this "
                                       "device and no peer served it in time") from exc
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise UsageError(f"{path}: {exc.strerror}") from exc
    if not raw and figures is None:
        raise UsageError(f"{path} is not inside a peerdrive mount")
    out: dict = {"path": str(path),
                 "state": raw[xattrs.STATE].decode() if xattrs.STATE in raw else None}
    if figures is not None:
        out["complete"] = figures.complete
        if figures.files is not None:
            out["files"] = figures.files
        if not figures.complete:
            out["counted_files"] = figures.counted_files
            if figures.size is not None:
                out["size_bytes"] = figures.size
    if xattrs.CACHED in raw:
        out["cached_bytes"] = xattrs.decode_int(raw[xattrs.CACHED], "cached")
    if xattrs.SIZE in raw:
        out["size_bytes"] = xattrs.decode_int(raw[xattrs.SIZE], "size")
    if xattrs.PINNED in raw:
        out["pinned"] = raw[xattrs.PINNED].strip() == xattrs.encode_flag(True)
    if xattrs.COPIES in raw:
        out["copies"] = xattrs.decode_int(raw[xattrs.COPIES], "copies")
    return out


def _read(path: Path, name: str) -> bytes | None:
    """One of our xattrs of `path`, None if the mount has no such name there."""
    try:
        return os.getxattr(path, xattrs.full_name(name))
    except OSError as exc:
        if exc.errno == errno.EIO:
            raise BlockUnavailable(f"{path}: its status needs data that is not on this "
                                   "device and no peer served it in time") from exc
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise UsageError(f"{path}: {exc.strerror}") from exc


def pin_progress(path: Path) -> xattrs.PinProgress | None:
    """The progress of the pin holding `path` (its own counters), None if it has none yet."""
    try:
        return xattrs.PinProgress.decode(os.getxattr(path, xattrs.full_name(xattrs.PROGRESS)))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise UsageError(f"{path}: {exc.strerror}") from exc


def known_drives(home: Home, store, running: list[dict] | None = None) -> list[dict]:
    """Every drive this node holds a verified head of (or hosts): what it can serve.

    Per drive: `seq`; `hosted` (this node hosts it, `peerdrive host`);
    `complete` and `missing_blocks` (every block of the newest version here,
    counted from its block list); `copies`: the devices (and mirrors) known to
    hold that version whole, this one included — the other nodes are counted by a
    running `serve` of this home (`copies_checked` says whether one did).
    """
    from .capability import StoreCap
    from .host_list import HostList, copies_in, serving_snapshots, version_presence
    from .storage import DriveStorage

    storage = DriveStorage(store)
    published = {cap.pubkey for cap in home.published_drives()}
    hosted = {e.cap.pubkey for e in HostList(home.hosts_dir).entries()}
    counting = serving_snapshots(running if running is not None else home.running_nodes(),
                                 "copies")
    out = []
    for pubkey in dict.fromkeys([*storage.known_drives(), *sorted(hosted)]):
        head = storage.load_head(StoreCap(pubkey))
        if head is None:
            out.append({"drive": pubkey.hex(), "seq": None, "created": None,
                        "published_here": pubkey in published, "hosted": pubkey in hosted,
                        "complete": False, "missing_blocks": None, "copies": 0,
                        "copies_checked": False, "mirrors": []})
            continue
        presence = version_presence(store, head)
        others = copies_in(counting, pubkey, head.seq)
        out.append({"drive": pubkey.hex(), "seq": head.seq, "created": head.created,
                    "published_here": pubkey in published, "hosted": pubkey in hosted,
                    **presence,
                    "copies": (others or 0) + (1 if presence["complete"] else 0),
                    "copies_checked": others is not None,
                    "mirrors": list(head.mirrors)})  # named in its head
    return out


def cache_status(store) -> dict:
    """The cache of this node: bytes used and the limit (None: no limit)."""
    stats = store.stats()
    return {"used_bytes": stats["total_bytes"], "limit_bytes": stats["limit_bytes"]}


def node_status(home: Home, store=None) -> dict:
    """The node: its home, cache, the drives it holds, live mounts, running node processes.

    `store`: the node's store if this process has it open already (LMDB opens
    an environment once per process), else it is opened for the call.
    """
    if store is None:
        from cache.store import BlockStore

        with BlockStore(home.store_path) as opened:
            return node_status(home, opened)
    running = home.running_nodes()
    return {"home": str(home.path), "cache": cache_status(store),
            "drives": known_drives(home, store, running), "mounts": home.live_mounts(),
            "nodes": running}


def path_status_with_cache(home: Home, path: Path, store=None) -> dict:
    """One path inside a mount (`path_status`) and the node's cache beside it."""
    data = path_status(path)
    if store is None:
        from cache.store import BlockStore

        with BlockStore(home.store_path) as opened:
            data["cache"] = cache_status(opened)
    else:
        data["cache"] = cache_status(store)
    return data
