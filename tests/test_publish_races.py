"""Publishes that race each other, crash mid-commit, or read a file being truncated
(issue 11 items 12 and 14).

Two `peerdrive publish` processes of one folder at once used to create two
drives for a new folder, or sign two different heads with one seq (readers
split for good), and the publish pin was replaced before the head was saved,
so a crash or a race could leave the stored head's blocks evictable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import trio

from cache.store import BlockStore
from tests.helpers import PYTHON, ROOT, env_for, mounted
from vfs.capability import WriteCap, parse_link
from vfs.publish import Publisher
from vfs.storage import DriveStorage, publish_pin

MIB = 1 << 20
CAP = WriteCap.from_secrets(bytes(range(32)), bytes(range(32, 64)))


def CAP_OF(link: str):  # noqa: N802 - reads like the constant above
    return parse_link(link)


def make_folder(root: Path, seed: int, files: int = 6, size: int = 6 * MIB) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        data = rng.randbytes(size + rng.randrange(MIB))
        (root / f"f{i}.bin").write_bytes(data)
        out[f"f{i}.bin"] = data
    for i in range(50):
        data = rng.randbytes(rng.randrange(20_000))
        (root / "small").mkdir(exist_ok=True)
        (root / "small" / f"s{i}").write_bytes(data)
        out[f"small/s{i}"] = data
    return out


@pytest.mark.fuse
def test_two_publish_processes_at_once_make_one_drive_two_versions_and_lose_nothing(
        tmp_path: Path, node_home) -> None:
    home = node_home("pub")
    folder = tmp_path / "folder"
    files = make_folder(folder, 1)
    for rnd in range(2):  # the first round creates the drive, the second makes versions 3, 4
        procs = [subprocess.Popen([PYTHON, "-m", "vfs.cli", "publish", str(folder), "--json"],
                                  env=env_for(home), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            outs = [p.communicate(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        results = [json.loads(out) for out, _ in outs]
        assert len({r["drive"] for r in results}) == 1, "two drives for one folder"
        assert sorted(r["seq"] for r in results) == [2 * rnd + 1, 2 * rnd + 2]
    drives = [d for d in (home / "drives").iterdir() if d.is_dir()]
    assert len(drives) == 1
    link = results[0]["read_link"]

    # everything evictable goes: what is left must be every block of the stored version
    store = BlockStore(home / "store")
    try:
        assert DriveStorage(store).load_head(CAP_OF(link)).seq == 4
        store.evict_to(0)
        assert [n for n in store.pin_names() if n.startswith("publish-pending:")] == []
    finally:
        store.close()
    mnt = tmp_path / "mnt"
    with mounted(home, link, mnt):  # no peer at all: it reads only what is pinned
        for rel, data in files.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).digest() == \
                hashlib.sha256(data).digest(), rel


class Crash(Exception):
    """Stands for the process dying at one step of the commit."""


def publish(store: BlockStore, folder: Path) -> Publisher:
    pub = Publisher(DriveStorage(store), CAP, folder)
    trio.run(pub.run)
    return pub


def test_a_crash_at_any_step_of_the_commit_keeps_the_stored_versions_blocks(
        tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    make_folder(folder, 2, files=2, size=MIB)
    store = BlockStore(tmp_path / "store")
    try:
        first = publish(store, folder)
        ids_by_seq = {1: set(first._sizes)}
        for step in range(3):  # the commit writes three times: head, publish pin, pending pin
            make_folder(folder, 10 + step, files=2, size=MIB)  # new content: new blocks
            calls = {"n": 0}
            real = {name: getattr(store, name) for name in ("update_record", "set_pin", "unpin")}

            def failing(name: str, stop_at: int = step, calls: dict = calls,
                        real: dict = real):
                def call(*args, **kwargs):
                    if calls["n"] == stop_at:
                        calls["n"] += 1
                        raise Crash(f"crash at commit step {stop_at} ({name})")
                    calls["n"] += 1
                    return real[name](*args, **kwargs)
                return call

            for name in real:
                setattr(store, name, failing(name))
            pub = Publisher(DriveStorage(store), CAP, folder)
            with pytest.raises(BaseException) as info:  # noqa: B017 - a group from trio.run
                trio.run(pub.run)
            assert "crash at commit step" in repr(info.value)
            for name, fn in real.items():
                setattr(store, name, fn)
            stored = DriveStorage(store).load_head(CAP)
            if stored.seq not in ids_by_seq:
                ids_by_seq[stored.seq] = set(pub._sizes)
            store.evict_to(0)
            needed = ids_by_seq[stored.seq]
            assert store.missing(list(needed)) == [], f"step {step}: the stored head lost blocks"
            # the next publish (after the "restart") leaves exactly one version pinned
            done = publish(store, folder)
            ids_by_seq[done.storage.load_head(CAP).seq] = set(done._sizes)
            assert [n for n in store.pin_names() if n.startswith("publish-pending:")] == []
            assert set(store.pin_ids(publish_pin(CAP.pubkey, done.storage.load_head(CAP).seq))) >= set(
                done._sizes)
        assert store.check_consistency() == []
    finally:
        store.close()


PUBLISH_IN_ANOTHER_PROCESS = """
import sys, trio
from pathlib import Path
from cache.store import BlockStore
from vfs.capability import parse_link
from vfs.publish import Publisher
from vfs.storage import DriveStorage

store = BlockStore(sys.argv[1])
pub = Publisher(DriveStorage(store), parse_link(sys.argv[2]), Path(sys.argv[3]), device="other")
trio.run(pub.run)
store.close()
"""


def test_seq_is_taken_in_the_same_transaction_as_the_head(tmp_path: Path) -> None:
    """Another process committed version 2 after this publish read the head: this
    publish merges onto it and becomes 3 (prev: 2's id), keeping both folders' files."""
    folder = tmp_path / "folder"
    make_folder(folder, 3, files=1, size=MIB)
    store = BlockStore(tmp_path / "store")
    try:
        publish(store, folder)
        (folder / "ours.txt").write_bytes(b"ours")
        other = tmp_path / "other"
        other.mkdir()
        (other / "theirs.txt").write_bytes(b"theirs")
        storage = DriveStorage(store)
        pub = Publisher(storage, CAP, folder)
        real_commit = storage.commit_publish
        calls = []

        def commit_after_another_publish(cap, sign, ids, pending, **kw):
            if not calls:
                subprocess.run([PYTHON, "-c", PUBLISH_IN_ANOTHER_PROCESS, str(tmp_path / "store"),
                                CAP.link(), str(other)], cwd=ROOT, check=True, timeout=120,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
            calls.append(kw)
            return real_commit(cap, sign, ids, pending, **kw)

        storage.commit_publish = commit_after_another_publish
        result = trio.run(pub.run)
        assert len(calls) == 2  # the first signing found version 2 stored and merged again
        assert result.head.seq == 3 and result.merged_with == 2
        stored = storage.load_head(CAP)
        assert stored.seq == 3 and stored.prev == calls[1]["expect"]
        names = {e.name for e in trio.run(_root_entries, store, stored)}
        assert {b"ours.txt", b"theirs.txt"} <= names
    finally:
        store.close()


async def _root_entries(store: BlockStore, head) -> list:
    from vfs.blocks import BlockReader
    from vfs.tree import Tree

    tree = Tree(BlockReader(store, CAP.read_key))
    return (await tree.read_directory(head.root.node))[1]


# ----------------------------------------------------------------------------- item 14: SIGBUS


def test_windows_make_exactly_the_chunks_of_one_cut(tmp_path: Path, monkeypatch) -> None:
    """Large files are read in windows; the carried last chunk makes the cut the same
    as one FastCDC pass over the whole file (the blocks, so dedup, do not change)."""
    import vfs.publish as publish_mod

    folder = tmp_path / "folder"
    folder.mkdir()
    rng = random.Random(7)
    (folder / "random.bin").write_bytes(rng.randbytes(21 * MIB + 12345))
    (folder / "runs.bin").write_bytes(bytes(9 * MIB) + rng.randbytes(5 * MIB) + bytes(3 * MIB))
    roots = []
    for window in (1 << 30, 3 * MIB, 2 * MIB + 1):  # one window = one cut over the file
        monkeypatch.setattr(publish_mod, "READ_WINDOW", window)
        with BlockStore(tmp_path / f"store-{window}") as store:
            roots.append(publish(store, folder).storage.load_head(CAP).root_block)
    assert roots[0] == roots[1] == roots[2]


def test_a_file_truncated_while_it_is_read_is_read_again(tmp_path: Path, monkeypatch) -> None:
    """Deterministic: the file is truncated right after the first window of it is read
    (what another process may do at any moment). It is read again and published as
    it now is; before, the mmap under the cut raised SIGBUS and killed publish."""
    import vfs.publish as publish_mod
    from tests.test_publish import read_back

    folder = tmp_path / "folder"
    folder.mkdir()
    big = folder / "big.bin"
    big.write_bytes(random.Random(8).randbytes(40 * MIB))
    real = publish_mod._read_and_cut
    calls = []

    def read_then_truncate(fd, offset, carry):
        out = real(fd, offset, carry)
        calls.append(offset)
        if len(calls) == 1:
            os.truncate(big, 5 * MIB + 7)
        return out

    monkeypatch.setattr(publish_mod, "_read_and_cut", read_then_truncate)
    with BlockStore(tmp_path / "store") as store:
        pub = Publisher(DriveStorage(store), CAP, folder)
        result = trio.run(pub.run)
        got = read_back(store, result)
    assert got["big.bin"][3] == big.read_bytes()
    assert len(got["big.bin"][3]) == 5 * MIB + 7
    assert calls.count(0) == 2  # read once, changed, read again from the start


def test_a_file_that_keeps_changing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import vfs.publish as publish_mod
    from vfs.errors import UsageError, unwrap_group

    folder = tmp_path / "folder"
    folder.mkdir()
    big = folder / "log.bin"
    big.write_bytes(random.Random(9).randbytes(20 * MIB))
    real = publish_mod._read_and_cut

    def read_then_append(fd, offset, carry):
        out = real(fd, offset, carry)
        with open(big, "ab") as f:
            f.write(b"another line\n")
        return out

    monkeypatch.setattr(publish_mod, "_read_and_cut", read_then_append)
    with BlockStore(tmp_path / "store") as store:
        with pytest.raises(BaseException) as info:  # noqa: B017 - a group from trio.run
            trio.run(Publisher(DriveStorage(store), CAP, folder).run)
        err = unwrap_group(info.value)
        assert isinstance(err, UsageError) and "kept changing" in str(err), err
        assert DriveStorage(store).load_head(CAP) is None


def test_truncating_a_big_file_during_a_real_publish(tmp_path: Path, node_home) -> None:
    """The attack on the real command: truncate a large file as soon as `peerdrive
    publish` has it open. Before: killed by SIGBUS (exit -7). Now: it publishes the
    file as it is after the truncate."""
    home = node_home("pub")
    folder = tmp_path / "folder"
    folder.mkdir()
    big = folder / "big.bin"
    with open(big, "wb") as f:
        rng = random.Random(10)
        for _ in range(48):
            f.write(rng.randbytes(4 * MIB))
    proc = subprocess.Popen([PYTHON, "-m", "vfs.cli", "publish", str(folder), "--json"],
                            env=env_for(home), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        opened = False
        while time.monotonic() < deadline and proc.poll() is None and not opened:
            with contextlib.suppress(OSError):
                opened = any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(big)
                             for fd in os.listdir(f"/proc/{proc.pid}/fd"))
            time.sleep(0.002)
        assert opened, "publish never opened the file"
        os.truncate(big, 3 * MIB)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (proc.returncode, err)
    assert json.loads(out)["bytes"] >= 3 * MIB
    link = json.loads(out)["read_link"]
    mnt = tmp_path / "mnt"
    with mounted(home, link, mnt):
        assert (mnt / "big.bin").read_bytes() == big.read_bytes()


@pytest.mark.parametrize("which", ["small.txt", "large.bin"])
def test_a_file_replaced_by_a_fifo_after_it_is_listed_is_an_error_not_a_hang(
        tmp_path: Path, monkeypatch, which: str) -> None:
    """Anyone who can write to the folder swaps a listed file for a FIFO: opening it
    would block for ever (no writer). Publish must fail at once with a clear error."""
    import threading

    import vfs.publish as publish_mod
    from vfs.errors import UsageError, unwrap_group

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "small.txt").write_bytes(b"small" * 100)
    (folder / "large.bin").write_bytes(random.Random(11).randbytes(publish_mod.SMALL_FILE + 1))
    found = publish_mod._Groups.found

    def listed_then_swap(self, job):  # before reading can start: reading overlaps the walk
        if job.name == which.encode():
            (folder / which).unlink()
            os.mkfifo(folder / which)
        found(self, job)

    monkeypatch.setattr(publish_mod._Groups, "found", listed_then_swap)
    outcome: list[BaseException | None] = []

    def run() -> None:
        with BlockStore(tmp_path / "store") as store:
            try:
                trio.run(Publisher(DriveStorage(store), CAP, folder).run)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(unwrap_group(exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():  # unblock the hung open so the thread can end, then fail
        fd = os.open(folder / which, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(timeout=30)
        pytest.fail("publish hung opening a FIFO")
    assert isinstance(outcome[0], UsageError), outcome
    assert "no longer the file that was listed" in str(outcome[0])


@pytest.mark.parametrize("which", ["small.txt", "large.bin"])
def test_a_folder_swapped_for_a_symlink_after_it_is_listed_publishes_nothing_from_elsewhere(
        tmp_path: Path, monkeypatch, which: str) -> None:
    """Someone who can write to the published folder swaps a listed subfolder for a
    symlink to a folder of the publisher's that holds a file of the same name: the
    publish would read that one and put it in the drive. It must refuse (small files
    and large files are read by different code)."""
    import vfs.publish as publish_mod
    from vfs.errors import UsageError, unwrap_group

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    size = 700 if which == "small.txt" else publish_mod.SMALL_FILE + 1
    (folder / "sub" / which).write_bytes(b"p" * size)
    (secret / which).write_bytes(b"S" * size)
    found = publish_mod._Groups.found

    def listed_then_swap(self, job):  # before reading can start: reading overlaps the walk
        if job.name == which.encode():
            (folder / "sub").rename(folder / "sub.orig")
            (folder / "sub").symlink_to(secret)
        found(self, job)

    monkeypatch.setattr(publish_mod._Groups, "found", listed_then_swap)
    with BlockStore(tmp_path / "store") as store:
        with pytest.raises(BaseException) as info:  # noqa: B017 - a group from trio.run
            trio.run(Publisher(DriveStorage(store), CAP, folder).run)
        err = unwrap_group(info.value)
        assert isinstance(err, UsageError) and "no longer the file that was listed" in str(err)
        assert DriveStorage(store).load_head(CAP) is None


def test_a_folder_swapped_for_a_symlink_while_it_is_walked_is_refused(
        tmp_path: Path, monkeypatch) -> None:
    """The same swap during the walk: between the parent's listing (which saw a folder)
    and the listing of that folder. Listing by path followed the symlink and published
    the other folder's files; the walk now lists through an O_NOFOLLOW descriptor
    checked against the parent's listing."""
    import vfs.publish as publish_mod
    from vfs.errors import UsageError, unwrap_group

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "public.txt").write_bytes(b"public")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_ed25519").write_bytes(b"SECRET KEY")
    real = publish_mod._list_dir

    def list_after_swap(path, listed, follow=False):
        if path.endswith(b"/sub"):
            (folder / "sub").rename(folder / "sub.orig")
            (folder / "sub").symlink_to(secret)
        return real(path, listed, follow)

    monkeypatch.setattr(publish_mod, "_list_dir", list_after_swap)
    with BlockStore(tmp_path / "store") as store:
        with pytest.raises(BaseException) as info:  # noqa: B017 - a group from trio.run
            trio.run(Publisher(DriveStorage(store), CAP, folder).run)
        err = unwrap_group(info.value)
        assert isinstance(err, UsageError), err
        assert "sub" in str(err) and "no longer the folder that was listed" in str(err)
        assert DriveStorage(store).load_head(CAP) is None
