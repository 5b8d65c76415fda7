"""The README's command-line contracts, run as a user runs them: real processes, real mounts.

Every node here is a `peerdrive serve` or `peerdrive mount` process on
127.0.0.1 without LAN (tests/pin_helpers.Nodes stops each by PID whatever
happens). The same exit codes are checked in process, for every error type,
in tests/test_cli_inprocess.py.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from cache.store import BlockStore
from tests.helpers import is_mounted, peerdrive, publish
from tests.inprocess import publish_folder, wrong_key_chunks
from tests.pin_helpers import MiB, Nodes, digest, open_store, status, xattr
from tests.swarm_helpers import node_id_of
from vfs.capability import parse_link
from vfs.home import Home

pytestmark = pytest.mark.fuse

MARKER = b"NOT UNDER THIS KEY"


def test_node_status_json_lists_the_live_mount_and_node_with_their_values(
        tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2 * MiB))
    pub, reader = node_home("pub"), node_home("reader")
    info = publish(pub, src)
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, info["read_link"], tmp_path / "mnt", "--bootstrap", seeder.addr)
        assert digest(m.path / "a.bin") == digest(src / "a.bin")
        after = time.time()
        data = status(reader)
        assert data["home"] == str(reader.resolve())
        [mount] = data["mounts"]
        assert {k: mount[k] for k in ("pid", "mountpoint", "drive", "port")} == {
            "pid": m.pid, "mountpoint": str(m.path.resolve()), "drive": info["drive"],
            "port": m.port}
        # the background mount's log, where `status` says it is; `start` names the process
        assert mount["log"] == str(Home(reader).mount_log_path(info["drive"]))
        assert Path(mount["log"]).exists() and isinstance(mount["start"], int)
        # the mount's own node snapshot, fresh and saying what it fetched from whom
        for _ in range(100):
            [node] = status(reader)["nodes"]
            if node["time"] >= after:
                break
            time.sleep(0.1)
        assert (node["pid"], node["port"], node["node_id"]) == (m.pid, m.port,
                                                                node_id_of(reader))
        peers = node["drives"][info["drive"]]["peers"]
        assert [p["node_id"] for p in peers] == [seeder.node_id]
        assert peers[0]["bytes"] >= 2 * MiB and peers[0]["blocks"] >= 2
        assert data["drives"] == [{**data["drives"][0], "drive": info["drive"], "seq": 1,
                                   "published_here": False}]
        with open_store(reader) as store:
            assert data["cache"] == {"used_bytes": store.total_bytes, "limit_bytes": None}
        # the publisher's node: the serve process, and what it served
        [served] = status(pub)["nodes"]
        assert served["pid"] == seeder.pid and served["port"] == seeder.port
        assert served["server"]["blocks_served"] >= 2
        assert status(pub)["mounts"] == []
        table = peerdrive(reader, "status").stdout
        assert f"mount   {m.path.resolve()}  drive {info['drive'][:16]}  pid {m.pid}" in table
        assert f"node    pid {m.pid} port {m.port}" in table
    # everything stopped: neither is listed any more
    data = status(reader)
    assert data["mounts"] == [] and data["nodes"] == []


def publish_with_a_wrong_key_block(home: Path, src: Path, monkeypatch) -> tuple[str, bytes]:
    """Publish `src` in this process as `home`'s drive; chunks starting with MARKER are
    encrypted under another key (their ids match, they do not decrypt)."""
    h = Home(home)
    cap = h.create_drive(src)
    with BlockStore(h.store_path) as store, wrong_key_chunks(monkeypatch, MARKER) as bad:
        publish_folder(store, src, cap)
    [bad_id] = bad
    return cap.read_cap().link(), bad_id


def test_corrupt_block_gives_eio_is_evicted_and_the_mount_survives(
        tmp_path: Path, node_home, monkeypatch) -> None:
    """A block whose id matches but whose bytes do not decrypt: EIO, and gone from the store."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_bytes(b"good\n")
    (src / "bad.txt").write_bytes(MARKER + b"!" * 5000)
    pub, reader = node_home("pub"), node_home("reader")
    link, bad_id = publish_with_a_wrong_key_block(pub, src, monkeypatch)
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr,
                        "--fetch-timeout", "10")
        for _ in range(2):  # and again: fetched afresh, never answered from a cache
            with pytest.raises(OSError) as exc:
                (m.path / "bad.txt").read_bytes()
            assert exc.value.errno == errno.EIO
        assert (m.path / "good.txt").read_bytes() == b"good\n"
        assert xattr(m.path / "bad.txt", "state") == "cloud"
        nodes.unmount(m)  # the store writer has stored everything it fetched by now
    with open_store(reader) as store:
        assert not store.has(bad_id), "the undecryptable block stayed in the reader's store"
        assert store.total_bytes > 0  # the good file's block and the directory were kept


def test_forged_head_in_the_store_exits_3(tmp_path: Path, node_home) -> None:
    """Exit code 3: corrupt or forged data (a head whose signature does not verify)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    home = node_home("pub")
    info = publish(home, src)
    pubkey = parse_link(info["read_link"]).pubkey
    with BlockStore(Home(home).store_path) as store:
        wire = bytearray(store.get_record(b"head:" + pubkey))
        wire[-5] ^= 0x40  # inside the signature
        store.put_record(b"head:" + pubkey, bytes(wire))
    (tmp_path / "mnt").mkdir()
    res = peerdrive(home, "mount", info["read_link"], str(tmp_path / "mnt"), "--listen",
                    "127.0.0.1:0", "--no-lan", check=False, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "head" in res.stderr
    assert not is_mounted(tmp_path / "mnt")
    res = peerdrive(home, "publish", str(src), check=False)
    assert res.returncode == 3, res.stderr
