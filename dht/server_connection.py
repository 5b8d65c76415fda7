"""One client of the peer server, past its handshake: its wants, its haves, its control frames.

Rules (docs/protocol.md, "After the handshake"):

1. Wants are served most urgent priority first, in arrival order within a
   priority (a WantRun is its wants, in order); a Cancel forgets a want (a block already being read is dropped
   before it is sent). A duplicate request id, or more than the server's
   `max_wants` outstanding, is a protocol violation.
1a. READ wants (a process blocked in read()) have a lane of their own: they
   are read from the source and sent ahead of the lazier replies already
   read ahead on this connection; while a READ of this connection is being
   read, lazier replies wait for it (at most LAZY_HOLD). Other connections'
   work is not held back for it: a hold across connections (tried) starved
   the readers' readahead from each other, and the seed sent more.
2. Control frames (Notice, Holding, Whole, HaveReply, Pong, Goodbye) go out ahead of
   blocks; a client that lets MAX_CONTROL_BACKLOG of them pile up is not
   reading and is dropped.
3. Have frames are answered from a token bucket (the server's `have_rate`,
   `have_burst`); past it the connection stops being read, so TCP pushes back.
4. A protocol violation is answered with Goodbye(reason) and the connection
   closes after GOODBYE_GRACE; errors end the connection, never the server.

The server (server.py) owns the block source and the drive scope; this
connection asks it through its public lookups (`lookup`, `holds`,
`in_flight`). A push dialer (push.py) runs the same class over a connection
it opened.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING

import trio

from .errors import PeerGoneError, PeerProtocolError, PeerStuckError
from .frames import (
    MAX_REASON,
    MAX_RUN_IDS,
    Cancel,
    Goodbye,
    Have,
    HaveReply,
    Message,
    NotFound,
    Ping,
    Pong,
    Want,
    WantRun,
    encode,
    encode_block,
    pack_bitmap,
)
from .streams import GOODBYE_GRACE, MAX_CONTROL_BACKLOG, FrameStream

if TYPE_CHECKING:
    from .server import PeerServer

HOLDING_WAIT = 2.0  # seconds a server waits for its node's own fetch of an announced block
# Wanted blocks are read from the source in batches, one worker-thread call each, of as
# many wants as make about LOAD_BYTES at the sizes this connection's blocks have had (at
# most LOAD_BATCH; a read stops at LOAD_BYTES and what it did not reach is queued again).
# A cold store read is a disk wait, so up to LOOKAHEAD_BATCHES batches are taken ahead of
# what has gone out, keeping both the disk and the connection busy; few, so a READ that
# arrives behind a PIN backlog waits for at most that much. Many small blocks (a pin of
# 10^5 small files) cost a thread hand-off (and one store transaction) per batch, not per
# block: a whole WantRun of small blocks is one batch.
# The lazier lane's batches are larger: a bulk read's readahead (and a pin) of 256 KiB
# blocks was one worker-thread call per block, each a hand-off of the GIL and back, the
# largest item of the serving loop's profile in a cold read (issue 12). READs keep small
# batches: the first one's reply waits for its whole batch to be read.
LOAD_BATCH = MAX_RUN_IDS
LOAD_BYTES = 256 * 1024  # the READ lane's batch
LAZY_LOAD_BYTES = 1024 * 1024  # the lazier lane's batch
LOOKAHEAD_BATCHES = 2
# Blocks sent in one write (one TLS record run, one system call): consecutive replies that
# are ready go together up to this many bytes.
SEND_BYTES = 256 * 1024
# Lanes: READ wants, then the lazier priorities (READAHEAD, PIN, PREFETCH).
URGENT, LAZY = 0, 1
# Seconds lazier replies wait, at most, for a READ of their connection being read from the
# store: it goes out first; a store that hangs does not stop the rest.
LAZY_HOLD = 0.25


class _Lookup:
    """One wanted block on its way from the source to the wire."""

    __slots__ = ("req_id", "seq", "lane", "data", "done", "skip", "batch")

    def __init__(self, req_id: int, seq: int, lane: int, batch: list[int]) -> None:
        self.req_id = req_id
        self.seq = seq
        self.lane = lane
        self.data: bytes | None = None
        self.done = False
        self.skip = False  # not read: its batch's byte budget ran out; queued again
        self.batch = batch  # [lookups of its batch not yet sent or dropped]


class ServerConnection:
    """One client past its handshake: a priority queue of wants and a queue of control frames.

    `server.serve_connection(conn)` runs it and keeps it in the server's client
    table (so `notify`, `announce_holding` and `say_goodbye` reach it).
    """

    def __init__(
        self,
        server: PeerServer,
        frames: FrameStream,
        discovery_key: bytes,
        client_id: bytes,
    ) -> None:
        self.server = server
        self.frames = frames
        self.discovery_key = discovery_key
        self.client_id = client_id
        # heap of (priority, seq, req_id); `wants` maps req_id -> (seq, block_id)
        # and is the truth: heap entries whose seq no longer matches are stale.
        self._queue: list[tuple[int, int, int]] = []
        self._wants: dict[int, tuple[int, bytes]] = {}
        self._seq = 0
        # seqs of READ wants here not yet read from the source
        self._urgent: set[int] = set()
        self._control: deque[bytes] = deque()
        # per lane, blocks being read from the source or read, in the order they go out
        self._ready: tuple[deque[_Lookup], deque[_Lookup]] = (deque(), deque())
        self._wake = trio.Event()  # the writer: a control frame or a looked-up block is ready
        self._load_wake = trio.Event()  # the loader: a new want, or a batch read
        self._unsent_batches = [0, 0]  # per lane, batches taken whose replies have not all gone out
        self._holds: set[trio.CancelScope] = set()  # lazier work holding back (rule 1a)
        # running mean of the blocks read here, which sizes batches: it starts as if blocks
        # were large (one want a batch) and shrinks as small ones come
        # per lane, the running mean of the blocks' sizes: a batch is as many wants as
        # make its budget at that size. The lazier lane's starts at its whole budget (a
        # batch of one), so a first guess below the real size never takes wants that
        # the budget then leaves unread: those go back in the queue behind the next
        # batch's, out of FIFO order (tests/test_peer.py, priority order when backlogged)
        self._block_size = [float(LOAD_BYTES), float(LAZY_LOAD_BYTES)]
        self._scope: trio.CancelScope | None = None
        self._goodbye_sent = False
        self._have_tokens = float(server.have_burst)
        self._have_at = trio.current_time()
        self.client_left = False  # the client said Goodbye

    @property
    def control_backlog(self) -> int:
        return len(self._control)

    def push_control(self, msg: Message | None, frame: bytes | None = None) -> bool:
        """Queue a control frame ahead of blocks; a client that never reads them is dropped."""
        if self._goodbye_sent:
            return False
        if len(self._control) >= MAX_CONTROL_BACKLOG:
            self._protocol_violation("not reading control frames")
            return False
        if frame is None:
            assert msg is not None
            frame = encode(msg)
        self._control.append(frame)
        self._wake.set()
        return True

    def leave(self, reason: str) -> None:
        """Say Goodbye(reason) and close, after a short grace for the frame to go out."""
        if self._goodbye_sent:
            return
        self._control.clear()
        self._control.append(encode(Goodbye(reason[:MAX_REASON])))
        self._goodbye_sent = True
        self._wake.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + GOODBYE_GRACE)

    def _protocol_violation(self, reason: str) -> None:
        """Count a broken rule, then leave with Goodbye(reason) (once: later ones are moot)."""
        if self._goodbye_sent:
            return
        self.server.stats.protocol_errors += 1
        self.leave(reason)

    async def run(self) -> None:
        """Serve until the client leaves or misbehaves; errors end the connection, not the server."""
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._writer)
            nursery.start_soon(self._loader, nursery)
            try:
                await self._reader()
            except PeerProtocolError as exc:
                self._protocol_violation(str(exc))
                await trio.sleep_forever()  # until the Goodbye is flushed or the grace ends
            except PeerGoneError:
                nursery.cancel_scope.cancel()

    async def _reader(self) -> None:
        stats = self.server.stats
        max_wants = self.server.max_wants
        while not self._goodbye_sent:
            msg = await self.frames.receive()
            if isinstance(msg, Want):
                self._want(msg.req_id, msg.block_id, int(msg.priority), max_wants)
            elif isinstance(msg, WantRun):
                # a run is its wants, in order: the loader then reads them in one batch
                self.server.stats.runs_received += 1
                priority = int(msg.priority)
                for req_id, block_id in zip(msg.request_ids(), msg.block_ids, strict=True):
                    if not self._want(req_id, block_id, priority, max_wants):
                        break
            elif isinstance(msg, Cancel):
                stats.cancels_received += 1
                if (want := self._wants.pop(msg.req_id, None)) is not None:
                    self._urgent_done(want[0])
                    self._compact_queue()
            elif isinstance(msg, Have):
                # answered at once, ahead of queued blocks: a presence check is cheap, but
                # 240 store reads per 4 KiB frame on the event loop are not free, so a
                # client past its rate waits (we stop reading it: TCP pushes back)
                await self._have_budget()
                stats.haves_received += 1
                bitmap = pack_bitmap(self.server.holds(self.discovery_key, msg.block_ids))
                self.push_control(HaveReply(msg.req_id, bitmap))
                await trio.lowlevel.checkpoint()
            elif isinstance(msg, Ping):
                self.push_control(Pong(msg.token))
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, Goodbye):
                self.client_left = True
                break
            else:
                self._protocol_violation(f"unexpected {msg.TYPE} frame")
        if not self._goodbye_sent:
            # The client said goodbye: nothing more to send.
            assert self._scope is not None
            self._scope.cancel()
        else:
            # Wait for the writer to flush our Goodbye (bounded by the deadline).
            await trio.sleep_forever()

    def _want(self, req_id: int, block_id: bytes, priority: int, max_wants: int) -> bool:
        """Queue one want (rule 1); False after a protocol violation."""
        if req_id in self._wants:
            self._protocol_violation(f"duplicate request id {req_id}")
            return False
        if len(self._wants) >= max_wants:
            self._protocol_violation(f"more than {max_wants} outstanding wants")
            return False
        self.server.stats.wants_received += 1
        self._seq += 1
        self._wants[req_id] = (self._seq, block_id)
        heapq.heappush(self._queue, (priority, self._seq, req_id))
        if priority == URGENT:
            self._urgent.add(self._seq)
        self._load_wake.set()
        return True

    async def _hold_lazy(self) -> None:
        """Let a READ of ours being read go out first: until it is ready (or none is left
        to read), at most LAZY_HOLD."""
        with trio.move_on_after(LAZY_HOLD) as scope:
            self._holds.add(scope)
            try:
                await trio.sleep_forever()
            finally:
                self._holds.discard(scope)

    def _end_holds(self) -> None:
        for scope in self._holds:
            scope.cancel()

    def _urgent_done(self, seq: int) -> None:
        """A READ want was read from the source (or cancelled): it holds lazier replies no
        more."""
        if seq in self._urgent:
            self._urgent.remove(seq)
            if not self._urgent:
                self._end_holds()

    async def _have_budget(self) -> None:
        """Take one Have from this connection's token bucket, sleeping until there is one."""
        rate, burst = self.server.have_rate, self.server.have_burst
        now = trio.current_time()
        self._have_tokens = min(burst, self._have_tokens + (now - self._have_at) * rate)
        self._have_at = now
        if self._have_tokens < 1:
            self.server.stats.haves_delayed += 1
            await trio.sleep((1 - self._have_tokens) / rate)
            self._have_tokens, self._have_at = 1.0, trio.current_time()
        self._have_tokens -= 1

    def _compact_queue(self) -> None:
        """Drop cancelled entries from the heap once they outnumber the live ones.

        A Cancel only forgets the want; its heap entry stays until popped, so
        want-then-cancel pairs would otherwise grow the heap without bound
        (`max_wants` bounds live wants only). Rebuilding when over half is stale
        keeps the heap under 2 x max_wants + 16 entries at amortised O(1) each.
        """
        if len(self._queue) > 2 * len(self._wants) + 16:
            wants = self._wants
            self._queue = [e for e in self._queue
                           if (w := wants.get(e[2])) is not None and w[0] == e[1]]
            heapq.heapify(self._queue)

    def _top_priority(self) -> int | None:
        """The priority of the most urgent live want (stale heap entries dropped), or None."""
        queue, wants = self._queue, self._wants
        while queue:
            prio, seq, req_id = queue[0]
            want = wants.get(req_id)
            if want is not None and want[0] == seq:
                return prio
            heapq.heappop(queue)
        return None

    def _next_want(self) -> tuple[int, int, int, bytes] | None:
        """(priority, seq, req_id, block_id) of the most urgent live want, off the heap."""
        while self._queue:
            prio, seq, req_id = heapq.heappop(self._queue)
            want = self._wants.get(req_id)
            if want is not None and want[0] == seq:
                return prio, seq, req_id, want[1]
        return None

    async def _loader(self, nursery: trio.Nursery) -> None:
        """Read wanted blocks from the source in worker threads, most urgent first.

        A store read can wait on the disk; in a thread it neither stalls the
        event loop (every other connection, the DHT) nor this connection's
        sends. Wants are taken in batches (about LOAD_BYTES for READs,
        LAZY_LOAD_BYTES for the rest, at most LOAD_BATCH), up to
        LOOKAHEAD_BATCHES of them per lane read ahead of the sends; they are
        sent in the order they were taken, READs (their own lane, rule 1a)
        ahead of the lazier ones.
        """
        while True:
            batch: list[tuple[_Lookup, int, bytes]] = []
            top = None if self._goodbye_sent else self._top_priority()
            lane = URGENT if top == URGENT else LAZY
            if top is not None and self._unsent_batches[lane] < LOOKAHEAD_BATCHES:
                budget = LOAD_BYTES if lane == URGENT else LAZY_LOAD_BYTES
                most = max(1, min(LOAD_BATCH, int(budget // self._block_size[lane])))
                left = [0]
                ready = self._ready[lane]
                while len(batch) < most:
                    prio = self._top_priority()
                    if prio is None or (prio == URGENT) != (lane == URGENT):
                        break
                    want = self._next_want()
                    assert want is not None
                    prio, seq, req_id, block_id = want
                    lookup = _Lookup(req_id, seq, lane, left)
                    ready.append(lookup)
                    batch.append((lookup, prio, block_id))
                left[0] = len(batch)
            if not batch:
                self._load_wake = trio.Event()
                await self._load_wake.wait()
                continue
            self._unsent_batches[lane] += 1
            nursery.start_soon(self._look_up, batch, nursery, budget)

    async def _look_up(self, batch: list[tuple[_Lookup, int, bytes]],
                       nursery: trio.Nursery, budget: int) -> None:
        in_flight = self.server.in_flight
        to_read = batch
        if in_flight is not None:
            # A block our node fetched moments ago for this drive (or is fetching) is
            # answered from its memory: most of what a reader relays to the readers
            # beside it, with no store read and no worker-thread round trip, each a
            # wait for a CPU on a busy machine.
            to_read = []
            for item in batch:
                lookup, _prio, block_id = item
                lookup.data = await in_flight(self.discovery_key, block_id, 0)
                if lookup.data is None:
                    to_read.append(item)
                else:
                    self.server.stats.served_in_flight += 1
                    lookup.done = True
        found: list[bytes | None] = []
        if to_read:
            found = await trio.to_thread.run_sync(
                self.server.lookup_many, self.discovery_key, [b for _, _, b in to_read],
                budget)
        for k, (lookup, prio, block_id) in enumerate(to_read):
            if k >= len(found):
                # not read (the byte budget ran out: the blocks were larger than their
                # running mean said): back in its place in the queue
                lookup.skip = lookup.done = True
                heapq.heappush(self._queue, (prio, lookup.seq, lookup.req_id))
                continue
            data = lookup.data = found[k]
            if data is None and in_flight is not None:
                # Perhaps announced by our node and still on its way here: wait for it,
                # out of the send queue, so the blocks wanted after it go out meanwhile.
                self._ready[lookup.lane].remove(lookup)
                nursery.start_soon(self._wait_in_flight, lookup, block_id)
                continue
            lookup.done = True
            if data is not None:
                mean = self._block_size
                mean[lookup.lane] += (len(data) - mean[lookup.lane]) / 4
        for lookup, _prio, _block_id in batch:
            if not lookup.skip:  # read (or waiting on our node's own fetch, not on the CPU)
                self._urgent_done(lookup.seq)
        if batch and batch[0][0].lane == URGENT:
            self._end_holds()  # a READ of ours is ready to send
        self._wake.set()
        self._load_wake.set()

    async def _wait_in_flight(self, lookup: _Lookup, block_id: bytes) -> None:
        in_flight = self.server.in_flight
        assert in_flight is not None
        lookup.data = await in_flight(self.discovery_key, block_id, HOLDING_WAIT)
        if lookup.data is not None:
            self.server.stats.served_in_flight += 1
        lookup.done = True
        self._ready[lookup.lane].append(lookup)
        if lookup.lane == URGENT:
            self._end_holds()
        self._wake.set()

    def _sendable(self) -> bool:
        """Whether a reply is ready to go: a READ's, or a lazier one's (rule 1a)."""
        urgent, lazy = self._ready
        return bool((urgent and urgent[0].done) or (lazy and lazy[0].done))

    def _replies_ready(self, lazy: bool) -> tuple[list[bytes], list[tuple[int, int, int]]]:
        """The replies ready to go, READs first (the lazier ones too if `lazy`), in order
        within a lane, as the parts of one write (a Block frame is two: its header and
        the block's bytes; up to SEND_BYTES; a large block goes on its own): (parts,
        [(req_id, seq, block bytes or -1)])."""
        parts: list[bytes] = []
        sent: list[tuple[int, int, int]] = []
        size = 0
        for lane in (URGENT, LAZY) if lazy else (URGENT,):
            ready = self._ready[lane]
            while ready and ready[0].done and size < SEND_BYTES:
                lookup = ready[0]
                data = lookup.data
                if parts and data is not None and len(data) >= SEND_BYTES // 4:
                    return parts, sent  # goes out alone next, not copied into a joined buffer
                ready.popleft()
                lookup.batch[0] -= 1
                if lookup.batch[0] == 0:
                    self._unsent_batches[lane] -= 1
                if lookup.skip:
                    continue
                current = self._wants.get(lookup.req_id)
                if current is None or current[0] != lookup.seq:
                    continue  # cancelled (or its id re-used) while it was being read
                if data is None:
                    self.server.stats.not_found += 1
                    parts.append(encode(NotFound(lookup.req_id)))
                    sent.append((lookup.req_id, lookup.seq, -1))
                else:
                    head, block = encode_block(lookup.req_id, data)
                    parts += (head, block)  # the block is not copied into a frame (send_parts)
                    size += len(head) + len(block)
                    sent.append((lookup.req_id, lookup.seq, len(data)))
        return parts, sent

    async def _writer(self) -> None:
        stats = self.server.stats
        try:
            while True:
                if self._control:
                    # everything queued in one write: a reader announcing what it fetches
                    # (Holding) queues a frame per batch of blocks, each a TLS record and
                    # a system call of its own otherwise
                    frames = list(self._control)
                    self._control.clear()
                    await self.frames.send_bytes(b"".join(frames))
                    if self._goodbye_sent and not self._control:
                        assert self._scope is not None
                        self._scope.cancel()
                        return
                    continue
                if self._goodbye_sent or not self._sendable():
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                urgent = self._ready[URGENT]
                if not (urgent and urgent[0].done) and self._urgent:
                    # only lazier replies to send while a READ of ours is being read: it
                    # goes first (rule 1a), for a moment at most
                    await self._hold_lazy()
                    if self._goodbye_sent or self._control or not self._sendable():
                        continue
                # a READ's reply goes out with READs only: the next READ may be a moment
                # from ready, and no lazier reply goes out ahead of it
                parts, sent = self._replies_ready(lazy=not (urgent and urgent[0].done))
                self._load_wake.set()
                if not parts:
                    continue
                await self.frames.send_parts(parts)
                for req_id, seq, size in sent:
                    if size >= 0:
                        stats.blocks_served += 1
                        stats.bytes_served += size
                    # Still outstanding until sent; a Cancel meanwhile already
                    # removed it, and a re-used req_id has a newer seq.
                    current = self._wants.get(req_id)
                    if current is not None and current[0] == seq:
                        del self._wants[req_id]
                await trio.lowlevel.checkpoint()
        except PeerGoneError as exc:
            if isinstance(exc, PeerStuckError):
                stats.send_timeouts += 1
            assert self._scope is not None
            self._scope.cancel()
