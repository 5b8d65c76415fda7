"""The cache limit through a real mount (issue 4, cloud vs device).

A publisher serves a drive (`peerdrive serve`); a reader mounts it with
`--cache-size` and reads several times the limit through the kernel. The
store must stay within the limit (plus at most one block) the whole time,
reads must return the right bytes, pinned data must stay, and the cache
(total, pins, LRU order) must come back the same after an unmount, and after
a SIGKILL of the mount. Real processes on 127.0.0.1 only; nothing here
asserts on speed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import digest, peerdrive, publish, write_random
from tests.pin_helpers import (
    MiB,
    Nodes,
    drop_page_cache,
    open_store,
    poll,
    status,
    store_state,
    xattrs,
)
from vfs.capability import parse_link
from vfs.chunker import CDC_MAX
from vfs.pins import pin_name

pytestmark = pytest.mark.fuse

BLOCK_MAX = CDC_MAX + 16  # the largest block: a chunk's ciphertext carries a 16-byte GCM tag
LIMIT = 24 * MiB


def _read_all(paths: list[Path], out: dict[str, str], errors: list[BaseException]) -> None:
    try:
        for p in paths:
            out[p.name] = digest(p)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_eviction_keeps_the_store_within_the_limit_and_pins_whole(tmp_path: Path,
                                                                   node_home) -> None:
    src = tmp_path / "src"
    for i in range(6):  # 72 MiB: three times the limit
        write_random(src / "stream" / f"f{i}.bin", 12 * MiB, seed=i)
    write_random(src / "keep" / "k.bin", 3 * MiB, seed=100)
    (src / "keep" / "note.txt").write_bytes(b"keep me\n" * 100)
    expected = {p.name: digest(p) for p in (src / "stream").iterdir()}
    pub, reader = node_home("pub"), node_home("reader")
    link = publish(pub, src)["read_link"]
    keep_pin = pin_name(parse_link(link), [b"keep"])

    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        mnt = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr,
                          "--cache-size", "24M", "--fetch-timeout", "30").path
        pinned = peerdrive(reader, "pin", str(mnt / "keep"), "--json", timeout=120)
        assert '"state": "device"' in pinned.stdout, pinned.stdout

        samples: list[int] = []  # from `peerdrive status --json`
        fine_samples: list[int] = []  # from the store itself, every few milliseconds
        done = threading.Event()

        first_sample = threading.Event()

        def watch() -> None:
            while not done.is_set():
                samples.append(status(reader)["cache"]["used_bytes"])
                first_sample.set()

        def watch_closely() -> None:
            with open_store(reader) as store:
                while not done.is_set():
                    fine_samples.append(store.total_bytes)
                    time.sleep(0.005)

        got: dict[str, str] = {}
        errors: list[BaseException] = []
        files = sorted((mnt / "stream").iterdir())
        watchers = [threading.Thread(target=watch), threading.Thread(target=watch_closely)]
        readers = [threading.Thread(target=_read_all, args=(files[k::2], got, errors))
                   for k in range(2)]  # two readers at once, each through its own files
        for t in watchers:
            t.start()
        try:
            # the reads start once the status poller answered, so its next call
            # overlaps them however fast they are (a fixed count of samples
            # measured the machine's speed, not the cache)
            assert first_sample.wait(timeout=120), "status --json never answered"
            for t in readers:
                t.start()
            for t in readers:
                t.join(timeout=300)
        finally:
            done.set()
            for t in watchers:
                t.join(timeout=120)
        assert not errors, f"{errors!r}\n{nodes.diagnostics()}"
        assert got == expected, "bytes read through the mount differ from the source"

        final = status(reader)
        samples.append(final["cache"]["used_bytes"])
        print(json.dumps({"cache_limit": LIMIT, "status_samples": len(samples),
                          "store_samples": len(fine_samples), "max_used": max(samples),
                          "max_used_store": max(fine_samples), "final_used": samples[-1]}))
        assert final["cache"]["limit_bytes"] == LIMIT
        assert len(samples) >= 3, "the status poller never ran while reading"  # first, during, final
        assert max(samples) <= LIMIT + BLOCK_MAX, f"status saw {max(samples)} bytes"
        assert max(fine_samples) <= LIMIT + BLOCK_MAX, f"the store held {max(fine_samples)}"

        keep = xattrs(mnt / "keep")
        assert keep["state"] == "device" and keep["pinned"] == "1"
        assert keep["cached"] == keep["size"] == str(3 * MiB + 800)
        with open_store(reader) as store:
            progress = store.pin_progress(keep_pin)
            assert progress.complete, progress
            assert store.total_bytes <= LIMIT + BLOCK_MAX

        # what was evicted comes back over the network, still correct
        drop_page_cache(files[0])
        assert digest(files[0]) == expected[files[0].name]

        # the pinned folder needs no peer
        seeder.stop()
        assert digest(mnt / "keep" / "k.bin") == digest(src / "keep" / "k.bin")

    with open_store(reader) as store:
        assert store.check_consistency() == []
        assert store.total_bytes <= LIMIT + BLOCK_MAX


def test_total_pins_and_lru_order_survive_unmount_and_sigkill(tmp_path: Path,
                                                              node_home) -> None:
    src = tmp_path / "src"
    for name in "abcde":
        write_random(src / f"{name}.bin", 4 * MiB, seed=ord(name))
    write_random(src / "keep" / "k.bin", 2 * MiB, seed=7)
    pub, reader = node_home("pub"), node_home("reader")
    link = publish(pub, src)["read_link"]
    keep_pin = pin_name(parse_link(link), [b"keep"])
    mnt_path = tmp_path / "mnt"

    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        boot = ("--bootstrap", seeder.addr, "--fetch-timeout", "30")
        m = nodes.mount(reader, link, mnt_path, *boot, "--cache-size", "12M")
        peerdrive(reader, "pin", str(m.path / "keep"), timeout=120)
        for name in ("a", "b", "c", "d", "a"):  # 16 MiB through 10 MiB of room, a read again
            p = m.path / f"{name}.bin"
            drop_page_cache(p)
            assert digest(p) == digest(src / f"{name}.bin")
        nodes.unmount(m)

        before = store_state(reader)
        assert keep_pin in before.pins
        assert before.order, "nothing evictable in the cache"
        assert before.total_bytes <= 12 * MiB + BLOCK_MAX

        # a clean restart: nothing moves (the limit was stored, so no --cache-size now)
        m = nodes.mount(reader, link, mnt_path, *boot)
        assert status(reader)["cache"]["limit_bytes"] == 12 * MiB
        assert xattrs(m.path / "keep")["state"] == "device"
        assert store_state(reader) == before
        nodes.kill_mount(m)
        assert store_state(reader) == before, "a SIGKILL changed the cache"

        # reads are remembered once the mount flushes them (every few seconds), and what
        # was flushed survives a SIGKILL
        m = nodes.mount(reader, link, mnt_path, *boot)
        drop_page_cache(m.path / "e.bin")
        assert digest(m.path / "e.bin") == digest(src / "e.bin")
        settled: list[object] = []

        def flushed() -> bool:
            state = store_state(reader)
            moved = state.order != before.order
            same_as_last = bool(settled) and settled[-1] == state
            settled.append(state)
            return moved and same_as_last

        assert poll(flushed, timeout=30, interval=1.0), "the mount never wrote its reads"
        after_reads = settled[-1]
        nodes.kill_mount(m)
        assert store_state(reader) == after_reads

        m = nodes.mount(reader, link, mnt_path, *boot)
        nodes.unmount(m)
        assert store_state(reader) == after_reads

    with open_store(reader) as store:
        assert store.check_consistency() == []
