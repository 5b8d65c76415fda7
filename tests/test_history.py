"""Versions end to end with real processes: `new`, `log`, `mount LINK@SEQ`, `--keep-versions`.

Each test runs the real command line (`python -m vfs.cli`), mounts with the
real background `peerdrive mount` process, and nodes over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cache.store import BlockStore
from tests.helpers import mounted, peerdrive, publish
from tests.swarm_helpers import Swarm, blocks_from
from vfs.capability import parse_link
from vfs.home import Home
from vfs.storage import DriveStorage, history_pin, publish_pin

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs FUSE and root")


def write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def versions(home: Path, target: str, *extra: str) -> list[dict]:
    return json.loads(peerdrive(home, "log", target, "--json", "--no-lan", *extra).stdout
                      )["versions"]


def test_log_lists_every_version_and_mount_at_1_reads_version_1(tmp_path: Path) -> None:
    home, src = tmp_path / "home", tmp_path / "src"
    v1 = {"a.txt": b"one\n", "big.bin": os.urandom(3 << 20), "sub/x": b"x\n"}
    write(src, v1)
    link = publish(home, src)["read_link"]
    (src / "a.txt").write_bytes(b"two\n")  # version 2: modified
    publish(home, src)
    (src / "sub" / "x").unlink()  # version 3: removed, added
    write(src, {"new/n.txt": b"n"})
    publish(home, src)
    (src / "big.bin").write_bytes(os.urandom(1 << 20))  # version 4: big.bin rewritten
    publish(home, src)

    log = versions(home, link)
    assert [v["seq"] for v in log] == [4, 3, 2, 1]
    assert log[0]["changes"]["modified"] == ["big.bin"]
    assert log[1]["changes"]["added"] == ["new/"] and log[1]["changes"]["removed"] == ["sub/x"]
    assert log[2]["changes"]["modified"] == ["a.txt"]
    assert log[3]["changes"]["added"] == ["a.txt", "big.bin", "sub/"] and log[3]["prev"] is None
    assert [v["files"] for v in log] == [3, 3, 3, 3]
    assert log[3]["bytes"] == sum(len(d) for d in v1.values())
    assert all(log[i]["prev"] == log[i + 1]["id"] for i in range(3))
    assert len(versions(home, link, "--limit", "2")) == 2
    text = peerdrive(home, "log", link, "--no-lan").stdout
    assert "version 3" in text and "- sub/x" in text and "+ new/" in text

    with mounted(home, f"{link}@1", tmp_path / "v1") as mnt:
        for rel, data in v1.items():
            assert (mnt / rel).read_bytes() == data, rel
        assert not (mnt / "new").exists()
        with pytest.raises(OSError):
            (mnt / "a.txt").write_bytes(b"no")  # an old version is read-only
    with mounted(home, link, tmp_path / "now") as mnt:
        assert (mnt / "a.txt").read_bytes() == b"two\n"
        # `log MNT` asks the mount itself (no second node, no key on the command line)
        assert [v["seq"] for v in versions(home, str(mnt))] == [4, 3, 2, 1]
    (tmp_path / "v9").mkdir()
    bad = peerdrive(home, "mount", f"{link}@9", str(tmp_path / "v9"), "--no-lan", check=False)
    assert bad.returncode != 0 and "version 9 is not in the drive's history" in bad.stderr, \
        bad.stderr
    bad = peerdrive(home, "mount", f"{link}@x", str(tmp_path / "v9"), check=False)
    assert bad.returncode == 2 and "not a version number" in bad.stderr


def test_new_makes_an_empty_drive(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = json.loads(peerdrive(home, "new", "--json").stdout)
    assert out["seq"] == 1 and out["write_link"].startswith("peerdrive:w1:")
    assert parse_link(out["read_link"]).pubkey == parse_link(out["write_link"]).pubkey
    with mounted(home, out["read_link"], tmp_path / "mnt") as mnt:
        assert os.listdir(mnt) == []
    keys = json.loads(peerdrive(home, "keys", "--json").stdout)
    assert [d["drive"] for d in keys["drives"]] == [out["drive"]]
    log = versions(home, out["read_link"])
    assert len(log) == 1 and log[0]["files"] == 0


def test_keep_versions_releases_old_blocks_and_a_peer_serves_them(tmp_path: Path) -> None:
    """The publisher keeps 2 versions; version 1's own blocks leave its store; a reader
    that read version 1 serves them, and a third node mounts LINK@1 from it."""
    pub, reader, third = tmp_path / "pub", tmp_path / "reader", tmp_path / "third"
    src = tmp_path / "src"
    old = os.urandom(2 << 20)
    write(src, {"old.bin": old, "same.txt": b"kept in every version\n"})
    link = publish(pub, src)["read_link"]
    cap = parse_link(link)
    with BlockStore(Home(pub).store_path) as store:
        v1_ids = set(store.pin_ids(publish_pin(cap.pubkey, 1)))
    with Swarm(tmp_path / "swarm") as swarm:
        p = swarm.serve("pub", pub, extra=["--keep-versions", "2"])
        with mounted(reader, link, tmp_path / "r", "--bootstrap", p.addr) as mnt:
            assert (mnt / "old.bin").read_bytes() == old  # now in the reader's cache
        for i in range(3):
            (src / "old.bin").write_bytes(os.urandom(1 << 20) + bytes([i]))
            peerdrive(pub, "publish", str(src), "--keep-versions", "2")
        deadline = time.monotonic() + 60  # serve, which keeps versions too, follows them
        # [4] alone when serve's follower skipped version 3 (published while it was busy):
        # a version older than the newest two is released either way
        while [w["hosted_versions"] for w in p.snapshot()["writing"]] not in ([[3, 4]], [[4]]):
            assert time.monotonic() < deadline, p.snapshot()["writing"]
            time.sleep(0.5)
        with BlockStore(Home(pub).store_path) as store:
            storage = DriveStorage(store)
            assert storage.published_versions(cap.pubkey) == [3, 4]
            kept = set(store.pin_ids(publish_pin(cap.pubkey, 3))) | set(
                store.pin_ids(publish_pin(cap.pubkey, 4)))
            v1_only = sorted(v1_ids - kept)
            assert len(v1_only) >= 4  # old.bin's chunks, the root node, the block list
            assert store.missing(v1_only) == v1_only  # released and evicted
            assert len(store.pin_ids(history_pin(cap.pubkey))) == 4  # every head stays
        r = swarm.serve("reader", reader, bootstrap=[p.addr])
        # a node that holds nothing of the drive: the log comes over the network
        # version 2 is on no device any more (released, never read elsewhere): its line
        # stays, without figures; version 1 comes from the reader
        log = versions(tmp_path / "logger", link, "--bootstrap", p.addr, "--bootstrap", r.addr,
                       "--fetch-timeout", "3")
        assert [v["seq"] for v in log] == [4, 3, 2, 1]
        assert log[0]["changes"]["modified"] == ["old.bin"] and log[0]["files"] == 2
        assert log[2]["files"] is None and "not fetched" in log[2]["missing"]
        assert log[1]["changes"] is None  # what changed since version 2 is not known
        assert log[3]["files"] == 2 and log[3]["changes"]["added"] == ["old.bin", "same.txt"]
        m = swarm.mount("third", third, f"{link}@1", tmp_path / "t",
                        bootstrap=[p.addr, r.addr])
        assert (m.mountpoint / "old.bin").read_bytes() == old
        assert (m.mountpoint / "same.txt").read_bytes() == b"kept in every version\n"
        from_reader = blocks_from(m.snapshot(after=time.time())).get(r.node_id, 0)
        swarm.unmount(m)  # its store writer commits what it fetched
        with BlockStore(Home(third).store_path) as store:
            fetched = [i for i in v1_only if store.has(i)]
        # old.bin (2 MiB: at least 2 chunks of at most 1 MiB) and the root node: blocks the
        # publisher no longer has, so they came from the reader
        assert len(fetched) >= 3, (len(fetched), len(v1_only))
        assert from_reader >= len(fetched)
