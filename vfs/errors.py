"""The drive layer's errors.

Every error a user can meet is one of these, with a message that says what
went wrong and what to do. The command line turns them into exit codes in one
place (`vfs.cli`); the FUSE layer turns them into errno in one place (`vfs.fs`).
"""

from __future__ import annotations


class PeerdriveError(Exception):
    """Base of every error the drive layer raises on purpose."""

    exit_code = 1


class UsageError(PeerdriveError):
    """The command was given something it cannot use (a bad path, a bad size)."""

    exit_code = 2


class LinkError(UsageError):
    """A share link is malformed, mistyped or of the wrong kind."""


class FormatError(PeerdriveError):
    """A record, directory node or head is malformed or of an unknown version."""

    exit_code = 3


class IntegrityError(FormatError):
    """Bytes do not match the hash, tag or signature that vouches for them."""


class RollbackError(IntegrityError):
    """A head older than one already verified was offered: refused."""


class BlockUnavailable(PeerdriveError):
    """A block is not on this device and no peer could serve it in time."""

    exit_code = 4


class DriveNotFound(PeerdriveError):
    """No head for this drive could be found locally or on the network."""

    exit_code = 4


class NoSpaceError(PeerdriveError):
    """The device is full: work that must write cannot go on."""

    exit_code = 5


class MountError(PeerdriveError):
    """Mounting or unmounting failed (not a directory, already mounted, no FUSE)."""

    exit_code = 6


def unwrap_group(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups from trio nurseries.

    A nursery reports a failing child as an ExceptionGroup; the command line
    wants the error itself for its message and exit code. Several distinct
    errors stay grouped.
    """
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if type(e).__name__ != "Cancelled"]
        if len(leaves) != 1:
            return exc
        exc = leaves[0]
    return exc


class PathError(PeerdriveError):
    """A change to a writable mount's tree that a filesystem refuses.

    Each subclass is one reason; `vfs/fs.py` (`fuse_errors`) turns it into
    its errno, the command line never sees these.
    """


class NoSuchEntry(PathError):
    """The name is not in the folder."""


class EntryExists(PathError):
    """The name is taken and the operation may not replace it."""


class DirectoryNotEmpty(PathError):
    """A folder that still holds names cannot be removed or replaced."""


class NotADirectory(PathError):
    """A folder was expected."""


class IsADirectory(PathError):
    """A file was expected, this is a folder."""


class NotPermitted(PathError):
    """Something drives cannot hold (hard links, devices, FIFOs)."""


class InvalidChange(PathError):
    """A change that makes no sense (a folder moved into itself, an unknown flag)."""


class NameTooLong(PathError):
    """A name longer than a drive holds (255 bytes)."""
