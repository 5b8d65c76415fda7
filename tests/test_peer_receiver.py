"""The peer client's receive thread (dht/receiver.py) against peers that misbehave mid-frame.

Real TLS over 127.0.0.1: a hostile server (tests/hostile.py) completes the
handshake, then sends what the test scripts: half a frame and silence, half a
frame and a close, a block that does not hash to its id, good frames followed
by garbage. What is checked: the same errors as the event-loop reader gave,
messages before a failure still delivered, no hang, and the thread gone once
the connection is (`ReceiveThread.thread_ended`). The last tests do it with
real processes: a `peerdrive mount` whose peer froze while the mount's
receive thread waited in its socket read stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
import trio

from dht.client import PeerConnection
from dht.errors import BadBlockError, PeerGoneError, PeerProtocolError
from dht.frames import Block, Hello, Notice, encode
from dht.identity import NodeIdentity
from dht.receiver import MAX_QUEUED, ReceiveThread
from dht.tlsstream import SOCKET_READ
from tests.helpers import publish, run_trio, write_random
from tests.hostile import FrameConn, HostilePeerServer, hostile_client
from tests.swarm_helpers import Swarm, peer_stats, wait_until
from tests.test_peer_support import block_id, new_drive, wants_in

DEADLINE = 60.0  # only a hang reaches it


def run(test) -> None:
    run_trio(test, DEADLINE)


async def wait_for(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def next_wants(conn: FrameConn, count: int):
    """The next `count` wants the client sends (Want or WantRun frames)."""
    wants = []
    while len(wants) < count:
        msg = await conn.receive()
        assert msg is not None, "the client left"
        wants += wants_in([msg])
    return wants


async def connect(nursery: trio.Nursery, script) -> tuple[PeerConnection, trio.Nursery]:
    hostile = HostilePeerServer(NodeIdentity.generate(), script)
    await nursery.start(hostile.run)
    dk, secret = new_drive()
    inner = await nursery.start(_nursery_task)
    conn = await PeerConnection.connect(hostile.addr(), NodeIdentity.generate(), dk, secret,
                                        nursery=inner)
    return conn, inner


async def _nursery_task(*, task_status) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def test_half_a_frame_then_silence_waits_and_close_ends_the_thread() -> None:
    data = os.urandom(300_000)
    sent_half = trio.Event()

    async def half_then_silence(conn: FrameConn) -> None:
        (want,) = await next_wants(conn, 1)
        frame = encode(Block(want.req_id, data))
        await conn.stream.send_all(frame[: len(frame) // 2])
        sent_half.set()
        await trio.sleep_forever()

    async def test(nursery) -> None:
        conn, _ = await connect(nursery, half_then_silence)
        receiver = conn._receiver
        assert receiver is not None and not receiver.thread_ended.is_set()
        with trio.CancelScope() as fetching:
            async def cancel_once_half_is_in() -> None:
                await sent_half.wait()
                # the thread took the half frame off the socket and waits for the rest
                await wait_for(lambda: receiver._decoder.buffered > 0)
                fetching.cancel()
            nursery.start_soon(cancel_once_half_is_in)
            await conn.fetch(block_id(data))
        assert fetching.cancelled_caught
        assert not conn.closed  # half a frame is no error, only unfinished
        await conn.aclose()
        assert receiver.thread_ended.is_set()  # aclose waited for the thread
        assert isinstance(await conn.wait_closed(), PeerGoneError)

    run(test)


@pytest.mark.parametrize("how", ["close_notify", "abrupt"])
def test_a_peer_that_closes_mid_frame_fails_the_fetch(how: str) -> None:
    data = os.urandom(300_000)

    async def half_then_close(conn: FrameConn) -> None:
        (want,) = await next_wants(conn, 1)
        frame = encode(Block(want.req_id, data))
        await conn.stream.send_all(frame[: len(frame) // 2])
        if how == "close_notify":
            await conn.stream.aclose()
        else:
            await trio.aclose_forcefully(conn.stream.transport)

    async def test(nursery) -> None:
        conn, _ = await connect(nursery, half_then_close)
        with pytest.raises(PeerGoneError, match="closed the connection"):
            await conn.fetch(block_id(data))
        error = await conn.wait_closed()
        assert "closed the connection" in str(error)
        assert conn._receiver is not None and conn._receiver.thread_ended.is_set()
        # a closed connection keeps no receive buffers (a fetcher may hold the object
        # until the departed peer's provider record expires: an hour; tests/test_uptime.py)
        assert len(conn._receiver._raw) + len(conn._receiver._plain) == 0

    run(test)


@pytest.mark.parametrize("size", [1000, 300_000])
def test_a_block_with_the_wrong_bytes_fails_after_the_good_one_before_it(size: int) -> None:
    good, bad = os.urandom(size), os.urandom(size)
    wrong = os.urandom(size)

    async def good_then_wrong(conn: FrameConn) -> None:
        first, second = await next_wants(conn, 2)
        # both answers in one write: one socket read, one batch for trio
        await conn.stream.send_all(encode(Block(first.req_id, good))
                                   + encode(Block(second.req_id, wrong)))
        await trio.sleep_forever()

    async def test(nursery) -> None:
        conn, _ = await connect(nursery, good_then_wrong)
        results: dict[str, object] = {}

        async def fetch(name: str, data: bytes) -> None:
            try:
                results[name] = await conn.fetch(block_id(data))
            except Exception as exc:  # noqa: BLE001 - the test looks at which
                results[name] = exc

        async with trio.open_nursery() as fetches:
            fetches.start_soon(fetch, "good", good)
            await wait_for(lambda: conn.in_flight == 1)
            fetches.start_soon(fetch, "bad", bad)
        assert results["good"] == good
        assert isinstance(results["bad"], BadBlockError), results["bad"]
        error = await conn.wait_closed()
        assert isinstance(error, PeerProtocolError) and "corrupt block" in str(error)
        assert conn.stats.blocks == 1
        assert conn._receiver is not None and conn._receiver.thread_ended.is_set()

    run(test)


def test_good_frames_then_garbage_deliver_then_fail_as_a_bad_frame() -> None:
    good = os.urandom(200_000)

    async def good_then_garbage(conn: FrameConn) -> None:
        (want,) = await next_wants(conn, 1)
        too_long = (64 * 1024 * 1024).to_bytes(4, "big")
        await conn.stream.send_all(encode(Block(want.req_id, good)) + too_long + b"junk")
        await trio.sleep_forever()

    async def test(nursery) -> None:
        conn, _ = await connect(nursery, good_then_garbage)
        assert await conn.fetch(block_id(good)) == good
        error = await conn.wait_closed()
        assert isinstance(error, PeerProtocolError), error
        assert "sent a bad frame" in str(error) and "exceeds the limit" in str(error)

    run(test)


def test_frames_that_came_with_the_welcome_are_delivered_before_anything_else_arrives() -> None:
    """A frame decoded into the buffer together with the Welcome reaches trio although
    the peer then sends nothing: a push connection's first Notice comes in one read with
    its Welcome, and the pushing node then waits for wants (issue 10: a host never
    learnt a version that existed before the push started)."""
    record = os.urandom(400)
    notices: list[tuple[bytes, bytes]] = []

    def notice_with_welcome(hello: Hello) -> list[Notice]:
        return [Notice(hello.discovery_key, record)]

    async def silence(conn: FrameConn) -> None:
        await trio.sleep_forever()

    async def test(nursery) -> None:
        hostile = HostilePeerServer(NodeIdentity.generate(), silence, notice_with_welcome)
        await nursery.start(hostile.run)
        dk, secret = new_drive()
        inner = await nursery.start(_nursery_task)
        conn = await PeerConnection.connect(
            hostile.addr(), NodeIdentity.generate(), dk, secret, nursery=inner,
            on_notice=lambda key, rec: notices.append((key, rec)))
        await wait_for(lambda: notices or conn.closed, 30)
        assert notices == [(dk, record)] and not conn.closed
        await conn.aclose()

    run(test)


def test_a_connection_cancelled_from_outside_still_counts_as_closed() -> None:
    """When the scope around a connection's tasks is cancelled (the node stops), its end
    is still marked: a host's fetcher closes its sources in a shielded cleanup and waited
    for ever on a push connection cancelled this way (a host ignored SIGTERM, issue 10)."""

    async def silence(conn: FrameConn) -> None:
        await trio.sleep_forever()

    async def test(nursery) -> None:
        hostile = HostilePeerServer(NodeIdentity.generate(), silence)
        await nursery.start(hostile.run)
        dk, secret = new_drive()
        async with trio.open_nursery() as outer:
            inner = await outer.start(_nursery_task)
            conn = await PeerConnection.connect(hostile.addr(), NodeIdentity.generate(), dk,
                                                secret, nursery=inner)
            outer.cancel_scope.cancel()
        with trio.fail_after(30):
            assert isinstance(await conn.wait_closed(), PeerGoneError)
            await conn.aclose()
        assert conn._receiver is not None and conn._receiver.thread_ended.is_set()

    run(test)


def test_the_thread_stops_reading_while_trio_has_not_taken_what_it_decoded() -> None:
    """A peer sending faster than we consume fills its own TCP window, not our memory;
    what it sent arrives in order once trio takes it."""
    # 32 MiB: more than the queue, the socket buffers on both sides (loopback autotunes
    # them to a few MiB each) and one socket read can hold together
    blocks = [os.urandom(256 * 1024) for _ in range(128)]
    everything_sent = trio.Event()
    frames_seen: list[int] = []

    async def flood(conn: FrameConn) -> None:
        for i, data in enumerate(blocks):
            await conn.stream.send_all(encode(Block(i, data)))
        everything_sent.set()
        await trio.sleep_forever()

    async def test(nursery) -> None:
        hostile = HostilePeerServer(NodeIdentity.generate(), flood)
        await nursery.start(hostile.run)
        # a bare client: TLS and the handshake by hand, then a receive thread nobody takes from
        dk, secret = new_drive()
        async with hostile_client(hostile.port, hostile.identity.node_id,
                                  NodeIdentity.generate(), dk, secret) as (tcp, raw):
            assert raw is not None
            # a fixed receive buffer: autotuning may grow it to tcp_rmem's maximum (32 MiB
            # on some machines), which could take the whole flood without the thread
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            receiver = ReceiveThread(raw.stream, raw.decoder, "hostile")
            async with trio.open_nursery() as inner:
                await inner.start(receiver.run)
                # the thread fills its queue, then stops reading; the sender stalls
                await wait_for(lambda: receiver._queued >= MAX_QUEUED)
                most = MAX_QUEUED + SOCKET_READ + 2 * 256 * 1024
                for _ in range(20):
                    assert receiver._queued <= most
                    await trio.sleep(0.01)
                assert not everything_sent.is_set()
                while len(frames_seen) < len(blocks):
                    batch = await receiver.take()
                    assert batch.error is None
                    for msg, digest in batch.messages:
                        assert isinstance(msg, Block)
                        assert digest == block_id(blocks[msg.req_id])
                        frames_seen.append(msg.req_id)
                assert frames_seen == list(range(len(blocks)))
                inner.cancel_scope.cancel()
            assert receiver.thread_ended.is_set()

    run(test)


# ---- a real mount whose peer freezes while the receive thread waits in its read --------


def test_a_mount_stops_on_sigterm_while_its_receive_thread_waits_for_a_frozen_peer(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 24 * 1024 * 1024, seed=12)
    pub_home = tmp_path / "pub"
    link = publish(pub_home, src)["read_link"]
    with Swarm(tmp_path / "swarm") as swarm:
        pub = swarm.serve("publisher", pub_home)
        swarm.probe(pub.addr).wait_providers(link, [pub.node_id])
        # the read waits for the frozen peer until the fetch timeout; the mount's FUSE
        # loop stops only once that read is answered (pyfuse3), so keep it short
        reader = swarm.mount("reader", tmp_path / "reader", link, tmp_path / "mnt",
                             bootstrap=[pub.addr], fetch_timeout=3)
        big = reader.mountpoint / "big.bin"
        with open(big, "rb") as f:  # a connection to the publisher, its thread running
            assert len(f.read(65536)) == 65536
        os.kill(pub.pid, signal.SIGSTOP)
        try:
            outcome: dict[str, object] = {}

            def read_far() -> None:  # blocks inside the mount until the mount goes
                try:
                    with open(big, "rb") as f:
                        f.seek(20 * 1024 * 1024)
                        outcome["read"] = len(f.read(1 << 20))
                except OSError as exc:
                    outcome["error"] = exc.errno

            reading = threading.Thread(target=read_far, daemon=True)
            reading.start()

            def waiting_on_the_peer() -> bool:
                stats = peer_stats(reader.snapshot(), pub.node_id)
                return stats is not None and stats.get("in_flight", 0) > 0

            # The read is in flight to the frozen peer, or (on a machine slower than the
            # 3 s fetch timeout) already failed; either way the connection's receive thread
            # waits in recv on a peer that sends nothing, which is what SIGTERM must end.
            assert wait_until(lambda: waiting_on_the_peer() or not reading.is_alive(), 30), \
                swarm.diagnostics()
            os.kill(reader.pid, signal.SIGTERM)
            gone = wait_until(lambda: not Path(f"/proc/{reader.pid}").exists(), 30)
            assert gone, "the mount did not stop: " + swarm.diagnostics()
            reading.join(30)
            assert not reading.is_alive()
            assert "error" in outcome, outcome  # the mount went: the read cannot succeed
        finally:
            os.kill(pub.pid, signal.SIGCONT)
