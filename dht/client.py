"""The peer client: one connection to one peer for one drive, with pipelined requests.

`PeerConnection.connect` / `open` dial a peer (dial.py: TCP, TLS pinned to the
node id we meant to reach, handshake.py's `ClientHandshake`); then per connection
a writer and a reader task run, and a receive thread:

- the writer sends everything queued so far in one write (Want, Cancel, Have,
  Ping, Pong), so a sequential reader's readahead is one TLS record;
- the receive thread (receiver.py) reads the socket, decrypts, decodes
  frames and hashes blocks off the event loop, handing finished messages
  over in batches (one wake-up per socket read, however many blocks); a
  block that hashes to the id its request asked for is also given to
  `on_verified(block_id, data)` there, in the thread, if the owner set one
  (the drive decrypts it there: `Fetcher`'s hook, issue 12);
- the reader routes each answer to the request awaiting it, by request id
  (Block/NotFound to a Want, HaveReply to a Have, Pong to a Ping), and takes
  Notice, Holding, Fetching, Whole, Ping and Goodbye as they come.

Rules: every block is checked against its id (a mismatch closes the
connection: the peer lied); at most the server's `max_wants` wants are
outstanding (more queue locally); a cancelled fetch sends Cancel only if its
Want went out; when the connection ends every request still waiting fails
with the reason. Every request waits on one `PendingReply`.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from .dial import dial
from .errors import (
    BadBlockError,
    BlockNotFound,
    DhtError,
    FrameError,
    PeerGoneError,
    PeerProtocolError,
)
from .frames import (
    MAX_HAVE_IDS,
    MAX_REQ_ID,
    MAX_RUN_IDS,
    MAX_TOKEN,
    Block,
    Cancel,
    Fetching,
    Goodbye,
    Have,
    HaveReply,
    Holding,
    Message,
    NotFound,
    Notice,
    Ping,
    Pong,
    Want,
    WantRun,
    Whole,
    encode,
    unpack_bitmap,
)
from .handshake import DRIVE_SECRET_LEN
from .identity import NodeIdentity
from .receiver import ReceiveThread
from .streams import (
    GOODBYE_GRACE,
    HANDSHAKE_TIMEOUT,
    MAX_CONTROL_BACKLOG,
    FrameStream,
    open_task_nursery,
)
from .types import BLOCK_ID_LEN, DISCOVERY_KEY_LEN, PeerAddr, Priority

OnNotice = Callable[[bytes, bytes], None]

log = logging.getLogger(__name__)

# on_verified(block_id, data): called in a thread with bytes already checked against the id
OnVerified = Callable[[bytes, bytes], None]

MAX_HAVES_IN_FLIGHT = 16  # Have requests one client connection keeps outstanding
MAX_HOLDING_REMEMBERED = 65536  # block ids a client remembers a server announced (Holding)
MAX_FETCHING_REMEMBERED = 4096  # ... said it is fetching (Fetching), not yet holding

T = TypeVar("T")


class PendingReply(Generic[T]):
    """One request awaiting its answer: `request` is the frame sent, `done` is set with the
    result or the error (the first of them wins)."""

    __slots__ = ("request", "done", "result", "error", "sent", "run")

    def __init__(self, request: Message, run: RunOfWants | None = None) -> None:
        self.request = request
        self.done = trio.Event()
        self.result: T | None = None
        self.error: DhtError | None = None
        self.sent = False  # the request went out (a cancelled one that did not owes nothing)
        self.run = run  # the run it belongs to, woken when it ends

    def succeed(self, result: T) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()
            if self.run is not None:
                self.run.wake.set()

    def fail(self, error: DhtError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()
            if self.run is not None:
                self.run.wake.set()

    async def wait(self) -> T:
        """The result, or the error raised."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class RunOfWants:
    """A run of blocks asked for in one WantRun frame (`PeerConnection.fetch_run`).

    Made by the caller before the run is sent, so that it can drop one block
    of it at any time (`cancel(i)`: its answer is no longer wanted) while the
    others are still coming.
    """

    __slots__ = ("block_ids", "priority", "cancelled", "wake", "behind")

    def __init__(self, block_ids: Sequence[bytes], priority: Priority) -> None:
        self.block_ids = list(block_ids)
        self.priority = Priority(priority)
        self.cancelled = [False] * len(self.block_ids)
        self.wake = trio.Event()  # set when a block of it is answered or cancelled
        # block i's answer still waits behind another block of the run: set by a source
        # that answers a run's blocks one after the other (`HttpSource`); a peer
        # connection sends every want at once and leaves it False (see `dht.fetch`)
        self.behind = [False] * len(self.block_ids)

    def cancel(self, index: int) -> None:
        """Block `index` is no longer wanted: Cancel on the wire if its want went out."""
        if not self.cancelled[index]:
            self.cancelled[index] = True
            self.wake.set()


# on_result(index in the run, the verified bytes or None, the error or None)
OnRunResult = Callable[[int, "bytes | None", "DhtError | None"], None]


@dataclass
class ConnectionStats:
    """Counters for one PeerConnection."""

    wants_sent: int = 0  # blocks asked for, one by one or in runs
    runs_sent: int = 0  # WantRun frames
    cancels_sent: int = 0
    blocks: int = 0
    bytes: int = 0
    not_found: int = 0
    unsolicited: int = 0  # answers to wants we had already cancelled
    notices: int = 0
    haves_sent: int = 0
    holdings: int = 0  # Holding frames received
    fetchings: int = 0  # Fetching frames received

class PeerConnection:
    """A client connection to one peer for one discovery key, with pipelined fetches.

    Make one with `connect` (its tasks run in a nursery you pass) or `open`
    (an async context manager owning its tasks). Every `fetch` awaits its own
    answer; any number may be in flight (up to the server's announced limit,
    beyond which fetches queue locally). Each block is checked against its id.
    """

    def __init__(
        self,
        addr: PeerAddr,
        discovery_key: bytes,
        frames: FrameStream,
        peer_public_key: bytes,
        max_wants: int,
        on_notice: OnNotice | None,
    ) -> None:
        self.addr = addr
        self.discovery_key = discovery_key
        self.peer_public_key = peer_public_key
        self.max_wants = max_wants
        self.stats = ConnectionStats()
        self._frames = frames
        self._on_notice = on_notice
        self._slots = trio.Semaphore(max_wants)
        # requests awaiting answers, by request id (Want, Have) or token (Ping)
        self._pending: dict[int, PendingReply[bytes]] = {}
        self._haves: dict[int, PendingReply[list[bool]]] = {}
        self._pings: dict[int, PendingReply[None]] = {}
        self._have_slots = trio.Semaphore(MAX_HAVES_IN_FLIGHT)
        self._next_id = secrets.randbelow(MAX_REQ_ID + 1)
        self._outgoing: deque[Message] = deque()
        self._wake = trio.Event()
        self._error: DhtError | None = None
        self._scope: trio.CancelScope | None = None
        self._finished = trio.Event()
        self._send_goodbye = False
        self._receiver: ReceiveThread | None = None  # its receive thread, once running
        # called in the receive thread with each block that hashes to the id its request
        # asked for, before the event loop hears of it (set by the owner; never raises)
        self.on_verified: OnVerified | None = None
        self._pongs_queued = 0  # answers to the peer's pings not yet written (bounded)
        # blocks the server announced (Holding), oldest first; a bounded set
        self.holding: OrderedDict[bytes, None] = OrderedDict()
        # blocks it announced it is fetching (Fetching) and has not announced holding since
        self.fetching: OrderedDict[bytes, None] = OrderedDict()
        # the trees the server says its node keeps whole (its last Whole frame)
        self.whole: frozenset[bytes] = frozenset()

    # ---- construction -------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        addr: PeerAddr,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        *,
        nursery: trio.Nursery,
        on_notice: OnNotice | None = None,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> PeerConnection:
        """Dial `addr`, pin its key, prove the drive secret; the reader/writer run in `nursery`.

        Raises PeerGoneError (unreachable, broke, timed out), PeerIdentityError
        (not the node we pinned) or PeerRefusedError (the peer said no).
        """
        if len(discovery_key) != DISCOVERY_KEY_LEN or len(drive_secret) != DRIVE_SECRET_LEN:
            raise DhtError("discovery key and drive secret must be 32 bytes each")
        conn = await cls._establish(addr, identity, discovery_key, drive_secret, on_notice, timeout)
        await nursery.start(conn.run)
        return conn

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        addr: PeerAddr,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        *,
        on_notice: OnNotice | None = None,
        timeout: float = HANDSHAKE_TIMEOUT,
    ) -> AsyncIterator[PeerConnection]:
        """`async with PeerConnection.open(...) as conn:` — closed on exit."""
        if len(discovery_key) != DISCOVERY_KEY_LEN or len(drive_secret) != DRIVE_SECRET_LEN:
            raise DhtError("discovery key and drive secret must be 32 bytes each")
        conn = await cls._establish(addr, identity, discovery_key, drive_secret, on_notice, timeout)
        async with open_task_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                yield conn
            finally:
                await conn.aclose()

    @classmethod
    async def _establish(
        cls,
        addr: PeerAddr,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        on_notice: OnNotice | None,
        timeout: float,
    ) -> PeerConnection:
        dialled = await dial(addr.host, addr.port, addr.node_id, identity, discovery_key,
                             drive_secret, peer=str(addr), timeout=timeout)
        return cls(addr, discovery_key, dialled.frames, dialled.peer_public_key,
                   dialled.max_wants, on_notice)

    # ---- public -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def in_flight(self) -> int:
        """Fetches awaiting an answer on this connection."""
        return len(self._pending)

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        """The block's bytes, verified against `block_id`.

        Raises BlockNotFound, BadBlockError (the connection is then closed),
        or PeerGoneError. Cancelling the caller sends Cancel to the peer.
        """
        if len(block_id) != BLOCK_ID_LEN:
            raise DhtError(f"block id must be {BLOCK_ID_LEN} bytes, got {len(block_id)}")
        priority = Priority(priority)
        self._raise_if_closed()
        # A free slot is taken without a pass of the scheduler (`acquire` gives one away
        # even then); the wait for the answer below is this call's checkpoint.
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            self._raise_if_closed()
            req_id = self._allocate(self._pending, MAX_REQ_ID)
            want = Want(req_id, block_id, priority)
            pending = self._pending[req_id] = PendingReply[bytes](want)
            self._send(want)
            try:
                await pending.done.wait()
            except BaseException:
                if self._pending.pop(req_id, None) is not None and pending.sent:
                    if not self.closed:
                        self._send(Cancel(req_id))
                raise
        finally:
            self._slots.release()
        # the answer is here: returned at once, not after one more pass of the scheduler
        # (`pending.wait()` would checkpoint again), issue 12
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    async def fetch_run(self, run: RunOfWants, on_result: OnRunResult) -> None:
        """Fetch the blocks of `run` with one WantRun frame; returns once each is answered
        or cancelled.

        `on_result(i, data, error)` is called once per block as it ends: its
        bytes (verified against its id), or BlockNotFound / BadBlockError /
        PeerGoneError, or (None, None) once `run.cancel(i)` has dropped it
        (cancelled on the wire if its want went out). Cancelling the caller
        cancels what is left, with no more calls. Each block takes one of the server's
        `max_wants` slots, as a single fetch does.
        """
        count = len(run.block_ids)
        if not 1 <= count <= min(MAX_RUN_IDS, self.max_wants):
            raise DhtError(f"a run has 1..{min(MAX_RUN_IDS, self.max_wants)} blocks, not {count}")
        for block_id in run.block_ids:
            if type(block_id) is not bytes or len(block_id) != BLOCK_ID_LEN:
                raise DhtError(f"block ids must be {BLOCK_ID_LEN} bytes")
        self._raise_if_closed()
        held = 0
        waiting: dict[int, tuple[int, PendingReply[bytes]]] = {}  # index -> (req_id, pending)
        try:
            for _ in range(count):
                await self._slots.acquire()
                held += 1
            self._raise_if_closed()
            wanted = [i for i in range(count) if not run.cancelled[i]]
            if wanted:
                first = self._allocate_run(len(wanted))
                msg = WantRun(first, tuple(run.block_ids[i] for i in wanted), run.priority)
                for req_id, i in zip(msg.request_ids(), wanted, strict=True):
                    pending = self._pending[req_id] = PendingReply[bytes](
                        Want(req_id, run.block_ids[i], run.priority), run)
                    waiting[i] = (req_id, pending)
                self._send(msg)
            held -= count - len(wanted)
            for _ in range(count - len(wanted)):
                self._slots.release()
            while waiting:
                run.wake = trio.Event()
                for i, (req_id, pending) in list(waiting.items()):
                    if pending.done.is_set():
                        del waiting[i]
                        held -= 1
                        self._slots.release()
                        on_result(i, pending.result, pending.error)
                    elif run.cancelled[i]:
                        del waiting[i]
                        held -= 1
                        self._slots.release()
                        self._forget(req_id, pending)
                        on_result(i, None, None)
                if waiting:
                    await run.wake.wait()
        finally:
            for req_id, pending in waiting.values():
                self._forget(req_id, pending)
            for _ in range(held):
                self._slots.release()

    def _forget(self, req_id: int, pending: PendingReply[bytes]) -> None:
        """A want whose answer is no longer wanted: Cancel on the wire if it went out."""
        if self._pending.pop(req_id, None) is not None and pending.sent and not self.closed:
            self._send(Cancel(req_id))

    async def have(self, block_ids: Sequence[bytes]) -> list[bool]:
        """Which of `block_ids` the peer holds, in order (it reads no block to answer).

        Asked `MAX_HAVE_IDS` ids per Have frame, at most `MAX_HAVES_IN_FLIGHT`
        frames outstanding. Raises PeerGoneError if the connection dies first
        (PeerProtocolError if the peer answers with a malformed bitmap).
        """
        ids = list(block_ids)
        for block_id in ids:
            if type(block_id) is not bytes or len(block_id) != BLOCK_ID_LEN:
                raise DhtError(f"block ids must be {BLOCK_ID_LEN} bytes")
        self._raise_if_closed()
        flags = [False] * len(ids)
        starts = iter(range(0, len(ids), MAX_HAVE_IDS))
        errors: list[DhtError] = []

        async def worker() -> None:
            for start in starts:
                part = tuple(ids[start : start + MAX_HAVE_IDS])
                try:
                    flags[start : start + len(part)] = await self._have_one(part)
                except DhtError as exc:
                    errors.append(exc)
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(min(MAX_HAVES_IN_FLIGHT, -(-len(ids) // MAX_HAVE_IDS))):
                nursery.start_soon(worker)
        if errors:
            raise errors[0]
        return flags

    async def _have_one(self, part: tuple[bytes, ...]) -> list[bool]:
        async with self._have_slots:
            self._raise_if_closed()
            req_id = self._allocate(self._haves, MAX_REQ_ID)
            have = Have(req_id, part)
            pending = self._haves[req_id] = PendingReply[list[bool]](have)
            self.stats.haves_sent += 1
            self._send(have)
            try:
                await pending.done.wait()
            finally:
                self._haves.pop(req_id, None)
        return await pending.wait()

    async def ping(self) -> float:
        """Round-trip time to the peer in seconds (PeerGoneError if the connection dies)."""
        self._raise_if_closed()
        token = self._allocate(self._pings, MAX_TOKEN)
        ping = Ping(token)
        pending = self._pings[token] = PendingReply[None](ping)
        start = trio.current_time()
        self._send(ping)
        try:
            await pending.wait()
        finally:
            self._pings.pop(token, None)
        return trio.current_time() - start

    async def aclose(self) -> None:
        """Say goodbye, close, and fail anything still pending with PeerGoneError."""
        if self._error is None:
            self._error = PeerGoneError(f"connection to {self.addr} was closed")
            self._send_goodbye = True
            if self._scope is not None:
                self._scope.cancel()
        await self._finished.wait()

    async def wait_closed(self) -> DhtError:
        """Wait until the connection ends; returns why."""
        await self._finished.wait()
        assert self._error is not None
        return self._error

    # ---- internals ----------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise self._error

    def _allocate(self, in_use: Mapping[int, Any], limit: int) -> int:
        while True:
            value = self._next_id
            self._next_id = 0 if value >= limit else value + 1
            if value not in in_use:
                return value

    def _allocate_run(self, count: int) -> int:
        """The first of `count` consecutive request ids, none of them in use (one WantRun)."""
        while True:
            first = self._next_id
            if first + count - 1 > MAX_REQ_ID:
                first = 0
            self._next_id = first + count
            if self._next_id > MAX_REQ_ID:
                self._next_id = 0
            if not any(r in self._pending for r in range(first, first + count)):
                return first

    def _send(self, msg: Message) -> None:
        self._outgoing.append(msg)
        self._wake.set()

    def _fail(self, error: DhtError) -> None:
        if self._error is None:
            self._error = error
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                receiver = self._receiver = ReceiveThread(
                    self._frames.stream, self._frames.hand_decoder_over(), str(self.addr),
                    self._verified_in_thread)
                nursery.start_soon(self._writer)
                await nursery.start(receiver.run)
                nursery.start_soon(self._reader, receiver)
                task_status.started()
        finally:
            if self._error is None:
                self._error = PeerGoneError(f"connection to {self.addr} ended")
            waiting: list[PendingReply[Any]] = [
                *self._pending.values(), *self._haves.values(), *self._pings.values()]
            for pending in waiting:
                pending.fail(self._error)
            for table in (self._pending, self._haves, self._pings):
                table.clear()
            stream = self._frames.stream
            if self._send_goodbye:
                with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_GRACE / 4):
                    try:
                        await self._frames.send(Goodbye("closing"))
                    except (DhtError, trio.BusyResourceError):
                        pass
            try:
                # raises Cancelled when a scope around this task was cancelled (the node
                # stops): `_finished` is set all the same, or whoever waits for it in a
                # shielded cleanup (Fetcher.run closing its sources) waits for ever
                await trio.aclose_forcefully(stream)
            finally:
                self._finished.set()

    async def _writer(self) -> None:
        """Send queued requests, everything queued so far in one write.

        A sequential reader asks for several blocks at once (its readahead):
        one TLS record and one system call for all of them, not one each.
        """
        try:
            while True:
                if not self._outgoing:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                frames: list[bytes] = []
                while self._outgoing:
                    msg = self._outgoing.popleft()
                    if isinstance(msg, Want):
                        pending = self._pending.get(msg.req_id)
                        if pending is None:
                            continue  # cancelled before it left: nothing to tell the peer
                        pending.sent = True
                        self.stats.wants_sent += 1
                    elif isinstance(msg, WantRun):
                        # blocks cancelled before the run left are cancelled right after it
                        gone: list[bytes] = []
                        for req_id in msg.request_ids():
                            pending = self._pending.get(req_id)
                            if pending is None:
                                gone.append(encode(Cancel(req_id)))
                                self.stats.cancels_sent += 1
                            else:
                                pending.sent = True
                        self.stats.wants_sent += len(msg.block_ids)
                        self.stats.runs_sent += 1
                        frames.append(encode(msg))
                        frames.extend(gone)
                        continue
                    elif isinstance(msg, Cancel):
                        self.stats.cancels_sent += 1
                    elif isinstance(msg, Pong):
                        self._pongs_queued -= 1
                    frames.append(encode(msg))
                if frames:
                    await self._frames.send_bytes(b"".join(frames))
        except DhtError as exc:
            self._fail(exc)

    async def _reader(self, receiver: ReceiveThread) -> None:
        """Route what the receive thread hands over, a batch at a time."""
        try:
            while True:
                batch = await receiver.take()
                for msg, digest in batch.messages:
                    self._on_message(msg, digest)
                if batch.error is not None:
                    raise batch.error
                if batch.flush:
                    await self._frames.flush()
        except DhtError as exc:
            self._fail(exc)

    def _verified_in_thread(self, req_id: int, digest: bytes, data: bytes) -> None:
        """In the receive thread: a block whose bytes hash to the id its request asked
        for goes to `on_verified`; anything else (unasked, cancelled, a lie) does not.

        The request table is only read here (a dict lookup, atomic under the
        GIL). A request answered meanwhile and its id reused by a new want
        is harmless: the bytes are passed on only if they hash to the id of
        the want found, so the hook sees verified bytes whatever it is. trio
        checks the answer again (`_on_block`) and decides what is delivered.
        """
        hook = self.on_verified
        if hook is None:
            return
        pending = self._pending.get(req_id)
        if pending is None or not isinstance(pending.request, Want):
            return
        if pending.request.block_id != digest:
            return
        try:
            hook(digest, data)
        except Exception:  # the hook is an optimisation: a failure must not end the thread
            log.exception("on_verified hook of %s failed", self.addr)

    def _on_message(self, msg: Message, digest: bytes | None) -> None:
        """One message from the peer; raises DhtError when it ends the connection."""
        if isinstance(msg, Block):
            assert digest is not None
            self._on_block(msg, digest)
        elif isinstance(msg, NotFound):
            pending = self._pending.pop(msg.req_id, None)
            if pending is None:
                self.stats.unsolicited += 1
            else:
                self.stats.not_found += 1
                pending.fail(BlockNotFound(
                    f"{self.addr} does not have block {_block_id(pending).hex()}"))
        elif isinstance(msg, HaveReply):
            have = self._haves.pop(msg.req_id, None)
            if have is None:
                self.stats.unsolicited += 1  # its asker left
            else:
                try:
                    flags = unpack_bitmap(msg.bitmap, len(_block_ids(have)))
                except FrameError as exc:
                    error = PeerProtocolError(
                        f"{self.addr} answered have with a bad bitmap: {exc}; "
                        "connection dropped"
                    )
                    have.fail(error)
                    raise error from None
                have.succeed(flags)
        elif isinstance(msg, Notice):
            if msg.discovery_key != self.discovery_key:
                raise PeerProtocolError(f"{self.addr} sent a notice for another drive")
            self.stats.notices += 1
            if self._on_notice is not None:
                self._on_notice(msg.discovery_key, msg.record)
        elif isinstance(msg, Whole):
            self.whole = frozenset(msg.node_ids)
        elif isinstance(msg, Holding):
            self.stats.holdings += 1
            holding = self.holding
            for block_id in msg.block_ids:
                holding[block_id] = None
                holding.move_to_end(block_id)
                self.fetching.pop(block_id, None)
            while len(holding) > MAX_HOLDING_REMEMBERED:
                holding.popitem(last=False)
        elif isinstance(msg, Fetching):
            self.stats.fetchings += 1
            fetching = self.fetching
            for block_id in msg.block_ids:
                if block_id not in self.holding:
                    fetching[block_id] = None
                    fetching.move_to_end(block_id)
            while len(fetching) > MAX_FETCHING_REMEMBERED:
                fetching.popitem(last=False)
        elif isinstance(msg, Ping):
            if self._pongs_queued >= MAX_CONTROL_BACKLOG:
                raise PeerProtocolError(
                    f"{self.addr} sends pings faster than it reads the answers; "
                    "connection dropped"
                )
            self._pongs_queued += 1
            self._send(Pong(msg.token))
        elif isinstance(msg, Pong):
            ping = self._pings.get(msg.token)
            if ping is not None:
                ping.succeed(None)
        elif isinstance(msg, Goodbye):
            raise PeerGoneError(f"{self.addr} closed the connection: {msg.reason}")
        else:
            raise PeerProtocolError(f"{self.addr} sent an unexpected {msg.TYPE} frame")

    def _on_block(self, msg: Block, digest: bytes) -> None:
        pending = self._pending.pop(msg.req_id, None)
        if pending is None:
            self.stats.unsolicited += 1
            return
        if digest != _block_id(pending):
            raise self._bad_block(pending)
        self._delivered(pending, msg.data)

    def _bad_block(self, pending: PendingReply[bytes]) -> PeerProtocolError:
        pending.fail(BadBlockError(
            f"{self.addr} sent bytes that do not hash to block {_block_id(pending).hex()}: "
            "the peer is faulty or lying; connection dropped"
        ))
        return PeerProtocolError(f"{self.addr} sent a corrupt block; connection dropped")

    def _delivered(self, pending: PendingReply[bytes], data: bytes) -> None:
        self.stats.blocks += 1
        self.stats.bytes += len(data)
        pending.succeed(data)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.in_flight} in flight"
        return f"PeerConnection({self.addr}, {state})"


def _block_id(pending: PendingReply[bytes]) -> bytes:
    """The block a pending Want asked for."""
    assert isinstance(pending.request, Want)
    return pending.request.block_id


def _block_ids(pending: PendingReply[list[bool]]) -> tuple[bytes, ...]:
    """The blocks a pending Have asked about."""
    assert isinstance(pending.request, Have)
    return pending.request.block_ids
