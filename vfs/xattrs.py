"""The extended-attribute vocabulary of a mount: names, values, encodings (pure code).

Status and pinning are spoken through extended attributes on every path of
a mount (`user.peerdrive.*`), so any tool (`getfattr`, a file manager, a
script) and the `peerdrive` command see the same thing. The FUSE layer
(`vfs.fs`), the drive's answers (`vfs.answers`), `peerdrive status` and the
CLI all take the names and encodings from here, so they cannot drift apart.

Read on every path:

    state     cloud | partial | device       (nothing, some, all bytes on this device)
    cached    decimal bytes on this device    (a folder: everything below it)
    size      decimal bytes in all            (a folder: everything below it)
    pinned    1 | 0                           (1 if it or a folder above it is pinned)
    copies    decimal count of devices (and mirrors) holding it whole (asks peers: slow)
    figures   JSON: whether `state` and `cached` are at hand (FiguresState); never waits

The first `state`/`cached` of a folder in a version need every directory
below it read once (minutes at 10^6 files): a read of them waits for that,
while `figures` answers at once, starts that count in the background if it
is not running, and says how far it is and the folder's files and size
from the drive's folder aggregates (docs/formats.md). `peerdrive status`
reads it first and does not wait.

Read in a writable mount: `published`, 1 if the path is as the drive's
current version has it, 0 if it holds changes this mount has not published
yet (its bytes are then on this device: in memory, or stored under the
mount's write pin; `copies` counts this device only).
Read on a pinned path (and below it): `progress`, the pin's own counters as
JSON (see PinProgress), cheap enough to poll. Read on the root only:
`versions`, the drive's versions as JSON (`peerdrive log MNT`, vfs/versions.py;
walks old heads: slow). Set: `pinned` 1|0 pins or
unpins, `evict` 1 frees the path's unpinned blocks now.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .errors import UsageError

PREFIX = "user.peerdrive."
PREFIX_BYTES = PREFIX.encode()

STATE = "state"
CACHED = "cached"
SIZE = "size"
PINNED = "pinned"
COPIES = "copies"
PROGRESS = "progress"
EVICT = "evict"
VERSIONS = "versions"
PUBLISHED = "published"
FIGURES = "figures"

# what `listxattr` shows on every path, in this order
LISTED = (STATE, CACHED, SIZE, PINNED, COPIES, FIGURES)
# cheap to read: no question to a peer (what a poll may ask for)
LOCAL = (STATE, CACHED, SIZE, PINNED)
SETTABLE = (PINNED, EVICT)

CLOUD = "cloud"
PARTIAL = "partial"
DEVICE = "device"


def full_name(name: str) -> str:
    """`state` -> `user.peerdrive.state`."""
    return PREFIX + name


def short_name(name: bytes | str) -> str | None:
    """`user.peerdrive.state` -> `state`; None for a name outside our prefix."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    return text[len(PREFIX):] if text.startswith(PREFIX) else None


def foreign_namespace(name: bytes | str) -> bool:
    """Whether `name` lies outside the `user.` namespace (`security.`, `system.`,
    `trusted.`): attributes a drive never holds (no ACLs, no security labels).

    Such a question is answered "not supported" (EOPNOTSUPP), not "no such
    attribute": `ls -l`, `cp -a` and others then remember that for the whole
    file system (coreutils keeps it per device) instead of asking each file for
    its SELinux label and ACL, two round trips through the mount per file that
    the kernel never caches (`ls -lR` warm: docs/benchmarks.md).
    """
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    return not text.startswith("user.")


def state_of(have: int, total: int) -> str:
    """The Kindle-model state: nothing local, some, or everything."""
    if total == 0 or have >= total:
        return DEVICE
    return CLOUD if have == 0 else PARTIAL


def encode_int(n: int) -> bytes:
    return str(n).encode()


def decode_int(raw: bytes | str, what: str) -> int:
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} is not a number: {text!r}") from None


def encode_flag(on: bool) -> bytes:
    return b"1" if on else b"0"


def decode_flag(raw: bytes, name: str) -> bool:
    """`1` or `0` (surrounding whitespace allowed, as `echo` adds a newline)."""
    flag = raw.strip()
    if flag not in (b"0", b"1"):
        raise UsageError(f"{full_name(name)} takes 0 or 1")
    return flag == b"1"


# The phases of a pin, as `progress` reports them.
PIN_WAITING = "waiting"  # set, not yet looked at (another pin is being worked on)
PIN_LISTING = "listing"  # walking the tree for the blocks it needs
PIN_FETCHING = "fetching"
PIN_COMPLETE = "complete"
PIN_RETRYING = "retrying"  # a block no peer served; tried again soon


@dataclass
class PinProgress:
    """How far one pin is: its own counters, kept as its blocks arrive.

    `blocks`/`bytes` are on this device out of `total_blocks`/`total_bytes`
    (plaintext lengths, metadata included) of the blocks known so far; while
    `phase` is `listing` the totals still grow.
    """

    phase: str = PIN_WAITING
    blocks: int = 0
    total_blocks: int = 0
    bytes: int = 0
    total_bytes: int = 0
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.phase == PIN_COMPLETE

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PinProgress:
        try:
            obj = json.loads(raw)
            return cls(phase=str(obj["phase"]), blocks=int(obj["blocks"]),
                       total_blocks=int(obj["total_blocks"]), bytes=int(obj["bytes"]),
                       total_bytes=int(obj["total_bytes"]), error=str(obj.get("error", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{full_name(PROGRESS)} is malformed: {raw[:80]!r}") from exc


@dataclass
class FiguresState:
    """Whether a path's `state` and `cached` can be answered now (`figures`).

    `complete` False: the folder's first figures of this version are being
    counted in the background; `counted_files` of `files` so far. `files` and
    `size` are the folder's totals (from the drive's folder aggregates while
    counting: None in a version written before them). `error` says why the
    last count stopped (a directory no peer served); the next read retries.
    """

    complete: bool
    files: int | None = None
    size: int | None = None
    counted_files: int = 0
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> FiguresState:
        try:
            obj = json.loads(raw)
            files, size = obj.get("files"), obj.get("size")
            return cls(complete=bool(obj["complete"]),
                       files=None if files is None else int(files),
                       size=None if size is None else int(size),
                       counted_files=int(obj.get("counted_files", 0)),
                       error=str(obj.get("error", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{full_name(FIGURES)} is malformed: {raw[:80]!r}") from exc
