"""A peer connection's receiving half in a thread of its own: socket, TLS, frames, block hashes.

Why: a cold read from one peer was bound by the event loop, which paid per
block for a socket wake-up, TLS record decryption, frame decoding and a
thread hand-off to hash the block, while it also answered FUSE
(docs/benchmarks.md, issue 12). Here one thread per connection does all of
that where the GIL is released (poll, the TLS object's decryption, SHA-256)
and trio gets the finished messages in batches: one wake-up per socket read
of up to 1 MiB, however many blocks it held. The socket is read into, and
records decrypted into, two buffers the thread reuses (allocating 1 MiB per
read and per record cost about a tenth of the mount's CPU in a cold read).

Rules:
- The thread is started by `ReceiveThread.run`, a task in the connection's
  nursery, with a capacity limiter of its own (it never takes one of trio's
  default worker threads). Cancelling that task wakes the thread through a
  pipe it polls beside the socket, and the task returns only once the thread
  has: no thread outlives its connection, and the socket is closed only after.
- The thread never changes request state. It hands trio, in order, each
  message with the SHA-256 of a Block's bytes; trio matches answers to
  requests and compares digests with the block ids asked for (client.py).
  Before a Block goes into the batch, `on_block(req_id, digest, data)` (if
  given) is called here, in the thread: the client uses it to hand blocks
  that hash to the id their request asked for to the drive, which decrypts
  them here with the GIL released instead of on the event loop (issue 12).
- At most `MAX_QUEUED` bytes of decoded messages wait for trio; beyond that
  the thread stops reading the socket until trio takes them, so a peer that
  sends faster than we consume fills its own TCP window, not our memory.
- The thread first delivers the frames the connection's decoder (and TLS) had
  buffered before the hand-over, without waiting for the socket: a peer that
  sent a frame together with the handshake's last one may wait for our answer.
- The end of the stream and every failure become one last item, with the
  messages FrameStream.receive gives on the event loop: a bad frame is a
  PeerProtocolError, a close or a broken socket or TLS a PeerGoneError.
  Messages decoded before it are delivered first.
- The TLS object is shared with the sending side (trio): TlsStream
  serialises calls on it; records it wrote while decrypting (a key update's
  answer) are flagged in the batch for trio to send.
"""

from __future__ import annotations

import hashlib
import os
import select
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .errors import DhtError, FrameError, PeerGoneError, PeerProtocolError
from .frames import Block, FrameDecoder, Message
from .tlsstream import SOCKET_READ, TlsStream

MAX_QUEUED = 4 * 1024 * 1024  # decoded bytes waiting for trio before the thread stops reading
PLAIN_BUFFER = 256 * 1024  # plaintext decrypted into one buffer at a time

# on_block(request id, SHA-256 of the block's bytes, the bytes): called in the thread
OnBlock = Callable[[int, bytes, bytes], None]


@dataclass(slots=True)
class Batch:
    """What the thread received since trio last took: messages in order (each with the
    SHA-256 of a Block's bytes, None otherwise), then the error that ended it, if any."""

    messages: list[tuple[Message, bytes | None]]
    error: DhtError | None
    flush: bool  # the TLS object wrote records for the peer (send them)


class _Stopped(Exception):
    """The owning task asked the thread to end."""


class ReceiveThread:
    """Receives one TLS connection's frames in a thread; `take` hands them to trio."""

    def __init__(self, tls: trio.abc.Stream, decoder: FrameDecoder, peer: str,
                 on_block: OnBlock | None = None) -> None:
        """`tls`: the connection's TlsStream over a trio.SocketStream; `decoder`: its
        frame decoder with what it buffered so far (FrameStream.hand_decoder_over);
        `peer` names the peer in errors; `on_block(req_id, digest, data)` is called in
        the thread for each Block before trio gets it (it must not raise)."""
        if not isinstance(tls, TlsStream) or not isinstance(tls.transport, trio.SocketStream):
            raise DhtError("a receive thread needs our TLS stream over a TCP socket")
        transport = tls.transport
        self.peer = peer
        self._tls = tls
        self._fd = transport.socket.fileno()
        self._decoder = decoder
        self._on_block = on_block
        self._leftover = tls.hand_receiving_to_thread()
        # the thread's buffers, made when it starts and reused for every read and record
        self._raw = bytearray()
        self._plain = bytearray()
        self._limiter = trio.CapacityLimiter(1)
        self._cond = threading.Condition()
        self._items: deque[tuple[Message, bytes | None]] = deque()
        self._queued = 0  # bytes of Block data in _items
        self._error: DhtError | None = None
        self._flush = False
        self._ended = False  # the thread put its last item
        self._stopping = False
        self._want_wake = False  # trio waits in `take`: wake it on the next item
        self._arrived = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake_fds: tuple[int, int] | None = None
        self.thread_ended = threading.Event()  # tests: the thread is gone

    # ---- trio side -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the receive thread until the stream ends, it fails, or this task is cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._wake_fds = os.pipe()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                task_status.started()
                await trio.to_thread.run_sync(self._thread_main, limiter=self._limiter)
                nursery.cancel_scope.cancel()
        finally:
            for fd in self._wake_fds:
                os.close(fd)

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        assert self._wake_fds is not None
        os.write(self._wake_fds[1], b"x")

    async def take(self) -> Batch:
        """Everything received since the last call (waits for at least one message or
        the end); after a batch with an error there is nothing more."""
        waited = False
        while True:
            self._arrived = trio.Event()
            with self._cond:
                if self._items or self._ended or self._flush:
                    batch = Batch(list(self._items), self._error if self._ended else None,
                                  self._flush)
                    self._items.clear()
                    self._queued = 0
                    self._flush = False
                    self._cond.notify_all()
                    break
                self._want_wake = True
            await self._arrived.wait()
            waited = True
        if not waited:
            # found at once: still a checkpoint. After a wait, another pass of the
            # scheduler before handing the batch over only delayed the READ waiting on
            # it (issue 12, random reads)
            await trio.lowlevel.checkpoint()
        return batch

    def _set_arrived(self) -> None:
        self._arrived.set()

    # ---- the thread -----------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._receive()
        except _Stopped:
            pass
        except FrameError as exc:
            self._end(PeerProtocolError(f"{self.peer} sent a bad frame: {exc}"))
        except (ssl.SSLError, OSError) as exc:
            self._end(PeerGoneError(f"connection to {self.peer} broke: TLS connection broke: {exc}"))
        except DhtError as exc:
            self._end(exc)
        finally:
            # A closed connection can outlive its thread by an hour: the fetcher keeps a
            # departed reader's connection object until the reader's provider record
            # expires. Its 1.25 MiB of buffers go now, not with it.
            self._raw = bytearray()
            self._plain = bytearray()
            self.thread_ended.set()

    def _receive(self) -> None:
        assert self._wake_fds is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_fds[0], select.POLLIN)
        self._raw = bytearray(SOCKET_READ)
        self._plain = bytearray(PLAIN_BUFFER)
        # Before the first poll: what TLS decrypted and the decoder buffered before the
        # hand-over. The decoder may already hold whole frames (a push connection's first
        # Notice comes in one read with its Welcome), and the peer may send nothing more
        # until we answer them: decode them now, not when the socket next has bytes.
        self._decode([self._leftover], False)
        self._leftover = b""
        while True:
            self._wait_for_room()
            events = poller.poll()
            if self._stopping or any(fd == self._wake_fds[0] for fd, _ in events):
                raise _Stopped
            try:
                got = os.readv(self._fd, [self._raw])
            except BlockingIOError:
                continue
            with memoryview(self._raw) as raw, raw[:got] as data:
                filled, ended = self._tls.decrypt_into(data, self._plain)
            while True:
                with memoryview(self._plain) as plain, plain[:filled] as part:
                    self._decode([part], self._tls.flush_wanted)
                if ended or filled < len(self._plain):
                    break
                filled, ended = self._tls.decrypt_more(self._plain, at_eof=not got)
            if ended:
                raise PeerGoneError(f"{self.peer} closed the connection")

    def _decode(self, parts: list[bytes] | list[memoryview], flush: bool) -> None:
        """Frames from decrypted bytes, handed over (with what came before a bad frame)."""
        decoder = self._decoder
        on_block = self._on_block
        messages: list[tuple[Message, bytes | None]] = []
        size = 0
        try:
            for part in parts:
                decoder.feed(part)
                while (msg := decoder.next_event()) is not None:
                    if isinstance(msg, Block):
                        digest = hashlib.sha256(msg.data).digest()
                        if on_block is not None:
                            on_block(msg.req_id, digest, msg.data)
                        messages.append((msg, digest))
                        size += len(msg.data)
                    else:
                        messages.append((msg, None))
        finally:
            if messages or flush:
                self._put(messages, size, flush)

    def _wait_for_room(self) -> None:
        with self._cond:
            while self._queued >= MAX_QUEUED and not self._stopping:
                self._cond.wait()
            if self._stopping:
                raise _Stopped

    def _put(self, messages: list[tuple[Message, bytes | None]], size: int, flush: bool) -> None:
        with self._cond:
            self._items.extend(messages)
            self._queued += size
            self._flush = self._flush or flush
            wake, self._want_wake = self._want_wake, False
        if wake:
            self._wake_trio()

    def _end(self, error: DhtError) -> None:
        with self._cond:
            self._error = error
            self._ended = True
            wake, self._want_wake = self._want_wake, False
        if wake:
            self._wake_trio()

    def _wake_trio(self) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._set_arrived)
        except trio.RunFinishedError:  # cannot happen while `run` waits for us; harmless
            pass
