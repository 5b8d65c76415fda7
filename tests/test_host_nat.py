"""A publisher behind NAT pushes its drive to a host; a reader behind another NAT reads it
from the host after the publisher is gone (issue 10).

The lab (tests/netns_helpers.py): the host sits on the shared bridge; the
publisher and the reader each sit behind a NAT router of their own (nftables
masquerade), so they can reach the bridge and nothing there can reach them.
The host is given only the store link. The publisher runs `serve --push
HOST`: the host can never dial it, so every block it gets comes over the
publisher's own outbound connection. `publish --wait-copies 1` returns once
the host holds the new version whole; the publisher goes offline; a fresh
reader that knows only the host reads every byte.

`hosted_behind_nat` builds that scene and hands it back, so a test can go on
from it (the host down too, a reader from a mirror, ...).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns_helpers import Host, Lab, Served, _run
from tests.nginx_helpers import Nginx

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.timeout(300)]

MIRROR_PORT = 8080


def write_tree(src: Path, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    files = {"film.bin": rng.randbytes(9 * 1024 * 1024 + 3),
             "notes/a.txt": b"pushed from behind NAT\n" * 100,
             "notes/b.bin": rng.randbytes(600_000)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def hosting(served: Served, drive: str, after: float) -> dict:
    snap = served.snapshot(after)
    return next((s for s in snap.get("hosting", ()) if s["drive"] == drive), {})


@dataclass
class HostedScene:
    """What `hosted_behind_nat` leaves running: the host serving, the publisher stopped."""

    lab: Lab
    host: Host  # on the bridge
    host_served: Served
    publisher: Host  # behind NAT A, offline now
    reader: Host  # behind NAT B, nothing started yet
    link: str  # the read link
    drive: str
    seq: int
    digests: dict[str, str]  # relative path -> SHA-256 of the newest version


def hosted_behind_nat(lab: Lab, src: Path) -> HostedScene:
    host = lab.hosts[0]
    publisher = lab.add_nat_host()
    reader = lab.add_nat_host()
    # NAT holds: nothing on the bridge can reach the publisher
    assert _run(host.argv("ping", "-c", "1", "-W", "1", publisher.address),
                check=False).returncode != 0

    write_tree(src, 1)
    v1 = publisher.publish(src)
    store_link = json.loads(publisher.peerdrive("share", v1["read_link"], "--store",
                                                "--json").stdout)["link"]
    host_served = host.serve("--no-lan")
    host.peerdrive("host", store_link, "--no-wait")
    pub_served = publisher.serve("--no-lan", "--bootstrap", host.endpoint,
                                 "--push", host.endpoint)

    # a second version, and the publisher waits until the host holds it whole
    digests = write_tree(src, 2)
    started = time.monotonic()
    v2 = json.loads(publisher.peerdrive("publish", str(src), "--wait-copies", "1",
                                        "--wait-timeout", "150", "--json", timeout=200).stdout)
    assert v2["seq"] == 2 and v2["copies"] >= 1
    waited = time.monotonic() - started

    state = hosting(host_served, v1["drive"], time.time())
    assert state["state"] == "complete" and state["hosted_seq"] == 2, state
    assert state["refused_blocks"] == 0
    # every block came over the publisher's own connection: the host cannot dial it
    snap = host_served.snapshot(time.time())
    peers = snap["drives"][v1["drive"]]["peers"]
    pub_id = pub_served.info["node_id"]
    got = {p["node_id"]: p["blocks"] for p in peers}
    assert got.get(pub_id, 0) > 0, peers
    assert snap["server"]["pushes_accepted"] >= 1
    pushes = pub_served.snapshot(time.time())["pushes"]
    assert [p["connected"] for p in pushes] == [True], pushes

    # the publisher goes offline
    _run(["kill", str(pub_served.pid)])
    pub_served.proc.wait(timeout=30)
    print(json.dumps({"wait_copies_seconds": round(waited, 2),
                      "blocks_from_publisher": got[pub_id]}))
    return HostedScene(lab, host, host_served, publisher, reader, v1["read_link"],
                       v1["drive"], v2["seq"], digests)


def test_a_reader_behind_nat_reads_from_the_host_a_publisher_behind_nat_pushed_to(
        nat_labs_possible: None, tmp_path: Path) -> None:
    with Lab(tmp_path / "lab", 1) as lab:
        scene = hosted_behind_nat(lab, tmp_path / "src")
        mnt = scene.reader.mount(scene.link, tmp_path / "mnt", "--no-lan",
                                 "--bootstrap", scene.host.endpoint, "--fetch-timeout", "30")
        for rel, digest in scene.digests.items():
            assert mnt.read(rel)["sha256"] == digest, f"{rel}: wrong bytes"
        served = scene.host_served.snapshot(time.time())["server"]["blocks_served"]
        assert served > 0


def test_with_the_host_down_too_the_reader_behind_nat_reads_on_from_a_mirror(
        nat_labs_possible: None, tmp_path: Path) -> None:
    """The issue's whole chain in one mount: the publisher behind NAT A pushed to the host
    and is gone; the reader behind NAT B reads from the host; the host goes down as well
    and the same mount reads every other file from nginx serving a mirror directory (on
    the bridge, where the host was), every byte the publisher's."""
    with Lab(tmp_path / "lab", 1) as lab:
        scene = hosted_behind_nat(lab, tmp_path / "src")
        www = tmp_path / "www"
        scene.publisher.peerdrive("mirror", scene.link, str(www / "drive"))
        nginx = Nginx(www, tmp_path / "nginx", host=scene.host.address, port=MIRROR_PORT,
                      argv_prefix=scene.host.argv(), wait_port=False)
        nginx.start()
        try:
            assert nginx.proc is not None
            lab.track(nginx.proc.pid)
            url = f"http://{scene.host.address}:{MIRROR_PORT}/drive"
            mnt = scene.reader.mount(scene.link, tmp_path / "mnt", "--no-lan",
                                     "--bootstrap", scene.host.endpoint,
                                     "--fetch-timeout", "30", "--mirror", url)
            first, *rest = sorted(scene.digests)
            assert mnt.read(first)["sha256"] == scene.digests[first]
            served = scene.host_served.snapshot(time.time())["server"]["blocks_served"]
            assert served > 0  # the host served the reader

            _run(["kill", str(scene.host_served.pid)])  # the host goes down too
            scene.host_served.proc.wait(timeout=30)
            before = mirror_blocks(mnt.snapshot(time.time()), url)
            for rel in rest:
                assert mnt.read(rel)["sha256"] == scene.digests[rel], f"{rel}: wrong bytes"
            assert mirror_blocks(mnt.snapshot(time.time()), url) > before
        finally:
            nginx.stop()


def mirror_blocks(snap: dict, url: str) -> int:
    """Blocks the mount fetched from the mirror at `url` (its status snapshot)."""
    return sum(m["blocks"] for d in snap["drives"].values() for m in d.get("mirrors", [])
               if m["url"] == url)
