"""The defaults a new user runs with: no --listen anywhere, LAN discovery on, no --bootstrap.

`peerdrive serve` then listens on 0.0.0.0:4100 and `peerdrive mount` on
0.0.0.0 with a port the kernel picks; readers find the publisher by LAN
multicast alone. Every host is a network namespace of its own on a private
bridge (tests/netns_helpers.py), so the default port cannot collide with
anything else on the machine or with a parallel run, and nothing leaves the
lab; the one connection made to the default port is to 127.0.0.1 inside the
publisher's namespace.

What a user meets first, and what the suite once missed: one long-lived
publisher, two readers one after another, then four readers at once, every
byte checked.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, write_random
from tests.netns_helpers import Host, Lab, LabError, Mount

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.timeout(900)]

DEFAULT_PORT = 4100
FILES = {"movie.bin": 12 << 20, "docs/report.pdf": 3 << 20, "docs/notes.txt": 20_000}


def serve_with_defaults(host: Host) -> subprocess.Popen[bytes]:
    """`peerdrive serve --json`, nothing else: the default listen address, LAN on."""
    with open(host.home / "serve.log", "ab") as log:
        proc = subprocess.Popen(host.argv(PYTHON, "-m", "vfs.cli", "serve", "--json"),
                                env=host.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL)
    host.lab.track(proc.pid)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise LabError(f"serve on {host.name} exited: {host.logs()}")
    ready = json.loads(line)
    assert ready["port"] == DEFAULT_PORT, ready
    return proc


def mount_with_defaults(host: Host, link: str, mountpoint: Path) -> Mount:
    """`peerdrive mount LINK MNT`, nothing else: no --listen, no --bootstrap, LAN on."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    res = host.peerdrive("mount", link, str(mountpoint), "--json")
    mount = Mount(host, int(json.loads(res.stdout)["pid"]), mountpoint)
    host.lab.track(mount.pid)
    host.mounts.append(mount)
    assert mount.is_mounted(), host.logs()
    return mount


def unmount(host: Host, mount: Mount) -> None:
    mount.run("fusermount3", "-u", str(mount.path))
    deadline = time.monotonic() + 60
    while Path(f"/proc/{mount.pid}").exists():
        assert time.monotonic() < deadline, f"the mount on {host.name} did not end"
        time.sleep(0.1)
    host.mounts.remove(mount)


def read_everything(mount: Mount, want: dict[str, str]) -> None:
    for rel, digest in want.items():
        got = mount.read(rel)
        assert got["sha256"] == digest, f"{rel} on {mount.host.name}"


def test_defaults_two_readers_in_turn_then_four_at_once(labs_possible, tmp_path: Path) -> None:
    src = tmp_path / "src"
    want = {rel: write_random(src / rel, size, seed=i) for i, (rel, size) in
            enumerate(FILES.items())}
    with Lab(tmp_path / "lab", 6) as lab:
        publisher, *readers = lab.hosts
        link = publisher.publish(src)["read_link"]
        serve_with_defaults(publisher)
        # the wildcard listener answers on the publisher's own loopback at the default port
        publisher_probe = subprocess.run(publisher.argv(
            PYTHON, "-c", "import socket; socket.create_connection(('127.0.0.1', "
            f"{DEFAULT_PORT}), timeout=10).close()"), capture_output=True, text=True)
        assert publisher_probe.returncode == 0, publisher_probe.stderr

        # two readers, one after the other, of the one long-lived publisher
        for host in readers[:2]:
            mount = mount_with_defaults(host, link, tmp_path / f"mnt-{host.name}-first")
            read_everything(mount, want)
            unmount(host, mount)

        # then four readers at once (the second of the first two again, with what it holds)
        mounts = [mount_with_defaults(h, link, tmp_path / f"mnt-{h.name}") for h in readers[1:]]
        errors: list[BaseException] = []

        def reader(m: Mount) -> None:
            try:
                read_everything(m, want)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(m,)) for m in mounts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a reader hung"
        assert errors == [], errors[0]
        for m in mounts:
            unmount(m.host, m)
