"""The command line without a mount: publish, status of the node, share, keys, exit codes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.helpers import peerdrive, publish
from vfs.capability import ReadCap, StoreCap, WriteCap, parse_link


def test_node_status_lists_drives_and_versions(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one")
    home = node_home("a")
    first = publish(home, src)
    (src / "a.txt").write_text("two")
    second = publish(home, src)
    assert second["read_link"] == first["read_link"] and second["seq"] == 2
    data = json.loads(peerdrive(home, "status", "--json").stdout)
    assert data["cache"]["limit_bytes"] is None and data["cache"]["used_bytes"] > 0
    [drive] = data["drives"]
    assert drive == {**drive, "drive": first["drive"], "seq": 2, "published_here": True}
    table = peerdrive(home, "status").stdout
    assert f"drive   {first['drive'][:16]}  version 2  published here" in table


def test_share_and_keys(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    home = node_home("a")
    info = publish(home, src)
    read = parse_link(info["read_link"])
    assert type(read) is ReadCap
    store_link = peerdrive(home, "share", info["read_link"], "--store").stdout.strip()
    assert type(parse_link(store_link)) is StoreCap
    assert parse_link(store_link).pubkey == read.pubkey
    assert peerdrive(home, "share", str(src)).stdout.strip() == info["read_link"]
    write = parse_link(peerdrive(home, "share", str(src), "--write").stdout.strip())
    assert type(write) is WriteCap and write.read_cap() == read
    keys = json.loads(peerdrive(home, "keys", "--json").stdout)
    assert [d["drive"] for d in keys["drives"]] == [info["drive"]]
    assert "write_link" not in keys["drives"][0]  # never printed unless asked for
    for secret in (home / "node.key", home / "drives" / info["drive"] / "write.cap"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_exit_codes(tmp_path: Path, node_home) -> None:
    home = node_home("a")
    res = peerdrive(home, "share", "peerdrive:r1:abc:def:ghi", check=False)
    assert res.returncode == 2 and "link" in res.stderr
    res = peerdrive(home, "publish", str(tmp_path / "missing"), check=False)
    assert res.returncode == 2 and "not a folder" in res.stderr
    res = peerdrive(home, "status", str(tmp_path), check=False)
    assert res.returncode == 2 and "not inside a peerdrive mount" in res.stderr
    src = tmp_path / "src"
    src.mkdir()
    link = publish(home, src)["read_link"]
    (tmp_path / "mnt").mkdir()
    res = peerdrive(home, "mount", link, str(tmp_path / "mnt"), "--cache-size", "12 parsecs",
                    "--listen", "127.0.0.1:0", "--no-lan", check=False)
    assert res.returncode == 2 and "parsecs" in res.stderr
