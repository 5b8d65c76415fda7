"""A peer that serves corrupt blocks, for tests that a reader never returns wrong bytes.

    python -m tests.lying_peer --home HOME --store STORE_DIR --link LINK \
        --listen 127.0.0.1:0 [--bootstrap HOST:PORT]

It is a real `vfs.network.NetworkNode` (DHT, block server, provider record
for the drive, status snapshots under HOME/run/<pid>.json) with its own node
identity, whose block source is another node's store seen through
`FlippingSource`: every block it has is served with its first byte flipped,
so the bytes are the right length and look plausible but no longer hash to
their id. Like `peerdrive serve --json` it prints one JSON line (node_id,
port) once it is serving, and it stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import trio

from cache.store import BlockStore
from dht.identity import NodeIdentity
from vfs.capability import parse_link
from vfs.home import Home
from vfs.network import NetworkNode, parse_hostport


class FlippingSource:
    """A block source that hands out every block it has with its first byte flipped."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.lies = 0

    def get(self, block_id: bytes) -> bytes | None:
        data = self.store.get(block_id)
        if not data:
            return data
        self.lies += 1
        return bytes([data[0] ^ 0xFF]) + data[1:]


async def run(args: argparse.Namespace) -> None:
    home = Home(Path(args.home))
    identity = NodeIdentity.load_or_create(home.node_key_path)
    cap = parse_link(args.link)
    with BlockStore(args.store) as store:
        net = NetworkNode(identity, FlippingSource(store),  # type: ignore[arg-type]
                          listen=parse_hostport(args.listen),
                          bootstrap=[parse_hostport(b) for b in args.bootstrap or []],
                          lan=False, run_dir=home.run_dir)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(net.run)
            net.serve_drive(cap)
            print(json.dumps({"node_id": identity.node_id.hex(), "port": port}), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lying_peer", description=__doc__)
    p.add_argument("--home", required=True, help="this peer's own state (identity, snapshots)")
    p.add_argument("--store", required=True, help="the block store whose blocks it corrupts")
    p.add_argument("--link", required=True, help="the drive to announce and serve")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--bootstrap", action="append")
    args = p.parse_args(argv)
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
