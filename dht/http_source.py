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
(`dht.http_connection`: HTTP/1.1, a bounded pool, so several requests are
in flight at once on reused connections, a response body read into one
buffer); blocks of 256 KiB and more are hashed in worker threads, those that
arrive meanwhile together in one call. This module only decides what to ask
and what to believe. It knows nothing of drives: a block is 32 opaque bytes
whose SHA-256 names it, and the head is a signed record it hands up unread
(the layer above verifies its signature and seq).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence

import trio

from .errors import BadBlockError, BlockNotFound, DhtError, PeerGoneError
from .http_connection import BodyTooLongError, HttpPool, HttpTimeouts
from .mirror_layout import HEAD_PATH, MAX_BLOCK, block_path, check_base_url, source_id
from .records import MAX_MUTABLE_WIRE
from .types import BLOCK_ID_LEN, Priority

_KNOWN_IDS = 65_536  # ids a mirror answered for, remembered (HEAD/GET succeeded)
_HASH_IN_THREAD = 256 * 1024  # hash blocks at least this big in a worker thread

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
        self._hasher = _BatchHasher()
        self._known: OrderedDict[bytes, None] = OrderedDict()  # ids it served or HEAD-answered
        self._head_limiter = trio.CapacityLimiter(max(1, max_connections // 2))
        self._record: bytes | None = None
        self._record_etag: str | None = None
        self.closed = False
        self.requests = 0
        self.bytes = 0

    def __repr__(self) -> str:
        return f"HttpSource({self.base_url!r})"

    # ---- the fetcher's interface ------------------------------------------

    async def fetch(self, block_id: bytes, priority: Priority = Priority.READ) -> bytes:
        """The block's bytes, checked against its id."""
        if len(block_id) != BLOCK_ID_LEN:
            raise DhtError(f"block id must be {BLOCK_ID_LEN} bytes")
        data = await self._get(block_path(block_id), MAX_BLOCK, what="block")
        if data is None:
            raise BlockNotFound(f"{self.base_url} does not have block {block_id.hex()[:16]}")
        if len(data) >= _HASH_IN_THREAD:
            digest = await self._hasher.sha256(data)
        else:
            digest = _sha256(data)
        if digest != block_id:
            raise BadBlockError(f"{self.base_url} served {len(data)} bytes for block "
                                f"{block_id.hex()[:16]} that do not hash to its id "
                                "(corrupt or truncated file on the mirror)")
        self._remember(block_id)
        return data

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
        with trio.CancelScope(shield=True):
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


class _BatchHasher:
    """SHA-256 of big blocks in worker threads, what arrives meanwhile in one call.

    Many requests finish at once; a thread call per block costs a wakeup
    of the loop each. A caller that finds no hashing under way hashes
    everything queued in one worker call and hands each waiter its digest;
    who is still waiting then (queued meanwhile) goes next.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[bytes, list[bytes]]] = []
        self._busy = False
        self._done = trio.Event()

    async def sha256(self, data: bytes) -> bytes:
        slot: list[bytes] = []
        self._queue.append((data, slot))
        try:
            while not slot:
                if self._busy:
                    await self._done.wait()
                else:
                    await self._hash_queued()
        finally:
            if not slot:  # cancelled before its turn: nobody needs it hashed
                self._queue = [q for q in self._queue if q[1] is not slot]
        return slot[0]

    async def _hash_queued(self) -> None:
        self._busy = True
        try:
            batch = list(self._queue)
            digests = await trio.to_thread.run_sync(_sha256_each, [d for d, _ in batch])
            for (_, slot), digest in zip(batch, digests, strict=True):
                slot.append(digest)
            hashed = {id(slot) for _, slot in batch}
            self._queue = [q for q in self._queue if id(q[1]) not in hashed]
        finally:
            self._busy = False
            self._done.set()
            self._done = trio.Event()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _sha256_each(blocks: list[bytes]) -> list[bytes]:
    return [hashlib.sha256(b).digest() for b in blocks]
