"""A write link mounted read-write (issue 13 part 1): real `peerdrive mount` processes.

Every change is made twice, through the writable mount and in a plain
folder, and the two trees must read back byte-equal: in the writable mount
at once, and, once published, in a read-only mount of another node that
found the writer through the DHT (the writer mount bootstraps it).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers import is_mounted, peerdrive, publish
from tests.pin_helpers import Nodes
from tests.processes import wait_exit

pytestmark = pytest.mark.fuse

KiB = 1024
MiB = 1024 * KiB


def tree_of(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, sha256 or target) for everything below `root`."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o777)
            else:
                out[rel] = ("file", st.st_mode & 0o777,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def wait_for_tree(root: Path, want: dict, timeout: float = 60.0) -> float:
    """Seconds until `root` holds `want` (a reader's mount following new versions)."""
    start = time.monotonic()
    last: dict = {}
    while time.monotonic() - start < timeout:
        try:
            last = tree_of(root)
        except OSError:
            last = {}
        if last == want:
            return time.monotonic() - start
        time.sleep(0.2)
    missing = {k: v for k, v in want.items() if last.get(k) != v}
    raise AssertionError(f"{root} never matched: {len(missing)} paths differ, e.g. "
                         f"{list(missing.items())[:3]}; extra {set(last) - set(want)}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_edits(root: Path, src: Path, rng: random.Random, archive: Path) -> None:
    """The same edits, whatever `root` is: cp, tar -x, an editor's save, append, truncate,
    random overwrites, renames over names, removal, symlink, chmod."""
    subprocess.run(["cp", "-r", str(src), str(root / "copied")], check=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(root)], check=True)
    # an editor's save: write a temporary file, fsync it, rename it over the original
    tmp = root / "notes.txt.swp"
    tmp.write_bytes(b"the new notes\n" * 100)
    fsync_path(tmp)
    os.rename(tmp, root / "notes.txt")
    with open(root / "log.txt", "ab") as f:
        for i in range(50):
            f.write(f"line {i}\n".encode())
    big = root / "copied" / "big.bin"
    with open(big, "r+b") as f:
        for _ in range(20):
            off = rng.randrange(0, 3 * MiB)
            f.seek(off)
            f.write(rng.randbytes(rng.randrange(1, 64 * KiB)))
        f.seek(5 * MiB)  # past the end: a hole, then bytes
        f.write(b"after the hole")
    os.truncate(root / "copied" / "mid.bin", 100 * KiB + 7)
    os.truncate(root / "grown.bin", 0) if (root / "grown.bin").exists() else None
    with open(root / "grown.bin", "wb") as f:
        f.truncate(2 * MiB + 3)
    os.replace(root / "copied" / "small.txt", root / "log.txt")  # over an existing name
    shutil.rmtree(root / "extracted" / "gone")
    os.symlink("notes.txt", root / "link")
    os.chmod(root / "notes.txt", 0o600)
    (root / "empty-dir").mkdir()


def make_source(base: Path) -> tuple[Path, Path]:
    rng = random.Random(7)
    src = base / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(rng.randbytes(3 * MiB))
    (src / "mid.bin").write_bytes(rng.randbytes(400 * KiB))
    (src / "small.txt").write_bytes(b"small\n")
    tree = base / "to-tar" / "extracted"
    (tree / "gone").mkdir(parents=True)
    (tree / "gone" / "x").write_bytes(b"x")
    for i in range(30):
        (tree / f"f{i:02d}").write_bytes(rng.randbytes(rng.randrange(0, 20 * KiB)))
    archive = base / "t.tar"
    with tarfile.open(archive, "w") as t:
        t.add(tree, arcname="extracted")
    return src, archive


def new_drive(tmp_path: Path, home: Path, files: dict[str, str]) -> tuple[dict, str]:
    """A folder of `files` published from `home`: (publish's JSON, the write link)."""
    start = tmp_path / "start"
    start.mkdir()
    for name, text in files.items():
        (start / name).write_text(text)
    info = publish(home, start)
    return info, peerdrive(home, "share", str(start), "--write").stdout.strip()


def test_edits_read_back_here_and_in_a_readers_mount(tmp_path: Path, node_home) -> None:
    writer = node_home("writer")
    info, write_link = new_drive(tmp_path, writer, {"notes.txt": "old notes\n",
                                                    "log.txt": "old log\n"})
    start = tmp_path / "start"
    src, archive = make_source(tmp_path)
    plain = tmp_path / "plain"
    shutil.copytree(start, plain)
    apply_edits(plain, src, random.Random(1), archive)
    want = tree_of(plain)
    with Nodes(tmp_path) as nodes:
        try:
            w = nodes.mount(writer, write_link, tmp_path / "wmnt", "--publish-delay", "0.5")
            apply_edits(w.path, src, random.Random(1), archive)
            assert tree_of(w.path) == want  # readable at once, before any version
            reader = nodes.mount(node_home("reader"), info["read_link"], tmp_path / "rmnt",
                                 "--bootstrap", w.addr)
            took = wait_for_tree(reader.path, want)
            print(f"a reader's mount showed the edits {took:.1f} s after it mounted")
            # one more change after the reader follows: it switches live
            (w.path / "later.txt").write_bytes(b"later")
            want["later.txt"] = ("file", 0o644, hashlib.sha256(b"later").hexdigest())
            saved = time.monotonic()
            took = wait_for_tree(reader.path, want)
            print(f"save to visible in the reader's mount: {time.monotonic() - saved:.1f} s")
            assert took < 60
        except BaseException:
            print(nodes.diagnostics())
            raise


def test_fsync_then_sigkill_keeps_the_data(tmp_path: Path, node_home) -> None:
    home = node_home("writer")
    _, write_link = new_drive(tmp_path, home, {"a.txt": "a\n"})
    body = random.Random(3).randbytes(3 * MiB + 5)
    with Nodes(tmp_path) as nodes:
        # no quiet-period version: only the fsync makes anything durable
        w = nodes.mount(home, write_link, tmp_path / "mnt", "--publish-delay", "3600")
        fd = os.open(w.path / "kept.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        (w.path / "not-synced.txt").write_bytes(b"x")  # may or may not survive
        os.kill(w.pid, signal.SIGKILL)
        assert wait_exit(w.pid, None, 30)
        nodes.kill_mount(w)
        assert not is_mounted(w.path)
        again = nodes.mount(home, write_link, tmp_path / "mnt", "--publish-delay", "3600")
        assert (again.path / "kept.bin").read_bytes() == body
        assert (again.path / "a.txt").read_text() == "a\n"


def write_unsynced(path: Path, body: bytes) -> None:
    """Write `body` without fsync: only the mount's last version can keep it."""
    with open(path, "wb") as f:
        f.write(body)


def wait_in_log(m, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in m.log_tail(400):
        assert time.monotonic() < deadline, f"{needle!r} never in the mount log:\n{m.log_tail()}"
        time.sleep(0.02)


def test_sigterm_while_the_last_version_is_published_lets_it_finish(tmp_path: Path,
                                                                   node_home) -> None:
    """A SIGTERM that arrives while an unmounted writable mount publishes its last
    version (a service manager's stop, an impatient unmount) does not kill it
    part-way: the version is made and the process exits 0."""
    home = node_home("writer")
    _, write_link = new_drive(tmp_path, home, {"a.txt": "a\n"})
    body = random.Random(6).randbytes(24 * MiB + 3)
    with Nodes(tmp_path) as nodes:
        w = nodes.mount(home, write_link, tmp_path / "mnt", "--publish-delay", "3600",
                        verbose=True)
        write_unsynced(w.path / "big.bin", body)
        subprocess.run(["fusermount3", "-u", str(w.path)], check=True)
        wait_in_log(w, "publishing the changes since the last version")
        os.kill(w.pid, signal.SIGTERM)
        assert wait_exit(w.pid, None, 200), "the mount process did not end"
        log = w.log_tail(400)
        assert "published version" in log, log
        nodes.mounts.remove(w)
        again = nodes.mount(home, write_link, tmp_path / "mnt", "--publish-delay", "3600")
        assert (again.path / "big.bin").read_bytes() == body


def test_a_read_link_still_mounts_read_only(tmp_path: Path, node_home) -> None:
    start = tmp_path / "start"
    start.mkdir()
    (start / "a.txt").write_text("a\n")
    home = node_home("n")
    info = publish(home, start)
    with Nodes(tmp_path) as nodes:
        m = nodes.mount(home, info["read_link"], tmp_path / "mnt")
        with pytest.raises(OSError) as err:
            (m.path / "b.txt").write_text("no")
        assert err.value.errno == 30  # EROFS
        assert (m.path / "a.txt").read_text() == "a\n"


def test_a_full_cache_is_enospc_for_the_writer_and_loses_nothing_acknowledged(
        tmp_path: Path, node_home) -> None:
    home = node_home("writer")
    _, write_link = new_drive(tmp_path, home, {"a.txt": "a\n"})
    kept = random.Random(5).randbytes(4 * MiB)
    with Nodes(tmp_path) as nodes:
        w = nodes.mount(home, write_link, tmp_path / "mnt", "--publish-delay", "3600",
                        "--cache-size", "24M")
        fd = os.open(w.path / "kept.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, kept)
            os.fsync(fd)  # acknowledged
        finally:
            os.close(fd)
        with pytest.raises(OSError) as err:
            with open(w.path / "too-big.bin", "wb") as f:
                # 160 MiB, past the 32 MiB kept in memory, then the cache: new bytes in each
                # piece (one piece repeated is a few MiB of blocks once cut: it fits)
                for _ in range(40):
                    f.write(os.urandom(4 * MiB))
                    f.flush()
                os.fsync(f.fileno())
        assert err.value.errno == 28  # ENOSPC
        assert (w.path / "kept.bin").read_bytes() == kept  # readable on, in this mount
        os.kill(w.pid, signal.SIGKILL)
        assert wait_exit(w.pid, None, 30)
        nodes.kill_mount(w)
        again = nodes.mount(home, write_link, tmp_path / "mnt", "--publish-delay", "3600")
        assert (again.path / "kept.bin").read_bytes() == kept


def test_two_writable_mounts_of_one_drive_keep_both_writers_changes(tmp_path: Path,
                                                                     node_home) -> None:
    home_a = node_home("a")
    _, write_link = new_drive(tmp_path, home_a, {"shared.txt": "v1\n"})
    with Nodes(tmp_path) as nodes:
        try:
            a = nodes.mount(home_a, write_link, tmp_path / "a", "--publish-delay", "3600")
            b = nodes.mount(node_home("b"), write_link, tmp_path / "b", "--publish-delay",
                            "3600", "--bootstrap", a.addr)
            (a.path / "from-a.txt").write_text("a\n")  # unpublished while b publishes
            (b.path / "from-b.txt").write_text("b\n")
            fsync_path(b.path / "from-b.txt")  # b's version first
            time.sleep(3)  # a most likely hears of it first (either way its commit looks it up)
            fsync_path(a.path / "from-a.txt")  # a's commit merges onto b's version
            want = {"shared.txt": "v1\n", "from-a.txt": "a\n", "from-b.txt": "b\n"}
            for m in (a, b):
                deadline = time.monotonic() + 60
                got: dict = {}
                while time.monotonic() < deadline:
                    got = {p.name: p.read_text() for p in m.path.iterdir()}
                    if got == want:
                        break
                    time.sleep(0.2)
                assert got == want, f"{m.path}: {got}"
        except BaseException:
            print(nodes.diagnostics())
            raise
