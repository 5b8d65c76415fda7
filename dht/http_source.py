"""A source of blocks by id at a base URL: a static HTTP mirror.

A mirror is a directory of files that any static web server, object-store
bucket or CDN serves as it is (docs/formats.md, "Mirror layout"):

    {base}/head                    the signed head record, exact bytes as signed
    {base}/blocks/ab/abcdef...     one file per block, named by its id in hex

`HttpSource` plugs into the fetch scheduler (`dht.fetch.Fetcher.set_sources`)
like a peer connection: `fetch`, `have`, `ping`, `closed`, `aclose`. Nothing
it receives is trusted. A block is read up to `MAX_BLOCK` bytes and no
further (a longer body, announced or not, is refused unread), and its
SHA-256 must be the id asked for, or it is a `BadBlockError`, so a mirror
serving corrupt or truncated files never yields wrong bytes, and the fetcher
shuns it like a peer that lied. A 404/410 is `BlockNotFound`; anything else
that goes wrong (refused, reset, a redirect loop, a 5xx, a timeout, a body
cut short of its Content-Length) is `PeerGoneError`, which the fetcher
answers with backoff. Every request has connect/read/write timeouts, and the
fetcher's own deadline and stall detection bound every wait above that.

HTTP is h11's, on this package's own keep-alive connections
(`dht.http_connection`: HTTP/1.1; a block's body received in one call into
the bytes handed up). Blocks are fetched, and hashed, by the source's own
long-lived fetch threads, several runs at once (`_FetchThreads`); the head,
HEAD requests and pings go over the trio pool. This module only decides
what to ask and what to believe. It knows nothing of drives: a block is 32 opaque bytes
whose SHA-256 names it, and the head is a signed record it hands up unread
(the layer above verifies its signature and seq).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

import trio

from .client import OnRunResult, OnVerified, RunOfWants
from .errors import BadBlockError, BlockNotFound, DhtError, PeerGoneError
from .http_connection import (
    Abort,
    BlockingPool,
    BodyTooLongError,
    HttpPool,
    HttpResponse,
    HttpTimeouts,
)
from .mirror_layout import HEAD_PATH, MAX_BLOCK, block_path, check_base_url, source_id
from .records import MAX_MUTABLE_WIRE
from .types import BLOCK_ID_LEN, Priority

log = logging.getLogger(__name__)

_KNOWN_IDS = 65_536  # ids a mirror answered for, remembered (HEAD/GET succeeded)
# blocks the fetcher may hand over as one run (`fetch_run`): one fetch thread, one
# connection, the blocks asked for one after the other; runs go out side by side
RUN_BLOCKS = 8

__all__ = ["HttpSource", "HttpTimeouts"]


class HttpSource:
    """Blocks and the head record of one mirror, over a pool of keep-alive connections.

    Create it anywhere; its pool opens connections lazily on the first
    request. `aclose` (the fetcher calls it when it stops or the source is
    removed) closes them.
    """

    def __init__(self, base_url: str, *, max_connections: int = 16,
                 timeouts: HttpTimeouts | None = None) -> None:
        self.base_url = check_base_url(base_url)
        self.source_id = source_id(self.base_url)
        self.label = self.base_url
        self._pool = HttpPool(max_connections=max_connections,
                              timeouts=timeouts or HttpTimeouts())
        self._blocking = BlockingPool(max_idle=max_connections, timeouts=self._pool.timeouts)
        self._threads = _FetchThreads(max_connections)
        self._jobs: set[_RunJob] = set()
        self._known: OrderedDict[bytes, None] = OrderedDict()  # ids it served or HEAD-answered
        self._head_limiter = trio.CapacityLimiter(max(1, max_connections // 2))
        self._record: bytes | None = None
        self._record_etag: str | None = None
        self.closed = False
        self.requests = 0
        self.bytes = 0
        # called in the fetch thread with each block checked against its id (the fetcher
        # sets it: the drive decrypts there, off the event loop); never raises
        self.on_verified: OnVerified | None = None

    def __repr__(self) -> str:
        return f"HttpSource({self.base_url!r})"

    # ---- the fetcher's interface ------------------------------------------

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        """The block's bytes, checked against its id."""
        run = RunOfWants([block_id], priority)
        answers: list[tuple[bytes | None, DhtError | None]] = []
        await self.fetch_run(run, lambda _i, data, error: answers.append((data, error)))
        [(data, error)] = answers
        if error is not None:
            raise error
        assert data is not None
        return data

    async def fetch_run(self, run: RunOfWants, on_result: OnRunResult) -> None:
        """Fetch the blocks of `run` in one of the source's fetch threads; returns once
        each is answered or cancelled (`PeerConnection.fetch_run`'s contract).

        The thread asks for the blocks one after the other on a keep-alive
        connection, checks each against its id and hands it to the event loop
        as it comes (`on_result`, in the loop), so the loop spends nothing on
        parsing, copying or hashing. A block `run.cancel(i)` drops is answered
        (None, None) at once; once every block left is dropped, the connection
        under way is shut down and the thread goes on to the next run. A
        caller cancelled returns at once: the thread's request is shut down
        the same way and nothing of it is answered any more.
        """
        count = len(run.block_ids)
        if not 1 <= count <= self.max_wants:
            raise DhtError(f"a run has 1..{self.max_wants} blocks, not {count}")
        for block_id in run.block_ids:
            if type(block_id) is not bytes or len(block_id) != BLOCK_ID_LEN:
                raise DhtError(f"block ids must be {BLOCK_ID_LEN} bytes")
        if self.closed:
            raise PeerGoneError(f"{self.base_url}: closed")
        job = _RunJob(run, on_result, self)
        # every block waits its turn (the thread clears each as it asks for it, so this
        # comes before the run is queued): the fetcher may ask again, on another
        # connection, for a late one still waiting
        run.behind[:] = [True] * count
        self._threads.submit(job)  # PeerGoneError once closed
        self._jobs.add(job)
        try:
            await job.follow()
        finally:
            self._jobs.discard(job)

    @property
    def max_wants(self) -> int:
        return RUN_BLOCKS

    @property
    def prioritises(self) -> bool:
        """False: a web server answers in arrival order, whatever our priority
        (`dht.fetch`: a block under way here is not asked for again when a read needs it)."""
        return False

    async def have(self, block_ids: Sequence[bytes]) -> list[bool]:
        """Which of these blocks the mirror serves: HEAD requests, a few at a time.

        Ids it served or answered for before are not asked again (blocks never
        change). An id it does not answer for cleanly counts as missing.
        """
        flags = [bid in self._known for bid in block_ids]
        missing = [i for i, f in enumerate(flags) if not f]

        async def ask(i: int) -> None:
            async with self._head_limiter:
                try:
                    found = await self._head(block_path(block_ids[i]))
                except DhtError:
                    return
            if found:
                flags[i] = True
                self._remember(block_ids[i])

        async with trio.open_nursery() as nursery:
            for i in missing:
                nursery.start_soon(ask, i)
        return flags

    async def ping(self) -> float:
        """Seconds a HEAD of the head file takes (PeerGoneError if the mirror is unreachable)."""
        start = time.monotonic()
        await self._head(HEAD_PATH)
        return time.monotonic() - start

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for job in list(self._jobs):
            job.abort.abort()
        self._blocking.close()
        with trio.CancelScope(shield=True):
            await self._threads.aclose()
            await self._pool.aclose()

    # ---- the head record --------------------------------------------------

    async def fetch_record(self) -> bytes | None:
        """The mirror's head file (unverified: the caller checks signature and seq), or None.

        Asked with If-None-Match when the server gave an ETag, so a head that
        did not change costs a 304. None when the mirror has no head file.
        """
        headers = {"If-None-Match": self._record_etag} if self._record_etag else {}
        try:
            resp_data = await self._get(HEAD_PATH, MAX_MUTABLE_WIRE, what="head",
                                        headers=headers, not_modified=self._record)
        except BadBlockError as exc:
            raise PeerGoneError(str(exc)) from exc
        return resp_data

    # ---- HTTP -------------------------------------------------------------

    def _remember(self, block_id: bytes) -> None:
        self._known[block_id] = None
        self._known.move_to_end(block_id)
        while len(self._known) > _KNOWN_IDS:
            self._known.popitem(last=False)

    def _fetch_blocks(self, job: _RunJob, post: Callable[[_RunJob, int, bytes | None,
                                                           DhtError | None], None]) -> None:
        """In a fetch thread: the run's blocks not dropped, asked for at once (pipelined on
        one connection, `BlockingPool.get_run`), each checked and handed to the loop as
        its response comes."""
        run = job.run
        urls = [f"{self.base_url}/{block_path(block_id)}" for block_id in run.block_ids]
        cancelled, behind, abort = run.cancelled, run.behind, job.abort

        def wanted(index: int) -> bool:
            return not cancelled[index] and not abort.aborted

        def on_turn(index: int) -> None:
            behind[index] = False  # (one list item set: the loop reads it, GIL-atomic)

        try:
            for index, answer in self._blocking.get_run(urls, limit=MAX_BLOCK, abort=abort,
                                                        wanted=wanted, on_turn=on_turn):
                if cancelled[index]:
                    continue  # answered by the loop (`follow_cancels`); not checked
                data: bytes | None = None
                error: DhtError | None = None
                try:
                    data = self._checked(run.block_ids[index], urls[index], answer)
                except DhtError as exc:
                    error = exc
                post(job, index, data, error)
        except PeerGoneError:
            if not abort.aborted:
                raise
            # aborted: the blocks not answered are the loop's (`_RunJob.follow`)

    def _checked(self, block_id: bytes, url: str, answer: HttpResponse | DhtError) -> bytes:
        """A block's response, checked against its id (in a worker thread)."""
        if isinstance(answer, BodyTooLongError):
            raise BadBlockError(f"{url}: the block is longer than {MAX_BLOCK} bytes; refused "
                                f"({answer})") from answer
        if isinstance(answer, DhtError):
            raise answer
        if answer.status in (404, 410):
            raise BlockNotFound(f"{self.base_url} does not have block {block_id.hex()[:16]}")
        if answer.status != 200:
            raise PeerGoneError(f"{url}: HTTP {answer.status}")
        data = answer.body
        if _sha256(data) != block_id:  # hashlib lets go of the GIL for big buffers
            raise BadBlockError(f"{self.base_url} served {len(data)} bytes for block "
                                f"{block_id.hex()[:16]} that do not hash to its id "
                                "(corrupt or truncated file on the mirror)")
        hook = self.on_verified
        if hook is not None:
            try:
                hook(block_id, data)
            except Exception:  # an optimisation: a failure must not fail the fetch
                log.exception("on_verified hook of %s failed", self.base_url)
        return data

    async def _head(self, path: str) -> bool:
        if self.closed:
            raise PeerGoneError(f"{self.base_url}: closed")
        self.requests += 1
        resp = await self._pool.request("HEAD", f"{self.base_url}/{path}", limit=0)
        if resp.status in (404, 410):
            return False
        if resp.status != 200:
            raise PeerGoneError(f"{self.base_url}/{path}: HTTP {resp.status}")
        return True

    async def _get(self, path: str, limit: int, *, what: str,
                   headers: dict[str, str] | None = None,
                   not_modified: bytes | None = None) -> bytes | None:
        """The body of `path` (at most `limit` bytes), None on 404/410."""
        if self.closed:
            raise PeerGoneError(f"{self.base_url}: closed")
        self.requests += 1
        url = f"{self.base_url}/{path}"
        try:
            resp = await self._pool.request("GET", url, limit=limit,
                                            headers=list((headers or {}).items()))
        except BodyTooLongError as exc:
            raise BadBlockError(f"{url}: the {what} is longer than {limit} bytes; refused "
                                f"({exc})") from exc
        status = resp.status
        if status == 304 and not_modified is not None:
            return not_modified
        if status in (404, 410):
            return None
        if status != 200:
            raise PeerGoneError(f"{url}: HTTP {status}")
        data = resp.body
        self.bytes += len(data)
        if path == HEAD_PATH:
            self._record, self._record_etag = data, resp.headers.get("etag")
        return data


class _FetchThreads:
    """An HttpSource's fetch threads: long-lived, fed runs through a queue.

    Why: a run handed to `trio.to_thread` each time cost the event loop a
    thread hand-off per run, and with the decryption and store threads
    beside them trio kept starting new threads throughout a read
    (`Thread.start`, waiting for the new thread to take the GIL: 8-9% of the
    loop's samples in a cold mirror read, docs/benchmarks.md issue 10).

    Rules:
    - A thread is started (`Thread.start` returns once it runs) when a run is
      queued and fewer threads wait than runs do, up to `limit`; it then takes
      run after run and ends only at `aclose`, which aborts the runs queued
      (the ones under way are aborted by the source), wakes every thread and
      waits until each has ended: no thread outlives its source.
    - Answers reach the event loop in batches: a thread appends to one list and
      wakes the loop (`run_sync_soon`) only when that list was empty, so the
      blocks several threads finish meanwhile cost one wake-up.
    - A run ends on the loop (`_RunJob.end`) after its last answer, in order.
    - A source lives in one trio run at a time (the token of the last run submitted).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._queue: deque[_RunJob] = deque()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # threads waiting for a run
        self._closing = False
        self._posted: list[tuple[_RunJob, int | None, bytes | None, DhtError | None]] = []
        self._token: trio.lowlevel.TrioToken | None = None

    def submit(self, job: _RunJob) -> None:
        """Queue a run (on the loop); a thread takes it as soon as one is free."""
        self._token = trio.lowlevel.current_trio_token()
        with self._cond:
            if self._closing:
                raise PeerGoneError(f"{job.source.base_url}: closed")
            self._queue.append(job)
            start = (len(self._queue) > self._waiting and len(self._threads) < self.limit)
            if start:
                thread = threading.Thread(target=self._main, args=(job.source,), daemon=True,
                                          name=f"mirror-fetch-{len(self._threads)}")
                self._threads.append(thread)
            else:
                self._cond.notify()
        if start:
            try:
                thread.start()
            except RuntimeError as exc:  # the process may start no more threads
                with self._cond:
                    self._threads.remove(thread)
                    if self._threads:
                        return  # the job waits in the queue for a thread there is
                    self._queue.remove(job)
                raise PeerGoneError(f"{job.source.base_url}: no fetch thread: {exc}") from exc

    async def aclose(self) -> None:
        """Abort the runs queued, end every thread and wait for them (on the loop)."""
        with self._cond:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        for job in queued:
            job.abort.abort()
            job.end()
        if threads:
            await trio.to_thread.run_sync(_join_all, threads)
        self._flush()  # the answers the threads posted last (their runs were aborted)

    def _main(self, source: HttpSource) -> None:
        """A fetch thread: runs until the source closes."""
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._waiting += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._waiting -= 1
                if self._closing:
                    return
                job = self._queue.popleft()
            try:
                source._fetch_blocks(job, self._post)
            except BaseException as exc:  # a defect: the run ends, its blocks failed
                job.crash = PeerGoneError(f"{source.base_url}: the fetch thread failed: {exc!r}")
            finally:
                self._post(job, None, None, None)

    def _post(self, job: _RunJob, index: int | None, data: bytes | None,
              error: DhtError | None) -> None:
        """From a thread: an answer (index None: the run is over) for the loop."""
        with self._cond:
            self._posted.append((job, index, data, error))
            wake = len(self._posted) == 1
        if wake and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._flush)

    def _flush(self) -> None:
        """On the loop: every answer posted since the last flush, in order."""
        with self._cond:
            posted, self._posted = self._posted, []
        for job, index, data, error in posted:
            if index is None:
                job.end()
            else:
                job.deliver(index, data, error)


def _join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


class _RunJob:
    """One run of blocks fetched by one fetch thread, and the event loop's side of it."""

    def __init__(self, run: RunOfWants, on_result: OnRunResult, source: HttpSource) -> None:
        self.run = run
        self.source = source
        self.abort = Abort()
        self.ended = False  # the thread is done with it (`end`, on the loop)
        self.crash: DhtError | None = None
        self.left = False  # the caller was cancelled: no answer reaches it any more
        self._on_result = on_result
        self._source = source
        self._answered = [False] * len(run.block_ids)

    def deliver(self, index: int, data: bytes | None, error: DhtError | None) -> None:
        """In the event loop: block `index` ended (the first word on it counts)."""
        if self._answered[index] or self.left:
            return
        self._answered[index] = True
        if data is not None or error is not None:
            self._source.requests += 1
        if data is not None:
            self._source._remember(self.run.block_ids[index])
            self._source.bytes += len(data)
        self._on_result(index, data, error)

    async def follow(self) -> None:
        """The caller's side, in its own task (no task or nursery of its own: a run costs
        the loop little): answer dropped blocks at once, return once every block is
        answered or the thread is done with the run; the thread's request is shut down
        once nothing it does is wanted (every block left dropped, or the caller cancelled).

        Woken by `run.wake`: `RunOfWants.cancel` sets it, and so does the thread's end
        of the run (`end`); its answers themselves need no wake-up.
        """
        run = self.run
        try:
            while not self.ended:
                for i, cancelled in enumerate(run.cancelled):
                    if cancelled and not self._answered[i]:
                        self.deliver(i, None, None)
                if all(self._answered):
                    self.abort.abort()  # nothing it does is wanted: it ends now
                    return
                run.wake = trio.Event()
                await run.wake.wait()
        except BaseException:  # the caller is cancelled: the thread must end now
            self.left = True
            self.abort.abort()
            raise
        for i, answered in enumerate(self._answered):
            if not answered:  # the thread ended without it (aborted, or a defect)
                self.deliver(i, None, self.crash or PeerGoneError(
                    f"{self._source.base_url}: the request was abandoned"))

    def end(self) -> None:
        """On the loop: the thread is done with the run (after its last answer)."""
        self.ended = True
        self.run.wake.set()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
