"""A node's status snapshot (`run/<pid>.json`) is written off the event loop.

On ext4 a rename over the old file waits for the new file's data to reach the
disk; done on the event loop during a cold read it held every FUSE request and
block behind it (issue 12). The snapshot must still appear, be current JSON,
and be gone once the node stops.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import trio

from cache.store import BlockStore
from dht.identity import NodeIdentity
from vfs.network import NetworkNode

DEADLINE = 60  # seconds: only a hang reaches it


def test_the_status_snapshot_is_written_in_a_worker_thread(tmp_path, monkeypatch) -> None:
    store = BlockStore(tmp_path / "store")
    run_dir = tmp_path / "run"
    node = NetworkNode(NodeIdentity.generate(), store, listen=("127.0.0.1", 0), lan=False,
                       run_dir=run_dir)
    snapshot = run_dir / f"{os.getpid()}.json"
    renamed_on: list[bool] = []  # per rename onto the snapshot: on the event loop's thread?
    replace = Path.replace

    def recording_replace(self: Path, target):  # type: ignore[no-untyped-def]
        if Path(target) == snapshot:
            renamed_on.append(threading.current_thread() is threading.main_thread())
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", recording_replace)

    async def main() -> None:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(node.run)
                while not renamed_on or not snapshot.exists():
                    await trio.sleep(0.05)
                assert json.loads(snapshot.read_text())["port"] == port
                nursery.cancel_scope.cancel()
        assert not snapshot.exists()

    with store:
        trio.run(main)
    assert renamed_on and not any(renamed_on), "the snapshot was renamed on the event loop"
