"""Pin, unpin and evict a path inside a mount: one extended attribute each.

`peerdrive pin|unpin|evict` and the dashboard's buttons both call these, and
they do exactly what `setfattr -n user.peerdrive.pinned -v 1 PATH` does: the
mount process (vfs/fs.py) acts on the attribute, so every tool goes through
one interface.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from . import xattrs
from .errors import NoSpaceError, UsageError


def _set_flag(path: Path, name: str, value: bytes) -> None:
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
