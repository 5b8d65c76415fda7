"""In-process drives for tests of vfs/: a real store, a fake network, no mount.

The honest boundary for the drive layer is the fetch function (`vfs.blocks.Fetch`):
below it are peers, sockets and the DHT, tested on their own in test_peer,
test_fetch and the swarm tests. Here a publisher's real LMDB store is the
whole network: `FakeNetwork.fetch` hands out its ciphertext and records what
was asked for, at which priority, so the read path, pins and status are
checked in milliseconds. The kernel side is checked by the mount tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

import vfs.publish as publish_mod
from cache.store import BlockStore
from dht.types import Priority
from vfs.capability import WriteCap
from vfs.crypto import Ref, block_id_of, chunk_key
from vfs.drive import Drive
from vfs.errors import BlockUnavailable
from vfs.head import Head
from vfs.publish import Publisher
from vfs.storage import DriveStorage


def publish_folder(store: BlockStore, src: Path, cap: WriteCap) -> Head:
    """Publish `src` into `store` as a new version of `cap`'s drive (what `publish` does)."""
    return trio.run(Publisher(DriveStorage(store), cap, src).run).head


def new_cap() -> WriteCap:
    return WriteCap.from_secrets(os.urandom(32), os.urandom(32))


def spy_calls(monkeypatch, obj, names, record: Callable[[str, tuple], None]) -> None:
    """Wrap each named method of `obj` so that every call is first handed to
    `record(name, args)`: the store-lookup counting tests see which lookups a read made
    (and on which thread) while the real method still answers."""
    for name in names:
        real = getattr(obj, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            record(_name, args)
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, spy)


@contextlib.contextmanager
def wrong_key_chunks(monkeypatch, marker: bytes):
    """While active, a chunk starting with `marker` is encrypted under another key.

    Its Ref keeps the real chunk hash, and its block id is the SHA-256 of the
    ciphertext actually stored: every node accepts the block (the id matches)
    but it does not decrypt with the drive's read key. That is a corrupt or
    forged block as a reader meets it.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    real = publish_mod.encrypt_chunk
    other_key = os.urandom(32)
    made: list[bytes] = []

    def encrypt(read_key: bytes, chunk) -> tuple[Ref, bytes]:
        if not bytes(chunk[:len(marker)]) == marker:
            return real(read_key, chunk)
        h = hashlib.sha256(chunk).digest()
        ct = AESGCM(chunk_key(other_key, h)).encrypt(bytes(12), bytes(chunk), None)
        made.append(block_id_of(ct))
        return Ref(block_id_of(ct), h, len(chunk)), ct

    with monkeypatch.context() as m:
        m.setattr(publish_mod, "encrypt_chunk", encrypt)
        yield made


class FakeNetwork:
    """Peers reduced to one store: `fetch` serves its ciphertext and records every request.

    `unavailable` holds ids no peer serves (BlockUnavailable, as the fetcher
    raises after its timeout); `hold` holds ids whose fetch waits until
    `release()`, so a test can see what happens while a fetch is in flight.
    """

    def __init__(self, source: BlockStore) -> None:
        self.source = source
        self.requests: list[tuple[bytes, Priority]] = []
        self.unavailable: set[bytes] = set()
        self.hold: set[bytes] = set()
        self._released = trio.Event()
        self._changed = trio.Event()

    async def fetch(self, block_id: bytes, priority: Priority) -> bytes:
        self.requests.append((block_id, priority))
        self._changed.set()
        self._changed = trio.Event()
        if block_id in self.hold:
            await self._released.wait()
        await trio.sleep(0)
        if block_id in self.unavailable:
            raise BlockUnavailable(f"no peer served block {block_id.hex()[:16]}")
        data = self.source.get(block_id)
        if data is None:
            raise BlockUnavailable(f"block {block_id.hex()[:16]} is on no peer")
        return data

    def release(self) -> None:
        self.hold.clear()
        self._released.set()

    def asked(self, priority: Priority | None = None) -> list[bytes]:
        return [b for b, p in self.requests if priority is None or p == priority]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait for requests to arrive until `predicate` holds (bounded by the test deadline)."""
        while not predicate():
            await self._changed.wait()


@contextlib.asynccontextmanager
async def running_drive(drive: Drive) -> AsyncIterator[Drive]:
    """The drive with its background tasks (store writer, pins, readahead) running."""
    async with trio.open_nursery() as nursery:
        await nursery.start(drive.run)
        yield drive
        nursery.cancel_scope.cancel()
