"""Real `peerdrive` processes on hosts of a private bridged network (issue 3).

Each test builds its own lab (tests/netns_helpers.py): network namespaces on
one Linux bridge, addresses in a private 10.77.x.0/24 that exists only inside
them, every process stopped by PID and every namespace deleted afterwards.

* Many sources: three seeders, each capped at R by a token bucket on its
  link, all serve one file to a fresh reader. The same run measures the
  file from one seeder under the same cap as a baseline; the speed-up is
  checked by `scripts/bench --swarm` (three_seeders), never by the test.
* LAN discovery: a reader with no bootstrap finds the publisher by multicast
  across the bridge and reads a file.

Both print one JSON line of figures (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import peerdrive, write_random
from tests.netns_helpers import PYTHON, Host, Lab, Mount
from tests.pin_helpers import Nodes
from tests.processes import wait_exit

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.timeout(240)]

RATE_MBIT = 40  # R: each seeder's egress cap
FILE_MIB = 64  # the benchmark's file: about 14 s at R from one seeder
TEST_FILE_MIB = 24  # the test's: every seeder still serves ~100 blocks' worth, in ~5 s at R
MIN_RATIO = 2.4  # the goal `scripts/bench --swarm` checks: three seeders at R give >= this R


def fetched_from(mount: Mount, after: float) -> dict[str, int]:
    """Blocks this reader's fetcher received from each peer, by peer address."""
    snap = mount.snapshot(after)
    out: dict[str, int] = {}
    for drive in snap["drives"].values():
        for peer in drive["peers"]:
            out[peer["addr"].split("@", 1)[1]] = peer["blocks"]
    return out


def blocks_served(host: Host, pid: int, after: float = 0.0) -> int:
    return int(host.snapshot(pid, after)["server"]["blocks_served"])


def test_three_capped_seeders_all_serve_one_reader(labs_possible, tmp_path: Path):
    """Every seeder serves a fresh reader, and the bytes are right.

    How much faster three seeders make it (the goal: at least MIN_RATIO times
    the cap) is a benchmark, not a test: `scripts/bench --swarm`.
    """
    three_seeders(tmp_path, TEST_FILE_MIB)


def three_seeders(tmp_path: Path, file_mib: int = FILE_MIB) -> dict:
    """One file read from one, two, then three seeders capped at RATE_MBIT; the figures.

    Asserts what must happen whatever the machine's speed (right bytes, every
    seeder used); `scripts/bench --swarm` checks the speed against MIN_RATIO
    on the full FILE_MIB (the test reads a smaller file: the same checks, and
    its one-seeder phase, paced by the cap, no longer takes 14 s of the suite).
    """
    rate = RATE_MBIT * 1e6 / 8  # bytes per second on the wire
    src = tmp_path / "src"
    src.mkdir()
    want = write_random(src / "big.bin", file_mib << 20)
    with Lab(tmp_path, 4) as lab:
        h1, h2, h3, h4 = lab.hosts
        info = h1.publish(src)
        publisher = h1.serve("--no-lan")
        for seeder in (h1, h2, h3):
            seeder.limit_egress(f"{RATE_MBIT}mbit")
        join = ("--bootstrap", h1.endpoint, "--no-lan")

        # one seeder: h2 reads from the publisher alone, and so caches the whole drive
        m2 = h2.mount(info["read_link"], tmp_path / "mnt-h2", *join)
        one = m2.read("big.bin")
        assert one["sha256"] == want and one["bytes"] == file_mib << 20
        # two seeders: h3 reads from h1 and h2, and caches it too
        m3 = h3.mount(info["read_link"], tmp_path / "mnt-h3", *join)
        two = m3.read("big.bin")
        assert two["sha256"] == want
        assert len(fetched_from(m3, time.time())) == 2, "h3 did not use both seeders"

        # three seeders: a fresh reader on h4
        served_before = {h1.name: blocks_served(h1, publisher.pid),
                         h2.name: blocks_served(h2, m2.pid), h3.name: blocks_served(h3, m3.pid)}
        m4 = h4.mount(info["read_link"], tmp_path / "mnt-h4", *join)
        three = m4.read("big.bin")
        done = time.time()
        assert three["sha256"] == want
        per_peer = fetched_from(m4, done)
        served = {h1.name: blocks_served(h1, publisher.pid, done) - served_before[h1.name],
                  h2.name: blocks_served(h2, m2.pid, done) - served_before[h2.name],
                  h3.name: blocks_served(h3, m3.pid, done) - served_before[h3.name]}

        def speed(result: dict) -> float:
            return result["bytes"] / result["seconds"]

        figures = {
            "test": "multi_source",
            "rate_mbit": RATE_MBIT,
            "R_bytes_per_s": rate,
            "file_bytes": three["bytes"],
            "one_seeder": {"T": round(speed(one)), "T_over_R": round(speed(one) / rate, 3),
                           "seconds": round(one["seconds"], 2)},
            "two_seeders": {"T": round(speed(two)), "T_over_R": round(speed(two) / rate, 3),
                            "seconds": round(two["seconds"], 2)},
            "three_seeders": {"T": round(speed(three)),
                              "T_over_R": round(speed(three) / rate, 3),
                              "T_over_one_seeder": round(speed(three) / speed(one), 3),
                              "seconds": round(three["seconds"], 2),
                              "first_mib_seconds": round(three["first_mib_seconds"], 3)},
            "blocks_served_to_reader": served,
            "blocks_fetched_by_reader": per_peer,
        }
        print(json.dumps(figures, sort_keys=True))

        seeders = {h.address: h.name for h in (h1, h2, h3)}
        assert {addr.rsplit(":", 1)[0] for addr in per_peer} == set(seeders), per_peer
        assert all(n > 0 for n in per_peer.values()), f"an idle seeder: {per_peer}"
        assert all(n > 0 for n in served.values()), f"an idle seeder: {served}"
    return figures


def test_reader_finds_the_publisher_by_lan_multicast_without_bootstrap(labs_possible,
                                                                         tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    want = write_random(src / "movie.bin", 6 << 20)
    (src / "notes.txt").write_text("found on the LAN\n")
    with Lab(tmp_path, 2) as lab:
        h1, h2 = lab.hosts
        info = h1.publish(src)
        h1.serve()  # LAN discovery on, as by default
        started = time.monotonic()
        mount = h2.mount(info["read_link"], tmp_path / "mnt-h2")  # no --bootstrap, LAN on
        mounted_after = time.monotonic() - started
        got = mount.read("movie.bin")
        assert got["sha256"] == want
        notes = mount.run("cat", str(mount.path / "notes.txt")).stdout
        assert notes == "found on the LAN\n"
        snap = mount.snapshot(time.time())
        per_peer = fetched_from(mount, time.time())
        print(json.dumps({"test": "lan_discovery", "mounted_seconds": round(mounted_after, 2),
                          "read_seconds": round(got["seconds"], 2),
                          "reader_dht_contacts": snap["dht_contacts"],
                          "blocks_fetched_by_reader": per_peer}, sort_keys=True))
        # the only source was the publisher, reached at its address on the bridge
        assert per_peer.keys() == {h1.endpoint}, per_peer
        assert per_peer[h1.endpoint] > 0


def test_a_lab_process_holds_no_copy_of_this_namespaces_fuse_mounts(
        labs_possible, tmp_path: Path, node_home) -> None:
    """A process started in a lab host (`ip netns exec`) gets a copy of our mount
    namespace; with private mounts (no propagation, as in this container) the copy
    held every FUSE mount of the moment until the process ended, so unmounting
    one here left its FUSE session alive and its daemon running (a lazy unmount's
    daemon never ended, `peerdrive unmount` SIGTERMed it after 20 s). The lab's
    commands drop those copies first (netns_helpers.in_netns)."""
    home = node_home("a")
    link = json.loads(peerdrive(home, "new", "--json").stdout)["read_link"]
    with Nodes(tmp_path) as nodes, Lab(tmp_path / "lab", 1) as lab:
        m = nodes.mount(home, link, tmp_path / "mnt")
        waiting = subprocess.Popen(
            lab.hosts[0].argv(PYTHON, "-c", "import sys; print('up', flush=True); "
                              "sys.stdin.read()"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.track(waiting.pid)
        try:
            assert waiting.stdout is not None and waiting.stdout.readline() == "up\n"
            held = Path(f"/proc/{waiting.pid}/mounts").read_text()
            assert f" {m.path.resolve()} " not in held, held
            res = peerdrive(home, "unmount", str(m.path), check=False, timeout=120)
            assert res.returncode == 0 and "sent SIGTERM" not in res.stderr, res.stderr
            assert wait_exit(m.pid, None, 60), "the mount process did not end after unmount"
            nodes.mounts.remove(m)
        finally:
            waiting.stdin.close()  # type: ignore[union-attr]
