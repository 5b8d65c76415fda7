"""Attacks by another account on the same machine, and mistakes a stale record invites
(issue 11 items 3, 13 and 14): each test performs the attack against a real
`peerdrive mount` process.

- item 3: the read link was on the mount daemon's command line, which every
  local user reads from `ps` (/proc/PID/cmdline);
- item 13: `unmount` of a record whose pid had been reused signalled an
  unrelated process; a non-empty mount point was accepted; two mounts of
  one path both registered;
- item 14: a root mount added `allow_other`, so every local user read the drive.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, env_for, is_mounted, mounted, peerdrive, publish, stop_pid
from tests.processes import wait_exit
from vfs.capability import parse_link
from vfs.home import Home

pytestmark = pytest.mark.fuse

LOOPBACK = ("--listen", "127.0.0.1:0", "--no-lan")
NOBODY = 65534


def published(tmp_path: Path, node_home) -> tuple[Path, dict]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.txt").write_text("only for the owner\n")
    home = node_home("pub")
    return home, publish(home, src)


def secrets_of(link: str) -> list[bytes]:
    """Every spelling of the read key a process might carry."""
    cap = parse_link(link)
    b32 = base64.b32encode(cap.read_key).decode().rstrip("=")
    return [link.encode(), b32.lower().encode(), b32.encode(), cap.read_key.hex().encode(),
            cap.read_key]


def proc_bytes(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def mount_record(home: Path, mnt: Path) -> dict:
    return json.loads(Home(home).mount_file(mnt.resolve()).read_text())


# ----------------------------------------------------------------------------- item 3


def test_the_read_key_is_not_in_the_daemons_command_line_or_environment(
        tmp_path: Path, node_home) -> None:
    home, info = published(tmp_path, node_home)
    link = info["read_link"]
    for how, mnt in (("argument", tmp_path / "m1"), ("stdin", tmp_path / "m2")):
        mnt.mkdir()
        if how == "argument":
            ctx = mounted(home, link, mnt)
        else:  # `mount - MNT`: the link never reaches any command line
            proc = subprocess.run([PYTHON, "-m", "vfs.cli", "mount", "-", str(mnt), *LOOPBACK],
                                  input=link + "\n", env=env_for(home), cwd=ROOT,
                                  capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == 0, proc.stderr
            ctx = _already_mounted(home, mnt)
        with ctx:
            pid = mount_record(home, mnt)["pid"]
            assert (mnt / "secret.txt").read_text() == "only for the owner\n"
            # what any local user reads from ps / /proc
            cmdline = proc_bytes(pid, "cmdline")
            environ = proc_bytes(pid, "environ")
            for secret in secrets_of(link):
                assert secret not in cmdline, f"{how}: the read key is on the command line"
                assert secret not in environ, f"{how}: the read key is in the environment"
            assert b"mount\0-\0" in cmdline  # it came by pipe
            log = b"".join(p.read_bytes() for p in (home / "logs").glob("*.log"))
            for secret in secrets_of(link):
                assert secret not in log


def test_mirror_takes_the_read_link_from_stdin(tmp_path: Path, node_home) -> None:
    """`peerdrive mirror` runs for minutes: with `-` its read link is in no command line."""
    home, info = published(tmp_path, node_home)
    out = tmp_path / "mirror"
    proc = subprocess.run([PYTHON, "-m", "vfs.cli", "mirror", "-", str(out), "--json"],
                          input=info["read_link"] + "\n", env=env_for(home), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drive"] == info["drive"]
    assert json.loads(proc.stdout)["written"] > 0


class _already_mounted:  # noqa: N801 - used like `mounted`
    """Unmount (and stop the process) at the end, like tests.helpers.mounted."""

    def __init__(self, home: Path, mnt: Path) -> None:
        self.home, self.mnt = home, mnt

    def __enter__(self) -> Path:
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        pid = mount_record(self.home, self.mnt).get("pid") if is_mounted(self.mnt) else None
        res = peerdrive(self.home, "unmount", str(self.mnt), check=False)
        if res.returncode != 0 and is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if pid is not None:
            stop_pid(pid)


# ----------------------------------------------------------------------------- item 13


def test_unmount_of_a_stale_record_never_signals_the_process_that_took_its_pid(
        tmp_path: Path, node_home) -> None:
    home, info = published(tmp_path, node_home)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bystander = None
    try:
        peerdrive(home, "mount", info["read_link"], str(mnt), *LOOPBACK)
        record = mount_record(home, mnt)
        os.kill(record["pid"], 9)  # the mount dies; its FUSE mount stays, dead
        assert wait_exit(record["pid"], None, 10)
        assert is_mounted(mnt)
        # its pid goes to an unrelated process (we cannot choose pids: point the record
        # at a process of our own, as if the kernel had handed it the old pid)
        bystander = subprocess.Popen(["sleep", "300"])
        record["pid"] = bystander.pid
        Home(home).mount_file(mnt.resolve()).write_text(json.dumps(record))
        assert Home(home).live_mounts() == []  # not a live mount: the start time differs
        started = time.monotonic()
        out = peerdrive(home, "unmount", str(mnt))
        assert out.returncode == 0
        assert not is_mounted(mnt)
        assert time.monotonic() - started < 15  # did not wait for the bystander either
        time.sleep(0.5)
        assert bystander.poll() is None, "unmount signalled an unrelated process"
        assert not Home(home).mount_file(mnt.resolve()).exists()
    finally:
        if bystander is not None:
            bystander.kill()
            bystander.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_a_non_empty_mount_point_is_refused_unless_asked(tmp_path: Path, node_home) -> None:
    home, info = published(tmp_path, node_home)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "mine.txt").write_text("would be hidden")
    res = peerdrive(home, "mount", info["read_link"], str(mnt), *LOOPBACK, check=False)
    assert res.returncode == 6, res.stderr
    assert "not empty" in res.stderr and "--nonempty" in res.stderr
    assert not is_mounted(mnt)
    with mounted(home, info["read_link"], mnt, "--nonempty"):
        assert (mnt / "secret.txt").exists()
    assert (mnt / "mine.txt").read_text() == "would be hidden"


def test_two_mounts_of_one_path_at_once_one_wins_the_other_is_refused(
        tmp_path: Path, node_home) -> None:
    home, info = published(tmp_path, node_home)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    procs = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                [PYTHON, "-m", "vfs.cli", "mount", "-", str(mnt), *LOOPBACK, "--json"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env_for(home), cwd=ROOT, text=True))
        outs = [p.communicate(info["read_link"] + "\n", timeout=120) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 6], outs
        loser = outs[[p.returncode for p in procs].index(6)][1]
        assert "already a mount point" in loser or "another peerdrive process" in loser
        with open("/proc/mounts") as f:
            assert sum(line.split()[1] == str(mnt) for line in f) == 1
        assert len(list((home / "mounts").glob("*.json"))) == 1
        winner = json.loads(outs[[p.returncode for p in procs].index(0)][0])
        assert mount_record(home, mnt)["pid"] == winner["pid"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if is_mounted(mnt):
            res = peerdrive(home, "unmount", str(mnt), check=False)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


# ----------------------------------------------------------------------------- item 14


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to mount and to become another user")
def test_another_local_user_cannot_read_a_root_mount_unless_allowed(
        tmp_path: Path, node_home) -> None:
    home, info = published(tmp_path, node_home)
    # a mount point `nobody` can reach (pytest's own folders are 0700)
    base = Path(tempfile.mkdtemp(prefix="peerdrive-allow-other-"))
    try:
        base.chmod(0o755)
        mnt = base / "mnt"
        mnt.mkdir()
        _other_user_reads(home, info, mnt)
    finally:
        if is_mounted(base / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _other_user_reads(home: Path, info: dict, mnt: Path) -> None:
    assert _as_nobody("ls", str(mnt)).returncode == 0  # the folder itself is reachable
    with mounted(home, info["read_link"], mnt):
        with open("/proc/mounts") as f:
            opts = [line.split()[3] for line in f if line.split()[1] == str(mnt)][0]
        assert "allow_other" not in opts
        res = _as_nobody("cat", str(mnt / "secret.txt"))
        assert res.returncode != 0 and "Permission denied" in res.stderr, res
        assert _as_nobody("ls", str(mnt)).returncode != 0
    with mounted(home, info["read_link"], mnt, "--allow-other"):
        res = _as_nobody("cat", str(mnt / "secret.txt"))
        assert res.returncode == 0 and res.stdout == "only for the owner\n", res


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to mount and to become another user")
def test_a_setuid_file_in_a_drive_gives_no_one_root(tmp_path: Path, node_home) -> None:
    """A malicious publisher ships a setuid copy of `id` (mode 4755). Mounted by root with
    --allow-other, any local user running it would get euid 0: the mount is nosuid and
    shows no setuid or setgid bit."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy("/usr/bin/id", src / "id")
    (src / "id").chmod(0o6755)
    home = node_home("pub")
    info = publish(home, src)
    base = Path(tempfile.mkdtemp(prefix="peerdrive-setuid-"))
    try:
        base.chmod(0o755)
        mnt = base / "mnt"
        mnt.mkdir()
        with mounted(home, info["read_link"], mnt, "--allow-other"):
            with open("/proc/mounts") as f:
                opts = [line.split()[3] for line in f if line.split()[1] == str(mnt)][0]
            assert "nosuid" in opts.split(",") and "nodev" in opts.split(","), opts
            mode = os.stat(mnt / "id").st_mode
            assert not mode & (0o4000 | 0o2000), oct(mode)
            res = _as_nobody(str(mnt / "id"), "-u")
            assert res.returncode == 0, res
            assert res.stdout.strip() == str(NOBODY), f"ran as uid {res.stdout.strip()}"
    finally:
        if is_mounted(base / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], check=False)
        shutil.rmtree(base, ignore_errors=True)
