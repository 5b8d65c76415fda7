"""HTTP mirrors end to end: `peerdrive mirror`, nginx on 127.0.0.1, real FUSE mounts.

A mirror directory written by `peerdrive mirror` is served by a private nginx
(tests/nginx_helpers.py). Readers mount with no peer holding any block: the
mirror URL comes from the signed head (found in the DHT) or from `--mirror`,
and every byte read must be the publisher's. A damaged mirror gives EIO or
correct bytes, never wrong ones, within the fetch timeout; a second version
adds only its new blocks; a stale head on a mirror never rolls a reader back.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dht.mirror_layout import BLOCKS_DIR, HEAD_PATH
from tests.helpers import peerdrive, publish
from tests.nginx_helpers import Nginx, free_port
from tests.swarm_helpers import Swarm, tree_digests, tree_files

pytestmark = [pytest.mark.fuse]

FETCH_TIMEOUT = 3.0


@dataclass
class Mirrored:
    src: Path
    home: Path
    link: str
    mirror: Path  # the directory `peerdrive mirror` wrote
    url: str  # where nginx serves it
    result: dict  # `peerdrive mirror --json`
    digests: dict[str, str]


def write_tree(src: Path, seed: int) -> None:
    rng = random.Random(seed)
    (src / "docs" / "deep").mkdir(parents=True)
    (src / "big.bin").write_bytes(rng.randbytes(6 * 1024 * 1024 + 777))
    (src / "docs" / "deep" / "photo.jpg").write_bytes(rng.randbytes(900_000))
    for i in range(8):
        (src / "docs" / f"note{i}.txt").write_bytes(f"note {i}\n".encode() * (i + 1))
    (src / "empty").write_bytes(b"")


def assert_digests(mnt: Path, digests: dict[str, str]) -> None:
    assert tree_files(mnt) == sorted(digests)
    got = tree_digests(mnt)
    wrong = [rel for rel in digests if got[rel] != digests[rel]]
    assert not wrong, f"wrong bytes in {wrong}"


def block_files(mirror: Path) -> set[str]:
    return {p.name for p in (mirror / BLOCKS_DIR).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory):
    """One nginx for the module, serving every mirror directory under `root`."""
    base = tmp_path_factory.mktemp("www")
    root = base / "root"
    root.mkdir()
    with Nginx(root, base / "nginx", port=free_port()) as server:
        yield root, server


def make_mirrored(base: Path, www, name: str, *, head_url: bool, seed: int) -> Mirrored:
    root, server = www
    src = base / f"src-{name}"
    src.mkdir()
    write_tree(src, seed)
    home = base / f"home-{name}"
    home.mkdir()
    url = f"{server.url}/{name}"
    args = ["publish", str(src), "--json"] + (["--mirror-url", url] if head_url else [])
    info = json.loads(peerdrive(home, *args).stdout)
    mirror = root / name
    result = json.loads(peerdrive(home, "mirror", info["read_link"], str(mirror),
                                  "--json").stdout)
    return Mirrored(src, home, info["read_link"], mirror, url, result, tree_digests(src))


@pytest.fixture(scope="module")
def with_url(tmp_path_factory: pytest.TempPathFactory, www) -> Mirrored:
    """A drive whose head names its mirror."""
    return make_mirrored(tmp_path_factory.mktemp("mirrored"), www, "named", head_url=True,
                         seed=1)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, www) -> Mirrored:
    """A drive whose head names no mirror: readers must be told with --mirror."""
    return make_mirrored(tmp_path_factory.mktemp("plain"), www, "plain", head_url=False, seed=2)


def new_home(tmp_path: Path, name: str) -> Path:
    home = tmp_path / f"home-{name}"
    home.mkdir()
    return home


def mirror_blocks(snap: dict, url: str) -> int:
    for drive in snap["drives"].values():
        for m in drive.get("mirrors", []):
            if m["url"] == url:
                return m["blocks"]
    return 0


# ----------------------------------------------------------------------------- writing


def test_mirror_writes_every_block_and_the_exact_head(with_url: Mirrored) -> None:
    res = with_url.result
    files = block_files(with_url.mirror)
    assert res["written"] == res["blocks"] == len(files) and res["skipped"] == 0
    assert res["written_bytes"] == res["bytes"] == sum(
        p.stat().st_size for p in (with_url.mirror / BLOCKS_DIR).rglob("*") if p.is_file())
    for p in (with_url.mirror / BLOCKS_DIR).rglob("*"):
        if p.is_file():  # named by id, in a fan-out folder of its first two hex digits
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
            assert p.parent.name == p.name[:2]
    assert not [p for p in with_url.mirror.rglob(".tmp-*")]
    # the head is the publisher's signed bytes, unchanged
    from cache.store import BlockStore
    from vfs.capability import parse_link
    from vfs.home import Home
    from vfs.storage import DriveStorage

    store = BlockStore(Home(with_url.home).store_path)
    try:
        head = DriveStorage(store).load_head(parse_link(with_url.link))
    finally:
        store.close()
    assert (with_url.mirror / HEAD_PATH).read_bytes() == head.wire
    assert head.mirrors == (with_url.url,)
    status = json.loads(peerdrive(with_url.home, "status", "--json").stdout)
    assert [d["mirrors"] for d in status["drives"]] == [[with_url.url]]
    # nothing in the mirror is plaintext: no 64-byte run of a source file, no file name
    blob = b"".join(p.read_bytes() for p in with_url.mirror.rglob("*") if p.is_file())
    for rel in with_url.digests:
        data = (with_url.src / rel).read_bytes()
        for off in range(0, max(0, len(data) - 64), 65_536):
            assert data[off:off + 64] not in blob
        assert os.path.basename(rel).encode() not in blob

    # again: nothing to do
    again = json.loads(peerdrive(with_url.home, "mirror", with_url.link, str(with_url.mirror),
                                 "--json").stdout)
    assert again["written"] == 0 and again["skipped"] == res["blocks"]
    assert not again["head_written"]


def test_store_link_is_enough_to_mirror(with_url: Mirrored, tmp_path: Path) -> None:
    store_link = peerdrive(with_url.home, "share", with_url.link, "--store").stdout.strip()
    out = tmp_path / "by-store-link"
    res = json.loads(peerdrive(with_url.home, "mirror", store_link, str(out), "--json").stdout)
    assert res["written"] == with_url.result["blocks"]
    assert block_files(out) == block_files(with_url.mirror)


# ----------------------------------------------------------------------------- reading


def test_fresh_reader_reads_everything_through_the_mirror_named_in_the_head(
        with_url: Mirrored, tmp_path: Path) -> None:
    # A DHT node that holds no block, the publisher's serve (which stores the head in
    # the DHT) stopped: the reader finds the head, and in it the mirror.
    with Swarm(tmp_path / "swarm") as swarm:
        dht = swarm.serve("dht-only", new_home(tmp_path, "dht"))
        pub = swarm.serve("publisher", with_url.home, bootstrap=[dht.addr])
        pub.stop()
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), with_url.link,
                             tmp_path / "mnt", bootstrap=[dht.addr])
        assert_digests(reader.mountpoint, with_url.digests)
        snap = reader.snapshot(after=time.time())
        assert mirror_blocks(snap, with_url.url) > 0
        copies = os.getxattr(reader.mountpoint / "big.bin", "user.peerdrive.copies")
        assert int(copies) >= 2  # the mirror and this device


def test_mirror_by_hand_with_no_peer_and_no_dht(plain: Mirrored, tmp_path: Path) -> None:
    with Swarm(tmp_path / "swarm") as swarm:
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), plain.link,
                             tmp_path / "mnt", extra=["--mirror", plain.url])
        assert_digests(reader.mountpoint, plain.digests)
        assert mirror_blocks(reader.snapshot(after=time.time()), plain.url) > 0
    # and from config.toml
    home = new_home(tmp_path, "config")
    (home / "config.toml").write_text(f'mirrors = ["{plain.url}"]\n')
    with Swarm(tmp_path / "swarm2") as swarm:
        reader = swarm.mount("reader", home, plain.link, tmp_path / "mnt2")
        assert_digests(reader.mountpoint, plain.digests)


def test_damaged_mirror_gives_eio_or_correct_bytes_in_time(plain: Mirrored,
                                                          tmp_path: Path, www) -> None:
    root, server = www
    bad = root / "damaged"
    shutil.copytree(plain.mirror, bad)
    data_blocks = sorted(p for p in (bad / BLOCKS_DIR).rglob("*")
                         if p.is_file() and p.stat().st_size >= 64 * 1024)
    assert len(data_blocks) >= 6
    rng = random.Random(5)
    for i, p in enumerate(rng.sample(data_blocks, 6)):
        data = bytearray(p.read_bytes())
        if i % 3 == 0:
            data[len(data) // 2] ^= 0x40  # corrupt
            p.write_bytes(bytes(data))
        elif i % 3 == 1:
            p.write_bytes(bytes(data[: len(data) - 100]))  # truncated
        else:
            p.unlink()  # missing: a 404
    with Swarm(tmp_path / "swarm") as swarm:
        reader = swarm.mount("reader", new_home(tmp_path, "reader"), plain.link,
                             tmp_path / "mnt", extra=["--mirror", f"{server.url}/damaged"],
                             fetch_timeout=FETCH_TIMEOUT)
        eio = 0
        for rel, digest in plain.digests.items():
            start = time.monotonic()
            try:
                got = hashlib.sha256((reader.mountpoint / rel).read_bytes()).hexdigest()
            except OSError as exc:
                assert exc.errno == errno.EIO, f"{rel}: {exc}"
                eio += 1
            else:
                assert got == digest, f"{rel}: wrong bytes from a damaged mirror"
            # a read of a missing block ends at the fetch timeout, plus a margin for the
            # kernel's retries of its 1 MiB requests; never a hang
            assert time.monotonic() - start < 60, f"{rel} took too long"
        assert eio >= 1  # the damage was seen, not served
        for rel in ("docs/note0.txt", "docs/note7.txt", "empty"):  # untouched blocks
            assert hashlib.sha256((reader.mountpoint / rel).read_bytes()).hexdigest() == \
                plain.digests[rel]
        assert reader.mountpoint.is_dir()  # the mount stays up


def test_second_version_adds_only_new_blocks_and_a_stale_head_does_not_roll_back(
        tmp_path: Path, www) -> None:
    m = make_mirrored(tmp_path, www, "versions", head_url=False, seed=3)
    old_head = (m.mirror / HEAD_PATH).read_bytes()
    before = block_files(m.mirror)
    home_v1 = tmp_path / "home-at-v1"  # a node that knows only version 1
    shutil.copytree(m.home, home_v1)
    # version 2: one new file, one changed in its middle, the rest as it was
    (m.src / "docs" / "new.txt").write_bytes(b"added in version 2\n" * 100)
    with open(m.src / "big.bin", "r+b") as f:
        f.seek(3 * 1024 * 1024)
        f.write(os.urandom(100_000))
    pub = publish(m.home, m.src)
    assert pub["seq"] == 2
    res = json.loads(peerdrive(m.home, "mirror", m.link, str(m.mirror), "--json").stdout)
    after = block_files(m.mirror)
    assert res["written"] == len(after - before) > 0
    assert res["skipped"] == res["blocks"] - res["written"] > 0
    assert res["written"] < res["blocks"] // 2  # only what changed moved
    assert pub["new_blocks"] <= res["written"]
    assert res["head_written"] and res["seq"] == 2
    digests_v2 = tree_digests(m.src)

    # a node at version 1 refuses to take the mirror back
    refused = peerdrive(home_v1, "mirror", m.link, str(m.mirror), check=False)
    assert refused.returncode == 2 and "roll" in refused.stderr
    assert (m.mirror / HEAD_PATH).read_bytes() != old_head

    home = new_home(tmp_path, "reader")
    with Swarm(tmp_path / "swarm") as swarm:
        reader = swarm.mount("reader", home, m.link, tmp_path / "mnt",
                             extra=["--mirror", m.url])
        assert_digests(reader.mountpoint, digests_v2)
    # the mirror goes back to version 1's head (a stale copy, a replayed upload):
    # the reader that saw version 2 stays there
    (m.mirror / HEAD_PATH).write_bytes(old_head)
    with Swarm(tmp_path / "swarm2") as swarm:
        reader = swarm.mount("reader-again", home, m.link, tmp_path / "mnt2",
                             extra=["--mirror", m.url])
        assert (reader.mountpoint / "docs" / "new.txt").exists()
        assert_digests(reader.mountpoint, digests_v2)


def test_runs_into_one_directory_take_turns_and_clean_up_after_a_killed_one(
        plain: Mirrored, tmp_path: Path) -> None:
    import fcntl
    import select
    import subprocess

    from tests.helpers import PYTHON, ROOT, env_for

    out = tmp_path / "turns"
    stale = out / BLOCKS_DIR / "ab" / ".tmp-abcdef.12345"  # as a killed run leaves it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a block")
    fd = os.open(out / ".peerdrive-mirror.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the directory
        proc = subprocess.Popen([PYTHON, "-m", "vfs.cli", "mirror", plain.link, str(out),
                                 "--json"], env=env_for(plain.home), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            assert ready, "peerdrive mirror neither waited nor ended"
            said = proc.stderr.readline()
            assert "waiting for another peerdrive mirror" in said, said  # it waits ...
            time.sleep(1)
            assert proc.poll() is None and not (out / HEAD_PATH).exists()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # ... and goes on once the other run ends
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.close(fd)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["written"] == plain.result["blocks"]
    assert not stale.exists() and not list(out.rglob(".tmp-*"))
