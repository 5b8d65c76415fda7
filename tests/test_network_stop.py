"""A node's fetch entry point once the node has stopped, and its errors as themselves.

CI saw `serve` exit 1 on SIGTERM: the copy counter came back from a thread
call (which ignores cancellation) after the node's nursery had closed, and
`start_fetcher` failed an assert. A cancelled caller must see Cancelled; any
other caller a clear NodeStoppedError.
"""

from __future__ import annotations

import pytest
import trio

from cache.store import BlockStore
from dht.errors import DhtError, NodeStoppedError
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


def test_whole_map_raises_a_failing_fetcher_s_error_as_itself(tmp_path):
    """`NetworkNode.whole_map` asks the peers and the mirrors side by side; a fetcher
    that fails raises DhtError out of it as itself (not in a nursery's exception group),
    which the copy counter and the xattr's `whole_function` catch."""
    store, node, cap = _node(tmp_path)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            fetcher = await node.start_fetcher(cap)

            async def failing(*, timeout=None):
                raise DhtError("the fetcher is not running")

            fetcher.whole_map = failing
            with pytest.raises(DhtError, match="not running"):
                await node.whole_map(cap, 1.0)
            assert await node.whole_function(cap)(1.0) == {}
            nursery.cancel_scope.cancel()

    with store:
        trio.run(main)
