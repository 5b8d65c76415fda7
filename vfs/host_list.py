"""What this node hosts, read without the network: the hosts folder, the pins of
hosted versions, and what a running `serve` reports about them.

`vfs/host.py` runs the hosting (in `serve`: follow heads, fetch, complete,
release); this module holds what it keeps and how, so `peerdrive host`,
`host --list`, `host --remove`, `status` and `publish --wait-copies` read it
in a short process that loads neither trio nor the DHT.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cache.store import BlockStore

from .blocklist import read_block_list
from .capability import StoreCap, parse_link
from .errors import FormatError, NoSpaceError, PeerdriveError, UsageError
from .head import Head

log = logging.getLogger(__name__)

DEFAULT_KEEP_VERSIONS = 1
MAX_KEEP_VERSIONS = 1000


def host_pin(pubkey: bytes, seq: int) -> str:
    """The pin of one complete hosted version (zero-padded seq: names sort by version)."""
    return f"host:{pubkey.hex()}:{seq:020d}"


def host_pending_pin(pubkey: bytes, seq: int) -> str:
    """The pin of a version being fetched: nothing under it counts as hosted."""
    return f"host-pending:{pubkey.hex()}:{seq:020d}"


def _pins_of(store: BlockStore, prefix: str) -> list[tuple[int, str]]:
    out = []
    for name in store.pin_names():
        if name.startswith(prefix):
            with contextlib.suppress(ValueError):
                out.append((int(name[len(prefix):]), name))
    return sorted(out)


def hosted_versions(store: BlockStore, pubkey: bytes) -> list[int]:
    """The versions of a drive this node holds complete as a host, oldest first."""
    return [seq for seq, _ in _pins_of(store, f"host:{pubkey.hex()}:")]


def release_versions(store: BlockStore, pubkey: bytes, keep: int, *,
                     pending_below: int | None = None, by_seq: bool = False) -> int:
    """Drop all but the newest `keep` hosted versions (and pending fetches older than
    `pending_below`, or all of them when it is None and keep is 0); evict the blocks
    no other pin holds. Returns the bytes freed.

    `by_seq`: keep only versions within `keep` seqs of the newest hosted one (a
    writer's "its last N versions"), so a version the follower skipped (published
    while it was busy) does not keep an older one alive in its place."""
    freed = 0
    complete = _pins_of(store, f"host:{pubkey.hex()}:")
    drop = [name for _, name in complete[:max(0, len(complete) - keep)]]
    if by_seq and complete:
        newest = complete[-1][0]
        drop += [name for seq, name in complete if seq <= newest - keep and name not in drop]
    for seq, name in _pins_of(store, f"host-pending:{pubkey.hex()}:"):
        if (pending_below is None and keep == 0) or (pending_below is not None
                                                     and seq < pending_below):
            drop.append(name)
    for name in drop:
        ids = store.pin_ids(name)
        store.unpin(name)
        freed += store.evict(ids)  # blocks another pin (a newer version) holds stay
    return freed


# ----------------------------------------------------------------------------- the hosts folder


@dataclass(frozen=True)
class HostEntry:
    """One drive this node hosts: its store capability and the limits the user set."""

    cap: StoreCap
    quota: int | None = None  # bytes one version may take; None: no limit
    keep_versions: int = DEFAULT_KEEP_VERSIONS

    def to_json(self) -> dict:
        return {"link": self.cap.link(), "quota": self.quota,
                "keep_versions": self.keep_versions}

    @classmethod
    def from_json(cls, data: object, where: Path) -> HostEntry:
        if not isinstance(data, dict):
            raise UsageError(f"{where} is not a host entry")
        cap = parse_link(str(data.get("link", "")))
        quota = data.get("quota")
        keep = data.get("keep_versions", DEFAULT_KEEP_VERSIONS)
        if (quota is not None and (type(quota) is not int or quota < 0)) \
                or type(keep) is not int or not 1 <= keep <= MAX_KEEP_VERSIONS:
            raise UsageError(f"{where} has a bad quota or keep_versions")
        return cls(StoreCap(cap.pubkey), quota, keep)


class HostList:
    """The drives this node hosts: one JSON file each under `PEERDRIVE_HOME/hosts/`."""

    def __init__(self, hosts_dir: Path) -> None:
        self.dir = hosts_dir

    def _file(self, cap: StoreCap) -> Path:
        return self.dir / f"{cap.drive_id}.json"

    def add(self, entry: HostEntry) -> bool:
        """Host a drive (or change its limits); True if it was not hosted before."""
        if entry.quota is not None and entry.quota < 0:
            raise UsageError("the quota must be a size of 0 or more")
        if not 1 <= entry.keep_versions <= MAX_KEEP_VERSIONS:
            raise UsageError(f"--keep-versions must be 1 to {MAX_KEEP_VERSIONS}")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._file(entry.cap)
        new = not path.exists()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry.to_json()))
        tmp.replace(path)
        return new

    def remove(self, cap: StoreCap) -> bool:
        try:
            self._file(cap).unlink()
        except FileNotFoundError:
            return False
        return True

    def get(self, cap: StoreCap) -> HostEntry | None:
        return next((e for e in self.entries() if e.cap == cap), None)

    def entries(self) -> list[HostEntry]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(HostEntry.from_json(json.loads(path.read_text()), path))
            except (OSError, ValueError, PeerdriveError) as exc:
                log.warning("ignored %s: %s", path, exc)
        return out


# ----------------------------------------------------------------------------- what is here


def version_presence(store: BlockStore, head: Head) -> dict:
    """Is every block of `head`'s version on this node? `complete` and `missing_blocks`.

    Counted from the block list: the list blocks themselves, every listed
    block, and, under a list block this node lacks, every block it would
    list. A version 1 head has no list: both are None.
    """
    if head.block_list is None:
        return {"complete": None, "missing_blocks": None}
    local = read_block_list(head.block_list, store.get)
    missing = (len(store.missing(list(local.blocks))) + local.missing_list_blocks
               + local.unknown_blocks)
    return {"complete": missing == 0, "missing_blocks": missing}


# ----------------------------------------------------------------------------- refusals


class QuotaExceeded(NoSpaceError):
    """A version is bigger than the quota its host was given: it is not hosted."""


class NotHostable(FormatError):
    """A version that cannot be hosted: no block list, or one that does not check out."""


def stop_hosting(store: BlockStore, cap: StoreCap) -> int:
    """Release every version of a drive this node hosts (complete or pending); bytes freed."""
    return release_versions(store, cap.pubkey, 0)


# ----------------------------------------------------------------------------- for the CLI


def serving_snapshots(running: list[dict], section: str) -> list[dict]:
    """The live `serve` snapshots of a home that report `section` (hosting, copies)."""
    return [snap for snap in running if section in snap]


def host_state_in(snapshots: list[dict], cap: StoreCap) -> tuple[dict | None, float]:
    """The newest hosting state of `cap` among snapshots, and that snapshot's time."""
    best: tuple[dict | None, float] = (None, 0.0)
    for snap in snapshots:
        for state in snap.get("hosting", ()):
            if state.get("drive") == cap.drive_id and snap.get("time", 0.0) > best[1]:
                best = (state, snap["time"])
    return best


def copies_in(snapshots: list[dict], pubkey: bytes, seq: int) -> int | None:
    """How many other nodes a running serve found holding version `seq` whole, or None."""
    found = None
    for snap in snapshots:
        c = snap.get("copies", {}).get(pubkey.hex())
        if c is not None and c.get("seq") == seq:
            found = max(found or 0, int(c.get("holders", 0)))
    return found
