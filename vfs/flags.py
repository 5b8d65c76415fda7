"""Pin, unpin and evict a path inside a mount: one extended attribute each.

`peerdrive pin|unpin|evict` and the dashboard's buttons both call these, and
they do exactly what `setfattr -n user.peerdrive.pinned -v 1 PATH` does: the
mount process (vfs/fs.py) acts on the attribute, so every tool goes through
one interface.

The attributes are ordinary `user.` ones, which most filesystems (ext4, tmpfs)
store for any file: on a path outside a mount, setting one would "succeed",
do nothing and leave a stray attribute behind. So the path's filesystem is
checked first (its device in the kernel's mount table must be a peerdrive
mount), and nothing is written anywhere else.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from . import xattrs
from .errors import NoSpaceError, UsageError

MOUNT_FSTYPE = "fuse.peerdrive"  # vfs/mount.py mounts with subtype=peerdrive


def _mount_fstype(dev: int) -> str | None:
    """The filesystem type the kernel's mount table gives the device `dev`."""
    key = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) > 2 and parts[2] == key:
                    return rest.split()[0] if rest.split() else None
    except OSError:
        return None
    return None


def require_in_mount(path: Path) -> None:
    """Raise UsageError unless `path` is a file or folder inside a peerdrive mount."""
    try:
        dev = os.stat(path).st_dev  # follows a symlink, as setxattr does
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    if _mount_fstype(dev) != MOUNT_FSTYPE:
        raise UsageError(f"{path} is not inside a peerdrive mount")


def _set_flag(path: Path, name: str, value: bytes) -> None:
    require_in_mount(path)
    try:
        os.setxattr(path, xattrs.full_name(name), value)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EROFS, errno.ENODATA):
            raise UsageError(f"{path} is not inside a peerdrive mount") from exc
        if exc.errno == errno.ENOSPC:
            raise NoSpaceError(f"{path}: the device holding this node's store is full; "
                               "free some space (peerdrive evict) and try again") from exc
        if (name == xattrs.PINNED and value == xattrs.encode_flag(False)
                and exc.errno == errno.EINVAL and _is_pinned(path)):
            raise UsageError(f"{path} is pinned through a folder above it; unpin that folder "
                             "instead") from exc
        raise UsageError(f"{path}: {exc.strerror}") from exc


def _is_pinned(path: Path) -> bool:
    try:
        return os.getxattr(path, xattrs.full_name(xattrs.PINNED)).strip() == \
            xattrs.encode_flag(True)
    except OSError:
        return False


def pin(path: Path) -> None:
    """Pin `path`: the mount fetches it whole in the background and keeps it."""
    _set_flag(path, xattrs.PINNED, xattrs.encode_flag(True))


def unpin(path: Path) -> None:
    """Unpin `path`: its blocks are evictable again."""
    _set_flag(path, xattrs.PINNED, xattrs.encode_flag(False))


def evict(path: Path) -> None:
    """Drop the unpinned blocks under `path` from this device now."""
    _set_flag(path, xattrs.EVICT, xattrs.encode_flag(True))
