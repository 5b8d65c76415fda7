"""Lab for the hot read: one reader's store, mounts from two checkouts in turn.

    .venv/bin/python scripts/hot_ab.py OLD_CHECKOUT [--size 256M] [--pairs 3]
        [--old-python PATH] [--new-python PATH]

Publishes a file of random bytes (scripts/bench.py's data and helpers),
reads it once through a reader mount of this checkout (cold: every block
into the reader's store), then mounts the same reader home from OLD_CHECKOUT
(a `git archive` of an older commit with a `.venv` link) and from this
checkout in turn, each time with the page cache dropped, and reads the
file with `cat`. `--old-python`/`--new-python` run each side's mount with
another interpreter (another venv: e.g. the same checkout on two builds of
pyfuse3); by default both use this one. Prints MB/s, the mount's CPU seconds and its event-loop
(main) thread's, from /proc, per read, and the medians. On a shared machine
only pairs in turn compare; the CPU per byte is the steadier figure.
Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench as B  # noqa: E402
from read_lab import _cpu_ticks  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="the other checkout (with .venv)")
    p.add_argument("--size", default="256M")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the temporary directory goes")
    p.add_argument("--old-python", default=None, help="the old side's mounts run with it")
    p.add_argument("--new-python", default=None, help="the new side's mounts run with it")
    args = p.parse_args()
    new, old = B.ROOT, args.old.resolve()
    size = B.parse_size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="hot-ab-", dir=args.workdir))
    tick = os.sysconf("SC_CLK_TCK")
    argv = {"old": [args.old_python, "-m", "vfs.cli"] if args.old_python else B.peerdrive_argv(),
            "new": [args.new_python, "-m", "vfs.cli"] if args.new_python else B.peerdrive_argv()}
    results: dict[str, list[tuple[float, float, float]]] = {"old": [], "new": []}
    with contextlib.ExitStack() as stack:
        bench = B.Bench(size=size, files=10, folders=1, runs=1, quick=True, workdir=workdir,
                        peerdrive_argv=B.peerdrive_argv(), stack=stack)
        stack.callback(B.cleanup, workdir)
        big = bench.big()
        home = bench.fresh("home-reader")
        for n in range(2 * args.pairs + 1):
            which = "new" if n % 2 == 0 else "old"
            B.ROOT = new if which == "new" else old  # the mount's PYTHONPATH and cwd
            bench.peerdrive_argv = argv[which]
            with bench.peerdrive_mount("big", "hot ab", home=home) as m:
                bench.drop_page_cache()
                cpu0, loop0 = _cpu_ticks(m.pid), _cpu_ticks(m.pid, m.pid)
                started = time.perf_counter()
                B.cat_to_null(m.path / big.name)
                took = time.perf_counter() - started
                cpu = (_cpu_ticks(m.pid) - cpu0) / tick
                loop = (_cpu_ticks(m.pid, m.pid) - loop0) / tick
            if n == 0:
                print(f"cold (this checkout): {size / took / 1e6:.0f} MB/s", flush=True)
                continue
            results[which].append((size / took / 1e6, cpu, loop))
            print(f"{which}: {size / took / 1e6:.0f} MB/s, mount CPU {cpu:.2f} s, event-loop "
                  f"thread {loop:.2f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    for which, rows in results.items():
        mbs, cpu, loop = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{which} medians: {mbs:.0f} MB/s, mount CPU {cpu:.2f} s, event loop {loop:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
