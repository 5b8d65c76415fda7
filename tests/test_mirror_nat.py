"""A reader behind NAT, no peer and no DHT anywhere, reads a drive from an HTTP mirror.

The lab (tests/netns_helpers.py): one host on the shared bridge runs nginx
serving a directory `peerdrive mirror` wrote; the reader sits behind a NAT
router of its own (nftables masquerade), so it can reach the bridge and
nothing there can reach it. Every device that held the drive is gone; the
mirror alone serves it. A mirror whose files were corrupted gives EIO or
correct bytes, never wrong ones.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from dht.mirror_layout import BLOCKS_DIR
from tests.helpers import PYTHON, peerdrive
from tests.netns_helpers import Lab, LabError, _run
from tests.nginx_helpers import Nginx

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.timeout(300)]

PORT = 8080


def write_tree(src: Path) -> dict[str, str]:
    rng = random.Random(11)
    (src / "photos").mkdir(parents=True)
    files = {"video.bin": rng.randbytes(12 * 1024 * 1024 + 5),
             "photos/a.jpg": rng.randbytes(700_000), "photos/b.txt": b"behind NAT\n" * 50}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def wait_reachable(host, address: str, port: int) -> None:
    code = ("import socket,sys,time\n"
            "t=time.monotonic()+20\n"
            "while True:\n"
            " try: socket.create_connection((sys.argv[1],int(sys.argv[2])),1).close(); break\n"
            " except OSError:\n"
            "  if time.monotonic()>t: sys.exit('unreachable')\n"
            "  time.sleep(0.1)\n")
    _run(host.argv(PYTHON, "-c", code, address, str(port)), timeout=30)


def test_reader_behind_nat_reads_everything_from_a_mirror_in_the_lab(
        nat_labs_possible: None, tmp_path: Path) -> None:
    src = tmp_path / "src"
    digests = write_tree(src)
    home = tmp_path / "home-publisher"
    home.mkdir()
    www = tmp_path / "www"
    with Lab(tmp_path / "lab", 1) as lab:
        server = lab.hosts[0]
        reader = lab.add_nat_host()
        url = f"http://{server.address}:{PORT}"
        info = json.loads(peerdrive(home, "publish", str(src), "--json", "--mirror-url",
                                    f"{url}/drive").stdout)
        link = info["read_link"]
        peerdrive(home, "mirror", link, str(www / "drive"))
        # the same mirror with damaged files: corrupt, truncated, deleted
        shutil.copytree(www / "drive", www / "damaged")
        big = sorted(p for p in (www / "damaged" / BLOCKS_DIR).rglob("*")
                     if p.is_file() and p.stat().st_size >= 64 * 1024)
        for i, p in enumerate(random.Random(2).sample(big, 6)):
            data = p.read_bytes()
            if i % 3 == 0:
                p.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
            elif i % 3 == 1:
                p.write_bytes(data[:-1])
            else:
                p.unlink()

        nginx = Nginx(www, tmp_path / "nginx", host=server.address, port=PORT,
                      argv_prefix=server.argv(), wait_port=False)
        nginx.start()
        try:
            assert nginx.proc is not None
            lab.track(nginx.proc.pid)
            wait_reachable(reader, server.address, PORT)  # through the NAT
            # and the bridge cannot open a connection to the reader
            probe = _run(server.argv("ping", "-c", "1", "-W", "1", reader.address), check=False)
            assert probe.returncode != 0

            # no bootstrap, no LAN: no peer, no DHT; the head and every block from the mirror
            mnt = reader.mount(link, tmp_path / "mnt", "--no-lan", "--mirror", f"{url}/drive")
            for rel, digest in digests.items():
                assert mnt.read(rel)["sha256"] == digest, f"{rel}: wrong bytes"

            # the good mirror goes away (its URL, named in the head, now answers 404); a
            # second fresh reader, behind a NAT of its own, has only the damaged one
            (www / "drive").rename(www / "gone")
            other = lab.add_nat_host()
            wait_reachable(other, server.address, PORT)
            bad = other.mount(link, tmp_path / "mnt-bad", "--no-lan", "--fetch-timeout", "3",
                               "--mirror", f"{url}/damaged")
            eio = 0
            for rel, digest in digests.items():
                try:
                    got = bad.read(rel, timeout=120)["sha256"]
                except LabError as exc:
                    assert "Input/output error" in str(exc), str(exc)
                    eio += 1
                else:
                    assert got == digest, f"{rel}: wrong bytes from a damaged mirror"
            assert eio >= 1
        finally:
            nginx.stop()
