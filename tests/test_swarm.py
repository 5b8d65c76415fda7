"""Swarms of real `peerdrive` processes on 127.0.0.1 (issue 3: the network).

Every node here is a separate process: `peerdrive serve` for publishers and
seeders, `peerdrive mount` (a real FUSE mount) for readers, and
`tests/lying_peer.py` for a peer that corrupts what it serves. Nodes find
each other through the DHT, bootstrapping from one another; LAN discovery is
off. One drive (a 60 MB file, a 4 MB file, small files in folders) is
published once for the module, and two reader homes cache all of it once, so
the tests can use them as seeders. Nothing asserts on speed beyond the
generous bounds the product promises (a read with no seeder left fails long
before a minute; a new version shows within 10 s); the figures a run
measures are printed (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cache.store import BlockStore
from tests.helpers import digest, is_mounted, publish, write_random
from tests.swarm_helpers import (
    Swarm,
    blocks_from,
    blocks_served,
    evict_page_cache,
    peer_stats,
    tree_digests,
    tree_files,
    wait_until,
)
from vfs.capability import parse_link
from vfs.errors import RollbackError
from vfs.head import HeadTracker, open_head
from vfs.head_follower import HeadFollower
from vfs.storage import DriveStorage

pytestmark = pytest.mark.fuse

BIG = "big60.bin"
MID = "mid4.bin"
BIG_SIZE = 60_000_000
MID_SIZE = 4_000_000
FETCH_TIMEOUT = 5.0


@dataclass
class Published:
    src: Path
    home: Path
    link: str
    digests: dict[str, str]


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One drive for the module: a 60 MB file, a 4 MB file and small files in folders."""
    base = tmp_path_factory.mktemp("swarm-drive")
    src = base / "src"
    (src / "docs" / "notes").mkdir(parents=True)
    write_random(src / BIG, BIG_SIZE, seed=31)
    write_random(src / MID, MID_SIZE, seed=32)
    for i in range(12):
        (src / "docs" / f"page{i:02d}.txt").write_bytes(f"page {i}\n".encode() * (50 * i + 1))
    (src / "docs" / "notes" / "todo.txt").write_text("read the swarm tests\n")
    write_random(src / "docs" / "notes" / "photo.jpg", 700_000, seed=33)
    (src / "empty").write_bytes(b"")
    home = base / "home-publisher"
    home.mkdir()
    info = publish(home, src)
    return Published(src, home, info["read_link"], tree_digests(src))


def read_range(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes from `offset` (fewer at the end), read in order 1 MiB at a time."""
    out = bytearray()
    with open(path, "rb") as f:
        f.seek(offset)
        while len(out) < size and (block := f.read(min(1 << 20, size - len(out)))):
            out += block
    return bytes(out)


def becomes_device(path: Path) -> bool:
    """Whether `path` reaches state "device" (fetched blocks are stored in batches)."""
    return wait_until(lambda: os.getxattr(path, "user.peerdrive.state") == b"device", 60)


def small_files(d: Published) -> list[str]:
    return [rel for rel in d.digests if rel not in (BIG, MID)]


def new_home(tmp_path: Path, name: str) -> Path:
    home = tmp_path / f"home-{name}"
    home.mkdir()
    return home


def assert_same_tree(mnt: Path, d: Published) -> None:
    assert tree_files(mnt) == sorted(d.digests)
    got = tree_digests(mnt)
    wrong = [rel for rel in d.digests if got[rel] != d.digests[rel]]
    assert not wrong, f"wrong bytes in {wrong}"


@pytest.fixture(scope="module")
def cached(drive: Published, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two reader homes that have read (so cached) the whole drive from the publisher."""
    base = tmp_path_factory.mktemp("swarm-cached")
    homes = [base / "home-cached1", base / "home-cached2"]
    with Swarm(base / "swarm") as swarm:
        pub = swarm.serve("publisher", drive.home)
        mounts = []
        for i, home in enumerate(homes):
            home.mkdir()
            mounts.append(swarm.mount(f"cacher{i + 1}", home, drive.link, base / f"mnt{i + 1}",
                                      bootstrap=[pub.addr]))
        with ThreadPoolExecutor(len(mounts)) as pool:
            list(pool.map(lambda m: assert_same_tree(m.mountpoint, drive), mounts))
        for m in mounts:
            assert becomes_device(m.mountpoint), "the cacher did not keep everything"
    return homes


# ----------------------------------------------------------------------------- 1


def test_reader_streams_every_byte_from_the_publisher(drive: Published, tmp_path: Path) -> None:
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", drive.home)
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), drive.link,
                             tmp_path / "mnt", bootstrap=[pub.addr])
        mnt = reader.mountpoint

        # a cold mount: the path lookup, the connection and the first block are all timed
        started = time.monotonic()
        with open(mnt / BIG, "rb") as f:
            first = f.read(65536)
        first_64k = time.monotonic() - started
        with open(drive.src / BIG, "rb") as f:
            assert first == f.read(65536)
        assert os.getxattr(mnt / MID, "user.peerdrive.state") == b"cloud"

        started = time.monotonic()
        assert digest(mnt / BIG) == drive.digests[BIG]
        cold = BIG_SIZE / (time.monotonic() - started) / 1e6
        print(f"\nfigures: first 64 KiB of an uncached file {first_64k * 1000:.0f} ms; "
              f"cold read from one peer {cold:.1f} MB/s")

        assert_same_tree(mnt, drive)
        assert becomes_device(mnt)
        snap = reader.snapshot(after=time.time())
        assert set(blocks_from(snap)) == {pub.node_id}
        assert blocks_from(snap)[pub.node_id] > 0


# ----------------------------------------------------------------------------- 2


def test_fresh_reader_draws_from_three_seeders(drive: Published, cached: list[Path],
                                               tmp_path: Path) -> None:
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", drive.home)
        # two readers that cached the whole drive; their mounts stay up and serve
        seeders = [pub] + [
            swarm.mount(f"seeder{i + 1}", home, drive.link, tmp_path / f"seed{i + 1}",
                        bootstrap=[pub.addr])
            for i, home in enumerate(cached)
        ]
        swarm.probe(pub.addr).wait_providers(drive.link, [s.node_id for s in seeders])
        before = {s.node_id: blocks_served(s.snapshot(after=time.time())) for s in seeders}

        fresh = swarm.mount("fresh", new_home(tmp_path, "fresh"), drive.link,
                            tmp_path / "mnt", bootstrap=[pub.addr])
        # Four readers of one file at once, each reading a quarter in order. The
        # scheduler sends a block to the peer that would deliver it soonest, so one
        # sequential reader may be served well by two fast peers alone; four keep
        # more blocks wanted than two peers have slots, so the third must get some.
        started = time.monotonic()
        quarter = -(-BIG_SIZE // 4)
        with ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(lambda k: read_range(fresh.mountpoint / BIG, k * quarter,
                                                       quarter), range(4)))
        rate = BIG_SIZE / (time.monotonic() - started) / 1e6
        done = time.time()
        assert hashlib.sha256(b"".join(parts)).hexdigest() == drive.digests[BIG]

        served = {s.node_id: blocks_served(s.snapshot(after=done)) - before[s.node_id]
                  for s in seeders}
        fetched = blocks_from(fresh.snapshot(after=done))
        print(f"\nfigures: 60 MB, four readers, three seeders {rate:.1f} MB/s; blocks served "
              f"{[served[s.node_id] for s in seeders]}")
        for s in seeders:
            assert served[s.node_id] > 0, (f"{s.name} served no blocks: served {served}, "
                                           f"the reader fetched {fetched}")
            assert fetched.get(s.node_id, 0) > 0


# ----------------------------------------------------------------------------- 3


def test_read_completes_when_a_seeder_is_killed_mid_read(drive: Published, cached: list[Path],
                                                         tmp_path: Path) -> None:
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", drive.home)
        seeders = [pub] + [swarm.serve(f"seeder{i + 1}", home, bootstrap=[pub.addr])
                           for i, home in enumerate(cached)]
        swarm.probe(pub.addr).wait_providers(drive.link, [s.node_id for s in seeders])
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), drive.link,
                             tmp_path / "mnt", bootstrap=[pub.addr])
        want = (drive.src / BIG).read_bytes()
        with open(reader.mountpoint / BIG, "rb") as f:
            head = f.read(16 << 20)
            assert head == want[:len(head)]
            # the seeder this reader has taken most blocks from dies at once
            at_kill = blocks_from(reader.snapshot(after=time.time()))
            victim = max(seeders, key=lambda s: at_kill.get(s.node_id, 0))
            assert at_kill.get(victim.node_id, 0) > 0
            victim.kill()
            assert not victim.alive()
            rest = f.read()
        assert head + rest == want
        assert is_mounted(reader.mountpoint)

        survivors = [s for s in seeders if s is not victim]
        after = blocks_from(reader.snapshot(after=time.time()))
        assert sum(after.get(s.node_id, 0) for s in survivors) > \
            sum(at_kill.get(s.node_id, 0) for s in survivors)
        print(f"\nfigures: killed {victim.name} after it delivered "
              f"{at_kill[victim.node_id]} blocks; blocks by node after: "
              f"{[after.get(s.node_id, 0) for s in seeders]}")


# ----------------------------------------------------------------------------- 4


def test_no_seeder_left_gives_eio_in_time_and_the_mount_stays_up(drive: Published,
                                                                  cached: list[Path],
                                                                  tmp_path: Path) -> None:
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", drive.home)
        seeder = swarm.serve("seeder", cached[0], bootstrap=[pub.addr])
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), drive.link,
                             tmp_path / "mnt", bootstrap=[pub.addr],
                             fetch_timeout=FETCH_TIMEOUT)
        mnt = reader.mountpoint
        early = small_files(drive) + [MID]
        got = tree_digests(mnt, early)
        assert got == {rel: drive.digests[rel] for rel in early}

        seeder.stop()
        pub.stop()
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            with open(mnt / BIG, "rb") as f:
                f.read(65536)
        took = time.monotonic() - started
        assert exc.value.errno == errno.EIO
        assert took < 60, f"the failing read took {took:.1f} s"
        print(f"\nfigures: EIO with every seeder gone after {took:.1f} s "
              f"(--fetch-timeout {FETCH_TIMEOUT:g})")

        # the mount is still up and what was read before still reads, from this device
        assert is_mounted(mnt)
        assert tree_files(mnt) == sorted(drive.digests)
        evict_page_cache(mnt / MID)
        assert tree_digests(mnt, early) == {rel: drive.digests[rel] for rel in early}
        assert becomes_device(mnt / MID)
        # and the uncached file still fails cleanly, not with wrong bytes
        with pytest.raises(OSError) as exc:
            with open(mnt / BIG, "rb") as f:
                f.seek(BIG_SIZE // 2)
                f.read(65536)
        assert exc.value.errno == errno.EIO
        # an evicted file is gone from this device: just read from it, now unreadable
        os.setxattr(mnt / MID, "user.peerdrive.evict", b"1")
        with pytest.raises(OSError) as exc:
            with open(mnt / MID, "rb") as f:
                f.read()
        assert exc.value.errno == errno.EIO


# ----------------------------------------------------------------------------- 5


def test_a_lying_peer_never_yields_wrong_bytes(drive: Published, cached: list[Path],
                                               tmp_path: Path) -> None:
    with Swarm(tmp_path / "swarm") as swarm:
        # the liar holds every block (a cached reader's store) and flips a byte in each
        liar = swarm.liar("liar", new_home(tmp_path, "liar"), cached[1], drive.link)
        pub = swarm.serve("publisher", drive.home, bootstrap=[liar.addr])
        swarm.probe(liar.addr).wait_providers(drive.link, [liar.node_id, pub.node_id])
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), drive.link,
                             tmp_path / "mnt", bootstrap=[liar.addr],
                             fetch_timeout=FETCH_TIMEOUT)
        mnt = reader.mountpoint

        # with an honest seeder too, every byte is right
        early = small_files(drive) + [MID]
        assert tree_digests(mnt, early) == {rel: drive.digests[rel] for rel in early}

        # with only the liar left, a read fails rather than return its bytes
        pub.stop()
        with pytest.raises(OSError) as exc:
            with open(mnt / BIG, "rb") as f:
                f.read(1 << 20)
        assert exc.value.errno == errno.EIO
        now = time.time()
        assert blocks_served(liar.snapshot(after=now)) > 0, "the liar was never asked"
        seen = peer_stats(reader.snapshot(after=now), liar.node_id)
        assert seen is not None and seen["bad_blocks"] > 0, seen

        # an honest seeder again: the reader gets there, with the right bytes
        honest = swarm.serve("publisher-again", drive.home, bootstrap=[liar.addr])
        got = None

        def read_big() -> bool:
            nonlocal got
            try:
                got = digest(mnt / BIG)
            except OSError as e:
                assert e.errno == errno.EIO, e
                return False
            return True

        assert wait_until(read_big, timeout=120, interval=1.0), swarm.diagnostics()
        assert got == drive.digests[BIG]
        fetched = blocks_from(reader.snapshot(after=time.time()))
        assert fetched.get(honest.node_id, 0) > 0
        print(f"\nfigures: liar served {blocks_served(liar.snapshot())} corrupt blocks; "
              f"reader saw {peer_stats(reader.snapshot(), liar.node_id)['bad_blocks']} of them")


# ----------------------------------------------------------------------------- 6


def test_fresh_reader_gets_everything_with_the_publisher_offline(drive: Published,
                                                                 cached: list[Path],
                                                                 tmp_path: Path) -> None:
    # The publisher stays offline throughout. A reader that cached the whole drive
    # (in an earlier session) mounts on its own, from what it holds; a fresh reader
    # that knows only that reader finds the head and every block there.
    with Swarm(tmp_path / "swarm") as swarm:
        keeper = swarm.mount("caching-reader", cached[0], drive.link, tmp_path / "keep")
        assert os.getxattr(keeper.mountpoint, "user.peerdrive.state") == b"device"
        fresh = swarm.mount("fresh", new_home(tmp_path, "fresh"), drive.link, tmp_path / "mnt",
                            bootstrap=[keeper.addr])
        assert_same_tree(fresh.mountpoint, drive)
        fetched = blocks_from(fresh.snapshot(after=time.time()))
        assert set(fetched) == {keeper.node_id}
        assert fetched[keeper.node_id] > 0


# ----------------------------------------------------------------------------- 7


def test_new_version_shows_in_a_live_mount(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("version 1\n")
    (src / "same.txt").write_text("unchanged\n")
    (src / "gone.txt").write_text("only in version 1\n" * 1000)
    write_random(src / "grows.bin", 3_000_000, seed=34)
    write_random(src / "shrinks.bin", 2_000_000, seed=35)
    held_names = ["grows.bin", "shrinks.bin", "gone.txt"]
    old = {name: (src / name).read_bytes() for name in held_names}
    home = new_home(tmp_path, "publisher")
    info = publish(home, src)
    link = info["read_link"]
    cap = parse_link(link)
    with BlockStore(home / "store") as store:
        v1_wire = DriveStorage(store).head_wire(cap.pubkey)
    assert v1_wire is not None

    reader_home = new_home(tmp_path, "reader")
    with Swarm(tmp_path / "swarm") as swarm, contextlib.ExitStack() as files:
        pub = swarm.serve("publisher", home)
        reader = swarm.mount("reader", reader_home, link, tmp_path / "mnt",
                             bootstrap=[pub.addr])
        mnt = reader.mountpoint
        assert (mnt / "notes.txt").read_text() == "version 1\n"
        # files opened in version 1, partly read
        held = {name: files.enter_context(open(mnt / name, "rb")) for name in held_names}
        first = {name: f.read(4096) for name, f in held.items()}

        (src / "notes.txt").write_text("version 2, longer than the first\n")
        (src / "added.txt").write_text("new in version 2\n")
        (src / "gone.txt").unlink()
        write_random(src / "grows.bin", 3_500_000, seed=36)
        write_random(src / "shrinks.bin", 500_000, seed=37)
        info2 = publish(home, src)
        assert info2["seq"] == 2
        started = time.monotonic()

        def shows_v2() -> bool:
            try:
                return ((mnt / "notes.txt").read_text() == "version 2, longer than the first\n"
                        and (mnt / "added.txt").read_text() == "new in version 2\n")
            except OSError:
                return False

        # bounded only to catch a hang (how soon it shows is the printed figure)
        assert wait_until(shows_v2, timeout=90), (
            f"version 2 did not show within 90 s\n{swarm.diagnostics()}")
        print(f"\nfigures: version 2 showed in the live mount after "
              f"{time.monotonic() - started:.1f} s")
        assert sorted(os.listdir(mnt)) == ["added.txt", "grows.bin", "notes.txt", "same.txt",
                                           "shrinks.bin"]
        assert not (mnt / "gone.txt").exists()
        assert (mnt / "same.txt").read_text() == "unchanged\n"
        for name in ("grows.bin", "shrinks.bin"):
            assert (mnt / name).stat().st_size == (src / name).stat().st_size
            assert (mnt / name).read_bytes() == (src / name).read_bytes()
        # files opened before the change keep reading the version they opened,
        # to its own end (the page cache dropped, so the reads reach the mount)
        for name, f in held.items():
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.fstat(f.fileno()).st_size == len(old[name]), name
            assert first[name] + f.read() == old[name], name

    # rollback: the reader kept seq 2 and refuses the older head it once had
    with BlockStore(reader_home / "store") as store:
        storage = DriveStorage(store)
        current = storage.load_head(cap)
        assert current is not None and current.seq == 2
        with pytest.raises(RollbackError):
            HeadTracker(cap, current).offer(v1_wire)
        with pytest.raises(RollbackError):
            storage.save_head(open_head(v1_wire, cap))
        follower = HeadFollower(cap, storage, net=None)  # type: ignore[arg-type]
        assert follower.offer(v1_wire) is None
        assert follower.tracker.current is not None and follower.tracker.current.seq == 2
        assert storage.load_head(cap).seq == 2
