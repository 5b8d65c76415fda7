"""How many passes of trio's scheduler a READ's fetch costs between its events (issue 12).

A random 4 KiB read that misses is one block from one peer, and each step
of its way from the READ to the wire and from the receive thread back to the
READ that waits on another pass of the scheduler is one more wait on a busy
machine (docs/benchmarks.md, issue 12 "random 4 KiB p50": 21 passes from a
fetch to its return, client and server in one process, now 15). These tests
count passes (trio's `before_io_wait`, once per pass) from a quiet start
(every task blocked), never time: the count is fixed by which task wakes
which, whatever order trio runs one pass's tasks in.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import trio
import trio.testing

from dht.client import PeerConnection
from dht.fetch import Fetcher
from dht.identity import NodeIdentity
from dht.receiver import ReceiveThread
from dht.server_connection import ServerConnection
from dht.types import Priority
from tests.helpers import run_trio
from tests.test_fetch import CALM, fixed
from tests.test_peer_support import make_blocks, new_drive, start_server

run = functools.partial(run_trio, deadline=60.0)


class _Passes(trio.abc.Instrument):
    """Counts the passes of the scheduler (one I/O wait each)."""

    def __init__(self) -> None:
        self.n = 0
        self.counting = False  # calls are noted only while the passes are counted

    def before_io_wait(self, timeout: float) -> None:
        self.n += 1


def _record(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, passes: _Passes,
            into: list[int]) -> None:
    """Note the pass in which each call of `cls.name` (sync or async) begins."""
    real = getattr(cls, name)
    if inspect.iscoroutinefunction(real):
        async def noted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if passes.counting:
                into.append(passes.n)
            return await real(self, *args, **kwargs)
    else:
        def noted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if passes.counting:
                into.append(passes.n)
            return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, noted)


def _fetch_second(blocks: dict[bytes, bytes], passes: _Passes, marks: list[int]) -> None:
    """Fetch one block from a connected peer, counting passes from a quiet start;
    `marks[0]` is set to the pass fetch() was called in, `marks[1]` returned in."""
    first, second = list(blocks)
    dk, secret = new_drive()

    async def test(nursery: trio.Nursery) -> None:
        _server, addr = await start_server(nursery, blocks, {dk: secret})
        async with Fetcher(NodeIdentity.generate(), dk, secret, fixed([addr]),
                           config=CALM) as f:
            assert await f.fetch(first, Priority.READ) == blocks[first]  # connected now
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(passes)
            passes.counting = True
            try:
                marks.append(passes.n)
                data = await f.fetch(second, Priority.READ)
                marks.append(passes.n)
            finally:
                passes.counting = False
                trio.lowlevel.remove_instrument(passes)
        assert data == blocks[second]

    run(test)


def test_a_delivered_block_wakes_the_fetch_on_the_second_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection's reader task hands the block over (pass P); the attempt's task
    wakes (P+1) and finishes the request at once, so the fetch returns on P+2. It
    returned on P+5: the connection's `pending.wait()` checkpointed once more, and the
    attempt finished its request only once its watch task had unwound (two passes:
    the cancelled task, then the nursery's owner)."""
    passes, delivered, marks = _Passes(), [], []
    _record(monkeypatch, PeerConnection, "_delivered", passes, delivered)
    _fetch_second(make_blocks(2, 256 * 1024), passes, marks)
    assert len(delivered) == 1
    assert marks[1] - delivered[0] == 2


def test_a_reads_want_reaches_the_socket_on_the_third_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch() queues the request (pass P); the dispatcher starts an attempt (P+1);
    the attempt takes a free slot of the connection and queues the want (P+2); the
    connection's writer encrypts it and sends it (P+3). It was P+5: trio's
    `Semaphore.acquire` (the slot) and `Lock.acquire` (TlsStream's send lock) each
    give a pass away even when they need not wait."""
    passes, sends, marks = _Passes(), [], []
    _record(monkeypatch, trio.SocketStream, "send_all", passes, sends)
    _fetch_second(make_blocks(2, 4096), passes, marks)
    assert sends, "nothing was sent"
    assert sends[0] - marks[0] == 3  # nothing else is sent before the want


def test_the_receive_threads_batch_is_delivered_in_the_pass_its_reader_wakes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The receive thread wakes trio (`_set_arrived`, pass P); the connection's reader
    task takes the batch and delivers the block on P+1. `take` checkpointed once more
    after its wait, and the block waited a pass for nothing."""
    passes, arrived, delivered, marks = _Passes(), [], [], []
    _record(monkeypatch, ReceiveThread, "_set_arrived", passes, arrived)
    _record(monkeypatch, PeerConnection, "_delivered", passes, delivered)
    _fetch_second(make_blocks(2, 256 * 1024), passes, marks)
    assert len(delivered) == 1
    woke = [n for n in arrived if n <= delivered[0]]
    assert woke, "the reader was not woken before the delivery"
    assert delivered[0] - woke[-1] == 1


def test_a_served_reads_block_reaches_the_socket_in_the_writers_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving connection's writer finds the READ's block ready and sends it in
    that same pass. It sent it a pass later: TlsStream's free send lock was taken with
    `Lock.acquire`, which gives a pass away."""
    passes, ready, sends, marks = _Passes(), [], [], []
    _record(monkeypatch, ServerConnection, "_replies_ready", passes, ready)
    _record(monkeypatch, trio.SocketStream, "send_all", passes, sends)
    _fetch_second(make_blocks(2, 256 * 1024), passes, marks)
    assert ready, "the server's writer never ran"
    after = [n for n in sends if n >= ready[0]]
    assert after
    assert after[0] == ready[0]
