"""New versions of a drive reuse every unchanged block (rsync-like deltas).

Real processes: the `peerdrive` command publishes the same folder several
times from one node, and a real FUSE mount (`peerdrive mount`, another
process) reads the result back. The figures checked are the publish
report's `new_blocks` / `new_bytes`, which count only blocks the store did
not already hold, so each edit is published on its own to measure it alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import digest, is_mounted, mounted, publish, write_random

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024
BIG = 100 * MiB
SECOND = 40 * MiB
# the mount process joins no network beyond loopback: every block is already on this node
LOCAL_ONLY = ("--listen", "127.0.0.1:0", "--no-lan")


def source_digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = digest(p)
    return out


def assert_reads_back(mnt: Path, want: dict[str, str]) -> None:
    got = source_digests(mnt)
    assert set(got) == set(want)
    for rel, d in want.items():
        assert got[rel] == d, f"{rel} differs through the mount"


def test_edits_publish_only_the_changed_blocks(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", BIG)
    write_random(src / "second.bin", SECOND)
    (src / "notes.txt").write_text("unchanged\n")
    home = node_home("pub")

    first = publish(home, src)
    assert first["seq"] == 1
    assert first["new_bytes"] >= BIG + SECOND  # everything is new the first time

    # (a) overwrite 1 MiB in the middle of the 100 MB file, publish on its own
    with open(src / "big.bin", "r+b") as f:
        f.seek(BIG // 2)
        f.write(os.urandom(MiB))
    changed = publish(home, src)
    assert changed["drive"] == first["drive"]
    assert changed["read_link"] == first["read_link"]
    assert changed["seq"] == 2
    assert changed["bytes"] == BIG + SECOND + len("unchanged\n")
    assert MiB <= changed["new_bytes"] <= 4 * MiB, changed

    # (b) insert 10 bytes at the start of the second file, publish on its own
    body = (src / "second.bin").read_bytes()
    (src / "second.bin").write_bytes(os.urandom(10) + body)
    del body
    inserted = publish(home, src)
    assert inserted["drive"] == first["drive"]
    assert inserted["read_link"] == first["read_link"]
    assert inserted["seq"] == 3
    # the chunk holding the insert, the root directory node, a chunk-list block if any
    assert 2 <= inserted["new_blocks"] <= 6, inserted
    assert inserted["new_bytes"] <= 4 * MiB, inserted

    want = source_digests(src)
    mnt = tmp_path / "mnt"
    with mounted(home, first["read_link"], mnt, *LOCAL_ONLY):
        assert (mnt / "big.bin").stat().st_size == BIG
        assert (mnt / "second.bin").stat().st_size == SECOND + 10
        assert_reads_back(mnt, want)
    assert not is_mounted(mnt)


def test_unchanged_folder_adds_only_metadata(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    (src / "docs" / "deep" / "er").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    write_random(src / "large.bin", 12 * MiB)
    write_random(src / "docs" / "mid.bin", 700_000)
    (src / "docs" / "deep" / "er" / "leaf.txt").write_text("leaf\n" * 100)
    (src / "empty.txt").write_bytes(b"")
    for i in range(50):
        (src / "docs" / f"note{i:02d}.txt").write_text(f"note {i}\n")
    os.symlink("docs/mid.bin", src / "link")
    home = node_home("pub")

    first = publish(home, src)
    again = publish(home, src)
    assert again["seq"] == first["seq"] + 1 == 2
    assert again["read_link"] == first["read_link"]
    assert again["files"] == first["files"]
    assert again["bytes"] == first["bytes"]
    assert again["new_bytes"] < 64 * 1024, again

    want = source_digests(src)
    mnt = tmp_path / "mnt"
    with mounted(home, again["read_link"], mnt, *LOCAL_ONLY):
        assert_reads_back(mnt, want)
        assert os.readlink(mnt / "link") == "docs/mid.bin"
        assert sorted(os.listdir(mnt / "empty-dir")) == []
    assert not is_mounted(mnt)
