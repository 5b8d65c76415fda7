"""Random file operations on a writable mount and on a plain folder give the same tree.

A hypothesis state machine applies each operation to both (the same result,
or the same errno), checks the two trees after every step, and after each
publish (an fsync of the mount's root folder) waits until a reader's mount
on another node shows that same tree: what was published is what was
written. One writer mount and one reader mount serve every example (real
`peerdrive mount` processes); each example starts from an empty folder.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.helpers import peerdrive, publish
from tests.pin_helpers import Nodes
from tests.test_writable_mount import tree_of

pytestmark = pytest.mark.fuse

KiB = 1024
DIRS = ["", "a", "b", "a/c"]
NAMES = ["x", "y", "a", "b", "c"]
STEPS: list[int] = []
paths = st.builds(lambda d, n: f"{d}/{n}" if d else n, st.sampled_from(DIRS),
                  st.sampled_from(NAMES))


def outcome(fn, root: Path) -> object:
    try:
        return ("ok", fn(root))
    except OSError as exc:
        return ("errno", exc.errno)


def clear(root: Path) -> None:
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def wait_equal(reader: Path, want: dict, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    got: dict = {}
    while time.monotonic() < deadline:
        try:
            got = tree_of(reader)
        except OSError:
            got = {}
        if got == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"the reader's mount never showed the published tree: want {want}, "
                         f"got {got}")


class WritableVsPlain(RuleBasedStateMachine):
    mnt: Path
    plain: Path
    reader: Path

    def __init__(self) -> None:
        super().__init__()
        clear(self.mnt)
        clear(self.plain)
        for root in (self.mnt, self.plain):  # a tree to work on: most operations then apply
            for d in DIRS[1:]:
                (root / d).mkdir()
                (root / d / "x").write_bytes(d.encode() * 1000)
            (root / "y").write_bytes(random.Random(0).randbytes(200 * KiB))

    def both(self, fn) -> None:
        a = outcome(fn, self.mnt)
        b = outcome(fn, self.plain)
        assert a == b, f"writable mount: {a}, plain folder: {b}"

    @rule(path=paths, off=st.integers(0, 400 * KiB), size=st.sampled_from([1, 100, 70 * KiB,
                                                                           300 * KiB]),
          seed=st.integers(0, 1000))
    def write(self, path: str, off: int, size: int, seed: int) -> None:
        data = random.Random(seed).randbytes(size)

        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=paths, size=st.integers(0, 500 * KiB))
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / path, size))

    @rule(path=paths, seed=st.integers(0, 1000))
    def append(self, path: str, seed: int) -> None:
        data = random.Random(seed).randbytes(3000)

        def op(root: Path) -> None:
            with open(root / path, "ab") as f:
                f.write(data)
        self.both(op)

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(lambda root: os.mkdir(root / path))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(lambda root: os.rmdir(root / path))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda root: os.unlink(root / path))

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(path=paths, to=st.sampled_from(NAMES))
    def symlink(self, path: str, to: str) -> None:
        self.both(lambda root: os.symlink(to, root / path))

    @rule(path=paths, mode=st.sampled_from([0o600, 0o644, 0o755]))
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / path, mode, follow_symlinks=False)
                  if not (root / path).is_symlink() else None)

    @rule()
    def publish(self) -> None:
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # a version at once
        finally:
            os.close(fd)
        wait_equal(self.reader, tree_of(self.plain))

    @invariant()
    def same_tree(self) -> None:
        plain = tree_of(self.plain)
        assert tree_of(self.mnt) == plain
        STEPS.append(len(plain))


def test_random_operations_give_the_same_tree(tmp_path: Path, node_home) -> None:
    start = tmp_path / "start"
    start.mkdir()
    writer = node_home("writer")
    info = publish(writer, start)
    write_link = peerdrive(writer, "share", str(start), "--write").stdout.strip()
    plain = tmp_path / "plain"
    plain.mkdir()
    with Nodes(tmp_path) as nodes:
        w = nodes.mount(writer, write_link, tmp_path / "wmnt", "--publish-delay", "3600")
        reader = nodes.mount(node_home("reader"), info["read_link"], tmp_path / "rmnt",
                             "--bootstrap", w.addr)
        WritableVsPlain.mnt = w.path
        WritableVsPlain.plain = plain
        WritableVsPlain.reader = reader.path
        try:
            run_state_machine_as_test(WritableVsPlain, settings=settings(
                max_examples=12, stateful_step_count=25, deadline=None,
                suppress_health_check=list(HealthCheck)))
            print(f"{len(STEPS)} steps, {sum(STEPS)} paths compared, largest tree {max(STEPS)}")
        except BaseException:
            print(nodes.diagnostics())
            raise
