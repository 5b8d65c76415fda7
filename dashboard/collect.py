"""What the dashboard shows, read from the node's home, cheaply, once a second.

The dashboard is its own process. It never talks to peers and never walks a
drive's tree; everything comes from what the node already keeps:

* the store (`BlockStore.stats()`: used, limit, pinned, evictable bytes; the
  heads of the drives it holds);
* the live JSON records under the home (`Home.live_mounts()`: the mounts;
  `Home.running_nodes()`: each serve and mount process's snapshot, with its
  peers and the bytes it served), which those processes rewrite every second;
* the `user.peerdrive.*` extended attributes of a mount's root and of the
  entries of the one folder a browser is looking at (`vfs.status.path_status`,
  the same call `peerdrive status` makes). A folder's totals are the mount's
  own aggregate, so one folder costs one call per entry, whatever lies below.

`copies` asks every peer (up to 5 s), so it is read for the mounts' roots in
its own slower loop and for a folder's entries only when a browser asks.

Rates and "last seen" are derived here from successive snapshots: a peer is
seen while a node process reports it connected or its byte count moves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from vfs import xattrs
from vfs.errors import UsageError
from vfs.home import Home
from vfs.status import cache_status, known_drives, path_status

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0
HISTORY_INTERVAL = 5.0
HISTORY_POINTS = 720  # an hour at one point per 5 s
COPIES_INTERVAL = 30.0
DRIVES_INTERVAL = 10.0  # known_drives (heads, versions' completeness) is re-read this often
MAX_ENTRIES = 500  # a folder listing shows this many entries; the rest are counted
MAX_COPIES_ENTRIES = 100  # entries whose copies one request asks peers for
# `figures` first: a folder whose first figures of a version are still being counted
# answers at once (files and size, `complete: false`) instead of holding the collector
CHEAP = (xattrs.FIGURES, *xattrs.LOCAL)


def safety(copies: int | None, here_whole: bool, always_on: bool) -> str:
    """The light of a drive: how many whole copies exist besides this device.

    red: only here, or nowhere whole; amber: one other copy (or several, none
    known to be always on); green: two or more others, at least one always on
    (a host or an HTTP mirror). Unknown copies read as red: nothing is known
    to be safe.
    """
    if copies is None:
        return "red"
    others = copies - (1 if here_whole else 0)
    if others <= 0:
        return "red"
    if others >= 2 and always_on:
        return "green"
    return "amber"


def percent(cached: int, size: int) -> float:
    return 100.0 if size <= 0 else round(min(100.0, 100.0 * cached / size), 1)


def mount_of(path: str, mounts: list[dict]) -> dict:
    """The live mount that holds `path` (resolved); UsageError if none does.

    The dashboard acts only inside this node's mounts: a token holder cannot
    list or touch anything else through it.
    """
    real = os.path.realpath(path)
    for m in mounts:
        mp = m.get("mountpoint", "")
        if mp and (real == mp or real.startswith(mp.rstrip("/") + "/")):
            return m
    raise UsageError(f"{path} is not inside a live peerdrive mount of this node")


def entry_status(path: Path, kind: str, with_copies: bool = False) -> dict:
    """One entry of a listing: the mount's answer for it plus its kind and percent."""
    if kind == "link":
        return {"path": str(path), "name": path.name, "kind": "link",
                "target": os.readlink(path)}
    st = path_status(path, only=(*CHEAP, "copies") if with_copies else CHEAP)
    st["name"] = path.name
    st["kind"] = kind
    st["percent"] = percent(st.get("cached_bytes", 0), st.get("size_bytes", 0))
    return st


def _kind(e: os.DirEntry) -> str:
    if e.is_symlink():
        return "link"
    return "dir" if e.is_dir(follow_symlinks=False) else "file"


def list_folder(path: str, mounts: list[dict], with_copies: bool = False) -> dict:
    """A folder inside a mount: its own status and its entries' (folders first, by name).

    Blocking (extended attributes go through the mount process): run it in a
    worker thread.
    """
    mount = mount_of(path, mounts)
    real = Path(os.path.realpath(path))
    if not real.is_dir():
        raise UsageError(f"{path} is not a folder")
    try:
        with os.scandir(real) as it:
            items = sorted(it, key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    shown = items[:MAX_ENTRIES]
    entries = []
    for i, e in enumerate(shown):
        try:
            entries.append(entry_status(Path(e.path), _kind(e),
                                        with_copies and i < MAX_COPIES_ENTRIES))
        except (UsageError, OSError) as exc:  # gone in a new version meanwhile
            entries.append({"path": e.path, "name": e.name, "kind": "unknown",
                            "error": str(exc)})
    folder = entry_status(real, "dir", with_copies)
    mp = mount["mountpoint"]
    parent = None if str(real) == mp else str(real.parent)
    return {"path": str(real), "mountpoint": mp, "drive": mount.get("drive"),
            "parent": parent, "folder": folder, "entries": entries,
            "more": len(items) - len(shown)}


class Collector:
    """Builds the dashboard's snapshot from the home and the store; keeps the history."""

    def __init__(self, home: Home, store, clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.store = store
        self.clock = clock
        self.history: deque[tuple[float, int]] = deque(maxlen=HISTORY_POINTS)
        self._last_history = 0.0
        self._root_copies: dict[str, int] = {}  # mountpoint -> copies, from the slow loop
        self._peer_seen: dict[tuple[str, str], float] = {}  # (drive, node id) -> last seen
        self._prev_bytes: dict[tuple, tuple[float, int]] = {}  # counter key -> (time, bytes)
        self._rates: dict[tuple, float] = {}
        self._known: tuple[float, list[dict]] | None = None  # (when, known_drives)

    # -- counters to rates --------------------------------------------------------

    def _rate(self, key: tuple, now: float, value: int) -> float:
        prev = self._prev_bytes.get(key)
        self._prev_bytes[key] = (now, value)
        if prev is None:
            return 0.0
        t0, v0 = prev
        if now - t0 <= 0:
            return self._rates.get(key, 0.0)
        rate = max(0.0, (value - v0) / (now - t0))
        self._rates[key] = rate
        return rate

    # -- one sample -----------------------------------------------------------------

    def sample(self) -> dict:
        """Everything the dashboard page shows (blocking: call it from a worker thread)."""
        now = self.clock()
        stats = self.store.stats()
        cache = {**cache_status(self.store), "pinned_bytes": stats["pinned_bytes"],
                 "evictable_bytes": stats["evictable_bytes"], "blocks": stats["count"]}
        if now - self._last_history >= HISTORY_INTERVAL or not self.history:
            self.history.append((round(now, 1), cache["used_bytes"]))
            self._last_history = now
        cache["history"] = [list(p) for p in self.history]
        mounts = self.home.live_mounts()
        nodes_raw = self.home.running_nodes()
        drives = self._drives(mounts)
        nodes, peers = self._nodes_and_peers(nodes_raw, mounts, now)
        return {"time": now, "home": str(self.home.path), "cache": cache, "drives": drives,
                "mounts": mounts, "nodes": nodes, "peers": peers}

    def _drives(self, mounts: list[dict]) -> list[dict]:
        from vfs.capability import StoreCap
        from vfs.storage import DriveStorage

        storage = DriveStorage(self.store)
        now = self.clock()
        if self._known is None or now - self._known[0] >= DRIVES_INTERVAL:
            # known_drives counts each version's blocks on this device: not every second
            self._known = (now, known_drives(self.home, self.store))
        by_id = {d["drive"]: d for d in self._known[1]}
        for m in mounts:  # a mount whose head is not in this store yet still shows
            by_id.setdefault(m["drive"], {"drive": m["drive"], "seq": None, "created": None,
                                          "published_here": False})
        out = []
        for drive_id, d in sorted(by_id.items()):
            row = dict(d)
            if "mirrors" not in row:
                head = None
                with contextlib.suppress(Exception):  # a head another process is writing
                    head = storage.load_head(StoreCap(bytes.fromhex(drive_id)))
                row["mirrors"] = list(getattr(head, "mirrors", ()) or ())
            row.setdefault("hosts", [])
            mount = next((m for m in mounts if m["drive"] == drive_id), None)
            row["mountpoint"] = mount["mountpoint"] if mount else None
            if mount is not None:
                try:
                    st = path_status(Path(mount["mountpoint"]), only=CHEAP)
                except (UsageError, OSError) as exc:
                    row["error"] = str(exc)
                    st = {}
                for k in ("state", "cached_bytes", "size_bytes", "pinned"):
                    if k in st:
                        row[k] = st[k]
                if "size_bytes" in row:
                    row["percent"] = percent(row.get("cached_bytes", 0), row["size_bytes"])
                asked = self._root_copies.get(mount["mountpoint"])  # peers asked, per file
                if asked is not None:
                    row["copies"] = asked
            elif row.get("complete") or (row.get("published_here") and "complete" not in row):
                # every block of the newest version is here (a publisher's are pinned)
                row["state"] = "device"
                row["percent"] = 100.0
            row.setdefault("copies", None)
            here_whole = row.get("state") == "device"
            # always on: an HTTP mirror, or a host holding it (the node's own copy is "here")
            always_on = bool(row["mirrors"]) or bool(row["hosts"])
            row["safety"] = safety(row["copies"], here_whole, always_on)
            out.append(row)
        return out

    def _nodes_and_peers(self, nodes_raw: list[dict], mounts: list[dict],
                         now: float) -> tuple[list[dict], list[dict]]:
        mount_by_pid = {int(m["pid"]): m for m in mounts}
        nodes, peers = [], []
        for n in nodes_raw:
            pid = int(n["pid"])
            srv = n.get("server", {})
            out_bytes = int(srv.get("bytes_served", 0))
            in_bytes = 0
            m = mount_by_pid.get(pid)
            for drive, d in (n.get("drives") or {}).items():
                for p in d.get("peers", []):
                    key = (drive, p["node_id"])
                    b = int(p.get("bytes", 0))
                    in_bytes += b
                    rate = self._rate(("peer", pid, *key), now, b)
                    if p.get("connected") or rate > 0:
                        self._peer_seen[key] = float(n.get("time", now))
                    peers.append({"node_id": p["node_id"], "addr": p.get("addr"),
                                  "drive": drive, "via_pid": pid,
                                  "connected": bool(p.get("connected")),
                                  "blocks": p.get("blocks", 0), "bytes_in": b,
                                  "rate_in": round(rate, 1),
                                  "last_seen": self._peer_seen.get(key),
                                  "failures": p.get("failures", 0)})
            nodes.append({"pid": pid, "node_id": n.get("node_id"), "port": n.get("port"),
                          "role": f"mount {m['mountpoint']}" if m else "serve",
                          "dht_contacts": n.get("dht_contacts", 0),
                          "connections": srv.get("connections_active", 0),
                          "bytes_out": out_bytes,
                          "rate_out": round(self._rate(("out", pid), now, out_bytes), 1),
                          "bytes_in": in_bytes,
                          "rate_in": round(self._rate(("in", pid), now, in_bytes), 1),
                          "last_seen": n.get("time")})
        return nodes, peers

    # -- the slow loop ----------------------------------------------------------------

    def refresh_copies(self) -> None:
        """Ask the mounts how many whole copies of each drive exist (asks peers; slow)."""
        for m in self.home.live_mounts():
            mp = m["mountpoint"]
            try:
                st = path_status(Path(mp), only=("copies",))
            except (UsageError, OSError) as exc:
                log.info("copies of %s: %s", mp, exc)
                continue
            if "copies" in st:
                self._root_copies[mp] = st["copies"]
