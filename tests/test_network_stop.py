"""A node's fetch entry point once the node has stopped.

CI saw `serve` exit 1 on SIGTERM: the copy counter came back from a thread
call (which ignores cancellation) after the node's nursery had closed, and
`start_fetcher` failed an assert. A cancelled caller must see Cancelled; any
other caller a clear NodeStoppedError.
"""

from __future__ import annotations

import pytest
import trio

from cache.store import BlockStore
from dht.errors import NodeStoppedError
from dht.identity import NodeIdentity
from vfs.capability import StoreCap
from vfs.network import NetworkNode


def _node(tmp_path) -> tuple[BlockStore, NetworkNode, StoreCap]:
    store = BlockStore(tmp_path / "store")
    node = NetworkNode(NodeIdentity.generate(), store, listen=("127.0.0.1", 0), lan=False)
    cap = StoreCap(NodeIdentity.generate().public_bytes)
    node.serve_drive(cap)
    return store, node, cap


def test_a_fetcher_asked_of_a_stopped_node_is_a_clear_error(tmp_path):
    store, node, cap = _node(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            nursery.cancel_scope.cancel()
        with pytest.raises(NodeStoppedError, match="not running"):
            await node.start_fetcher(cap)

    with store:
        trio.run(main)


def test_a_cancelled_caller_of_a_stopped_node_sees_cancelled(tmp_path):
    store, node, cap = _node(tmp_path)

    async def main():
        with trio.CancelScope() as scope:
            scope.cancel()
            await node.start_fetcher(cap)
            raise AssertionError("start_fetcher returned in a cancelled scope")
        assert scope.cancelled_caught

    with store:
        trio.run(main)
