"""A READ right after its source came back succeeds; the failure memory still bounds a dead one.

vfs/drive.py remembers a block that could not be fetched (UNAVAILABLE_MEMORY): the
kernel follows a failed readahead with a read of the same page, which must not wait
out the fetch timeout a second time. Answered from memory alone, though, a READ
failed with EIO inside that window even when the source was back, since nothing
asked it (a reader retrying after an EIO got EIO again). Now such a READ asks
once more, for at most RECHECK_WAIT, and the fetcher probes its backed-off source
at once (`Fetcher.probe_now`).

In process: a published drive's blocks served by a fake mirror (the fake sources
of tests/test_fetch_probe.py) through a real Fetcher, read by a real Drive on a
real store. The windows are stretched far past any scheduling delay, so a loaded
machine can neither pass the old rule nor fail the new one; no timing is asserted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import trio

import vfs.drive as drive_mod
from cache.store import BlockStore
from dht.errors import DhtError
from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.types import Priority
from tests.helpers import run_trio
from tests.inprocess import new_cap, publish_folder, running_drive
from tests.test_fetch_probe import FakeSource
from vfs.chunker import CDC_MAX
from vfs.drive import Drive
from vfs.errors import BlockUnavailable
from vfs.storage import DriveStorage

DEADLINE = 120.0  # only a hang breaks it
MiB = 1024 * 1024
FETCH_TIMEOUT = 3.0  # the mount's fetch timeout here: a dead source's READ fails after it
# hedges, stalls and connects never fire (counts must not ride on short timers)
CONFIG = FetchConfig(default_timeout=FETCH_TIMEOUT, hedge_floor=600.0, stall_timeout=600.0,
                     connect_timeout=600.0, swarm_jitter=0)


class InStore:
    """A publisher's store as the blocks a fake source holds."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def __contains__(self, block_id: object) -> bool:
        return isinstance(block_id, bytes) and self.store.get(block_id) is not None

    def __getitem__(self, block_id: bytes) -> bytes:
        data = self.store.get(block_id)
        if data is None:
            raise KeyError(block_id)
        return data


class FetcherFetch:
    """What a mount hands its Drive (`vfs.network.DriveFetch`), over one Fetcher."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher

    async def __call__(self, block_id: bytes, priority: Priority) -> bytes:
        try:
            return await self.fetcher.fetch(block_id, priority)
        except DhtError as exc:
            raise BlockUnavailable(f"block {block_id.hex()[:16]}: {exc}") from exc

    def probe_now(self) -> bool:
        return self.fetcher.probe_now()


@pytest.fixture
def mirrored(tmp_path: Path):
    """A published drive (big.bin, 8 MiB: at least 4 chunks of at most CDC_MAX), its blocks
    at a fake mirror, an empty reader."""
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(4 * CDC_MAX)
    (src / "big.bin").write_bytes(big)
    cap = new_cap()
    pub = BlockStore(tmp_path / "pub", sync=False)
    head = publish_folder(pub, src, cap)
    reader = BlockStore(tmp_path / "reader", sync=False)
    source = FakeSource("mirror", InStore(pub))  # type: ignore[arg-type]
    yield cap, head, reader, source, big
    reader.close()
    pub.close()


def read_after_failure(mirrored, monkeypatch, body) -> None:
    """Open big.bin through a fetcher whose only source is `source`, then run `body`."""
    cap, head, reader, source, big = mirrored
    # the failure memory outlasts any delay of a loaded machine: the old rule (EIO from
    # memory) cannot pass by the window having ended
    monkeypatch.setattr(drive_mod, "UNAVAILABLE_MEMORY", 600.0)

    async def main(nursery: trio.Nursery) -> None:
        async with Fetcher(NodeIdentity.generate(), os.urandom(32), os.urandom(32), list,
                           config=CONFIG) as fetcher:
            fetcher.set_sources([source])
            drive = Drive(cap.read_cap(), DriveStorage(reader), head,
                          fetch=FetcherFetch(fetcher))
            async with running_drive(drive):
                entry = await drive.lookup(drive.root_entry(), b"big.bin")
                assert entry is not None
                of = await drive.open(entry)
                assert len(of.map.chunks) >= 4
                await body(drive, of, source, big)

    run_trio(main, DEADLINE)


def test_a_read_right_after_the_source_came_back_succeeds(mirrored, monkeypatch) -> None:
    monkeypatch.setattr(drive_mod, "RECHECK_WAIT", 60.0)  # only a hang reaches it

    async def body(drive: Drive, of, source: FakeSource, big: bytes) -> None:
        off = of.map.starts[2]
        source.dead_until = math.inf  # the mirror goes down: the READ fails (EIO)
        with pytest.raises(BlockUnavailable):
            await drive.read(of, off, 4096)
        asked = len(source.calls)
        source.dead_until = -math.inf  # and is back at once
        # the reader retries: the bytes (the old rule: EIO from memory, nothing asked)
        assert bytes(await drive.read(of, off, 4096)) == big[off:off + 4096]
        assert len(source.calls) == asked + 1  # one request: a probe, at once
        assert bytes(await drive.read(of, off, 4096)) == big[off:off + 4096]  # stored now

    read_after_failure(mirrored, monkeypatch, body)


def test_a_read_of_a_block_still_dead_fails_after_one_short_try(mirrored, monkeypatch) -> None:
    """The memory's purpose kept: the kernel's read of a page right after its failed
    readahead gets EIO after RECHECK_WAIT, not a second fetch timeout, and asks the dead
    source once, not in a loop."""
    monkeypatch.setattr(drive_mod, "RECHECK_WAIT", 0.2)

    async def body(drive: Drive, of, source: FakeSource, big: bytes) -> None:
        off = of.map.starts[3]
        source.dead_until = math.inf
        with pytest.raises(BlockUnavailable):
            await drive.read(of, off, 4096)
        asked = len(source.calls)
        with pytest.raises(BlockUnavailable):
            await drive.read(of, off, 4096)  # ends (RECHECK_WAIT), never hangs
        assert 1 <= len(source.calls) - asked <= 2  # one probe (two on a very slow loop)

    read_after_failure(mirrored, monkeypatch, body)
