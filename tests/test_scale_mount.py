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

