"""The drive layer's view of the node's block store.

`cache/` knows block ids, bytes, pins and small records; this module gives
them drive meaning: where a drive's verified head is kept, which pin holds a
published version, which pin holds a mount's metadata. Pin names:

    publish:<pubkey hex>        every block of the version this node published last
    publish-pending:<pubkey>    blocks of a publish in progress (so eviction cannot take them)
    pin:<pubkey hex>:<tag>      a user pin: every block under one path; the tag is an
                                HMAC of the path, which is sealed in the record
                                pinpath:<pubkey><tag> (vfs/pins.py): no path in clear
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cache.errors import StoreFull
from cache.store import BlockStore

from .capability import StoreCap, WriteCap
from .errors import RollbackError
from .head import Head, open_head

_HEAD = b"head:"


class DriveStorage:
    full_errors: tuple[type[BaseException], ...] = (StoreFull,)

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def head_wire(self, pubkey: bytes) -> bytes | None:
        return self.store.get_record(_HEAD + pubkey)

    def load_head(self, cap: StoreCap) -> Head | None:
        wire = self.head_wire(cap.pubkey)
        return open_head(wire, cap) if wire is not None else None

    def save_head(self, head: Head) -> bool:
        """Keep `head` if it is newer than the stored one; a lower seq is refused.

        One atomic read-modify-write, so two processes of this node (a mount and
        a publish, say) cannot interleave and store an older head over a newer one.
        """
        outcome: list[bool] = []

        def newer(old: bytes | None) -> bytes | None:
            outcome.clear()
            if old is not None:
                current = open_head(old, StoreCap(head.pubkey))
                if head.seq < current.seq:
                    raise RollbackError(f"refused head seq {head.seq}: already at {current.seq}")
                if head.seq == current.seq and head.wire <= old:
                    outcome.append(False)  # the same head, or the losing fork (HeadTracker)
                    return old
            outcome.append(True)
            return head.wire

        self.store.update_record(_HEAD + head.pubkey, newer)
        return outcome[-1]

    def known_drives(self) -> list[bytes]:
        return [key[len(_HEAD):] for key, _ in self.store.records(_HEAD)]

    def next_seq(self, cap: WriteCap) -> int:
        current = self.load_head(cap)
        return 1 if current is None else current.seq + 1

    def commit_publish(self, cap: WriteCap, sign: Callable[[int, Head | None], Head],
                       ids: Iterable[bytes], pending_pin: str) -> Head:
        """Make a finished publish the drive's next version; returns its head.

        The seq is allocated inside the store's write transaction that saves
        the head (`sign(seq, previous head)` signs it there), so two publishes
        of one drive can never both take the same seq, even from two
        processes. The order keeps every version's blocks pinned at every
        instant, whatever crashes where: the new blocks are held by the
        pending pin while the head that names them is saved; only then does
        the publish pin take them over (releasing the previous version's),
        and the pending pin goes last. A crash in between leaves an extra
        pin, never a stored head whose blocks could be evicted.
        """
        made: list[Head] = []

        def next_version(old: bytes | None) -> bytes:
            made.clear()
            previous = open_head(old, cap) if old is not None else None
            head = sign(1 if previous is None else previous.seq + 1, previous)
            made.append(head)
            return head.wire

        self.store.update_record(_HEAD + cap.pubkey, next_version)
        self.store.set_pin(publish_pin(cap.pubkey), ids)
        self.store.unpin(pending_pin)
        return made[-1]


def publish_pin(pubkey: bytes) -> str:
    return f"publish:{pubkey.hex()}"

