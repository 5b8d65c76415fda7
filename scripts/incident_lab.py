"""Lab for a mirror's hiccup beside a peer: how long the mirror stays unused after it.

    .venv/bin/python scripts/incident_lab.py [--runs N]

Publishes 16 MiB plus a 64 MiB file read only later, writes the drive's mirror
(the freezing loopback server of tests/test_mirror_stall.py), serves the drive
from the publisher (a peer), and mounts a reader with both. A streaming read of
the 16 MiB file is caught by a freeze of the mirror (after 6 block files) that
lasts HICCUP seconds from the first request it holds: long enough for the
mount to hedge every request in flight there to the peer, short against the
60 s the old rule could back the mirror off for. Then the 64 MiB file is read 1 MiB per 0.1 s (a
paced reader, so the time is the mirror's and not the loop's) while the
mount's snapshot is read after each MiB. Printed: the requests the mount
counted failed at the mirror in that one hiccup (its `failures`; the old rule
backed the mirror off by all of them, now by one incident), the seconds from the thaw to the
mirror's next delivered block (null: never during the read), the mirror's
share of the 64 MiB file's blocks, and the mount's CPU seconds (user + system,
/proc/PID/stat) over the read. To compare two versions, run it from two
checkouts in turn. Measures; asserts nothing.
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

from tests.helpers import peerdrive, publish, write_random  # noqa: E402
from tests.swarm_helpers import Swarm  # noqa: E402
from tests.test_mirror_stall import (  # noqa: E402
    FreezingMirror,
    mirror_failures,
    read_in_background,
)

MiB = 1024 * 1024
LATER = 64 * MiB
PACE = 0.1  # seconds per MiB of the later read
HICCUP = 2.0  # seconds the mirror stays frozen


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in ticks of 10 ms


def _mirror_blocks(snap: dict, url: str) -> int:
    return sum(m["blocks"] for d in snap["drives"].values() for m in d["mirrors"]
               if m["url"] == url)


def _peer_blocks(snap: dict) -> int:
    return sum(p["blocks"] for d in snap["drives"].values() for p in d["peers"])


def one_run(work: Path) -> dict:
    src = work / "src"
    src.mkdir(parents=True)
    write_random(src / "big.bin", 16 * MiB, seed=10)
    want_later = write_random(src / "later.bin", LATER, seed=12)
    publisher = work / "publisher"
    publisher.mkdir()
    link = publish(publisher, src)["read_link"]
    www = work / "www"
    peerdrive(publisher, "mirror", link, str(www), "--json")
    reader_home = work / "reader"
    reader_home.mkdir()
    with FreezingMirror(www) as mirror, Swarm(work / "swarm") as swarm:
        pub = swarm.serve("publisher", publisher)
        reader = swarm.mount("reader", reader_home, link, work / "mnt", bootstrap=[pub.addr],
                             fetch_timeout=20.0, extra=["--mirror", mirror.url])
        sorted(reader.mountpoint.iterdir())
        mirror.freeze_after(6)
        streaming = read_in_background(reader.mountpoint / "big.bin")
        while mirror.held < 1:
            time.sleep(0.02)
        time.sleep(HICCUP)
        failures = mirror_failures(reader.snapshot(), mirror.url)
        mirror.thaw()
        thawed = time.monotonic()
        streaming.join(timeout=120)
        snap = reader.snapshot()
        mirror_start, peer_start = _mirror_blocks(snap, mirror.url), _peer_blocks(snap)
        cpu_before = _cpu_seconds(reader.pid)
        back_after = None
        digest = hashlib.sha256()
        with open(reader.mountpoint / "later.bin", "rb") as f:
            while chunk := f.read(MiB):
                digest.update(chunk)
                time.sleep(PACE)
                snap = reader.snapshot()
                if back_after is None and _mirror_blocks(snap, mirror.url) > mirror_start:
                    back_after = round(time.monotonic() - thawed, 2)
        cpu = _cpu_seconds(reader.pid) - cpu_before
        snap = reader.snapshot()
        from_mirror = _mirror_blocks(snap, mirror.url) - mirror_start
        from_peer = _peer_blocks(snap) - peer_start
        assert digest.hexdigest() == want_later, "wrong bytes"
    return {"failed_requests_at_mirror": failures, "mirror_back_after_s": back_after,
            "mirror_share": round(from_mirror / max(1, from_mirror + from_peer), 2),
            "blocks_mirror": from_mirror, "blocks_peer": from_peer, "cpu_s": round(cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="incident-lab-") as tmp:
            result = one_run(Path(tmp))
        print(json.dumps({"run": run + 1, "root": str(ROOT), **result}), flush=True)


if __name__ == "__main__":
    main()
