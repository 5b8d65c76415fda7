"""TLS over a trio stream that hands back everything it can decrypt at once.

trio.SSLStream returns one TLS record per `receive_some` (at most 16 KiB of
plaintext), and each call runs its general machinery (conflict detectors,
locks, checkpoints) once more: a 1 GiB block stream is 65,536 such calls on
the event loop that also serves FUSE. This stream reads up to 1 MiB from the
socket per system call and decrypts every complete record in it in one go
(`ssl.SSLObject` over memory BIOs), so a large block costs a handful of
calls. On loopback, one process receiving 1 GiB: the receiving side's CPU
~1.0 s -> ~0.25 s, throughput +35-40% (measure it: `.venv/bin/python
scripts/tls_receive.py`).

It does only what the peer protocol (and the HTTPS mirror source,
`dht/http_connection.py`) needs: one handshake, one task receiving
while another sends (their outgoing TLS bytes are sent under one lock, so
records never interleave), close_notify on close. An `ssl.SSLError` or a
connection reset becomes trio.BrokenResourceError, as with trio.SSLStream.

Receiving may instead be handed to a thread (`hand_receiving_to_thread`,
`decrypt_into`: dht/receiver.py), which decrypts while trio sends. OpenSSL must
not run one connection's read and write at once, so every call on the TLS
object and its memory BIOs holds `_tls_lock` (a threading lock held for one
record's decryption at most; uncontended when no thread receives).
"""

from __future__ import annotations

import ssl
import threading

import trio

SOCKET_READ = 1024 * 1024  # bytes asked of the socket per receive
PLAINTEXT_READ = 1024 * 1024  # bytes asked of the TLS object per record read
SMALL_PART = 16 * 1024  # send_parts: parts below one TLS record's size are joined, not copied


class TlsStream(trio.abc.Stream):
    """A TLS client or server connection over `transport` (usually a trio.SocketStream)."""

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, *,
                 server_side: bool = False, server_hostname: str | None = None) -> None:
        """`server_hostname`: the name a client sends (SNI) and checks the certificate
        against when the context says so (HTTPS mirrors); peers pin keys instead."""
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._send_lock = trio.Lock()
        self._tls_lock = threading.Lock()  # the TLS object and its BIOs (see the module's rules)
        self._thread_receives = False  # receiving was handed to a thread: receive_some refuses
        # decrypted bytes a caller's max_bytes left for the next receive, from _plain_at on
        self._plain = b""
        self._plain_at = 0
        self._receiving = False
        self._closed = False
        self._broken: BaseException | None = None

    # -- inspection --------------------------------------------------------------------

    def getpeercert(self, binary_form: bool = False):  # type: ignore[no-untyped-def]
        with self._tls_lock:
            return self._ssl.getpeercert(binary_form)

    # -- the TLS object -------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = exc
        error = trio.BrokenResourceError(f"TLS connection broke: {exc}")
        error.__cause__ = exc
        return error

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"TLS connection broke: {self._broken}")

    async def _flush(self) -> None:
        """Send whatever the TLS object wrote, in the order it wrote it, including what
        it wrote while this was sending (the receiving side's records: see
        `_flush_from_receive`)."""
        if not self._outgoing.pending:
            return
        # a free lock is taken without a pass of the scheduler (`acquire` gives one away
        # even then): the bytes go out now, not a pass later (issue 12, random reads)
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            while True:
                with self._tls_lock:
                    data = self._outgoing.read()
                if not data:
                    return
                await self.transport.send_all(data)
        finally:
            self._send_lock.release()

    async def _flush_from_receive(self) -> None:
        """The receiving side's flush: records its reads made the TLS object write (a key
        update's answer) go out now, unless a send is under way: that sender sends them
        when it is done (`_flush` loops). Waiting for it instead would stop receiving
        for as long as the peer does not read, and a sender's records still pending
        were written by that sender, just before it took the lock: a server whose
        client had stopped reading then never read that client's Cancels
        (tests/test_peer.py::test_server_answers_in_priority_order_when_backlogged)."""
        if self._outgoing.pending and not self._send_lock.locked():
            await self._flush()

    async def _fill(self) -> bool:
        """Feed the TLS object what the socket has; False at the socket's end."""
        data = await self.transport.receive_some(SOCKET_READ)
        if not data:
            with self._tls_lock:
                self._incoming.write_eof()
            return False
        with self._tls_lock:
            self._incoming.write(data)
        return True

    # -- trio.abc.Stream ------------------------------------------------------------------

    async def do_handshake(self) -> None:
        self._check()
        while True:
            try:
                with self._tls_lock:
                    self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise self._fail(ssl.SSLEOFError("the peer closed during the handshake")) from None
                continue
            except ssl.SSLError as exc:
                await self._flush_quietly()
                raise self._fail(exc) from exc
            await self._flush()
            return

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        try:
            with self._tls_lock:
                self._ssl.write(data)
        except ssl.SSLError as exc:
            raise self._fail(exc) from exc
        await self._flush()

    async def send_parts(self, parts: list[bytes]) -> None:
        """`send_all` of the parts joined, without joining them: a large part is handed to
        the TLS object as it is (a served block, 256 KiB and more, is not copied behind
        its frame header first); small parts next to each other still go in one write,
        so they share TLS records. One socket send for all of it."""
        self._check()
        small: list[bytes] = []
        try:
            with self._tls_lock:
                for part in parts:
                    if len(part) < SMALL_PART:
                        small.append(part)
                        continue
                    if small:
                        self._ssl.write(b"".join(small))
                        small = []
                    self._ssl.write(part)
                if small:
                    self._ssl.write(b"".join(small))
        except ssl.SSLError as exc:
            raise self._fail(exc) from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes (at least one, at most `max_bytes`), or b"" at the end of the stream.

        Everything the socket brought is decrypted at once; what does not fit
        `max_bytes` is kept for the next call, so a caller bounds what one call
        hands it (and the socket is not read again while any is left).
        """
        self._check()
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
            raise ValueError("max_bytes must be a positive integer")
        if self._receiving or self._thread_receives:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            if self._plain_at >= len(self._plain):
                self._plain, self._plain_at = await self._receive_decrypted(), 0
            start = self._plain_at
            if start == 0 and (max_bytes is None or len(self._plain) <= max_bytes):
                data, self._plain = self._plain, b""
            else:
                end = len(self._plain) if max_bytes is None else start + max_bytes
                data = self._plain[start:end]
                self._plain_at = start + len(data)
                if self._plain_at >= len(self._plain):
                    self._plain, self._plain_at = b"", 0
            if not data:
                await trio.lowlevel.checkpoint()
            return data
        finally:
            self._receiving = False

    async def _receive_decrypted(self) -> bytes:
        """Everything decrypted so far (at least one byte), or b"" at the end of the stream."""
        at_eof = False
        while True:
            parts: list[bytes] = []
            ended = False
            try:
                while True:
                    with self._tls_lock:
                        data = self._ssl.read(PLAINTEXT_READ)
                    if not data:  # the peer's close_notify
                        ended = True
                        break
                    parts.append(data)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
            except ssl.SSLError as exc:
                raise self._fail(exc) from exc
            await self._flush_from_receive()  # e.g. an answer to a key update
            if parts:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if ended or at_eof:
                return b""
            at_eof = not await self._fill()  # at the end, the TLS object reports it next

    # -- receiving in a thread (dht/receiver.py) ------------------------------------------

    def hand_receiving_to_thread(self) -> bytes:
        """From now on a thread receives (`decrypt_into`); returns the plaintext already
        decrypted and not yet taken, which that thread must consume first."""
        self._check()
        if self._receiving or self._thread_receives:
            raise trio.BusyResourceError("another task is already receiving")
        self._thread_receives = True
        left = self._plain[self._plain_at:]
        self._plain, self._plain_at = b"", 0
        return left

    def decrypt_into(self, data: bytes | bytearray | memoryview, out: bytearray
                     ) -> tuple[int, bool]:
        """Thread-safe: feed what the socket brought (empty at its end), decrypt into
        `out` from its start; returns (bytes written, whether the peer's stream ended).

        Stops when `out` is full (then `decrypt_more` goes on). Raises
        ssl.SSLError for anything a TLS peer must not send. Records the TLS
        object wrote meanwhile (a key update's answer) wait for `flush`.
        """
        with self._tls_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()
        return self.decrypt_more(out, at_eof=not data)

    def decrypt_more(self, out: bytearray, *, at_eof: bool = False) -> tuple[int, bool]:
        """Thread-safe: decrypt what the TLS object already holds into `out` (as
        `decrypt_into`, without feeding it)."""
        view = memoryview(out)
        filled = 0
        try:
            while filled < len(out):
                with self._tls_lock:
                    n = self._ssl.read(len(out) - filled, view[filled:])
                if not n:  # the peer's close_notify
                    return filled, True
                filled += n
            return filled, False
        except ssl.SSLWantReadError:
            return filled, at_eof
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return filled, True
        except ssl.SSLError as exc:
            self._broken = exc
            raise
        finally:
            view.release()

    @property
    def flush_wanted(self) -> bool:
        """The TLS object wrote records that nobody sent yet (see `decrypt`)."""
        with self._tls_lock:
            return bool(self._outgoing.pending)

    async def flush(self) -> None:
        """Send what the TLS object wrote on its own (trio.BrokenResourceError if it cannot);
        the receiving side calls it, so a send under way sends them (`_flush_from_receive`)."""
        await self._flush_from_receive()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._broken is None:
                try:
                    with self._tls_lock:
                        self._ssl.unwrap()  # queues close_notify; we do not wait for the peer's
                except ssl.SSLError:
                    pass
                await self._flush_quietly()
        finally:
            await self.transport.aclose()

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
