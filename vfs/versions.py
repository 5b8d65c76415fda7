"""Old versions from the command line: `peerdrive log` and `peerdrive mount LINK@SEQ`.

`vfs/history.py` walks a drive's versions given a way to get blocks; this
module wires that to a node: its store first, and the network (joined like a
mount: DHT, LAN, the head's mirrors) for what the store lacks. A publisher's
store holds its drive's newest head and its last versions, so its `log` runs
offline; any other node asks the network for the newest head, then fetches
old heads and directory nodes lazily, like any block.

A mount answers `log MNT` itself through the extended attribute
`user.peerdrive.versions` on its root (JSON, the newest VERSIONS_XATTR
versions at most, trimmed to fit an xattr's 64 KiB), so no second node
starts and no key leaves the mount.
"""

from __future__ import annotations

import json

import trio

from dht.errors import DhtError
from dht.types import Priority

from .blocks import BlockReader
from .capability import ReadCap
from .errors import BlockUnavailable, UsageError
from .head_follower import join_for_head
from .history import GetBlock, VersionInfo, version_log
from .home import Home
from .options import MOUNT_LISTEN, NodeOptions
from .storage import DriveStorage
from .tree import Tree

VERSIONS_XATTR = 50  # versions a mount lists through user.peerdrive.versions, at most
XATTR_PATHS = 10  # changed paths per kind per version in it
XATTR_MAX = 60 * 1024  # bytes; the kernel's limit for one value is 64 KiB
def block_getter(blocks: BlockReader) -> GetBlock:
    """Blocks by id: the store, else the reader's fetch (verified against the id)."""
    async def get(block_id: bytes) -> bytes:
        try:
            data = await blocks.ciphertext_of(block_id, Priority.READ)
        except DhtError as exc:
            raise BlockUnavailable(f"block {block_id.hex()[:16]}: {exc}") from exc
        assert data is not None
        return data
    return get


def run_log(home: Home, cap: ReadCap, opts: NodeOptions, versions: int,
            paths: int) -> list[VersionInfo]:
    """`peerdrive log LINK`: from the store alone when this node publishes the drive and
    holds what the log needs, else from the network."""
    from .node import network_for, open_store

    node_opts = opts.resolve(home.config(), MOUNT_LISTEN)
    store = open_store(home, None)
    try:
        return trio.run(_log_main, home, cap, node_opts, store, versions, paths, network_for)
    finally:
        store.close()


async def _log_main(home, cap: ReadCap, node_opts, store, versions: int, paths: int,
                    network_for) -> list[VersionInfo]:
    storage = DriveStorage(store)
    head = storage.load_head(cap)
    if head is not None and any(c.pubkey == cap.pubkey for c in home.published_drives()):
        blocks = BlockReader(store, cap.read_key, None, tag=cap.discovery_key)
        try:
            return await version_log(head, cap, Tree(blocks), block_getter(blocks),
                                     versions=versions, paths=paths)
        except BlockUnavailable:
            pass  # released older versions: their blocks come from peers
    net = network_for(home, store, node_opts)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        head = await join_for_head(net, cap, storage, head, node_opts.mirrors)
        blocks = BlockReader(store, cap.read_key, net.fetch_function(cap),
                             tag=cap.discovery_key)
        result = await version_log(head, cap, Tree(blocks), block_getter(blocks),
                                   versions=versions, paths=paths)
        nursery.cancel_scope.cancel()
    return result


def encode_xattr(infos: list[VersionInfo]) -> bytes:
    """The versions as the mount's `versions` attribute: JSON under XATTR_MAX bytes
    (older versions dropped until it fits)."""
    items = [i.as_json() for i in infos]
    while True:
        raw = json.dumps({"versions": items, "complete": len(items) == len(infos)},
                         separators=(",", ":")).encode()
        if len(raw) <= XATTR_MAX or len(items) <= 1:
            return raw
        items = items[:max(1, len(items) * 3 // 4)]


def decode_xattr(raw: bytes) -> list[dict]:
    try:
        obj = json.loads(raw)
        items = obj["versions"]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise TypeError
        return items
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"the mount's version list is malformed: {raw[:80]!r}") from exc
