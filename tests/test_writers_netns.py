"""Two writers of one drive on two hosts, cut apart, both publish, rejoin: nothing lost.

Host A publishes a folder; host B publishes its copy into the same drive
(`publish --into` the write link): version 2 (a fork of version 1 joined,
if B had not seen it yet). Both run `serve`. Then the bridge port of
A goes down (a partition), and each publishes changes: the same file changed
on both sides, different files changed, a file added on each, one removed.
Both sign version 3. When the port comes back up, the writer whose version 3
lost the tie (heads of one seq are ordered by their bytes, never by a clock)
finds it missing from the drive's history and rebases it onto the winner as
version 4 (`vfs/writers.py`). The test reads version 4 through a real
`peerdrive mount` on A: every change of both sides is there, the file both
changed is there twice (the loser's copy as `NAME (conflict DEVICE DATE).EXT`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns_helpers import PYTHON, Host, Lab

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.timeout(300)]

LIST_TREE = ("import json, os, sys; r = sys.argv[1]; print(json.dumps({os.path.relpath("
             "os.path.join(d, f), r): open(os.path.join(d, f)).read() for d, _, fs in "
             "os.walk(r) for f in fs}))")


def stored_seq(host: Host, drive: str) -> int | None:
    out = json.loads(host.peerdrive("status", "--json").stdout)
    return next((d["seq"] for d in out["drives"] if d["drive"] == drive), None)


def wait_for(what: str, check, timeout: float, host: Host) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s\n{host.lab.hosts[0].logs()}\n"
                                 f"{host.lab.hosts[1].logs()}")
        time.sleep(1.0)


def test_partitioned_writers_both_keep_their_changes(labs_possible, tmp_path: Path) -> None:
    with Lab(tmp_path, 2) as lab:
        a, b = lab.hosts
        src_a, src_b = tmp_path / "a-src", tmp_path / "b-src"
        src_a.mkdir()
        for name in ("same.txt", "both.txt", "a-edits.txt", "b-edits.txt", "b-removes.txt"):
            (src_a / name).write_text(f"{name} as it was\n")
        first = a.publish(src_a)
        drive, link = first["drive"], first["read_link"]
        write_link = a.peerdrive("share", str(src_a), "--write").stdout.strip()
        a.serve()
        b.serve("--bootstrap", a.endpoint)
        # B's copy of the folder joins the drive: merged onto version 1 if B's serve already
        # holds it, else a version 1 of its own, a fork of A's that serve joins as version 2;
        # no conflict either way (the same files, only their mtimes differ)
        shutil.copytree(src_a, src_b)
        joined = json.loads(b.peerdrive("publish", str(src_b), "--into", write_link,
                                        "--json").stdout)
        assert joined["seq"] in (1, 2) and joined["conflicts"] == []
        wait_for("both writers on version 2",
                 lambda: stored_seq(a, drive) == 2 and stored_seq(b, drive) == 2, 120, a)

        # the partition: A's port on the bridge goes down
        subprocess.run(["ip", "-n", lab.bridge_ns, "link", "set", "p1", "down"], check=True)
        (src_a / "both.txt").write_text("A's edit\n")
        (src_a / "a-edits.txt").write_text("A's edit\n")
        (src_a / "a-new.txt").write_text("new on A\n")
        (src_b / "both.txt").write_text("B's edit\n")
        (src_b / "b-edits.txt").write_text("B's edit\n")
        (src_b / "b-new.txt").write_text("new on B\n")
        (src_b / "b-removes.txt").unlink()
        assert a.publish(src_a)["seq"] == 3
        assert b.publish(src_b)["seq"] == 3
        subprocess.run(["ip", "-n", lab.bridge_ns, "link", "set", "p1", "up"], check=True)

        wait_for("both writers on version 4",
                 lambda: stored_seq(a, drive) == 4 and stored_seq(b, drive) == 4, 150, a)
        mount = a.mount(link, tmp_path / "mnt", "--listen", f"{a.address}:4101")  # serve: 4100
        tree = json.loads(mount.run(PYTHON, "-c", LIST_TREE, str(mount.path)).stdout)
        conflict = [n for n in tree if n.startswith("both (conflict ")]
        assert len(conflict) == 1, tree
        assert re.fullmatch(r"both \(conflict [0-9a-f]{8} \d{4}-\d\d-\d\d\)\.txt", conflict[0])
        assert {tree["both.txt"], tree[conflict[0]]} == {"A's edit\n", "B's edit\n"}
        assert tree["a-edits.txt"] == "A's edit\n" and tree["b-edits.txt"] == "B's edit\n"
        assert tree["a-new.txt"] == "new on A\n" and tree["b-new.txt"] == "new on B\n"
        assert tree["same.txt"] == "same.txt as it was\n"
        assert "b-removes.txt" not in tree
        assert len(tree) == 7, tree
        log = json.loads(a.peerdrive("log", link, "--json", "--no-lan").stdout)["versions"]
        assert [v["seq"] for v in log] == [4, 3, 2, 1]
        assert all(v["changes"]["counts"]["added"] + v["changes"]["counts"]["modified"] > 0
                   for v in log[:2])
