"""A mount's HeadFollower outlives what other processes and the disk do (issue 11 item 10).

Before: when another process of the node (a publish, a second mount) had
stored a higher seq, `save_head` raised RollbackError out of
`HeadFollower.run`, and the mount's nursery ended: the drive unmounted. A
full store did the same. The attack here is real: a second process opens the
same LMDB store and saves a newer head while the follower runs.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import trio

from cache.errors import DiskFull
from cache.store import BlockStore
from tests.helpers import ROOT
from vfs.blocklist import ListRef
from vfs.capability import WriteCap
from vfs.crypto import Ref
from vfs.formats import KIND_DIR, Entry
from vfs.head import Head, make_head
from vfs.head_follower import HeadFollower
from vfs.storage import DriveStorage

CAP = WriteCap.from_secrets(bytes(range(32)), bytes(range(32, 64)))


def head(seq: int) -> Head:
    tag = b"v%d" % seq
    root = Entry(b"root", KIND_DIR, 0o755, 0, node=Ref(hashlib.sha256(tag).digest(),
                                                        hashlib.sha256(b"c" + tag).digest(), 10),
                 nsubdirs=0, nentries=0)
    return make_head(CAP, seq, root, ListRef(hashlib.sha256(tag).digest(), 0, 1, 100),
                     created=1_700_000_000 + seq)


SAVE_IN_ANOTHER_PROCESS = textwrap.dedent("""
    import sys
    from cache.store import BlockStore
    from vfs.capability import StoreCap
    from vfs.head import open_head
    from vfs.storage import DriveStorage

    store = BlockStore(sys.argv[1])
    wire = bytes.fromhex(sys.argv[2])
    DriveStorage(store).save_head(open_head(wire, StoreCap(bytes.fromhex(sys.argv[3]))))
    store.close()
""")


class QuietNetwork:
    """The follower's network when nobody answers: heads arrive only by notice."""

    async def lookup_head(self, cap) -> bytes | None:
        return None


def test_a_racing_save_and_a_full_store_do_not_end_the_follower(tmp_path) -> None:
    store = BlockStore(tmp_path / "store")
    storage = DriveStorage(store)
    storage.save_head(head(1))
    follower = HeadFollower(CAP.read_cap(), storage, QuietNetwork())
    seen: list[int] = []
    arrived = trio.Condition()

    async def on_new(new: Head) -> None:
        seen.append(new.seq)
        async with arrived:
            arrived.notify_all()

    async def offer_and_wait(seq: int, count: int) -> None:
        follower.notice(head(seq).wire)
        with trio.fail_after(30):
            async with arrived:
                while len(seen) < count:
                    await arrived.wait()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run, on_new)
            await offer_and_wait(2, 1)
            # another process of this node stores seq 5 while the mount knows seq 2
            subprocess.run([sys.executable, "-c", SAVE_IN_ANOTHER_PROCESS, str(tmp_path / "store"),
                            head(5).wire.hex(), CAP.pubkey.hex()],
                           cwd=ROOT, check=True, timeout=60)
            await offer_and_wait(4, 2)  # the network offers 4: the follower moves to 5
            assert seen == [2, 5]
            assert follower.tracker.current.seq == 5

            # the store is full: the new version is followed, saved later
            real_update = store.update_record

            def full(*args, **kwargs):
                raise DiskFull("no space left on the device (test)")

            store.update_record = full
            await offer_and_wait(6, 3)
            assert storage.load_head(CAP).seq == 5
            store.update_record = real_update
            await offer_and_wait(7, 4)
            assert seen == [2, 5, 6, 7]
            assert storage.load_head(CAP).seq == 7
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()
