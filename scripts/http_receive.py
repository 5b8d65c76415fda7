"""The HTTP mirror source alone: blocks from loopback nginx, CPU per block of this process.

    .venv/bin/python scripts/http_receive.py [--blocks 1000] [--size 280000] [--in-flight 16]

Writes `--blocks` random blocks as a mirror's block files, serves them with
a private nginx on 127.0.0.1 (tests/nginx_helpers.py), and fetches every one
through `dht.http_source.HttpSource` with `--in-flight` requests at a time
(the fetcher's per-source limit), each checked against its id as in a read.
Prints MB/s and this process's CPU (user + system) per block: on a shared
machine the CPU is the steadier figure. Another checkout's source is
measured by putting it first on PYTHONPATH. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from dht.http_source import HttpSource  # noqa: E402
from dht.mirror_layout import block_path  # noqa: E402
from tests.nginx_helpers import Nginx  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _fetch_all(url: str, ids: list[bytes], in_flight: int) -> None:
    source = HttpSource(url)
    limiter = trio.Semaphore(in_flight)

    async def one(bid: bytes) -> None:
        async with limiter:
            await source.fetch(bid)

    try:
        async with trio.open_nursery() as nursery:
            for bid in ids:
                nursery.start_soon(one, bid)
    finally:
        await source.aclose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=1000)
    p.add_argument("--size", type=int, default=280_000, help="bytes per block")
    p.add_argument("--in-flight", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="http-receive-") as tmp:
        root = Path(tmp) / "www"
        ids = []
        for _ in range(args.blocks):
            data = os.urandom(args.size)
            bid = hashlib.sha256(data).digest()
            path = root / block_path(bid)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            ids.append(bid)
        with Nginx(root, Path(tmp) / "nginx") as server:
            trio.run(_fetch_all, server.url, ids[:16], args.in_flight)  # warm the page cache
            cpu, start = _cpu(), time.perf_counter()
            trio.run(_fetch_all, server.url, ids, args.in_flight)
            took, cpu = time.perf_counter() - start, _cpu() - cpu
    total = args.blocks * args.size
    print(f"{args.blocks} blocks of {args.size} bytes, {args.in_flight} in flight: "
          f"{total / took / 1e6:.0f} MB/s, {cpu / args.blocks * 1e3:.2f} ms CPU per block "
          f"({total / cpu / 1e6:.0f} MB per CPU-second), load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
