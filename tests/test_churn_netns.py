"""Churn (issue 9) in network namespaces: LAN discovery on, readers coming and going.

Every node is a real `peerdrive` process inside a namespace the test builds
(`tests/netns_helpers.py`); nothing touches the host's interfaces.

* Four readers at once with LAN discovery on, every node bound to 127.0.0.1
  in one namespace that also has an `eth0` with a multicast route: LAN
  announcements leave by `eth0`, so their source address is not where the
  servers listen. That once made every reader dial the publisher at the wrong
  address and fail with EIO ("tried 4 of 4 known peer(s): 3 failed").
* Churn: one publisher, eight readers that join, read a random part and leave
  (SIGTERM or SIGKILL, at random) for two minutes, while one more reader
  streams a 256 MiB file: bytes equal, no EIO, and the longest wait between two
  successive 1 MiB reads is printed (it must stay under `MAX_GAP`, a bound only
  a hang breaks). Every mount runs with `-v`: a slow read's history is in the
  logs a failure prints.

This file is also the small reader program those reads run inside a mount
namespace (`python test_churn_netns.py stream PATH` / `part PATH OFF SIZE`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ != "__main__":
    import pytest

    from tests.helpers import publish
    from tests.netns_helpers import (
        PYTHON,
        Host,
        Lab,
        LabError,
        Mount,
    )
    from tests.test_churn import write_random

    pytestmark = [
        pytest.mark.fuse,
        pytest.mark.usefixtures("labs_possible"),
    ]

FILE = "data.bin"
FOUR_SIZE = 64 << 20
STREAM_SIZE = 256 << 20
CHURN_SECONDS = 120.0
CHURNERS = 8
# Seconds between two successive 1 MiB reads of the streaming reader: a bound only a hang
# breaks (a read that waits out the 20 s fetch timeout). The goal is 2 s, a speed
# goal this test does not assert: on the shared 2-core machine, at a load average of 18-27,
# the longest gap measured 5.8-11.2 s, with the publisher's process waiting for a CPU
# (runnable, not running) 175 s of its 182 s (/proc/PID/task/*/schedstat): every reader's
# blocks then wait in line for that share. Each slow read is logged with its history
# (which peers were asked, what each said, how long each took) at INFO (`-v`); the
# figures and the distribution of the gaps are printed.
MAX_GAP = 15.0
SELF = Path(__file__).resolve()


def reader_host(lab: Lab, index: int, home: Path, address: str) -> Host:
    """A node home inside host `index`'s namespace, listening on `address`."""
    home.mkdir(parents=True, exist_ok=True)
    return Host(lab, index, lab.hosts[index - 1].ns, address, home)


def mount_in(host: Host, link: str, mountpoint: Path, *extra: str, verbose: bool = False
             ) -> Mount:
    mountpoint.mkdir(parents=True, exist_ok=True)
    res = host.peerdrive(*["-v"] * verbose, "mount", link, str(mountpoint), "--json", *extra)
    pid = int(json.loads(res.stdout)["pid"])
    host.lab.track(pid)
    return Mount(host, pid, mountpoint)


def run_reader(m: Mount, *args: str, timeout: float) -> dict:
    res = m.run(PYTHON, str(SELF), *args, timeout=timeout, check=False)
    if res.returncode != 0:
        raise LabError(f"reader {' '.join(args)} on {m.host.home.name} failed "
                       f"({res.returncode}): {res.stderr.strip()[-2000:]}\n"
                       f"--- logs ---\n{m.host.logs()}")
    return json.loads(res.stdout)


def test_four_readers_at_once_with_lan_discovery(tmp_path: Path) -> None:
    with Lab(tmp_path, 1) as lab:
        src = tmp_path / "src"
        src.mkdir()
        digest = write_random(src / FILE, FOUR_SIZE, 21)
        pub = reader_host(lab, 1, tmp_path / "home-pub", "127.0.0.1")
        link = publish(pub.home, src)["read_link"]
        served = pub.serve()  # --listen 127.0.0.1:4100, LAN discovery on (the default)
        mounts = [mount_in(reader_host(lab, 1, tmp_path / f"home-r{i}", "127.0.0.1"), link,
                           tmp_path / f"mnt{i}", "--listen", "127.0.0.1:0",
                           "--bootstrap", pub.endpoint)
                  for i in range(4)]
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda m: run_reader(m, "stream", str(m.path / FILE),
                                                         timeout=600), mounts))
        seconds = time.monotonic() - started
        assert [r["sha256"] for r in results] == [digest] * 4
        sent = served.snapshot(after=time.time())["server"]["bytes_served"]
        print(f"\nfour readers of {FOUR_SIZE >> 20} MiB at once, LAN on: {seconds:.1f} s, "
              f"publisher sent {sent / 1e6:.0f} MB = {sent / FOUR_SIZE:.2f}x the file")
        assert sent < 3.0 * FOUR_SIZE



# A clean-clone run once saw one churner's read get EIO ("tried 16 of 17 known peer(s)":
# every reader, never the seed). Fixed since, shown in tests/test_fetch_swarm.py: a read()
# of a block the readahead was loading waited at READAHEAD priority, a parked request
# wanted at READ was not asked again, and READs counted against slots readahead held.
# (That run's log was cut short; these being its cause is our reading of it.)
def test_readers_come_and_go_while_one_streams(tmp_path: Path) -> None:
    _come_and_go(tmp_path)


def _come_and_go(tmp_path: Path) -> None:
    rng = random.Random(int(time.time()))
    with Lab(tmp_path, CHURNERS + 2) as lab:
        src = tmp_path / "src"
        src.mkdir()
        digest = write_random(src / FILE, STREAM_SIZE, 22)
        pub = lab.hosts[0]
        link = publish(pub.home, src)["read_link"]
        pub.serve()
        stop_at = time.monotonic() + CHURN_SECONDS
        failures: list[str] = []
        cycles: list[str] = []
        lock = threading.Lock()

        def churn(index: int) -> None:
            host_no = index + 2
            turn = 0
            while time.monotonic() < stop_at - 5 and not failures:
                turn += 1
                host = reader_host(lab, host_no, tmp_path / f"home-c{index}-{turn}",
                                   lab.hosts[host_no - 1].address)
                m = None
                try:
                    m = mount_in(host, link, tmp_path / f"mnt-c{index}-{turn}",
                                 "--listen", host.endpoint, "--bootstrap", pub.endpoint,
                                 verbose=True)
                    offset = rng.randrange(0, STREAM_SIZE - (8 << 20))
                    size = rng.randrange(1 << 20, 24 << 20)
                    got = run_reader(m, "part", str(m.path / FILE), str(offset), str(size),
                                     timeout=300)
                    want = part_digest(src / FILE, offset, size)
                    if got["sha256"] != want:
                        failures.append(f"churner {index} read wrong bytes at {offset}")
                finally:
                    how = rng.choice([signal.SIGTERM, signal.SIGKILL])
                    if m is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(m.pid, how)
                        wait_gone(m.pid)
                with lock:
                    cycles.append(f"c{index}:{how.name}")

        def guarded(index: int) -> None:
            try:
                churn(index)
            except Exception as exc:  # reported below, with the logs
                failures.append(f"churner {index}: {exc}"[:4000])

        with ThreadPoolExecutor(CHURNERS) as pool:
            futures = [pool.submit(guarded, i) for i in range(CHURNERS)]
            # the streamer starts once readers have come and gone
            time.sleep(min(30.0, CHURN_SECONDS / 4))
            streamer = reader_host(lab, CHURNERS + 2, lab.hosts[-1].home,
                                   lab.hosts[-1].address)
            m = mount_in(streamer, link, tmp_path / "mnt-stream", "--listen",
                         streamer.endpoint, "--bootstrap", pub.endpoint, verbose=True)
            stream = run_reader(m, "stream", str(m.path / FILE), timeout=900)
            peers = m.snapshot()["drives"]
            for f in futures:
                f.result()
        print(f"\nchurn: {len(cycles)} readers joined and left in {CHURN_SECONDS:.0f} s "
              f"({sum('SIGKILL' in c for c in cycles)} killed); the streamer read "
              f"{stream['bytes'] >> 20} MiB in {stream['seconds']:.1f} s, longest gap between "
              f"1 MiB reads {stream['max_gap']:.2f} s at {stream['max_gap_at']:.1f} s; "
              f"gaps: median {stream['median_gap']:.2f} s, 90th percentile "
              f"{stream['p90_gap']:.2f} s, {stream['gaps_over_2s']} of {stream['gaps']} over 2 s")
        for drive in peers.values():
            for peer in drive["peers"]:
                print(f"  streamer's peer {peer['addr']}: {peer['blocks']} blocks, "
                      f"{peer['failures']} failures")
        assert not failures, "\n".join(failures)
        assert stream["sha256"] == digest
        assert len(cycles) >= CHURNERS
        assert stream["max_gap"] < MAX_GAP, f"{stream}\n{m.host.logs()}"


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if os.path.exists(f"/proc/{pid}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def part_digest(path: Path, offset: int, size: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(size)).hexdigest()


# ----------------------------------------------------------------------------- reader program


def _stream(path: str) -> None:
    digest = hashlib.sha256()
    total = 0
    max_gap = max_gap_at = 0.0
    gaps: list[float] = []
    first: float | None = None
    started = last = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            now = time.monotonic()
            if first is None:
                first = now - started  # opening and the first MiB: not a gap between reads
            else:
                gaps.append(now - last)
                if now - last > max_gap:
                    max_gap, max_gap_at = now - last, now - started
            last = now
            digest.update(chunk)
            total += len(chunk)
    gaps.sort()
    print(json.dumps({"bytes": total, "sha256": digest.hexdigest(),
                      "seconds": time.monotonic() - started, "max_gap": max_gap,
                      "first_mib_seconds": first, "max_gap_at": max_gap_at,
                      "gaps": len(gaps), "gaps_over_2s": sum(g > 2.0 for g in gaps),
                      "median_gap": gaps[len(gaps) // 2] if gaps else 0.0,
                      "p90_gap": gaps[int(len(gaps) * 0.9)] if gaps else 0.0}))


def _part(path: str, offset: int, size: int) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        data = bytearray()
        while len(data) < size and (chunk := f.read(min(1 << 20, size - len(data)))):
            data += chunk
    print(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "stream":
        _stream(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "part":
        _part(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: test_churn_netns.py stream PATH | part PATH OFFSET SIZE")
