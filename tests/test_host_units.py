"""Hosting without processes: what a host accepts, its hosts folder, push targets, release.

The process-level promises are in tests/test_host.py and tests/test_host_nat.py;
these pin down the pieces that decide them: a block the signed version does
not list (or lists with another size) is refused and counted; the hosts
folder's decoder takes only well-formed entries (hypothesis); a push target
is HOST:PORT or NODEID@HOST:PORT; releasing keeps the newest versions and
evicts only blocks no other pin holds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.store import BlockStore
from dht.fetch import Fetcher
from dht.identity import NodeIdentity
from dht.types import Priority
from tests.helpers import run_trio
from vfs.capability import StoreCap, WriteCap
from vfs.errors import PeerdriveError, UsageError
from vfs.host import HostedDrive
from vfs.host_list import (
    HostEntry,
    HostList,
    host_pending_pin,
    host_pin,
    hosted_versions,
    release_versions,
    version_presence,
)
from vfs.pushes import parse_push_target
from vfs.storage import DriveStorage

CAP = StoreCap(WriteCap.from_secrets(bytes(range(32)), bytes(range(32, 64))).pubkey)


class NoNetwork:
    async def lookup_head(self, cap):  # pragma: no cover - never awaited here
        return None


def block(n: int) -> tuple[bytes, bytes]:
    data = b"block %d " % n * 20
    return hashlib.sha256(data).digest(), data


def test_a_block_the_signed_version_does_not_list_is_refused_and_counted(
        tmp_path: Path) -> None:
    with BlockStore(tmp_path / "store") as store:
        hosted = HostedDrive(HostEntry(CAP), DriveStorage(store), NoNetwork())  # type: ignore
        good_id, good = block(1)
        hosted._wanted = {good_id: len(good)}
        assert hosted.accept(good_id, good)
        stranger_id, stranger = block(2)
        assert not hosted.accept(stranger_id, stranger)
        assert not hosted.accept(good_id, good + b"!")  # listed, but not with this size
        assert hosted.state.refused_blocks == 2
        assert hosted.state.as_json()["refused_blocks"] == 2  # what status shows


def test_releasing_keeps_the_newest_versions_and_what_other_pins_hold(tmp_path: Path) -> None:
    with BlockStore(tmp_path / "store") as store:
        shared, only_v1, only_v2, only_v3, mine = (block(i) for i in range(5))
        store.put_pinned(host_pin(CAP.pubkey, 1), [shared, only_v1])
        store.put_pinned(host_pin(CAP.pubkey, 2), [shared, only_v2])
        store.put_pinned(host_pin(CAP.pubkey, 3), [shared, only_v3])
        store.put_pinned("pin:someone-else", [only_v1])
        store.put_pinned(host_pending_pin(CAP.pubkey, 2), [mine])
        assert hosted_versions(store, CAP.pubkey) == [1, 2, 3]
        freed = release_versions(store, CAP.pubkey, 2, pending_below=3)
        assert hosted_versions(store, CAP.pubkey) == [2, 3]
        assert freed == len(mine[1])  # only_v1 is held by another pin
        assert store.missing([b[0] for b in (shared, only_v1, only_v2, only_v3)]) == []
        assert store.missing([mine[0]]) == [mine[0]]
        assert release_versions(store, CAP.pubkey, 0) > 0  # host --remove
        assert hosted_versions(store, CAP.pubkey) == []
        assert store.missing([shared[0]]) == [shared[0]]


def test_a_version_1_head_has_no_presence_to_count(tmp_path: Path) -> None:
    from tests.test_head import LIST, root_entry, signed_value, value_of
    from vfs.head import make_head, open_head

    writer = WriteCap.from_secrets(bytes(range(32)), bytes(range(32, 64)))
    v2 = make_head(writer, 1, root_entry(), LIST, created=1)
    value = {k: v for k, v in value_of(v2.wire).items() if k != "bl"}
    v1 = open_head(signed_value(writer, 1, {**value, "v": 1}), CAP)
    with BlockStore(tmp_path / "store") as store:
        assert version_presence(store, v1) == {"complete": None, "missing_blocks": None}
        # the list block itself is missing: everything it lists is unknown
        assert version_presence(store, open_head(v2.wire, CAP)) == {
            "complete": False, "missing_blocks": 1 + LIST.nblocks}


def test_the_hosts_folder_round_trips_and_keeps_only_the_store_capability(
        tmp_path: Path) -> None:
    hosts = HostList(tmp_path / "hosts")
    assert hosts.entries() == []
    assert hosts.add(HostEntry(CAP, 10 << 20, 2))
    assert not hosts.add(HostEntry(CAP, None, 1))  # changed limits, same drive
    assert hosts.entries() == [HostEntry(CAP, None, 1)]
    text = (tmp_path / "hosts" / f"{CAP.drive_id}.json").read_text()
    assert "peerdrive:s1:" in text and "r1" not in text and "w1" not in text
    with pytest.raises(UsageError):
        hosts.add(HostEntry(CAP, None, 0))
    assert hosts.remove(CAP) and not hosts.remove(CAP)
    # a malformed file is skipped, not fatal
    (tmp_path / "hosts" / "junk.json").write_text("{not json")
    assert hosts.entries() == []


@settings(max_examples=300)
@given(st.one_of(
    st.dictionaries(st.sampled_from(["link", "quota", "keep_versions", "x"]),
                    st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 70),
                              st.text(max_size=80), st.just(CAP.link())), max_size=4),
    st.lists(st.integers(), max_size=3), st.text(max_size=20), st.none()))
def test_host_entries_decode_only_when_well_formed(data: object) -> None:
    try:
        entry = HostEntry.from_json(json.loads(json.dumps(data)), Path("x.json"))
    except PeerdriveError:
        return
    assert entry.cap == CAP
    assert entry.quota is None or entry.quota >= 0
    assert 1 <= entry.keep_versions <= 1000


def test_push_targets() -> None:
    t = parse_push_target("nas.example.org:4200")
    assert (t.host, t.port, t.node_id) == ("nas.example.org", 4200, None)
    assert parse_push_target("10.0.0.5").port == 4100
    pinned = parse_push_target("ab" * 32 + "@10.0.0.5:4100")
    assert pinned.node_id == bytes.fromhex("ab" * 32) and pinned.host == "10.0.0.5"
    for bad in ("zz@h:1", "ab@h:1", "h:port", "h:70000", ":4100"):
        with pytest.raises(UsageError):
            parse_push_target(bad)


class Mirror:
    """A static source (as an HTTP mirror) holding some blocks: what a host fetches from."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.source_id = hashlib.sha256(b"mirror").digest()
        self.label = "mirror"
        self.closed = False
        self.blocks = blocks

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        return self.blocks[block_id]

    async def have(self, block_ids) -> list[bool]:
        return [b in self.blocks for b in block_ids]

    async def ping(self) -> float:
        return 0.01

    async def aclose(self) -> None:
        self.closed = True


def test_blocks_a_host_stored_are_no_longer_held_by_its_fetcher(tmp_path: Path) -> None:
    """The fetcher keeps delivered blocks for other readers only until the store has them
    (`Fetcher.stored`); a host never said so, and a long-running one held its fetcher's
    16 MiB of them for good (tests/test_uptime.py: +1.2 MB of anonymous memory a version)."""
    blocks = dict(block(n) for n in range(40))

    async def test(nursery: trio.Nursery) -> None:
        with BlockStore(tmp_path / "store") as store:
            hosted = HostedDrive(HostEntry(CAP), DriveStorage(store), NoNetwork())  # type: ignore
            fetcher = Fetcher(NodeIdentity.generate(), CAP.discovery_key, CAP.pubkey, list)
            await nursery.start(fetcher.run)
            fetcher.set_sources([Mirror(blocks)])
            hosted._wanted = {i: len(d) for i, d in blocks.items()}
            pending = host_pending_pin(CAP.pubkey, 2)
            await hosted._fetch_missing(list(blocks), fetcher, pending)
            assert not store.missing(list(blocks))  # all stored, under the pending pin
            held = [i for i in blocks if await fetcher.in_flight_block(i, timeout=0)]
            assert held == []

    run_trio(test)
