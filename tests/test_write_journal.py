"""The write journal: its decoder (hypothesis), and a session recovering what fsync kept.

In process (no mount): a WriteSession on a real LMDB store writes and
checkpoints (what an fsync does), is dropped without publishing (a SIGKILL),
and a new session on the same store publishes the journal's tree first.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cache.store import BlockStore
from tests.inprocess import new_cap, publish_folder
from vfs.blocks import BlockReader
from vfs.errors import FormatError
from vfs.formats import KIND_FILE
from vfs.storage import DriveStorage
from vfs.tree import Tree
from vfs.write_journal import journal_key, open_journal, seal_journal
from vfs.writer import WriteSession, write_pin

CAP = new_cap()


@given(st.binary(max_size=5000))
def test_the_decoder_refuses_anything_malformed_with_a_clear_error(data: bytes) -> None:
    with pytest.raises(FormatError):  # IntegrityError is a FormatError
        open_journal(CAP, data)


@given(st.dictionaries(st.sampled_from(["v", "base", "root", "box", "x"]),
                       st.one_of(st.integers(-5, 2**63), st.binary(max_size=64), st.none()),
                       max_size=5))
def test_the_decoder_refuses_bad_fields(fields: dict) -> None:
    with pytest.raises(FormatError):
        open_journal(CAP, msgpack.packb(fields))


def session_on(store: BlockStore, cap) -> WriteSession:
    storage = DriveStorage(store)
    head = storage.load_head(cap)
    tree = Tree(BlockReader(store, cap.read_key, tag=cap.discovery_key))
    return WriteSession(cap, storage, tree, head)


def test_a_checkpoint_survives_a_kill_and_is_published_at_the_next_start(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    cap = new_cap()
    store = BlockStore(tmp_path / "store")
    try:
        first = publish_folder(store, src, cap)
        body = bytes(range(256)) * 5000

        async def write_and_checkpoint() -> None:
            s = session_on(store, cap)
            node = await s.tree.create(s.tree.root, b"new.bin", KIND_FILE, 0o644)
            await s.write(node, 0, body)
            await s.checkpoint()  # what fsync does; then the process dies unpublished

        trio.run(write_and_checkpoint)
        assert DriveStorage(store).load_head(cap).seq == first.seq
        journal = open_journal(cap, store.get_record(journal_key(cap.pubkey)))
        assert journal.base_seq == first.seq
        assert store.pin_ids(write_pin(cap.pubkey))  # its blocks are held

        async def restart() -> bytes:
            s = session_on(store, cap)
            head = await s.recover()
            assert head is not None and head.seq == first.seq + 1
            node = await s.tree.lookup(s.tree.root, b"new.bin")
            assert node is not None and node.size == len(body)
            chunks = await s.tree.base.chunks(node.base)
            return b"".join([await s.load(r) for r in chunks])

        assert trio.run(restart) == body
        assert store.get_record(journal_key(cap.pubkey)) is None
        assert not store.has_pin(write_pin(cap.pubkey))
        assert DriveStorage(store).load_head(cap).seq == first.seq + 1
    finally:
        store.close()


def test_a_journal_of_another_drive_does_not_open(tmp_path: Path) -> None:
    from vfs.crypto import Ref
    from vfs.formats import KIND_DIR, Entry

    root = Entry(b"root", KIND_DIR, 0o755, 0, node=Ref(b"\1" * 32, b"\2" * 32, 10))
    sealed = seal_journal(CAP, 3, root)
    assert open_journal(CAP, sealed).root == root
    with pytest.raises(FormatError):
        open_journal(new_cap(), sealed)
