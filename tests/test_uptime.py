"""Uptime: a publisher, a host and a reader that stay up for hours, compressed into minutes.

The quality bar asks for tests "the way people use it: ... a publisher that
stays up for hours". Real processes on 127.0.0.1, every one started with
`PEERDRIVE_TIME_SCALE` (dht/timescale.py): the hour-long timers of a node
(provider records live an hour and are announced again every 20 min, the DHT
refreshes and culls its storage every 15 min and re-stores heads every hour,
a fetcher re-reads its providers every minute, a serve counts copies every
minute) run SCALE times faster, never below 1 s; the short ones (head polls,
snapshots, host syncs, every 1-5 s) are as they are. So the soak below
spans dozens of "hours" of provider records and DHT refreshes, and hundreds
of the short timers' rounds.

Long-running: a publisher `serve` (`--keep-versions 2`), a host (`peerdrive
host`, default `--keep-versions 1`) and one reader's mount. Meanwhile fresh
readers mount (bootstrapping from the publisher or the host in turn), read
every file whole and compare it byte for byte, and end by `unmount`, SIGTERM
or SIGKILL; every third reader the publisher publishes a new version, which
the host and the long reader follow (compared byte for byte too).

What must not grow without bound in the three long-running processes is
compared between a sample after warm-up (cycle WARM) and the last one, each
taken at rest (no transient reader), with a fixed slack (counts, never
times): open fds (/proc/PID/fd), threads (/proc/PID/task), RSS (generous),
the block server's connections and the fetchers' peer tables (status
snapshot), the DHT's stored records (expired ones dropped: the killed
readers' provider records go, in scaled time, within their TTL plus a
refresh), the routing table, and the host's and publisher's stores (older
versions released). At the end a fresh reader bootstrapping from the host's
DHT port alone finds the drive's providers through the DHT (the records the
publisher and host announced dozens of TTLs after their first) and reads
every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dht.fetch import _MAX_FORMER_PEERS
from tests.helpers import is_mounted, peerdrive
from tests.pin_helpers import open_store
from tests.processes import wait_exit
from tests.swarm_helpers import MountedReader, NodeProcess, Swarm, evict_page_cache, tree_digests

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse for the readers' mounts")

SCALE = 600  # one hour of the node's timers in 6 s; 15 min in 1.5 s; a minute in 1 s
READERS = 12  # transient readers, at least
# and at least this long: 15 scaled hours, 60 DHT refreshes (UPTIME_SOAK=SECONDS: longer)
SOAK_SECONDS = float(os.environ.get("UPTIME_SOAK", 90))
VERSION_EVERY = 3  # readers between two new versions
# UPTIME_HEAP=FRAMES: the publisher and host trace their allocations (PEERDRIVE_TRACEMALLOC,
# vfs/heapwatch.py) and log what grew at WARM and after every version's readers; printed
# at the end (-s shows it). For finding what a soak's RSS track says grows, not a check.
HEAP_FRAMES = os.environ.get("UPTIME_HEAP", "")
WARM = 3  # the sample every later one is compared with (after warm-up)
KIB = 1024

# fixed slack between the sample at WARM and the last one (a leak per reader or per
# version over READERS readers and READERS / VERSION_EVERY versions exceeds each)
FD_SLACK = 8
THREAD_SLACK = 6
# RSS: the process's own memory (RssAnon) at most 25 % or 40 MB more (its bounded caches,
# the 16 MiB plaintext LRU of a mount, fill as versions come); all of it, the store's
# mapped pages it touched included (VmRSS), at most 50 % or 64 MB more
ANON_SLACK = 1.25, 40 << 20
RSS_SLACK = 1.5, 64 << 20
LONG_CACHE = 8 << 20  # the long reader's --cache-size: its store evicts old versions
STORE_SLACK = 256 * KIB  # a version's blocks vary this much (chunk cuts, folder nodes)


def make_version(src: Path, version: int) -> dict[str, str]:
    """The source folder as version `version`: two files that stay, one that changes every
    version, and a small one named after the version (the previous one removed)."""
    rng = random.Random(1000 + version)
    if version == 1:
        (src / "docs").mkdir(parents=True)
        (src / "stays.bin").write_bytes(random.Random(1).randbytes(900 * KIB))
        (src / "docs" / "notes.txt").write_bytes(random.Random(2).randbytes(40 * KIB))
    for old in src.glob("v*.txt"):
        old.unlink()
    (src / "changes.bin").write_bytes(rng.randbytes(600 * KIB))
    (src / f"v{version}.txt").write_bytes(rng.randbytes(3 * KIB))
    return {str(p.relative_to(src)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(src.rglob("*")) if p.is_file()}


@dataclass
class Sample:
    """What one long-running process holds at one moment."""

    fds: int
    threads: int
    rss: int
    anon: int  # RssAnon: the process's own memory, not the store's mapped pages it touched
    connections: int  # the block server's live client connections
    peers: int  # entries of its fetchers' peer tables
    connected_peers: int
    contacts: int  # DHT routing table
    provider_records: int  # DHT storage, expired ones not yet dropped included
    provider_keys: int
    mutable_keys: int


def sample(pid: int, home: Path) -> Sample:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    status = {k: v for k, _, v in (line.partition(":") for line in
                                  Path(f"/proc/{pid}/status").read_text().splitlines())}
    rss, anon = (int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon"))
    snap = json.loads((home / "run" / f"{pid}.json").read_text())
    peers = [p for d in snap["drives"].values() for p in d["peers"]]
    storage = snap["dht_storage"]
    return Sample(fds, threads, rss, anon, snap["server"]["connections_active"], len(peers),
                  sum(1 for p in peers if p["connected"]), snap["dht_contacts"],
                  storage["provider_records"], storage["provider_keys"],
                  storage["mutable_keys"])


def at_rest(pid: int, home: Path, samples: int = 4) -> Sample:
    """The smallest of a few samples a snapshot apart: what the process holds once what
    a departed reader left (a connection being closed, an idle worker thread) is gone."""
    taken = []
    for _ in range(samples):
        taken.append(sample(pid, home))
        time.sleep(1.1)
    return Sample(*(min(getattr(s, f) for s in taken) for f in Sample.__dataclass_fields__))


def store_figures(home: Path) -> tuple[int, int]:
    """(stored bytes, pins) of a home's store."""
    with open_store(home) as store:
        st = store.stats()
    return st["total_bytes"], len(st["pins"])


def hosted(host: NodeProcess, drive: str) -> dict | None:
    snap = host.snapshot(after=time.time())
    return next((s for s in snap.get("hosting", ()) if s["drive"] == drive), None)


def wait_for(predicate, timeout: float, what: str, diagnostics=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout:.0f} s)\n{diagnostics()}")
        time.sleep(0.25)


def end_reader(sw: Swarm, m: MountedReader, how: str) -> None:
    """Stop a transient reader the way users do: `unmount`, SIGTERM or SIGKILL."""
    if how == "unmount":
        res = peerdrive(m.home, "unmount", str(m.mountpoint), check=False, timeout=60)
        assert res.returncode == 0, res.stderr
        assert wait_exit(m.pid, timeout=30), f"{m.name}: the mount process outlived unmount"
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert wait_exit(m.pid, timeout=30), f"{m.name}: still running after {how}"
        if is_mounted(m.mountpoint):  # a killed mount leaves its mount point behind
            subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)],
                           capture_output=True, check=False)
    sw.mounts.remove(m)


def read_all(mnt: Path, want: dict[str, str]) -> None:
    for rel in want:
        with contextlib.suppress(OSError):
            evict_page_cache(mnt / rel)  # through the mount, not the kernel's copy
    got = tree_digests(mnt)
    assert got == want, f"{mnt}: {sorted(got)} vs {sorted(want)}"


def compare(name: str, warm: Sample, last: Sample) -> list[str]:
    bad = []
    if last.fds > warm.fds + FD_SLACK:
        bad.append(f"{name}: open fds {warm.fds} -> {last.fds}")
    if last.threads > warm.threads + THREAD_SLACK:
        bad.append(f"{name}: threads {warm.threads} -> {last.threads}")
    if last.anon > max(warm.anon * ANON_SLACK[0], warm.anon + ANON_SLACK[1]):
        bad.append(f"{name}: anonymous RSS {warm.anon >> 20} -> {last.anon >> 20} MB")
    if last.rss > max(warm.rss * RSS_SLACK[0], warm.rss + RSS_SLACK[1]):
        bad.append(f"{name}: RSS {warm.rss >> 20} -> {last.rss >> 20} MB")
    # a fetcher keeps the statistics of at most _MAX_FORMER_PEERS departed providers
    if last.peers - last.connected_peers > _MAX_FORMER_PEERS:
        bad.append(f"{name}: fetcher peers {warm.peers} -> {last.peers}, "
                   f"{last.connected_peers} connected")
    if last.connected_peers > warm.connected_peers + 1:
        bad.append(f"{name}: connected peers {warm.connected_peers} -> {last.connected_peers}")
    if last.contacts > warm.contacts + 2:
        bad.append(f"{name}: DHT contacts {warm.contacts} -> {last.contacts}")
    return bad


def test_publisher_host_and_reader_stay_bounded_through_hours_of_readers_and_versions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERDRIVE_TIME_SCALE", str(SCALE))  # every process started below
    if HEAP_FRAMES:
        monkeypatch.setenv("PEERDRIVE_TRACEMALLOC", HEAP_FRAMES)
    src = tmp_path / "src"
    want = make_version(src, 1)
    P, H, L = tmp_path / "P", tmp_path / "H", tmp_path / "L"
    started = time.monotonic()
    with Swarm(tmp_path / "swarm") as sw:
        pub = json.loads(peerdrive(P, "publish", str(src), "--json",
                                   "--keep-versions", "2").stdout)
        link, drive = pub["read_link"], pub["drive"]
        publisher = sw.serve("publisher", P, extra=["--keep-versions", "2"])
        host = sw.serve("host", H, bootstrap=[publisher.addr])
        store_link = json.loads(peerdrive(P, "share", link, "--store", "--json").stdout)["link"]
        out = peerdrive(H, "host", store_link, "--json", "--stall-timeout", "120", check=False)
        assert out.returncode == 0, out.stderr + sw.diagnostics()
        # the long reader's mount is started without the tracing (a serve's hook only)
        with monkeypatch.context() as m:
            m.delenv("PEERDRIVE_TRACEMALLOC", raising=False)
            long = sw.mount("long", L, link, tmp_path / "mnt-long", bootstrap=[publisher.addr],
                            fetch_timeout=30, extra=["--cache-size", str(LONG_CACHE)])
        read_all(long.mountpoint, want)
        watched = {"publisher": (publisher.pid, P), "host": (host.pid, H),
                   "long reader": (long.pid, L)}
        seq, cycle, warm = 1, 0, {}
        history: list[dict] = []
        while cycle < READERS or time.monotonic() - started < SOAK_SECONDS:
            cycle += 1
            if cycle % VERSION_EVERY == 0:
                seq += 1
                want = make_version(src, seq)
                out = json.loads(peerdrive(P, "publish", str(src), "--json",
                                           "--keep-versions", "2").stdout)
                assert out["seq"] == seq
                wait_for(lambda s=seq: (hosted(host, drive) or {}).get("hosted_seq") == s, 90,
                         f"the host never held version {seq}", sw.diagnostics)
                wait_for(lambda s=seq: (long.mountpoint / f"v{s}.txt").exists(), 60,
                         f"the long reader never showed version {seq}", sw.diagnostics)
                read_all(long.mountpoint, want)
            via = publisher if cycle % 2 else host
            home = tmp_path / f"R{cycle}"
            reader = sw.mount(f"reader{cycle}", home, link, tmp_path / f"mnt{cycle}",
                              bootstrap=[via.addr], fetch_timeout=30)
            read_all(reader.mountpoint, want)
            end_reader(sw, reader, ("unmount", "sigterm", "sigkill")[cycle % 3])
            read_all(long.mountpoint, want)
            if HEAP_FRAMES and cycle >= WARM and cycle % VERSION_EVERY == VERSION_EVERY - 1:
                for node in (publisher, host):  # logs what grew since the last signal
                    os.kill(node.pid, signal.SIGUSR2)
            if cycle == WARM:
                warm = {name: at_rest(pid, home) for name, (pid, home) in watched.items()}
                warm_stores = {"host": store_figures(H), "publisher": store_figures(P)}
            history.append({"cycle": cycle, "seq": seq,
                            "seconds": round(time.monotonic() - started, 1),
                            **{name: sample(pid, home).__dict__
                               for name, (pid, home) in watched.items()}})

        soak = time.monotonic() - started
        # The departed readers' provider records expire (TTL 1 h: 6 s here) and the DHT's
        # upkeep drops them: what the publisher and host hold ends at the live providers.
        live = 3  # publisher, host, long reader
        for name in ("publisher", "host"):
            pid, home = watched[name]
            wait_for(lambda p=pid, h=home: sample(p, h).provider_records <= live, 60,
                     f"{name} kept expired provider records",
                     lambda p=pid, h=home: f"{sample(p, h)}\n{sw.diagnostics()}")
        last = {name: at_rest(pid, home) for name, (pid, home) in watched.items()}
        print(json.dumps({"soak_seconds": round(soak, 1), "cycles": cycle, "versions": seq,
                          "warm": {k: v.__dict__ for k, v in warm.items()},
                          "last": {k: v.__dict__ for k, v in last.items()}}))
        # per cycle: seq, then (RSS, anonymous RSS) in MB of each long-running process
        print("rss", json.dumps([[h["cycle"], h["seq"]] + [(h[n]["rss"] >> 20, h[n]["anon"] >> 20)
                                                         for n in watched] for h in history]))
        if HEAP_FRAMES:
            for node in (publisher, host):
                os.kill(node.pid, signal.SIGUSR2)
            time.sleep(5)  # a report, not a count: the snapshots of a traced heap take a while
            for node in (publisher, host):
                print(f"--- {node.name} heap ---")
                print("\n".join(line for line in node.log_path.read_text().splitlines()
                                 if "heap #" in line or " kB " in line))
        problems = [p for name in watched for p in compare(name, warm[name], last[name])]
        for name in ("publisher", "host"):
            s = last[name]
            if (s.provider_keys, s.mutable_keys) != (1, 1):
                problems.append(f"{name}: DHT keys {s.provider_keys} provider, "
                                f"{s.mutable_keys} mutable (one drive)")
            # the long reader and the other long-running node, nothing of departed readers
            if s.connections > 2:
                problems.append(f"{name}: {s.connections} client connections at rest")
        if last["long reader"].connected_peers > 2:
            problems.append(f"long reader: connected to {last['long reader'].connected_peers}")
        state = hosted(host, drive)
        if state["hosted_versions"] != [seq]:
            problems.append(f"host keeps versions {state['hosted_versions']}, not [{seq}]")
        if store_figures(L)[0] > LONG_CACHE:
            problems.append(f"long reader: store {store_figures(L)[0]} B over its limit")
        for name, home in (("host", H), ("publisher", P)):
            (was, was_pins), (now, pins) = warm_stores[name], store_figures(home)
            if now > was + STORE_SLACK or pins > was_pins:
                problems.append(f"{name}: store {was} B / {was_pins} pins at cycle {WARM}, "
                                f"{now} B / {pins} pins at the end")
        assert not problems, "\n".join(problems) + "\n" + json.dumps(history[-1])

        # a fresh reader that knows only the host's DHT port finds the drive's providers
        # (announced dozens of record lifetimes after their first) and reads every byte
        last_reader = sw.mount("fresh", tmp_path / "R-fresh", link, tmp_path / "mnt-fresh",
                               bootstrap=[host.addr], fetch_timeout=30)
        read_all(last_reader.mountpoint, want)
        snap = last_reader.snapshot(after=time.time())
        found = {p["node_id"] for d in snap["drives"].values() for p in d["peers"]}
        assert {publisher.node_id, host.node_id} <= found, (found, sw.diagnostics())
        assert soak >= SOAK_SECONDS and cycle >= READERS
