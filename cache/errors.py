"""Errors raised by the block store.

Every error the cache package raises is a `StoreError`, so a caller can catch
the package's failures with one clause. Each message says what happened and,
where there is one, what the user can do about it.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by `cache/`."""


class StoreClosed(StoreError):
    """The store was used after `close()`."""


class InvalidArgument(StoreError, ValueError):
    """A caller passed something the store cannot take (a 31-byte id, an empty pin name...)."""


class CorruptBlock(StoreError, ValueError):
    """`put` was given bytes whose SHA-256 is not the block id they were offered under."""


class CorruptMetadata(StoreError):
    """A metadata value inside LMDB does not have the layout the store writes.

    Block bytes that rot are caught by their checksum and dropped; this is for
    the store's own bookkeeping, which `BlockStore.check_consistency` reports.
    """


class UnknownPin(StoreError, LookupError):
    """A pin name that the store does not hold."""


class StoreFull(StoreError):
    """A write cannot be done for lack of room; nothing of it was written.

    Raised when a block does not fit under the size limit (everything left is
    pinned or held by reads in flight), when LMDB's map has reached its
    maximum, and (as `DiskFull`) when the filesystem under the store is full.
    The store knows no errno: `vfs/fs.py` makes ENOSPC of it, `vfs/cli.py`
    exit code 5.
    """


class DiskFull(StoreFull):
    """The filesystem holding the store has no room left for this write."""
