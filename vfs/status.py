"""`peerdrive status`: the node, or one path inside a mount.

A path's status is read through the same extended attributes any tool can
read (`user.peerdrive.*`), so the command and `getfattr` can never disagree.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .errors import UsageError
from .home import Home
from .units import format_size

XATTRS = ("state", "cached", "size", "pinned", "copies")


def path_status(path: Path, only: tuple[str, ...] | None = None) -> dict:
    """The status of one path from its xattrs; `only` reads just those (copies asks peers)."""
    try:
        names = [n for n in os.listxattr(path) if n.startswith("user.peerdrive.")]
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    if not names:
        raise UsageError(f"{path} is not inside a peerdrive mount")
    if only is not None:
        names = [n for n in names if n[len("user.peerdrive."):] in only]
    raw = {}
    for n in names:
        raw[n[len("user.peerdrive."):]] = os.getxattr(path, n).decode()
    out: dict = {"path": str(path), "state": raw.get("state")}
    if "cached" in raw:
        out["cached_bytes"] = int(raw["cached"])
    if "size" in raw:
        out["size_bytes"] = int(raw["size"])
    if "pinned" in raw:
        out["pinned"] = raw["pinned"] == "1"
    if "copies" in raw:
        out["copies"] = int(raw["copies"])
    return out


def running_nodes(home: Home) -> list[dict]:
    """Snapshots the live serve and mount processes of this home keep in run/."""
    out = []
    for f in sorted((home.path / "run").glob("*.json")):
        try:
            snap = json.loads(f.read_text())
            os.kill(int(snap["pid"]), 0)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            continue
        out.append(snap)
    return out


def known_drives(home: Home, store) -> list[dict]:
    """Every drive this node holds a verified head of: what it can serve."""
    from .capability import StoreCap
    from .storage import DriveStorage

    storage = DriveStorage(store)
    published = {cap.pubkey for cap in home.published_drives()}
    out = []
    for pubkey in storage.known_drives():
        head = storage.load_head(StoreCap(pubkey))
        if head is not None:
            out.append({"drive": pubkey.hex(), "seq": head.seq, "created": head.created,
                        "published_here": pubkey in published})
    return out


def status_command(home: Home, args: argparse.Namespace) -> tuple[dict, str]:
    from cache.store import BlockStore

    if args.path:
        data = path_status(Path(args.path))
        store_stats = None
    else:
        data = {}
    drives = []
    with BlockStore(home.store_path) as store:
        store_stats = store.stats()
        if not args.path:
            drives = known_drives(home, store)
    data["cache"] = {"used_bytes": store_stats["total_bytes"],
                     "limit_bytes": store_stats["limit_bytes"]}
    if args.path:
        text = (f"{data['path']}\n  state   {data['state']}\n"
                f"  on device {format_size(data.get('cached_bytes', 0))} of "
                f"{format_size(data.get('size_bytes', 0))}")
        if "pinned" in data:
            text += f"\n  pinned  {'yes' if data['pinned'] else 'no'}"
        if "copies" in data:
            text += f"\n  copies  {data['copies']}"
        return data, text
    mounts = home.live_mounts()
    data["mounts"] = mounts
    data["nodes"] = running_nodes(home)
    data["home"] = str(home.path)
    data["drives"] = drives
    lines = [f"home    {home.path}",
             f"cache   {format_size(store_stats['total_bytes'])} used of "
             f"{format_size(store_stats['limit_bytes'])}"]
    for d in drives:
        lines.append(f"drive   {d['drive'][:16]}  version {d['seq']}"
                     f"{'  published here' if d['published_here'] else ''}")
    for m in mounts:
        lines.append(f"mount   {m['mountpoint']}  drive {m['drive'][:16]}  pid {m['pid']}")
    for n in data["nodes"]:
        srv = n["server"]
        lines.append(f"node    pid {n['pid']} port {n['port']}  {n['dht_contacts']} DHT contacts, "
                     f"served {srv['blocks_served']} blocks ({format_size(srv['bytes_served'])})")
        for drive, d in n["drives"].items():
            for p in d["peers"]:
                lines.append(f"  peer  {p['node_id'][:12]} {p['addr']}  drive {drive[:12]}  "
                             f"got {p['blocks']} blocks ({format_size(p['bytes'])})"
                             f"{'  connected' if p['connected'] else ''}")
    return data, "\n".join(lines)
