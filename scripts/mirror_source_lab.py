"""Lab for the HTTP mirror source alone: no mount, no FUSE, no store.

    .venv/bin/python scripts/mirror_source_lab.py [--blocks 1024] [--rounds 3] [--workdir DIR]

Writes `--blocks` random blocks of 256 KiB as a mirror's `blocks/` files,
serves them with a private loopback nginx (tests/nginx_helpers.py), warms the
page cache with one round, then fetches them all `--rounds` times through one
`dht.http_source.HttpSource` per round, in runs of 8 (`fetch_run`), 8 runs at
once, as a mount's readahead hands them over. Prints per round: the wall
time per 256 MiB, the process's CPU per block (the fetch threads and the
event loop's side together) and how often the fetch threads woke the event
loop per block (`_FetchThreads._flush` calls). To compare two versions, run
it from two checkouts in turn (it imports the tree it lives in). Measures;
asserts nothing (docs/benchmarks.md, issue 10's pipelined mirror runs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from dht.client import RunOfWants  # noqa: E402
from dht.http_source import HttpSource  # noqa: E402
from dht.mirror_layout import block_path  # noqa: E402
from dht.types import Priority  # noqa: E402
from tests.nginx_helpers import Nginx  # noqa: E402

BLOCK = 256 * 1024
RUN = 8
AT_ONCE = 8


def write_blocks(root: Path, count: int) -> list[bytes]:
    ids = []
    for _ in range(count):
        data = os.urandom(BLOCK)
        block_id = hashlib.sha256(data).digest()
        path = root / block_path(block_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        ids.append(block_id)
    return ids


async def one_round(url: str, ids: list[bytes]) -> tuple[float, float, int, int]:
    """(wall s, CPU s, blocks, loop wake-ups) of fetching every block once."""
    src = HttpSource(url)
    wakeups = 0
    flush = src._threads._flush

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        flush()

    src._threads._flush = counted  # the fetch threads wake the loop with this
    limiter = trio.CapacityLimiter(AT_ONCE)
    got = 0

    def on_result(_i: int, data: bytes | None, error: Exception | None) -> None:
        nonlocal got
        if error is not None:
            raise error
        got += 1

    async def fetch(run: list[bytes]) -> None:
        async with limiter:
            await src.fetch_run(RunOfWants(run, Priority.READAHEAD), on_result)

    wall, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for start in range(0, len(ids), RUN):
            nursery.start_soon(fetch, ids[start:start + RUN])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await src.aclose()
    return wall, cpu, got, wakeups


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=1024, help="blocks of 256 KiB (default 1024)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    p.add_argument("--workdir", default=None, help="where the temporary directory goes")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirror-source-lab-", dir=args.workdir))
    try:
        ids = write_blocks(work / "www", args.blocks)
        with Nginx(work / "www", work / "nginx") as server:
            trio.run(one_round, server.url, ids)  # the page cache warm, nginx's too
            for _ in range(args.rounds):
                wall, cpu, got, wakeups = trio.run(one_round, server.url, ids)
                print(f"{got} blocks: {wall * 2**28 / (got * BLOCK):.2f} s per 256 MiB, "
                      f"CPU {cpu / got * 1e3:.3f} ms a block, {wakeups / got:.2f} loop "
                      f"wake-ups a block, load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
