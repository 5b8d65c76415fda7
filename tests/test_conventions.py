"""The conventions Linux users expect (issue 14 part 2): fstab, systemd units, logs.

- An fstab line (`fuse.peerdrive`, link read from a 0600 file) mounts a drive
  at `mount -a -T FSTAB`, in a mount namespace of the test's own (`unshare
  -m`), where mount(8) finds our helper as /sbin/mount.fuse.peerdrive through
  a bind mount: the machine's /sbin and mount table are never touched. The
  helper starts the real background mount process; `umount` ends it.
- systemd is not PID 1 here, so the units `peerdrive install-units` writes
  are checked with `systemd-analyze verify` and then run as systemd would run
  them: ExecStart with the unit's Environment= and StandardInput=file:, then
  ExecStop (mount) or SIGTERM (serve).
- `-v` reaches the background mount process; its log file is the one
  `status` names, and the log rotates.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, env_for, is_mounted, peerdrive, publish
from tests.processes import stop_pid
from tests.swarm_helpers import Swarm, read_ready_line, tail, wait_until
from vfs.home import Home
from vfs.systemd_units import escape_path, exec_lines

pytestmark = pytest.mark.fuse


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "readme.txt").write_text("hello from fstab\n")
    (src / "docs" / "a.txt").write_bytes(os.urandom(300_000))
    return src


def _link_file(path: Path, link: str, mode: int = 0o600) -> Path:
    path.write_text(f"# the read link of the test drive\n{link}\n")
    path.chmod(mode)
    return path


def _helper_dir(tmp_path: Path) -> Path:
    """A copy of /usr/sbin (links) plus our helpers, running this checkout's code."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    for entry in os.listdir("/usr/sbin"):
        os.symlink(os.path.join("/usr/sbin", entry), sbin / entry)
    for name in ("mount.peerdrive", "mount.fuse.peerdrive"):
        helper = sbin / name
        if helper.is_symlink():
            helper.unlink()
        helper.write_text(f"#!/bin/sh\nexport PYTHONPATH={ROOT}\n"
                          f'exec {PYTHON} -m vfs.mount_helper "$@"\n')
        helper.chmod(0o755)
    return sbin


def _in_namespace(script: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-euc", script],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_fstab_line_mounts_at_mount_a_and_unmounts(tmp_path: Path) -> None:
    pub, reader = tmp_path / "home-pub", tmp_path / "home-reader"
    link = publish(pub, _source(tmp_path))["read_link"]
    mnt, bad_mnt = tmp_path / "mnt", tmp_path / "mnt-bad"
    mnt.mkdir()
    bad_mnt.mkdir()
    secret = _link_file(tmp_path / "drive.link", link)
    shared = _link_file(tmp_path / "shared.link", link, 0o644)
    sbin = _helper_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with Swarm(tmp_path / "swarm") as swarm:
        seeder = swarm.serve("pub", pub)
        fstab = tmp_path / "fstab"
        fstab.write_text(
            "# a drive at boot: the link stays in a file only root can read\n"
            f"peerdrive {mnt} fuse.peerdrive link={secret},home={reader},"
            f"bootstrap=127.0.0.1:{seeder.port},listen=127.0.0.1:0,nolan,verbose,"
            "_netdev,nofail 0 0\n"
            f"peerdrive {bad_mnt} fuse.peerdrive link={shared},home={reader},noauto 0 0\n")
        script = textwrap.dedent(f"""
            mount --bind {sbin} /usr/sbin
            mount -a -T {fstab}
            grep -F " {mnt} fuse.peerdrive " /proc/self/mounts > {out}/mounts
            cat {mnt}/readme.txt > {out}/readme
            getfattr --only-values -n user.peerdrive.state {mnt}/readme.txt > {out}/state
            cp {reader}/mounts/*.json {out}/record.json
            mount -a -T {fstab}   # again: already mounted, nothing to do
            grep -cF " {mnt} fuse.peerdrive " /proc/self/mounts > {out}/count
            if mount -T {fstab} {bad_mnt} 2> {out}/bad; then echo mounted > {out}/bad-rc; fi
            umount {mnt}
            grep -cF " {mnt} " /proc/self/mounts > {out}/after || true
        """)
        res = _in_namespace(script)
        pid = None
        try:
            record = json.loads((out / "record.json").read_text())
            pid = int(record["pid"])
            assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{swarm.diagnostics()}"
            assert (out / "readme").read_text() == "hello from fstab\n"
            assert (out / "state").read_text() == "device"  # read whole, so on the device
            assert (out / "count").read_text().strip() == "1"
            assert (out / "after").read_text().strip() == "0"
            assert not (out / "bad-rc").exists()
            assert "chmod 600" in (out / "bad").read_text()
            assert record["mountpoint"] == str(mnt) and record["log"]
            assert wait_until(lambda: not _alive(pid), 30), "the mount process outlived umount"
            # the link was in no file anyone could read, and -o verbose reached the daemon
            assert link not in fstab.read_text()
            assert "INFO vfs.node: mounted drive" in Path(record["log"]).read_text()
        finally:
            if pid is not None and _alive(pid):
                stop_pid(pid)
    assert not is_mounted(mnt)  # never in this namespace's table


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _unit_env(unit_text: str, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for line in unit_text.splitlines():
        if line.startswith("Environment="):
            for assignment in exec_lines(line.replace("Environment=", "X=", 1), "X")[0]:
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def test_systemd_units_start_and_stop(tmp_path: Path) -> None:
    pub, reader = tmp_path / "home-pub", tmp_path / "home-reader"
    link = publish(pub, _source(tmp_path))["read_link"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    secret = _link_file(tmp_path / "drive.link", link)
    units = tmp_path / "units"
    res = peerdrive(pub, "install-units", "--dir", str(units), "--mount", str(mnt), str(secret),
                    "--json")
    written = [Path(p) for p in json.loads(res.stdout)["units"]]
    mount_name = f"peerdrive-mount-{escape_path(str(mnt))}.service"
    assert sorted(p.name for p in written) == sorted(["peerdrive-serve.service", mount_name])
    serve_text = (units / "peerdrive-serve.service").read_text()
    mount_text = (units / mount_name).read_text()
    assert link not in mount_text and f"StandardInput=file:{secret}" in mount_text
    # refused: a link file others can read
    secret.chmod(0o640)
    bad = peerdrive(pub, "install-units", "--dir", str(units), "--mount", str(mnt),
                    str(secret), check=False)
    assert bad.returncode == 2 and "chmod 600" in bad.stderr
    secret.chmod(0o600)
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", *map(str, written)],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        assert "peerdrive" not in check.stderr, check.stderr  # no warning about our lines

    # serve, as systemd runs it (the publisher's home), stopped with SIGTERM
    [serve_argv] = exec_lines(serve_text, "ExecStart")
    serve_env = _unit_env(serve_text, os.environ)
    assert serve_env["PEERDRIVE_HOME"] == str(pub)
    serve_argv += ["--listen", "127.0.0.1:0", "--no-lan", "--json"]  # the test stays on loopback
    log = tmp_path / "serve.log"
    with open(log, "wb") as logf:
        serve = subprocess.Popen(serve_argv, env=serve_env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=logf, cwd="/")
    mount_proc = None
    try:
        port = read_ready_line(serve, log)["port"]
        # the mount unit, as systemd runs it: the link on stdin from the file
        [start] = exec_lines(mount_text, "ExecStart")
        [stop] = exec_lines(mount_text, "ExecStop")
        env = _unit_env(mount_text, os.environ)
        env["PEERDRIVE_HOME"] = str(reader)  # the reader's node (the unit named the publisher's)
        start += ["--bootstrap", f"127.0.0.1:{port}", "--listen", "127.0.0.1:0", "--no-lan"]
        with open(secret) as stdin, open(tmp_path / "mount.log", "wb") as logf:
            mount_proc = subprocess.Popen(start, env=env, stdin=stdin, stdout=logf,
                                          stderr=subprocess.STDOUT, cwd="/")
        assert wait_until(lambda: is_mounted(mnt) and (mnt / "readme.txt").exists(), 90), \
            tail(tmp_path / "mount.log")
        assert (mnt / "readme.txt").read_text() == "hello from fstab\n"
        done = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=60,
                              check=False, cwd="/")
        assert done.returncode == 0, done.stderr
        assert mount_proc.wait(timeout=30) == 0
        assert not is_mounted(mnt)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    finally:
        if mount_proc is not None and mount_proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                           check=False)
            stop_pid(mount_proc.pid, mount_proc)
        stop_pid(serve.pid, serve)
        if serve.stdout is not None:
            serve.stdout.close()


def test_verbose_reaches_the_background_mount_and_status_names_its_log(tmp_path: Path) -> None:
    pub, reader = tmp_path / "home-pub", tmp_path / "home-reader"
    link = publish(pub, _source(tmp_path))["read_link"]
    with Swarm(tmp_path / "swarm") as swarm:
        seeder = swarm.serve("pub", pub)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        out = peerdrive(reader, "-v", "mount", link, str(mnt), "--listen", "127.0.0.1:0",
                        "--no-lan", "--bootstrap", f"127.0.0.1:{seeder.port}", "--json")
        pid = json.loads(out.stdout)["pid"]
        try:
            status = json.loads(peerdrive(reader, "status", "--json").stdout)
            [m] = status["mounts"]
            log = Path(m["log"])
            assert log == Home(reader).mount_log_path(m["drive"]) and log.exists()
            assert f"log {log}" in peerdrive(reader, "status").stdout
            assert wait_until(lambda: "INFO vfs.node: mounted drive" in log.read_text(), 10)
        finally:
            peerdrive(reader, "unmount", str(mnt), check=False)
            if _alive(pid):
                stop_pid(pid)


def test_log_file_rotates_and_stderr_follows(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "mount-x.log"
    code = textwrap.dedent(f"""
        import logging, sys
        from pathlib import Path
        from vfs.logs import setup_logging
        setup_logging(1, Path({str(log)!r}), max_bytes=4000, backups=2)
        for i in range(400):
            logging.getLogger("t").info("line %d %s", i, "x" * 40)
        print("stderr after the last rotation", file=sys.stderr, flush=True)
        logging.getLogger("t").debug("not at -v")
    """)
    subprocess.run([PYTHON, "-c", code], env=env_for(tmp_path), cwd=ROOT, check=True,
                   timeout=60)
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["mount-x.log", "mount-x.log.1", "mount-x.log.2"]
    for p in log.parent.iterdir():
        assert p.stat().st_size <= 4000 + 200
    text = log.read_text()
    assert "line 399" in text and "stderr after the last rotation" in text
    assert "not at -v" not in text
    assert "line 0 " not in "".join(p.read_text() for p in log.parent.iterdir())  # rotated out
    time.sleep(0)
