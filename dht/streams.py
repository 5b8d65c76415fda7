"""Frames over a byte stream, and the socket chores both ends of a peer connection share.

The peer server (server.py), its client (client.py) and push connections
(push.py) all carry frames.py's messages over TLS (tlsstream.py); what they
have in common lives here, so none of them reaches into another's
internals: `FrameStream` (one reader and one writer at once, a bounded
send), `set_keepalive`, `close_quietly` / `abort` for the end of a
connection, the peer's name for messages, and `open_task_nursery` for
context managers that own tasks.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .errors import FrameError, PeerGoneError, PeerProtocolError, PeerStuckError
from .frames import MAX_FRAME, FrameDecoder, Message, encode

HANDSHAKE_TIMEOUT = 10.0  # seconds for TCP connect + TLS + Challenge/Hello/Welcome
SEND_TIMEOUT = 30.0  # seconds one frame may take to go out before the peer counts as stuck
GOODBYE_GRACE = 2.0  # seconds to flush a Goodbye/Refused before closing anyway
RECEIVE_SIZE = MAX_FRAME  # a client takes whatever a socket read decrypted (blocks are big)
MAX_CONTROL_BACKLOG = 256  # queued Notice/Pong/HaveReply frames before a peer counts as stuck


@asynccontextmanager
async def open_task_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that is an implementation detail of a context manager.

    Errors from the caller's `async with` body (or a lone failing task) come
    out as themselves rather than wrapped in an ExceptionGroup, so callers can
    `except PeerGoneError` around our context managers as they would expect.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def set_keepalive(stream: trio.SocketStream) -> None:
    """Let the kernel notice a peer that vanished without a FIN on an idle connection."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    except OSError:
        pass  # not fatal: timeouts above us still bound every wait


def peer_host(stream: trio.SocketStream) -> str:
    """The remote IP address of a TCP stream ("?" once the socket is gone)."""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


def peer_name(stream: trio.SocketStream) -> str:
    """`host:port` of the remote end, for messages ("client" once the socket is gone)."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "client"
    return f"{host}:{port}"


class FrameStream:
    """Messages over a byte stream: one task may receive while another sends.

    A send that cannot complete within `send_timeout` (the peer stopped reading
    and its receive window is full) fails with PeerStuckError: a peer that never
    reads must not hold our writer, and the memory queued for it, for ever.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str, max_frame: int = MAX_FRAME,
                 send_timeout: float = SEND_TIMEOUT, receive_size: int = RECEIVE_SIZE) -> None:
        self.stream = stream
        self.peer = peer
        self.send_timeout = send_timeout
        self.receive_size = receive_size
        self._decoder = FrameDecoder(max_frame)
        self._handed_over = False  # a receive thread decodes (hand_decoder_over)

    async def receive(self) -> Message:
        if self._handed_over:
            raise trio.BusyResourceError("a receive thread reads this connection")
        while True:
            try:
                msg = self._decoder.next_event()
            except FrameError as exc:
                raise PeerProtocolError(f"{self.peer} sent a bad frame: {exc}") from None
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(self.receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGoneError(f"connection to {self.peer} broke: {exc}") from None
            if not data:
                raise PeerGoneError(f"{self.peer} closed the connection")
            try:
                self._decoder.feed(data)
            except FrameError as exc:
                raise PeerProtocolError(f"{self.peer} sent a bad frame: {exc}") from None

    def set_max_frame(self, max_frame: int) -> None:
        self._decoder.set_max_frame(max_frame)

    def hand_decoder_over(self) -> FrameDecoder:
        """The decoder, with what it buffered, for a receive thread (receiver.py) that
        reads this connection from now on: `receive` refuses afterwards."""
        self._handed_over = True
        return self._decoder

    async def flush(self) -> None:
        """Send records the TLS layer wrote on its own (the answer to a key update that
        a receive thread decrypted); PeerStuckError / PeerGoneError as `send_bytes`."""
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            await self._sending(flush)

    async def send(self, msg: Message) -> None:
        await self.send_bytes(encode(msg))

    async def send_bytes(self, frame: bytes) -> None:
        await self._sending(self.stream.send_all, frame)

    async def send_parts(self, parts: list[bytes]) -> None:
        """`send_bytes(b"".join(parts))`, without the join where the stream can take the
        parts as they are (TlsStream.send_parts: a served block is not copied again)."""
        send_parts = getattr(self.stream, "send_parts", None)
        if send_parts is None:
            await self.send_bytes(parts[0] if len(parts) == 1 else b"".join(parts))
        else:
            await self._sending(send_parts, parts)

    async def _sending(self, send: Callable[..., Awaitable[None]], *args: object) -> None:
        """`await send(*args)` within the send timeout, its failures as our errors."""
        try:
            with trio.fail_after(self.send_timeout):
                await send(*args)
        except trio.TooSlowError:
            raise PeerStuckError(
                f"{self.peer} read nothing for {self.send_timeout:g}s; connection dropped"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGoneError(f"connection to {self.peer} broke: {exc}") from None


async def close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close gracefully if the peer lets us within a moment, else drop the socket."""
    with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_GRACE) as scope:
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


async def abort(stream: trio.abc.AsyncResource | None) -> None:
    """Drop a connection at once (a failed handshake: nothing is owed to the peer)."""
    if stream is not None:
        await trio.aclose_forcefully(stream)
