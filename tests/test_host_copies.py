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

from tests.helpers import peerdrive
from tests.nginx_helpers import Nginx, free_port
from tests.swarm_helpers import Swarm, wait_until
from tests.test_host import drive_status, hosting_state, make_source, store_link

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
