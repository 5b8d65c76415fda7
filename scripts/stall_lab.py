"""Lab for a lone mirror's hiccup: how long reads fail after the mirror answers again.

    .venv/bin/python scripts/stall_lab.py [--runs N] [--failures 8] [--fetch-timeout 20]

Publishes 16 MiB plus a 4 MiB file read only later, writes the drive's mirror,
and mounts a reader whose only source is that mirror, served by the
freezing loopback server of tests/test_mirror_stall.py. A streaming `cat`-like
read of the big file is caught by a freeze (after 6 block files); once the
mount has counted `--failures` failures at the mirror (its status
snapshot), the server answers again. Then the later file is read, again and
again until it reads whole: printed are the seconds from the thaw to its
bytes, the reads that failed with EIO meanwhile, the block requests the
mirror got in that time, and the mount process's CPU seconds (user + system,
/proc/PID/stat) over it. To compare two versions, run it from two checkouts
in turn. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.swarm_helpers import Swarm  # noqa: E402
from tests.test_mirror_stall import (  # noqa: E402
    FreezingMirror,
    mirror_failures,
    mirrored_drive,
    read_in_background,
)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in ticks of 10 ms


def one_run(work: Path, failures: int, fetch_timeout: float) -> dict:
    link, www, reader_home, _, want_later = mirrored_drive(work)
    with FreezingMirror(www) as mirror, Swarm(work / "swarm") as swarm:
        reader = swarm.mount("reader", reader_home, link, work / "mnt",
                             fetch_timeout=fetch_timeout, extra=["--mirror", mirror.url])
        sorted(reader.mountpoint.iterdir())
        mirror.freeze_after(6)
        streaming = read_in_background(reader.mountpoint / "big.bin")
        while mirror_failures(reader.snapshot(), mirror.url) < failures:
            time.sleep(0.2)
        requests_before = mirror.served + mirror.held
        cpu_before = _cpu_seconds(reader.pid)
        thawed = time.monotonic()
        mirror.thaw()
        eio = 0
        while True:
            try:
                data = (reader.mountpoint / "later.bin").read_bytes()
            except OSError:
                eio += 1
                continue
            break
        took = time.monotonic() - thawed
        cpu = _cpu_seconds(reader.pid) - cpu_before
        asked = mirror.served + mirror.held - requests_before
        streaming.join(timeout=120)
        assert hashlib.sha256(data).hexdigest() == want_later, "wrong bytes"
    return {"seconds": round(took, 2), "eio": eio, "requests": asked, "cpu_s": round(cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--failures", type=int, default=8)
    parser.add_argument("--fetch-timeout", type=float, default=20.0)
    args = parser.parse_args()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="stall-lab-") as tmp:
            result = one_run(Path(tmp), args.failures, args.fetch_timeout)
        print(json.dumps({"run": run + 1, "root": str(ROOT), **result}), flush=True)


if __name__ == "__main__":
    main()
