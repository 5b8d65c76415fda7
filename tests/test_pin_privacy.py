"""No path in clear on disk: pin names and the mount log (issue 11 item 7).

The attack: someone who copies a reader's PEERDRIVE_HOME (a backup, a stolen
disk, another account that can read it) looks for what the user keeps
offline. Before, every pin was named `pin:<drive>:/<path>` in data.mdb, and
an incomplete pin logged its path. Now pins are named by an HMAC of the path
under a key derived from the read key, the path is sealed beside it, and
the log says only which pin (by tag) failed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import peerdrive, publish
from tests.pin_helpers import Nodes, open_store, xattr
from vfs.capability import parse_link
from vfs.pins import pin_name
from vfs.storage import publish_pin

pytestmark = pytest.mark.fuse

# names that must never appear in clear on the reader's disk
KEPT = "Zorglub-medical-records"
KEPT_FILE = "diagnosis-xyzzy-2026.pdf"
MISSING = "Quuxly-tax-returns"
SECRET_NAMES = [KEPT, KEPT_FILE, MISSING]


def _spellings(name: str) -> list[bytes]:
    raw = name.encode()
    return [raw, raw.lower(), raw.replace(b"-", b"%2D"), name.encode("utf-16-le")]


def scan(home: Path) -> list[str]:
    """Every secret name found anywhere in the reader's store files and logs."""
    found = []
    files = [p for p in (home / "store").rglob("*") if p.is_file()]
    files += [p for p in (home / "logs").rglob("*") if p.is_file()]
    for f in files:
        data = f.read_bytes()
        for name in SECRET_NAMES:
            if any(s in data for s in _spellings(name)):
                found.append(f"{name} in {f.relative_to(home)}")
    return found


def test_pinned_paths_are_not_in_the_store_or_the_log(tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    (src / KEPT).mkdir(parents=True)
    (src / KEPT / KEPT_FILE).write_bytes(b"x-ray " * 50_000)
    (src / MISSING).mkdir()
    (src / MISSING / "2025.pdf").write_bytes(b"taxes " * 50_000)
    pub = node_home("pub")
    link = publish(pub, src)["read_link"]
    reader = node_home("reader")
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr,
                        "--fetch-timeout", "3")
        peerdrive(reader, "pin", str(m.path / KEPT), timeout=120)
        assert xattr(m.path / KEPT / KEPT_FILE, "state") == "device"
        # the seeder goes: a second pin (its folder listed, its file never read) cannot
        # complete, and the mount logs that it failed
        assert [p.name for p in (m.path / MISSING).iterdir()] == ["2025.pdf"]
        seeder.stop()
        peerdrive(reader, "pin", "--no-wait", str(m.path / MISSING), timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "incomplete" not in m.log_tail(200):
            time.sleep(0.5)
        assert "incomplete" in m.log_tail(200), m.log_tail()
        with open_store(reader) as store:
            names = [n for n in store.pin_names() if n.startswith("pin:")]
        assert sorted(names) == sorted([pin_name(parse_link(link), [KEPT.encode()]),
                                        pin_name(parse_link(link), [MISSING.encode()])])
        assert xattr(m.path / KEPT, "pinned") == "1"  # the mount still knows its paths
        assert scan(reader) == []
        nodes.unmount(m)
    assert scan(reader) == []


def test_pins_named_by_path_are_renamed_on_mount(tmp_path: Path, node_home) -> None:
    """A store from before: its pin names hold paths. Mounting renames them; the paths
    stay pinned (the blocks a pin holds are moved to the new name, then recomputed)."""
    src = tmp_path / "src"
    (src / KEPT).mkdir(parents=True)
    (src / KEPT / KEPT_FILE).write_bytes(b"x-ray " * 50_000)
    home = node_home("pub")
    link = publish(home, src)["read_link"]
    cap = parse_link(link)
    with open_store(home) as store:
        ids = [i for i in store.pin_ids(publish_pin(cap.pubkey, 1))][:5]
        store.set_pin(f"pin:{cap.drive_id}:/{KEPT}", ids)  # the old naming
    with Nodes(tmp_path) as nodes:
        m = nodes.mount(home, link, tmp_path / "mnt")
        assert xattr(m.path / KEPT, "pinned") == "1"
        assert xattr(m.path / KEPT / KEPT_FILE, "pinned") == "1"
        with open_store(home) as store:
            names = [n for n in store.pin_names() if n.startswith("pin:")]
            assert names == [pin_name(cap, [KEPT.encode()])]
            assert store.pin_ids(names[0])  # it holds the blocks of the path (recomputed)
        nodes.unmount(m)
