"""A mount's memory follows what is in use (issue 17), through the real command line.

The kernel holds an inode (and so the mount holds its entry) for as long as
it keeps the name, which after a walk of a large drive is every name: the
mount asks it to forget the oldest past `--max-inodes`. Checked with a real
`peerdrive mount` process and a small bound: the table shrinks back after a
walk, and every file still reads right through fresh lookups.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.helpers import mount_pid, mounted, peerdrive, publish
from tests.pin_helpers import Nodes, poll, xattr

FOLDERS = 5
PER_FOLDER = 60
BOUND = 64


def snapshot(home: Path, pid: int) -> dict:
    return json.loads((home / "run" / f"{pid}.json").read_text())


def test_the_inode_table_shrinks_back_after_a_walk_and_every_file_still_reads(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    want: dict[str, bytes] = {}
    for d in range(FOLDERS):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(PER_FOLDER):
            data = os.urandom(64) + f"{d}/{f}".encode()
            (src / f"d{d}" / f"f{f:02d}").write_bytes(data)
            want[f"d{d}/f{f:02d}"] = data
    home = tmp_path / "home"
    link = publish(home, src)["read_link"]
    (tmp_path / "mnt").mkdir()
    res = peerdrive(home, "mount", link, str(tmp_path / "mnt"), "--max-inodes", "3",
                    check=False)
    assert res.returncode == 2 and "--max-inodes" in res.stderr, res.stderr
    with mounted(home, link, tmp_path / "mnt", "--max-inodes", str(BOUND)) as mnt:
        pid = mount_pid(home, mnt)
        assert pid is not None
        seen = {str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file()}
        assert seen == set(want)
        # the kernel's FORGETs come after our invalidations: a bounded wait
        deadline = time.monotonic() + 60
        while True:
            inodes = snapshot(home, pid).get("inodes", {})
            if inodes.get("held", 1 << 30) <= BOUND and inodes.get("forget_asked", 0) > 0:
                break
            assert time.monotonic() < deadline, f"the table stayed at {inodes}"
            time.sleep(0.2)
        for rel, data in want.items():
            assert (mnt / rel).read_bytes() == data
        assert {str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file()} == set(want)



def held_within(home: Path, pid: int, bound: int) -> dict:
    """The mount's inode figures, written after now, once the kernel's FORGETs brought it
    within `bound` (they come after our invalidations: a bounded wait only a stuck mount
    breaks; the snapshot is rewritten every second)."""
    since = time.time()
    deadline = time.monotonic() + 60
    while True:
        snap = snapshot(home, pid)
        inodes = snap.get("inodes", {})
        if snap["time"] > since and inodes.get("held", 1 << 30) <= bound and "made" in inodes:
            return inodes
        assert time.monotonic() < deadline, f"the table stayed at {inodes}"
        time.sleep(0.2)


def test_a_second_walk_past_the_bound_finds_the_folders_it_listed_first_in_the_kernel(
        tmp_path: Path) -> None:
    """A walk over more names than `--max-inodes` keeps the folders it listed first; a
    second walk finds them in the kernel and makes inodes only for the rest (issue 17).
    Evicting the oldest names first made every walk drop each folder just before the
    next walk came back to it: every inode of the drive was made again, every folder
    listed and decoded again, on every warm `find`."""
    folders, per_folder, bound = 32, 40, 512
    src = tmp_path / "src"
    for d in range(folders):
        (src / f"d{d:02d}").mkdir(parents=True)
        for f in range(per_folder):
            (src / f"d{d:02d}" / f"f{f:02d}").write_bytes(os.urandom(64))
    total = folders * (per_folder + 1)
    home = tmp_path / "home"
    link = publish(home, src)["read_link"]

    def walk(mnt: Path) -> int:
        return sum(len(files) for _, _, files in os.walk(mnt))

    with mounted(home, link, tmp_path / "mnt", "--max-inodes", str(bound)) as mnt:
        pid = mount_pid(home, mnt)
        assert pid is not None
        for _ in range(3):
            assert walk(mnt) == folders * per_folder
            first = held_within(home, pid, bound)
            assert first["made"] >= total and first["forget_asked"] > 0
            assert walk(mnt) == folders * per_folder
            second = held_within(home, pid, bound)
            # in a tree of flat folders the kernel forgets just what the mount asks: more
            # means something else emptied its caches meanwhile (another test's or a
            # benchmark's drop_caches forgets every name on the machine): walk again
            if (second["forgotten"] - first["forgotten"]
                    <= second["forget_asked"] - first["forget_asked"]):
                break
        # what the kernel kept (about half the bound) was not made again (before: all of it)
        assert second["made"] - first["made"] <= total - bound // 4, (first, second)


def test_folder_copies_come_from_what_the_peers_announce(tmp_path: Path) -> None:
    """A folder's `copies` counts the devices that said they keep it whole (Whole frames):
    the publisher's serve (the whole version), a reader's complete pins; an unpin takes
    it back. The serve counts a reader that keeps the whole version (`status --json`)."""
    src = tmp_path / "src"
    for folder, count in (("a", 3), ("b", 2)):
        (src / folder).mkdir(parents=True)
        for i in range(count):
            (src / folder / f"f{i}").write_bytes(os.urandom(2048))
    pub, home_a, home_b = (tmp_path / n for n in ("pub", "ra", "rb"))
    for h in (home_a, home_b):
        h.mkdir()
    out = publish(pub, src)
    link = out["read_link"]

    def served_copies() -> int:
        data = json.loads(peerdrive(pub, "status", "--json").stdout)
        return next(d for d in data["drives"] if d["drive"] == out["drive"])["copies"]

    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        flags = ("--bootstrap", seeder.addr, "--fetch-timeout", "30")
        a = nodes.mount(home_a, link, tmp_path / "mnt-a", *flags).path
        b = nodes.mount(home_b, link, tmp_path / "mnt-b", *flags).path
        # the publisher keeps the whole version: one copy of every folder, none here
        assert (xattr(b, "copies"), xattr(b / "a", "copies")) == ("1", "1")
        peerdrive(home_a, "pin", str(a / "a"))
        assert poll(lambda: xattr(b / "a", "copies") == "2", timeout=60), nodes.diagnostics()
        assert (xattr(b, "copies"), xattr(b / "b", "copies")) == ("1", "1")
        assert xattr(a / "a", "copies") == "2"  # the publisher and this device
        assert served_copies() == 1  # itself: the reader keeps only a folder
        peerdrive(home_a, "pin", str(a))
        assert poll(lambda: xattr(b / "b", "copies") == "2", timeout=60), nodes.diagnostics()
        assert poll(lambda: served_copies() == 2, timeout=60)
        peerdrive(home_a, "unpin", str(a))
        assert poll(lambda: xattr(b / "b", "copies") == "1", timeout=60)
        assert xattr(b / "a", "copies") == "2"  # still pinned on its own
