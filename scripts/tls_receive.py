"""How much CPU receiving a block stream over TLS costs: dht.tlsstream.TlsStream vs trio.SSLStream.

    .venv/bin/python scripts/tls_receive.py [--mib 1024]

A sender process (this script with --send) streams MiB of random bytes over
TLS 1.3 on 127.0.0.1; this process receives them, once through
`trio.SSLStream` and once through `dht.tlsstream.TlsStream`, and prints the
receiving process's CPU seconds (user + system) and throughput for each. The
peer protocol's receiving side is the one that runs next to FUSE, so its CPU
is what `TlsStream` was written to save (docs/protocol.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dht.identity import NodeIdentity  # noqa: E402
from dht.tls import client_context, server_context  # noqa: E402
from dht.tlsstream import TlsStream  # noqa: E402

CHUNK = 1024 * 1024


async def send(port: int, mib: int) -> None:
    context = server_context(NodeIdentity.generate())
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print("ready", flush=True)
    payload = os.urandom(CHUNK)
    for _ in range(2):  # one connection per receiver kind
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, context, server_side=True)
        await stream.do_handshake()
        for _ in range(mib):
            await stream.send_all(payload)
        await stream.aclose()


async def receive(port: int, mib: int, kind: str) -> tuple[float, float]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    if kind == "trio.SSLStream":
        stream: trio.abc.Stream = trio.SSLStream(tcp, client_context(), server_hostname=None)
    else:
        stream = TlsStream(tcp, client_context())
    await stream.do_handshake()
    want = mib * CHUNK
    got = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while got < want:
        data = await stream.receive_some(CHUNK)
        if not data:
            break
        got += len(data)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await trio.aclose_forcefully(stream)
    if got != want:
        raise SystemExit(f"received {got} of {want} bytes")
    return cpu, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB per run (default 1024)")
    parser.add_argument("--send", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        trio.run(send, args.send, args.mib)
        return 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = subprocess.Popen([sys.executable, __file__, "--send", str(port),
                               "--mib", str(args.mib)], stdout=subprocess.PIPE)
    try:
        assert sender.stdout is not None
        if sender.stdout.readline().strip() != b"ready":
            raise SystemExit("the sender did not start")
        for kind in ("trio.SSLStream", "TlsStream"):
            cpu, wall = trio.run(receive, port, args.mib, kind)
            print(f"{kind:15s} receiving {args.mib} MiB: {cpu:.2f} s CPU, "
                  f"{args.mib * CHUNK / wall / 1e6:.0f} MB/s")
    finally:
        try:
            sender.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sender.kill()
            sender.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
