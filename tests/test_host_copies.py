"""`copies` of a hosted drive counts every holder of the whole version, as real processes.

Issue 10 item 4: `copies` (`status --json` per drive, and the xattr of a
folder) counts the hosts and mirrors that hold the whole version, and this
device when it does. A host that knows nobody but the publisher pushing to it
(the publisher behind NAT cannot be dialled) counted 0 others: the Whole
frame the publisher sent over the push connection was not looked at, and no
mirror was ever counted for a drive or a folder. Here a publisher pushes to a
host and names a mirror (nginx on loopback) in its head (the pushes come from `push = [...]` in
its config.toml, one target unreachable): the host counts
itself, the publisher and the mirror; once the publisher is gone, a reader's
mount counts the host and the mirror for the drive's root folder. And a
mount pushes as `serve` does (`mount --push`), which no test ran before.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cache.store import BlockStore
from tests.helpers import peerdrive
from tests.nginx_helpers import Nginx, free_port
from tests.swarm_helpers import Swarm, wait_until
from tests.test_host import drive_status, hosting_state, make_source, store_link
from vfs.capability import StoreCap, parse_link
from vfs.home import Home
from vfs.host_list import host_pin, hosted_versions

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse for the reader's mount")

COUNTED = ("seq", "hosted", "complete", "copies", "copies_checked")


def test_a_hosted_drive_counts_the_publisher_pushing_to_it_and_the_mirror(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src, 11)
    www = tmp_path / "www"
    www.mkdir()
    P, H, R = tmp_path / "P", tmp_path / "H", tmp_path / "R"
    with Nginx(www, tmp_path / "nginx", port=free_port()) as nginx, \
            Swarm(tmp_path / "swarm") as sw:
        url = f"{nginx.url}/m"
        pub = json.loads(peerdrive(P, "publish", str(src), "--mirror-url", url,
                                   "--json").stdout)
        peerdrive(P, "mirror", pub["read_link"], str(www / "m"), "--json")
        host = sw.serve("host", H)  # knows nobody: only the push reaches it
        peerdrive(H, "host", store_link(P, pub["read_link"]), "--no-wait")
        # `push = [...]` in config.toml, as `--push` twice: a target nobody listens on
        # beside the host does not hold the host's push back
        nobody = f"127.0.0.1:{free_port()}"
        (P / "config.toml").write_text(f'push = ["{nobody}", "{host.addr}"]\n')
        publisher = sw.serve("publisher", P)

        def complete() -> bool:
            state = hosting_state(host, pub["drive"])
            return state is not None and state["state"] == "complete"

        assert wait_until(complete, 90), (hosting_state(host, pub["drive"]), sw.diagnostics())
        pushes = {p["target"]: p for p in publisher.snapshot(after=time.time())["pushes"]}
        assert pushes.keys() == {nobody, host.addr}, pushes
        assert pushes[host.addr]["node_id"] == host.node_id and pushes[nobody]["failures"] >= 1
        # the host itself, the publisher (over its push connection) and the mirror
        seen: dict[str, dict] = {}

        def counted(name: str, home: Path) -> bool:
            st = drive_status(home, pub["drive"])
            seen[name] = {k: st[k] for k in COUNTED}
            return st["copies_checked"] and st["copies"] == 3

        assert wait_until(lambda: counted("host", H), 60, interval=0.5), seen
        assert seen["host"] == {"seq": 1, "hosted": True, "complete": True, "copies": 3,
                                "copies_checked": True}
        # the publisher counts the same three: itself, the host it pushes to, the mirror
        assert wait_until(lambda: counted("publisher", P), 60, interval=0.5), seen

        publisher.stop()
        reader = sw.mount("reader", R, pub["read_link"], tmp_path / "mnt",
                          bootstrap=[host.addr], fetch_timeout=30)
        # the root folder: kept whole by the host (its Whole frame) and the mirror (its head)
        # and not by this reader, which has read nothing
        copies = os.getxattr(reader.mountpoint, "user.peerdrive.copies")
        assert copies == b"2", (copies, reader.log_tail())
        sw.unmount(reader)


def test_a_mount_pushes_to_a_host_with_push(tmp_path: Path) -> None:
    """`mount --push` (issue 10 item 2: any node with `serve` or `mount`): the publisher's
    node, with no serve running, mounts its drive and pushes to a host that knows nobody;
    the host completes the version over that connection alone."""
    src = tmp_path / "src"
    make_source(src, 12)
    P, H = tmp_path / "P", tmp_path / "H"
    with Swarm(tmp_path / "swarm") as sw:
        pub = json.loads(peerdrive(P, "publish", str(src), "--json").stdout)
        host = sw.serve("host", H)  # knows nobody: only the push reaches it
        peerdrive(H, "host", store_link(P, pub["read_link"]), "--no-wait")
        mount = sw.mount("publisher's mount", P, pub["read_link"], tmp_path / "mnt",
                         extra=["--push", host.addr])

        def complete() -> bool:
            state = hosting_state(host, pub["drive"])
            return state is not None and state["state"] == "complete"

        assert wait_until(complete, 90), (hosting_state(host, pub["drive"]), sw.diagnostics())
        state = hosting_state(host, pub["drive"])
        peers = host.snapshot(after=time.time())["drives"][pub["drive"]]["peers"]
        assert {p["node_id"] for p in peers if p["blocks"]} == {mount.node_id}, peers
        assert sum(p["blocks"] for p in peers) >= state["blocks_total"]
        pushes = mount.snapshot(after=time.time())["pushes"]
        assert [(p["target"], p["connected"]) for p in pushes] == [(host.addr, True)], pushes
        sw.unmount(mount)


def test_host_keep_versions_keeps_the_newest_two_complete_versions(tmp_path: Path) -> None:
    """`host LINK --keep-versions 2` as a user runs it: versions 1 and 2 kept, then 2 and 3
    once 3 is whole, and nothing of version 1 but what versions 2 and 3 share stays in the
    host's store (no test ran the flag through the command line and a serve)."""
    src = tmp_path / "src"
    make_source(src, 13)
    P, H = tmp_path / "P", tmp_path / "H"
    with Swarm(tmp_path / "swarm") as sw:
        v1 = json.loads(peerdrive(P, "publish", str(src), "--json").stdout)
        publisher = sw.serve("publisher", P)
        sw.serve("host", H, bootstrap=[publisher.addr])
        link = store_link(P, v1["read_link"])
        out = peerdrive(H, "host", link, "--keep-versions", "2", "--json",
                        "--stall-timeout", "60", check=False)
        assert out.returncode == 0, out.stderr + sw.diagnostics()
        assert json.loads(out.stdout)["keep_versions"] == 2

        def listed() -> dict:
            return json.loads(peerdrive(H, "host", "--list", "--json").stdout)["hosts"][0]

        only_v1 = src / "plain-name-13-alpha.bin"
        counts: dict[int, dict] = {}
        for seq in (2, 3):
            if seq == 3:
                only_v1.unlink()  # its blocks are in versions 1 and 2 only
            (src / f"new-{seq}.bin").write_bytes(os.urandom(100 * 1024))
            assert json.loads(peerdrive(P, "publish", str(src), "--json").stdout)["seq"] == seq
            assert wait_until(lambda s=seq: (listed()["state"], listed()["hosted_versions"][-1])
                              == ("complete", s), 60), (listed(), sw.diagnostics())
            assert listed()["hosted_versions"] == [seq - 1, seq]
            counts[seq] = drive_status(H, v1["drive"])
        assert counts[3]["complete"] and counts[3]["missing_blocks"] == 0
        # version 1 released: the host's store holds versions 2 and 3 and nothing else
        cap = StoreCap(parse_link(link).pubkey)
        with BlockStore(Home(H).store_path) as store:
            assert hosted_versions(store, cap.pubkey) == [2, 3]
            kept = set(store.pin_ids(host_pin(cap.pubkey, 2))) | set(
                store.pin_ids(host_pin(cap.pubkey, 3)))
            assert store.count == len(kept) and store.missing(list(kept)) == []
