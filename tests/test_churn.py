"""Churn (issue 9): one publisher serves reader after reader, and many at once.

Real processes on 127.0.0.1: one long-lived `peerdrive serve` publisher and
fresh readers (`peerdrive mount`, each with an empty `PEERDRIVE_HOME`) that
come and go. What used to go wrong: the second reader's mount took 10 s (its
DHT lookups waited 5 s per crawl round on the departed first reader) and its
reads failed with EIO; four readers at once made the publisher send 3.5x the
file. The in-process tests at the end pin the cost of one dead DHT contact
and of one dead provider to at most one short timeout.

Mount time is taken from the mount's own status snapshot (`timings.ready`,
seconds from the node starting to the mount being ready), which leaves out
the interpreter start-up that a loaded, shared machine stretches to seconds;
the wall time of `peerdrive mount` is printed beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import trio

from dht.fetch import FetchConfig, Fetcher
from dht.identity import NodeIdentity
from dht.kad import Dht
from dht.records import MutableRecord
from dht.server import PeerServer
from dht.types import PeerAddr, Priority
from tests.helpers import PYTHON, ROOT, env_for, is_mounted, publish
from tests.helpers import digest as file_digest
from tests.swarm_helpers import Swarm, read_snapshot, wait_until

FILE = "data.bin"
SERIAL_SIZE = 64 << 20
CONCURRENT_SIZE = 64 << 20
# Seconds from the node's start to a ready mount. The defect of issue 9 was a mount
# that waited out a 10 s dial next to departed readers: this bound catches it and
# only it. The 2 s goal is a figure of scripts/bench ("mount ready", churn readers),
# not a timing asserted here (issue 16: no speed goal inside a test).
MOUNT_READY_LIMIT = 8.0


def write_random(path: Path, size: int, seed: int) -> str:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 4 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def published(tmp_path: Path, size: int, seed: int) -> tuple[Path, str, str]:
    src = tmp_path / "src"
    src.mkdir()
    digest = write_random(src / FILE, size, seed)
    home = tmp_path / "home-publisher"
    home.mkdir()
    return home, publish(home, src)["read_link"], digest


def ready_seconds(home: Path, pid: int) -> float:
    """`timings.ready` of the mount's status snapshot: node start to mount ready."""
    deadline = time.monotonic() + 15
    while True:
        snap = read_snapshot(home, pid)
        ready = snap.get("timings", {}).get("ready")
        if ready is not None:
            return float(ready)
        if time.monotonic() > deadline:
            raise AssertionError(f"mount {pid} reports no ready time: {snap.get('timings')}")
        time.sleep(0.2)


def kill_mount(swarm: Swarm, m) -> None:
    """SIGKILL the mount process by PID and clear the dead mount it leaves."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{m.pid}"), 10)
    subprocess.run(["fusermount3", "-u", "-z", str(m.mountpoint)], capture_output=True,
                   check=False)
    if m in swarm.mounts:
        swarm.mounts.remove(m)


@pytest.mark.fuse
def test_serial_fresh_readers_mount_fast_and_read_every_byte(tmp_path: Path) -> None:
    home, link, digest = published(tmp_path, SERIAL_SIZE, 9)
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", home)
        figures = []
        for i in range(5):
            reader_home = tmp_path / f"home-reader{i + 1}"
            reader_home.mkdir()
            started = time.monotonic()
            m = swarm.mount(f"reader{i + 1}", reader_home, link, tmp_path / f"mnt{i + 1}",
                            bootstrap=[pub.addr])
            wall = time.monotonic() - started
            ready = ready_seconds(reader_home, m.pid)
            started = time.monotonic()
            got = file_digest(m.mountpoint / FILE)  # EIO would raise here
            read = time.monotonic() - started
            how = "SIGTERM" if i % 2 == 0 else "SIGKILL"
            figures.append(f"reader {i + 1}: ready {ready:.2f} s (mount command {wall:.2f} s), "
                           f"64 MiB read {read:.2f} s, then {how}")
            assert got == digest, f"reader {i + 1} read wrong bytes\n{swarm.diagnostics()}"
            assert ready < MOUNT_READY_LIMIT, (
                f"reader {i + 1} took {ready:.2f} s to mount next to departed readers\n"
                + "\n".join(figures) + "\n" + swarm.diagnostics())
            if how == "SIGTERM":
                swarm.unmount(m)  # fusermount, then SIGTERM by PID
            else:
                kill_mount(swarm, m)
            assert not is_mounted(m.mountpoint)
        print("\n" + "\n".join(figures))
        assert pub.alive()


@pytest.mark.fuse
def test_four_readers_at_once_read_every_byte_and_serve_each_other(tmp_path: Path) -> None:
    home, link, digest = published(tmp_path, CONCURRENT_SIZE, 11)
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", home)
        mounts = []
        for i in range(4):
            reader_home = tmp_path / f"home-reader{i + 1}"
            reader_home.mkdir()
            mounts.append(swarm.mount(f"reader{i + 1}", reader_home, link,
                                      tmp_path / f"mnt{i + 1}", bootstrap=[pub.addr]))
        # every reader knows the others as providers before the race starts
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            digests = list(pool.map(lambda m: file_digest(m.mountpoint / FILE), mounts))
        seconds = time.monotonic() - started
        assert digests == [digest] * 4, swarm.diagnostics()
        after = time.time()
        sent = pub.snapshot(after=after)["server"]["bytes_served"]
        print(f"\nfour readers of {CONCURRENT_SIZE >> 20} MiB at once (no LAN): "
              f"{seconds:.1f} s, publisher sent {sent / 1e6:.0f} MB = "
              f"{sent / CONCURRENT_SIZE:.2f}x the file")
        # each reader alone would take 1x from the publisher: 4x is not serving each other
        assert sent < 3.0 * CONCURRENT_SIZE, swarm.diagnostics()


# ----------------------------------------------------------------------------- in process


def _silent_udp() -> socket.socket:
    """A UDP socket on 127.0.0.1: a DHT node that answers pings until told to die."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def _ping_from(sock: socket.socket, node_id: bytes, to: tuple[str, int]) -> None:
    """Make `to` list `sock` as a contact: a ping request from it (Kademlia adds senders)."""
    body = msgpack.packb(["ping", [node_id]], use_bin_type=True)
    sock.sendto(b"\x00" + os.urandom(20) + body, to)


async def _answer_pings(sock: socket.socket, node_id: bytes) -> None:
    """Answer every ping request (the publisher verifies a new contact's address with one)."""
    tsock = trio.socket.from_stdlib_socket(sock)
    while True:
        data, addr = await tsock.recvfrom(65536)
        if data[:1] == b"\x00":
            with contextlib.suppress(Exception):
                name, _ = msgpack.unpackb(data[21:], raw=False)
                if name == "ping":
                    await tsock.sendto(b"\x01" + data[1:21] + msgpack.packb(node_id), addr)


def test_a_dead_dht_contact_costs_a_lookup_one_short_timeout_at_most() -> None:
    trio.run(_test_a_dead_dht_contact_costs_a_lookup_one_short_timeout_at_most)


def _requests_from(socks: list[socket.socket], port: int) -> int:
    """Datagrams waiting at these sockets that came from 127.0.0.1:`port` (read, so gone)."""
    count = 0
    for sock in socks:
        while True:
            try:
                _, addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            count += addr[1] == port
    return count


async def _test_a_dead_dht_contact_costs_a_lookup_one_short_timeout_at_most() -> None:
    # long enough that the bounds below leave seconds of slack on a loaded machine, yet
    # waiting for two timeouts one after the other would break the join's bound
    rpc_timeout = 4.0
    _, head = MutableRecord.create(_key(), 1, b"head")
    dead = [_silent_udp() for _ in range(2)]
    try:
        async with trio.open_nursery() as nursery:
            publisher = Dht(rpc_timeout=rpc_timeout)
            port = await nursery.start(publisher.run, "127.0.0.1", 0, [])
            await publisher.put_mutable(head)
            async with trio.open_nursery() as alive:  # alive until the publisher knows them
                for sock in dead:
                    node_id = os.urandom(32)
                    alive.start_soon(_answer_pings, sock, node_id)
                    _ping_from(sock, node_id, ("127.0.0.1", port))
                assert await _until(lambda: len(publisher.contacts()) == len(dead))
                alive.cancel_scope.cancel()
            # now they read nothing and answer nothing: dead nodes the publisher still lists

            reader = Dht(rpc_timeout=rpc_timeout)
            started = trio.current_time()
            await nursery.start(reader.run, "127.0.0.1", 0, [("127.0.0.1", port)])
            joined = trio.current_time() - started
            asked_in_join = _requests_from(dead, reader.port)
            record = MutableRecord.decode(head)
            started = trio.current_time()
            got = await reader.get_mutable(record.key)
            first = trio.current_time() - started
            started = trio.current_time()
            got_again = await reader.get_mutable(record.key)
            second = trio.current_time() - started
            asked_later = _requests_from(dead, reader.port)
            print(f"\njoin {joined:.2f} s, first lookup {first:.2f} s, second {second:.2f} s "
                  f"(rpc timeout {rpc_timeout} s, {len(dead)} dead contacts)")
            assert got is not None and got.wire == head
            assert got_again is not None
            # the join meets the dead contacts: each asked once, all in one round, so
            # one timeout (two one after the other would take 2 x rpc_timeout)
            assert asked_in_join == len(dead)
            assert joined < 2 * rpc_timeout
            # remembered as dead: later lookups do not ask them at all (so wait no timeout)
            assert asked_later == 0
            assert first < rpc_timeout and second < rpc_timeout
            nursery.cancel_scope.cancel()
    finally:
        for sock in dead:
            sock.close()


def test_a_reader_whose_connection_broke_is_handed_to_no_newcomer() -> None:
    trio.run(_test_a_reader_whose_connection_broke_is_handed_to_no_newcomer)


async def _test_a_reader_whose_connection_broke_is_handed_to_no_newcomer() -> None:
    # A killed reader leaves the publisher's routing table only once a ping of it has
    # timed out; readers 2-5 of the bench joined within that second and each waited it
    # out on the dead one. The RPC timeout is far beyond the bound below: only a join
    # that never asks the dead reader can meet it.
    rpc_timeout = 60.0
    dead = _silent_udp()
    try:
        async with trio.open_nursery() as nursery:
            publisher = Dht(rpc_timeout=rpc_timeout)
            port = await nursery.start(publisher.run, "127.0.0.1", 0, [])
            dead_id = os.urandom(32)
            async with trio.open_nursery() as alive:  # alive until the publisher lists it
                alive.start_soon(_answer_pings, dead, dead_id)
                _ping_from(dead, dead_id, ("127.0.0.1", port))
                assert await _until(lambda: len(publisher.contacts()) == 1, timeout=30)
                alive.cancel_scope.cancel()
            # its block connection broke without a Goodbye: what the server reports
            assert publisher.check_contact(dead_id)
            pinged = 0

            def check_sent() -> bool:
                nonlocal pinged
                pinged += _requests_from([dead], port)
                return pinged > 0

            assert await _until(check_sent, timeout=30)  # the check is under way

            reader = Dht(rpc_timeout=rpc_timeout)
            started = trio.current_time()
            with trio.fail_after(rpc_timeout / 2):
                await nursery.start(reader.run, "127.0.0.1", 0, [("127.0.0.1", port)])
            joined = trio.current_time() - started
            print(f"\njoin {joined:.2f} s next to a reader being checked "
                  f"(rpc timeout {rpc_timeout:.0f} s)")
            assert _requests_from([dead], reader.port) == 0
            assert [c[0] for c in reader.contacts()] == [publisher.node_id]
            nursery.cancel_scope.cancel()
    finally:
        dead.close()


def test_a_mount_stopped_by_sigterm_outside_its_fuse_session_says_bye(tmp_path: Path) -> None:
    trio.run(_test_a_mount_stopped_by_sigterm_outside_its_fuse_session_says_bye, tmp_path)


async def _test_a_mount_stopped_by_sigterm_outside_its_fuse_session_says_bye(
        tmp_path: Path) -> None:
    # `fusermount -u` then SIGTERM (the bench, the swarm harness, a service manager)
    # reached the mount daemon after the FUSE session's signal receiver had closed:
    # the default action killed it before its DHT bye, and the publisher kept the
    # reader. The same gap is open while the mount starts; there it can be hit every
    # time: the daemon waits for the head of a drive nobody serves.
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    link = publish(tmp_path / "home-publisher", src)["read_link"]
    home = tmp_path / "home-reader"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon: list[int] = []

    def daemon_pid() -> bool:
        daemon[:] = [int(p.stem) for p in (home / "run").glob("*.json")]
        return len(daemon) == 1

    async with trio.open_nursery() as nursery:
        # an RPC timeout far beyond the wait below: only the mount's bye removes it
        boot = Dht(rpc_timeout=120.0)
        port = await nursery.start(boot.run, "127.0.0.1", 0, [])
        command = await trio.lowlevel.open_process(
            [PYTHON, "-m", "vfs.cli", "mount", link, str(mnt), "--listen", "127.0.0.1:0",
             "--no-lan", "--json", "--bootstrap", f"127.0.0.1:{port}"],
            env=env_for(home), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert await _until(lambda: len(boot.contacts()) == 1, timeout=60)
            assert await _until(daemon_pid, timeout=60)
            os.kill(daemon[0], signal.SIGTERM)
            assert await _until(lambda: len(boot.contacts()) == 0, timeout=30), (
                "the mount stopped by SIGTERM did not say its DHT bye")
            with trio.move_on_after(60):
                await command.wait()
        finally:
            for pid in [*daemon, command.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await command.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                           check=False)
        nursery.cancel_scope.cancel()


def test_a_departing_dht_node_says_bye_and_leaves_routing_tables() -> None:
    trio.run(_test_a_departing_dht_node_says_bye_and_leaves_routing_tables)


async def _test_a_departing_dht_node_says_bye_and_leaves_routing_tables() -> None:
    async with trio.open_nursery() as nursery:
        # an RPC timeout far beyond the wait below: only b's bye can remove it in time
        a = Dht(rpc_timeout=120.0)
        port = await nursery.start(a.run, "127.0.0.1", 0, [])
        async with trio.open_nursery() as b_nursery:
            b = Dht(rpc_timeout=120.0)
            await b_nursery.start(b.run, "127.0.0.1", 0, [("127.0.0.1", port)])
            assert await _until(lambda: len(a.contacts()) == 1, timeout=30)
            b_nursery.cancel_scope.cancel()
        # b stopped: its bye removes it from a's table without waiting for any timeout
        assert await _until(lambda: len(a.contacts()) == 0, timeout=30)
        nursery.cancel_scope.cancel()


async def _until(predicate, timeout: float = 5.0) -> bool:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return True
    return False


class _Store:
    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.blocks = blocks

    def get(self, block_id: bytes) -> bytes | None:
        return self.blocks.get(block_id)


def test_a_dead_provider_never_holds_a_fetch() -> None:
    trio.run(_test_a_dead_provider_never_holds_a_fetch)


async def _test_a_dead_provider_never_holds_a_fetch() -> None:
    """One live provider, one that accepts TCP and then says nothing (a hung host), one
    whose port is closed, and the live one listed at a wrong address first: the fetch
    is served by the live one at once, and the live one is not counted failed."""
    server_ident = NodeIdentity.generate()
    client_ident = NodeIdentity.generate()
    dk, secret = os.urandom(32), os.urandom(32)
    block = os.urandom(100_000)
    block_id = hashlib.sha256(block).digest()
    server = PeerServer(server_ident, _Store({block_id: block}), {dk: secret})
    hung = trio.socket.socket()
    await hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        live = server_ident.node_id
        providers = [
            PeerAddr(os.urandom(32), "127.0.0.1", hung.getsockname()[1]),
            PeerAddr(os.urandom(32), "127.0.0.1", closed_port),
            PeerAddr(live, "127.0.0.1", closed_port),  # a wrong address of the live peer
            PeerAddr(live, "127.0.0.1", port),
        ]
        # the hung provider's connect timeout is far beyond the bound below: only a
        # fetch that never waits for it can pass
        config = FetchConfig(connect_timeout=120.0, default_timeout=240.0)
        async with Fetcher(client_ident, dk, secret, lambda: providers, config=config) as f:
            started = trio.current_time()
            data = await f.fetch(block_id, Priority.READ)
            took = trio.current_time() - started
            stats = {s.node_id: s for s in f.peer_stats()}
        print(f"\nfetch next to a hung and a dead provider: {took * 1000:.0f} ms")
        assert data == block
        assert took < 30.0  # far below the 120 s connect timeout of the hung one
        assert stats[live].failures == 0 and stats[live].blocks == 1
        nursery.cancel_scope.cancel()
    hung.close()


def _key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()
