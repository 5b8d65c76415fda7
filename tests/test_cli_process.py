"""The README's command-line contracts, run as a user runs them: real processes, real mounts.

Every node here is a `peerdrive serve` or `peerdrive mount` process on
127.0.0.1 without LAN (tests/pin_helpers.Nodes stops each by PID whatever
happens). The same exit codes are checked in process, for every error type,
in tests/test_cli_inprocess.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache.store import BlockStore
from tests.helpers import PYTHON, ROOT, digest, env_for, is_mounted, peerdrive, publish
from tests.inprocess import publish_folder, wrong_key_chunks
from tests.pin_helpers import MiB, Nodes, open_store, status, xattr
from tests.processes import stop_pid, wait_exit, where_blocked
from tests.swarm_helpers import node_id_of
from vfs.capability import WriteCap, parse_link
from vfs.home import Home

pytestmark = pytest.mark.fuse

MARKER = b"NOT UNDER THIS KEY"


def test_node_status_json_lists_the_live_mount_and_node_with_their_values(
        tmp_path: Path, node_home) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(2 * MiB))
    pub, reader = node_home("pub"), node_home("reader")
    info = publish(pub, src)
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, info["read_link"], tmp_path / "mnt", "--bootstrap", seeder.addr)
        assert digest(m.path / "a.bin") == digest(src / "a.bin")
        after = time.time()
        data = status(reader)
        assert data["home"] == str(reader.resolve())
        [mount] = data["mounts"]
        assert {k: mount[k] for k in ("pid", "mountpoint", "drive", "port")} == {
            "pid": m.pid, "mountpoint": str(m.path.resolve()), "drive": info["drive"],
            "port": m.port}
        # the background mount's log, where `status` says it is; `start` names the process
        assert mount["log"] == str(Home(reader).mount_log_path(info["drive"]))
        assert Path(mount["log"]).exists() and isinstance(mount["start"], int)
        # the mount's own node snapshot, fresh and saying what it fetched from whom
        for _ in range(100):
            [node] = status(reader)["nodes"]
            if node["time"] >= after:
                break
            time.sleep(0.1)
        assert (node["pid"], node["port"], node["node_id"]) == (m.pid, m.port,
                                                                node_id_of(reader))
        peers = node["drives"][info["drive"]]["peers"]
        assert [p["node_id"] for p in peers] == [seeder.node_id]
        assert peers[0]["bytes"] >= 2 * MiB and peers[0]["blocks"] >= 2
        assert data["drives"] == [{**data["drives"][0], "drive": info["drive"], "seq": 1,
                                   "published_here": False}]
        with open_store(reader) as store:
            assert data["cache"] == {"used_bytes": store.total_bytes, "limit_bytes": None}
        # the publisher's node: the serve process, and what it served
        [served] = status(pub)["nodes"]
        assert served["pid"] == seeder.pid and served["port"] == seeder.port
        assert served["server"]["blocks_served"] >= 2
        assert status(pub)["mounts"] == []
        table = peerdrive(reader, "status").stdout
        assert f"mount   {m.path.resolve()}  drive {info['drive'][:16]}  pid {m.pid}" in table
        assert f"node    pid {m.pid} port {m.port}" in table
    # everything stopped: neither is listed any more
    data = status(reader)
    assert data["mounts"] == [] and data["nodes"] == []


def publish_with_a_wrong_key_block(home: Path, src: Path, monkeypatch) -> tuple[str, bytes]:
    """Publish `src` in this process as `home`'s drive; chunks starting with MARKER are
    encrypted under another key (their ids match, they do not decrypt)."""
    h = Home(home)
    cap = h.create_drive(src)
    with BlockStore(h.store_path) as store, wrong_key_chunks(monkeypatch, MARKER) as bad:
        publish_folder(store, src, cap)
    [bad_id] = bad
    return cap.read_cap().link(), bad_id


def test_corrupt_block_gives_eio_is_evicted_and_the_mount_survives(
        tmp_path: Path, node_home, monkeypatch) -> None:
    """A block whose id matches but whose bytes do not decrypt: EIO, and gone from the store."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_bytes(b"good\n")
    (src / "bad.txt").write_bytes(MARKER + b"!" * 5000)
    pub, reader = node_home("pub"), node_home("reader")
    link, bad_id = publish_with_a_wrong_key_block(pub, src, monkeypatch)
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr,
                        "--fetch-timeout", "10")
        for _ in range(2):  # and again: fetched afresh, never answered from a cache
            with pytest.raises(OSError) as exc:
                (m.path / "bad.txt").read_bytes()
            assert exc.value.errno == errno.EIO
        assert (m.path / "good.txt").read_bytes() == b"good\n"
        assert xattr(m.path / "bad.txt", "state") == "cloud"
        nodes.unmount(m)  # the store writer has stored everything it fetched by now
    with open_store(reader) as store:
        assert not store.has(bad_id), "the undecryptable block stayed in the reader's store"
        assert store.total_bytes > 0  # the good file's block and the directory were kept


def test_forged_head_in_the_store_exits_3(tmp_path: Path, node_home) -> None:
    """Exit code 3: corrupt or forged data (a head whose signature does not verify)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    home = node_home("pub")
    info = publish(home, src)
    pubkey = parse_link(info["read_link"]).pubkey
    with BlockStore(Home(home).store_path) as store:
        wire = bytearray(store.get_record(b"head:" + pubkey))
        wire[-5] ^= 0x40  # inside the signature
        store.put_record(b"head:" + pubkey, bytes(wire))
    (tmp_path / "mnt").mkdir()
    res = peerdrive(home, "mount", info["read_link"], str(tmp_path / "mnt"), "--listen",
                    "127.0.0.1:0", "--no-lan", check=False, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "head" in res.stderr
    assert not is_mounted(tmp_path / "mnt")
    res = peerdrive(home, "publish", str(src), check=False)
    assert res.returncode == 3, res.stderr


def small_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "folder" / "sub").mkdir(parents=True)
    (src / "folder" / "a.bin").write_bytes(os.urandom(3 * MiB))
    (src / "folder" / "sub" / "b.bin").write_bytes(os.urandom(MiB))
    (src / "other.txt").write_text("other\n")
    return src


def test_exit_codes_of_real_commands(tmp_path: Path, node_home) -> None:
    """0, 1, 2, 5 and 6 from the processes a user runs (3: test_forged_head_..., 4 below)."""
    home = node_home("a")
    src = small_tree(tmp_path)
    assert peerdrive(home, "publish", str(src)).returncode == 0
    not_a_dir = tmp_path / "home-is-a-file"
    not_a_dir.write_text("")
    res = peerdrive(not_a_dir, "keys", check=False)
    assert res.returncode == 1 and "peerdrive: error:" in res.stderr
    res = peerdrive(home, "share", "peerdrive:r1:not-a-link", check=False)
    assert res.returncode == 2 and "link" in res.stderr
    res = peerdrive(home, "mount", publish(home, src)["read_link"], str(tmp_path / "nowhere"),
                    check=False)
    assert res.returncode == 6 and "not a directory" in res.stderr
    res = peerdrive(home, "unmount", str(tmp_path), check=False)
    assert res.returncode == 6 and "not mounted" in res.stderr


def udp_port_held_with_tcp_twin_free() -> tuple[socket.socket, int]:
    """A UDP socket bound to 127.0.0.1:P whose TCP P is free (a node serves both on P)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                continue
        return udp, port
    raise AssertionError("no UDP port with a free TCP twin in 50 tries")


def test_a_taken_dht_port_is_a_message_and_exit_1(tmp_path: Path, node_home) -> None:
    """A node that cannot bind its DHT (UDP) port on an explicit --listen fails with the
    reason, not a traceback: serve in the foreground, mount through its ready report."""
    home = node_home("a")
    link = json.loads(peerdrive(home, "new", "--json").stdout)["read_link"]
    (tmp_path / "mnt").mkdir()
    udp, port = udp_port_held_with_tcp_twin_free()
    with udp:
        for args in (("serve",), ("mount", link, str(tmp_path / "mnt"))):
            res = peerdrive(home, *args, "--listen", f"127.0.0.1:{port}", "--no-lan",
                            check=False, timeout=120)
            assert res.returncode == 1, (args, res.stderr)
            assert res.stderr.startswith("peerdrive: error: cannot listen for DHT traffic on "
                                         f"UDP 127.0.0.1:{port}"), (args, res.stderr)
            assert "Traceback" not in res.stderr, (args, res.stderr)
    assert not is_mounted(tmp_path / "mnt")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs, mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(filler: Path) -> None:
    """Grow `filler` (made beforehand) until its disk is full to the last byte."""
    with open(filler, "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)


def test_publish_on_a_full_disk_exits_5(tmp_path: Path, small_disk: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(24 * MiB))  # more than the 16 MiB disk
    home = small_disk / "home"
    res = peerdrive(home, "publish", str(src), check=False)
    assert res.returncode == 5, res.stderr
    assert "full" in res.stderr or "no space" in res.stderr
    with BlockStore(Home(home).store_path) as store:
        assert store.check_consistency() == []  # nothing half-written


def test_pin_on_a_full_disk_is_enospc_and_exits_5_and_reads_still_work(
        tmp_path: Path, node_home, small_disk: Path) -> None:
    """ENOSPC through FUSE: a pin on a home whose disk filled up; reads are served uncached."""
    src = small_tree(tmp_path)
    pub = node_home("pub")
    reader = small_disk / "home"
    link = publish(pub, src)["read_link"]
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        filler = small_disk / "filler"
        filler.touch()
        m = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr)
        assert (m.path / "other.txt").read_text() == "other\n"
        fill(filler)
        try:
            # the pin cannot be kept: ENOSPC (exit 5) when its own record needs a new page
            # of the store, else it stalls with nothing stored (exit 4); never "pinned"
            res = peerdrive(reader, "pin", str(m.path / "folder"), "--stall-timeout", "5",
                            check=False, timeout=120)
            assert (res.returncode, "full" in res.stderr) in ((5, True), (4, False)), \
                res.stderr + m.log_tail()
            # a read the network can serve never fails for a full disk, and the mount lives
            assert digest(m.path / "folder" / "a.bin") == digest(src / "folder" / "a.bin")
            assert is_mounted(m.path.resolve())
        finally:
            filler.unlink()
        peerdrive(reader, "pin", str(m.path / "folder"), timeout=120)
        assert xattr(m.path / "folder", "state") == "device"


def test_keys_show_write_prints_the_write_link_only_when_asked(tmp_path: Path,
                                                               node_home) -> None:
    home = node_home("a")
    src = small_tree(tmp_path)
    info = publish(home, src)
    plain = json.loads(peerdrive(home, "keys", "--json").stdout)
    assert plain["node_id"] == node_id_of(home) and plain["home"] == str(home.resolve())
    [drive] = plain["drives"]
    assert drive == {"drive": info["drive"], "read_link": info["read_link"],
                     "source": str(src.resolve())}
    shown = json.loads(peerdrive(home, "keys", "--show-write", "--json").stdout)
    write_link = shown["drives"][0]["write_link"]
    assert write_link == peerdrive(home, "share", str(src), "--write").stdout.strip()
    write = parse_link(write_link)
    assert type(write) is WriteCap and write.read_cap().link() == info["read_link"]
    assert write_link not in peerdrive(home, "keys").stdout
    assert f"  write  {write_link}" in peerdrive(home, "keys", "--show-write").stdout


def test_unmount_busy_lazy_and_not_mounted(tmp_path: Path, node_home) -> None:
    home = node_home("pub")
    src = small_tree(tmp_path)
    link = publish(home, src)["read_link"]
    with Nodes(tmp_path) as nodes:
        m = nodes.mount(home, link, tmp_path / "mnt")
        held = open(m.path / "other.txt", "rb")  # noqa: SIM115 - held open across unmounts
        try:
            res = peerdrive(home, "unmount", str(m.path), check=False)
            assert res.returncode == 6
            assert "busy" in res.stderr and "--lazy" in res.stderr
            assert is_mounted(m.path.resolve())
            peerdrive(home, "unmount", "--lazy", str(m.path))
            assert not is_mounted(m.path.resolve())
            assert held.read() == b"other\n"  # an open file goes on reading after --lazy
        finally:
            held.close()
        assert wait_exit(m.pid, None, 30), "the mount process did not end after the last close"
        res = peerdrive(home, "unmount", str(m.path), check=False)
        assert res.returncode == 6 and "is not mounted" in res.stderr


def start(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "vfs.cli", *args], env=env_for(home), cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 0),
                                           (signal.SIGTERM, 0)])
def test_a_signal_stops_serve_cleanly(tmp_path: Path, node_home, sig: int, code: int) -> None:
    home = node_home("pub")
    publish(home, small_tree(tmp_path))
    proc = start(home, "serve", "--listen", "127.0.0.1:0", "--no-lan", "--json")
    try:
        ready = json.loads(proc.stdout.readline())
        assert wait_for(lambda: (home / "run" / f"{proc.pid}.json").exists())
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert ("interrupted" in err) == (code == 130)
        assert not (home / "run" / f"{proc.pid}.json").exists()  # its snapshot went with it
        assert ready["port"] > 0
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid, proc)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 0)])
def test_a_signal_unmounts_a_foreground_mount(tmp_path: Path, node_home, sig: int,
                                              code: int) -> None:
    home = node_home("pub")
    link = publish(home, small_tree(tmp_path))["read_link"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = start(home, "mount", link, str(mnt), "--foreground", "--listen", "127.0.0.1:0",
                 "--no-lan")
    try:
        assert wait_for(lambda: Home(home).mount_file(mnt).exists() or proc.poll() is not None,
                        timeout=60)
        assert is_mounted(mnt) and (mnt / "other.txt").read_text() == "other\n"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert not is_mounted(mnt)
        assert not Home(home).mount_file(mnt).exists()
        assert status(home)["mounts"] == []
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid, proc)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_a_signal_unmounts_a_background_mount(tmp_path: Path, node_home) -> None:
    home = node_home("pub")
    link = publish(home, small_tree(tmp_path))["read_link"]
    with Nodes(tmp_path) as nodes:
        for sig in (signal.SIGINT, signal.SIGHUP):
            m = nodes.mount(home, link, tmp_path / "mnt")
            os.kill(m.pid, sig)
            assert wait_exit(m.pid, None, 60), f"signal {sig} did not end the mount"
            assert not is_mounted(m.path.resolve())
            assert status(home)["mounts"] == []
            nodes.mounts.remove(m)


@contextlib.contextmanager
def reader_of_a_seeder(tmp_path: Path, node_home, *extra: str):
    """small_tree published, its publisher serving, a reader's mount of it: (src, reader
    home, seeder, mount); everything stopped on exit."""
    src = small_tree(tmp_path)
    pub, reader = node_home("pub"), node_home("reader")
    link = publish(pub, src)["read_link"]
    with Nodes(tmp_path) as nodes:
        seeder = nodes.serve("pub", pub)
        m = nodes.mount(reader, link, tmp_path / "mnt", "--bootstrap", seeder.addr, *extra)
        try:
            yield src, reader, seeder, m
        except BaseException:  # the mount's and the seeder's logs go with the tmp dir
            with contextlib.suppress(Exception):
                print(f"{where_blocked(m.pid)}\n{nodes.diagnostics()}", file=sys.stderr)
            raise


def test_interrupted_pin_exits_130_and_the_pin_stays(tmp_path: Path, node_home) -> None:
    with reader_of_a_seeder(tmp_path, node_home, "--fetch-timeout", "3") as (src, reader,
                                                                          seeder, m):
        seeder.stop()  # nobody serves the blocks: the pin waits
        proc = start(reader, "pin", str(m.path / "folder"))
        try:
            assert wait_for(lambda: xattr(m.path / "folder", "pinned") == "1")
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"pin did not end 30 s after SIGINT\n"
                                     f"{where_blocked(proc.pid)}") from None
            assert proc.returncode == 130 and "interrupted" in err
        finally:
            if proc.poll() is None:
                stop_pid(proc.pid, proc)
        assert xattr(m.path / "folder", "pinned") == "1"  # the pin stays, to complete later


def test_no_peer_exits_4(tmp_path: Path, node_home) -> None:
    with reader_of_a_seeder(tmp_path, node_home, "--fetch-timeout", "3") as (src, reader,
                                                                          seeder, m):
        seeder.stop()
        res = peerdrive(reader, "pin", str(m.path / "folder"), "--stall-timeout", "5",
                        check=False, timeout=120)
        assert res.returncode == 4 and "no peer" in res.stderr


def test_evict_of_a_folder_drops_its_blocks_and_the_kernels_pages(tmp_path: Path,
                                                                  node_home) -> None:
    with reader_of_a_seeder(tmp_path, node_home, "--fetch-timeout", "3") as (src, reader,
                                                                          seeder, m):
        folder = m.path / "folder"
        files = [folder / "a.bin", folder / "sub" / "b.bin"]
        for f in files:  # read whole: on the device, and in the kernel's page cache
            assert digest(f) == digest(src / f.relative_to(m.path))
        assert (m.path / "other.txt").read_text() == "other\n"
        assert wait_for(lambda: xattr(folder, "state") == "device")
        assert wait_for(lambda: xattr(m.path / "other.txt", "state") == "device")
        out = json.loads(peerdrive(reader, "evict", str(folder), "--json").stdout)
        assert out["evicted"][0]["cached_bytes"] == 0
        assert [xattr(f, "state") for f in files] == ["cloud", "cloud"]
        assert xattr(m.path / "other.txt", "state") == "device"  # outside the folder: kept
        # with every peer gone, an evicted file cannot be read: not even from the kernel
        seeder.stop()
        for f in files:
            with pytest.raises(OSError) as exc:
                f.read_bytes()
            assert exc.value.errno == errno.EIO
        assert (m.path / "other.txt").read_text() == "other\n"


def test_unpin_below_a_pinned_folder_is_refused_with_the_reason(tmp_path: Path,
                                                                node_home) -> None:
    with reader_of_a_seeder(tmp_path, node_home) as (src, reader, seeder, m):
        peerdrive(reader, "pin", str(m.path / "folder"), timeout=120)
        child = m.path / "folder" / "sub" / "b.bin"
        res = peerdrive(reader, "unpin", str(child), check=False)
        assert res.returncode == 2
        assert "pinned through a folder above it" in res.stderr
        assert xattr(child, "pinned") == "1"
        peerdrive(reader, "unpin", str(m.path / "folder"))
        assert xattr(child, "pinned") == "0"


@pytest.mark.parametrize("command", [["pin", "--no-wait"], ["pin"], ["unpin"], ["evict"]])
def test_a_path_outside_any_mount_is_refused_and_its_xattrs_untouched(tmp_path: Path,
                                                                      node_home,
                                                                      command) -> None:
    """Before: `pin --no-wait DIR` on a plain folder exited 0, printed "pinned DIR: None,
    0 B of 0 B" and left user.peerdrive.pinned on it (ext4 and tmpfs store any user.
    attribute)."""
    folder = tmp_path / "plain" / "folder"
    folder.mkdir(parents=True)
    (folder / "f.txt").write_text("x\n")
    for path in (folder, folder / "f.txt"):
        res = peerdrive(node_home(), *command, str(path), check=False, timeout=60)
        assert res.returncode == 2, (res.stdout, res.stderr)  # a usage error
        assert f"{path} is not inside a peerdrive mount" in res.stderr
        assert res.stdout == ""
        assert os.listxattr(path) == []


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll `predicate` until it holds; False if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
