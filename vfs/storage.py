"""The drive layer's view of the node's block store.

`cache/` knows block ids, bytes, pins and small records; this module gives
them drive meaning: where a drive's verified head is kept, which pin holds a
published version, which pin holds a mount's metadata. Records:

    head:<pubkey>               the newest verified head (its signed bytes)
    own:<pubkey>                the last head this node committed (`vfs/writers.py` checks
                                it is still in the drive's history)
    folderbase:<pubkey>         the Ref of the root node of the folder's tree as last
                                published: the base its next publish merges from

Pin names:

    publish:<pubkey hex>:<seq>  every block of one version this node committed (seq zero-
                                padded to 20 digits, so names sort by version); the newest
                                `keep_versions` are kept, older ones released
    publish:<pubkey hex>        the first wave's single publish pin (dropped at the next commit)
    publish-pending:<pubkey>    blocks of a publish in progress (so eviction cannot take them)
    publish-base:<pubkey hex>   the folder's own tree when its last publish was merged with
                                another writer's version (the base of the next publish)
    history:<pubkey hex>        every head this node committed, as blocks (~400 bytes each,
                                never released): `log` and `mount LINK@SEQ` walk them even
                                after the versions' own blocks were released
    pin:<pubkey hex>:<tag>      a user pin: every block under one path; the tag is an
                                HMAC of the path, which is sealed in the record
                                pinpath:<pubkey><tag> (vfs/pins.py): no path in clear
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import msgpack

from cache.errors import StoreFull, UnknownPin
from cache.store import BlockStore

from .capability import StoreCap, WriteCap
from .crypto import HASH_LEN, Ref
from .errors import RollbackError
from .formats import decode_ref, encode_ref
from .head import Head, head_id, open_head

_HEAD = b"head:"
_OWN = b"own:"  # the wire of the last head this node committed for a drive
_FOLDER_BASE = b"folderbase:"  # Ref of the root node of the folder's tree as last published

DEFAULT_KEEP_VERSIONS = 10
MAX_KEEP_VERSIONS = 1000


class HeadMoved(Exception):
    """Another commit stored a newer head between a merge and its signing: merge again."""


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
                       ids: Iterable[bytes], pending_pin: str, *,
                       expect: bytes | None | bool = False,
                       keep_versions: int = DEFAULT_KEEP_VERSIONS) -> Head:
        """Make a finished publish the drive's next version; returns its head.

        The seq is allocated inside the store's write transaction that saves
        the head (`sign(seq, previous head)` signs it there), so two publishes
        of one drive can never both take the same seq, even from two
        processes. With `expect` (the id of the head the version was merged
        onto, None for "no head yet") the transaction signs only if that is
        still the stored head, else raises HeadMoved and stores nothing.
        The order keeps every version's blocks pinned at every
        instant, whatever crashes where: the new blocks are held by the
        pending pin while the head that names them is saved; only then does
        the version's own publish pin take them, and the pending pin goes
        last; versions older than the newest `keep_versions` this node
        committed are released after that. A crash in between leaves an
        extra pin, never a stored head whose blocks could be evicted.
        """
        made: list[Head] = []

        def next_version(old: bytes | None) -> bytes:
            made.clear()
            if expect is not False and (None if old is None else head_id(old)) != expect:
                raise HeadMoved
            previous = open_head(old, cap) if old is not None else None
            head = sign(1 if previous is None else previous.seq + 1, previous)
            made.append(head)
            return head.wire

        self.store.update_record(_HEAD + cap.pubkey, next_version)
        head = made[-1]
        self.store.put_record(_OWN + cap.pubkey, head.wire)
        self.store.put_pinned(history_pin(cap.pubkey), [(head.id, head.wire)],
                              ids_checked=True, tag=cap.discovery_key)
        self.store.move_to_pin(publish_pin(cap.pubkey, head.seq), pending_pin, ids)
        self.store.unpin(f"publish:{cap.pubkey.hex()}")  # the first wave's single pin
        self.release_versions(cap.pubkey, keep_versions)
        return head

    def own_head(self, cap: StoreCap) -> Head | None:
        """The last version this node committed of the drive (it may since have been
        overtaken, or lost a fork to another writer's version of the same seq)."""
        wire = self.store.get_record(_OWN + cap.pubkey)
        return open_head(wire, cap) if wire is not None else None

    def published_versions(self, pubkey: bytes) -> list[int]:
        """The seqs of the versions whose blocks this node keeps as their publisher."""
        prefix = f"publish:{pubkey.hex()}:"
        out = []
        for name in self.store.pin_names():
            if name.startswith(prefix):
                with contextlib.suppress(ValueError):
                    out.append(int(name[len(prefix):]))
        return sorted(out)

    def release_versions(self, pubkey: bytes, keep: int) -> int:
        """Release all but the newest `keep` versions this node published: their pins go
        and their blocks that no other pin holds are evicted. Returns the bytes freed."""
        freed = 0
        versions = self.published_versions(pubkey)
        for seq in versions[:max(0, len(versions) - max(1, keep))]:
            name = publish_pin(pubkey, seq)
            with contextlib.suppress(UnknownPin):
                ids = self.store.pin_ids(name)
                self.store.unpin(name)
                freed += self.store.evict(ids)  # blocks a kept version shares stay
        return freed

    def folder_base(self, pubkey: bytes) -> Ref | None:
        """The root node of the tree the drive's folder had when it was last published."""
        raw = self.store.get_record(_FOLDER_BASE + pubkey)
        if raw is None:
            return None
        try:
            return decode_ref(msgpack.unpackb(raw), "folder base")
        except Exception:  # a record this node wrote; unreadable means unusable, not fatal
            return None

    def set_folder_base(self, pubkey: bytes, root: Ref, ids: Iterable[bytes] | None) -> None:
        """Remember the folder's tree; `ids` (its blocks) are pinned when it is not the
        published version's tree (a merge), else the version's pin holds them."""
        assert len(root.block_id) == HASH_LEN
        self.store.put_record(_FOLDER_BASE + pubkey, msgpack.packb(encode_ref(root)))
        if ids is None:
            self.store.unpin(publish_base_pin(pubkey))
        else:
            self.store.set_pin(publish_base_pin(pubkey), ids)


def publish_pin(pubkey: bytes, seq: int) -> str:
    """The pin holding every block of version `seq`, published by this node."""
    return f"publish:{pubkey.hex()}:{seq:020d}"


def history_pin(pubkey: bytes) -> str:
    return f"history:{pubkey.hex()}"


def publish_base_pin(pubkey: bytes) -> str:
    return f"publish-base:{pubkey.hex()}"

