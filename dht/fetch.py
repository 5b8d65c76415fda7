"""The fetch scheduler: getting blocks of one drive from a swarm of peers.

A `Fetcher` serves one discovery key. Callers ask for blocks by id with a
priority; the Fetcher keeps one pooled connection per provider and decides
which peer is asked for which block and when:

* **Urgent first.** Requests wait in a local priority queue (lowest
  `Priority` value first, FIFO within a priority) and each peer gets only a
  bounded number in flight, so the queue, not the network, holds a big pin
  backlog. Nothing but a READ may fill a peer's last `foreground_reserve`
  slots (not even READAHEAD, which a streaming reader keeps at the limit),
  and a READ counts only against READs: lazier work never holds it up, since
  on the wire it carries its priority and the server answers it ahead of
  anything queued there. Small PIN and
  PREFETCH blocks go deeper (up to `max_small_in_flight_per_peer`,
  `small_in_flight_bytes` in flight): a pin of many small files is bound by
  round trips, not bytes.
* **Runs.** Requests queued one behind the other (a streaming reader's
  readahead, in file order) that the chosen peer can take alike go to it as
  one run: one WantRun frame, one task and one watchdog, each block still a
  request in flight of its own (`_take_run`, `_run_attempts`).
* **Spread by speed.** A block goes to the eligible peer with the lowest
  estimated completion time, (bytes in flight + this block) / throughput EWMA
  + latency EWMA, so every provider gets work and faster ones get more.
* **Hedging.** An attempt that takes longer than `hedge_factor` x that peer's
  usual time (and at least `hedge_floor`) gets a second attempt at another
  peer; the first answer wins and the loser is cancelled (Cancel on the wire).
* **Penalties.** NotFound excludes the peer for that block. A broken
  connection, a refused or failed connect, or a stall (no answer at all for
  `stall_timeout`) puts the peer in exponential backoff. The backoff counts
  *incidents*, not requests: the requests in flight when a source went silent
  or its connection broke all fail (each is retried elsewhere at once), but
  only the first failure counts; the others were dispatched before it was
  counted and stem from the same incident (`_penalise`). One freeze of a
  source with 16 requests in flight used to count 16-32 failures (a 60 s
  backoff); now it counts one (0.5 s). A block with the wrong hash never
  reaches the caller: the connection is dropped and the peer is shunned for
  `bad_block_backoff`, per lie.
* **Probes of a lone source.** Backoff spreads work away from a failing peer
  to the others; a request with no other eligible source (a drive read only
  through one mirror, or from one peer) would only wait out that backoff, up
  to `backoff_max`, and its reads fail with EIO meanwhile even though the
  source was back a moment after its hiccup. So such a request may take one
  *probe* attempt to the backed-off source: one probe in flight per source,
  the first `probe_interval` after the failure, the next after twice that,
  and so on up to `probe_max`; and only while a request waits for it. A probe
  that answers ends the backoff at once; one that fails counts as any other
  failure, so the backoff of a source that stays dead still grows. A shunned
  peer (a corrupt block, a refusal) is never probed. With another eligible
  source nothing changes: the work goes there (`_probe_target`).
* **Bounded waits.** Every fetch has a deadline; past it the caller gets
  FetchTimeout saying how many peers were tried and what each said.

The provider list comes from an async callable (the DHT and LAN discovery
supply it) and is re-read periodically and whenever a request runs out of
peers to ask.
"""

from __future__ import annotations

import copy
import enum
import heapq
import inspect
import itertools
import logging
import math
import random
import statistics
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .client import OnNotice, OnVerified, PeerConnection, RunOfWants
from .errors import (
    BadBlockError,
    BlockNotFound,
    DhtError,
    FetchTimeout,
    PeerGoneError,
    PeerIdentityError,
    PeerRefusedError,
)
from .frames import MAX_RUN_IDS
from .identity import NodeIdentity
from .streams import open_task_nursery
from .timescale import scaled
from .types import BLOCK_ID_LEN, PeerAddr, Priority

log = logging.getLogger(__name__)

ProvidersFn = Callable[[], Awaitable[Sequence[PeerAddr]] | Sequence[PeerAddr]]
ConnectFn = Callable[..., Awaitable[PeerConnection]]
"""Called as connect(addr, identity, discovery_key, drive_secret, *, nursery, on_notice, timeout)."""

_INITIAL_BLOCK_SIZE = 256 * 1024
_DEFAULT_THROUGHPUT = 10e6  # bytes/s assumed for a peer never measured (optimistic)
_DEFAULT_LATENCY = 0.05  # seconds assumed for a peer never measured
_SOFT_FAILURE_PENALTY = 10.0  # seconds added to the estimate of a peer that failed this block
_MAX_BLOCKED_SCAN = 64  # requests examined per dispatch pass that find all their peers busy
_NOT_ANNOUNCED_PENALTY = 5.0  # seconds added for a peer that announces blocks but not this one
_MAX_FORMER_PEERS = 64  # peers no longer listed as providers whose statistics are kept
_MAX_ADDRS_PER_PEER = 8  # addresses kept per peer (LAN and DHT records together)
_MAX_BACKGROUND_DIALS = 16  # providers dialled ahead of need at once
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address of a peer is dialled too
SLOW_READ = 1.0  # seconds a READ may wait before its block's history is logged (INFO, -v)
_FETCHING_POLL = 0.05  # seconds between looks for the Holding of a block another reader fetches
_MAX_TRACE = 24  # events kept per request for that log: the first half and the latest
# What an entry of the recently delivered blocks costs beside its bytes (its id, the dict
# slot, the bytes objects; measured with tracemalloc: ~200 bytes): counted in recent_bytes.
RECENT_ENTRY_OVERHEAD = 200


@dataclass
class FetchConfig:
    """Tuning knobs; the defaults suit a WAN swarm, tests shrink the times."""

    max_in_flight_per_peer: int = 16
    foreground_reserve: int = 2  # slots per peer that only a READ may take
    # PIN/PREFETCH requests per peer past the usual slots while blocks are small: up to
    # this many, as long as what is in flight stays under small_in_flight_bytes
    max_small_in_flight_per_peer: int = 240
    small_in_flight_bytes: int = 256 * 1024
    small_run_min: int = 120  # slots that deep pipeline refills at once (see _has_slot)
    # a source that asks for a run's blocks one after the other (a static HTTP mirror) has
    # its lazier slots refilled a run at a time, once this many are free (or as many as
    # its runs hold, if fewer), not one block as each answer lands (see _has_slot)
    serial_run_min: int = 8
    max_parallel_attempts: int = 2  # one attempt + one hedge per block at a time
    hedge_factor: float = 3.0
    hedge_floor: float = 0.5  # seconds: never hedge sooner than this
    stall_timeout: float = 10.0  # seconds without any answer from a peer with work
    connect_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    bad_block_backoff: float = 600.0  # also used for refused / wrong-identity peers
    # a backed-off source that is a request's only eligible one is probed (one attempt at
    # a time) this long after its failure, then after twice as long after each failed
    # probe, at most probe_max apart: a hiccup costs a retry, not the backoff
    probe_interval: float = 1.0
    probe_max: float = 10.0
    default_timeout: float = 30.0  # per fetch, when the caller gives none
    providers_timeout: float = 30.0
    provider_refresh_interval: float = scaled(60.0)  # dht/timescale.py
    provider_refresh_min_interval: float = 1.0
    ewma_alpha: float = 0.25
    # adjacent queued requests of one priority sent to one peer as one run (one WantRun
    # frame, one attempt): a streaming reader's readahead costs a scheduling step per run
    max_run_blocks: int = 16
    # a pin's (or prefetch's) blocks, queued together by `fetch_batch`, go in runs this
    # long: a pin of many small files is one WantRun frame per this many blocks
    max_batch_run_blocks: int = MAX_RUN_IDS
    fetch_many_concurrency: int = 32
    holders_timeout: float = 5.0  # count_holders / have_map, when the caller gives none
    holders_refresh_interval: float = 10.0  # re-read providers first if older than this
    # delivered blocks kept for other readers until the store has them: the mount's store
    # writer holds at most 16 MiB unstored (vfs/blocks.py), so older ones are stored
    recent_bytes: int = 16 * 1024 * 1024
    swarm_jitter: float = 0.25  # seconds: most a readahead waits for another reader to take it
    holder_hedge_max: float = 2.0  # seconds before an attempt at an announcing reader is hedged
    # seconds a readahead (or lazier) request may wait for a reader that said it is fetching
    # the block (Fetching) to announce holding it, instead of taking it from the seed too
    fetching_hold: float = 2.0
    fetching_hedge: float = 0.5  # seconds before a READ at a reader still fetching it is hedged

    def __post_init__(self) -> None:
        if self.max_in_flight_per_peer < 1:
            raise ValueError("max_in_flight_per_peer must be at least 1")
        if not 0 <= self.foreground_reserve < self.max_in_flight_per_peer:
            raise ValueError("foreground_reserve must be below max_in_flight_per_peer")
        if self.max_parallel_attempts < 1:
            raise ValueError("max_parallel_attempts must be at least 1")


@dataclass(frozen=True)
class PeerStats:
    """A snapshot of what one peer has done for this Fetcher (status output, tests)."""

    node_id: bytes
    addr: str
    provider: bool
    connected: bool
    in_flight: int
    blocks: int
    bytes: int
    failures: int  # failed attempts that counted against it (an incident's several)
    incidents: int  # of them, those counted for its backoff (one per freeze or break)
    not_found: int
    bad_blocks: int
    stalls: int
    late: int  # attempts that ran past their hedge deadline
    latency: float | None  # EWMA seconds per request
    throughput: float | None  # EWMA bytes per second
    backoff_remaining: float


@dataclass
class FetcherStats:
    requests: int = 0
    completed: int = 0
    timeouts: int = 0
    attempts: int = 0
    hedges: int = 0
    probes: int = 0  # attempts at a backed-off source that was a request's only one
    provider_refreshes: int = 0


class BlockSource(Protocol):
    """What the fetcher asks of a source of blocks once it is reached.

    A pooled `PeerConnection` is one; a source that needs no dialling (an HTTP
    mirror, `dht.http_source.HttpSource`) is one too and is handed to the
    fetcher directly (`Fetcher.set_sources`), with a 32-byte `source_id` and
    a `label` in place of a node id and an address. Either way the fetcher
    schedules, hedges, verifies and penalises it the same. A source that also
    has `fetch_run` and `max_wants` (as `PeerConnection`) is given runs of
    blocks (`_take_run`); any other, one block per attempt. One whose
    `prioritises` is False serves in arrival order whatever the priority: a
    block under way there is not asked of it again when a read needs it now.
    """

    @property
    def closed(self) -> bool: ...
    async def fetch(self, block_id: bytes, priority: Priority) -> bytes: ...
    async def have(self, block_ids: Sequence[bytes]) -> list[bool]: ...
    async def ping(self) -> float: ...
    async def aclose(self) -> None: ...


class StaticSource(BlockSource, Protocol):
    source_id: bytes
    label: str


class Outcome(enum.Enum):
    """What one peer did with one request; a FetchTimeout counts them by kind."""

    IN_PROGRESS = "in progress"
    DELIVERED = "delivered"
    TOO_SLOW = "too slow"  # lost a hedge without delivering anything meanwhile
    STALLED = "stalled"  # no answer at all for stall_timeout
    NOT_FOUND = "does not have it"
    CORRUPT = "sent a corrupt block"
    REFUSED = "refused"  # the handshake said no, or the node is not who it should be
    FAILED = "failed"  # the connection could not be made or broke


class _Peer:
    """What the fetcher knows of one provider (or one static source)."""

    def __init__(self, addr: PeerAddr | None, source: StaticSource | None = None) -> None:
        self.addr = addr  # the address that worked last (else the first listed)
        self.addrs: list[PeerAddr] = [addr] if addr is not None else []
        # (host, port) -> when a dial there last failed: one bad address never
        # makes the peer look failed while another works
        self.addr_failed: dict[tuple[str, int], float] = {}
        self.source = source  # a source needing no connection (a mirror); addr is None
        self.node_id = source.source_id if source is not None else addr.node_id
        self.label = source.label if source is not None else str(addr)
        self.provider = True
        self.partial = False  # answered NotFound: holds part of the drive (see `announced`)
        self.left_at = math.inf  # when it stopped being listed as a provider
        self.pushed = False  # a source that is a peer's push connection (add_source)
        # a source that asks for a run's blocks one after the other (a static mirror: it
        # serves in arrival order): the most blocks of a run, else 0 (see Fetcher._has_slot)
        self.serial_runs = 0
        if (source is not None and not getattr(source, "prioritises", True)
                and callable(getattr(source, "fetch_run", None))):
            wants = getattr(source, "max_wants", 1)
            self.serial_runs = wants if wants > 1 else 0
        self.conn: PeerConnection | None = None
        # its last connection ended by itself (the reader left, the link broke while idle):
        # dropped at once, not dialled ahead again until something needs it (see `_dial_ahead`)
        self.conn_ended = False
        self.connecting: trio.Event | None = None
        self.last_connect_failure = -math.inf
        self.connect_error: DhtError | None = None
        self.in_flight = 0
        self.in_flight_lazy = 0  # attempts at a priority other than READ
        self.in_flight_bytes = 0
        self.latency: float | None = None  # EWMA of whole-request time
        self.idle_latency: float | None = None  # EWMA of request time when nothing else queued
        self.throughput: float | None = None
        self.last_delivery = -math.inf
        self.consecutive_failures = 0  # incidents in a row: the backoff's exponent
        # when the incident counted last was: a failure of an attempt dispatched before
        # then (in flight when it happened) is part of it, not another (Fetcher._penalise)
        self.incident_at = -math.inf
        self.incidents = 0
        self.backoff_until = -math.inf
        self.shunned_until = -math.inf  # a corrupt block or a refusal: never probed till then
        self.probe_at = math.inf  # while backed off: when a request with nobody else may probe
        self.probe_failures = 0  # probes failed in a row (each doubles the next one's wait)
        self.probing = False  # a probe is in flight (one at a time)
        self.blocks = 0
        self.bytes = 0
        self.failures = 0
        self.not_found = 0
        self.bad_blocks = 0
        self.stalls = 0
        self.late = 0

    @property
    def connected(self) -> bool:
        if self.source is not None:
            return not self.source.closed
        return self.conn is not None and not self.conn.closed

    def set_addrs(self, addrs: list[PeerAddr]) -> bool:
        """Replace the address list (the working one stays first); True if it changed."""
        ordered = list(dict.fromkeys(addrs))[:_MAX_ADDRS_PER_PEER]
        if self.addr in ordered:
            ordered.remove(self.addr)
            ordered.insert(0, self.addr)
        changed = set(ordered) != set(self.addrs)
        self.addrs = ordered
        if self.addr not in ordered:
            self.addr = ordered[0]
            self.label = str(self.addr)
        known = {(a.host, a.port) for a in ordered}
        for key in [k for k in self.addr_failed if k not in known]:
            del self.addr_failed[key]
        return changed

    def dial_order(self) -> list[PeerAddr]:
        """Addresses to dial: the one that worked, then those that never failed, then the rest."""
        return sorted(self.addrs, key=lambda a: (a != self.addr,
                                                 self.addr_failed.get((a.host, a.port),
                                                                      -math.inf)))

    def tells_holdings(self) -> bool:
        """Whether it announces what it holds (Holding or Fetching frames) on the connection
        open now."""
        conn = self.conn if self.source is None else None
        return conn is not None and not conn.closed and bool(
            getattr(conn, "holding", None) or getattr(conn, "fetching", None))

    def announced(self, block_id: bytes) -> bool | None:
        """Whether the peer is expected to have the block.

        True: it said it holds it, on the connection open now. False: it tells
        what it holds, or has answered NotFound (it holds only part of the
        drive, a reader like us), and did not announce holding this one (it
        may be fetching it: see `fetching`); a reader whose connection broke (it
        may have been killed) is no holder until it says so again. None:
        nothing says it lacks anything (a seed, as far as we know).
        """
        conn = self.conn if self.source is None else None
        holding = getattr(conn, "holding", None)
        if holding or getattr(conn, "fetching", None):
            if conn is not None and not conn.closed and holding and block_id in holding:
                return True
            self.partial = True  # it announces: a reader, after this connection too
        return False if self.partial else None

    def fetching(self, block_id: bytes) -> bool:
        """Whether it said it is fetching the block (and has not said it holds it since), on
        the connection open now."""
        conn = self.conn if self.source is None else None
        fetching = getattr(conn, "fetching", None)
        return bool(fetching) and conn is not None and not conn.closed and block_id in fetching


class _Request:
    _seq = itertools.count()

    def __init__(self, block_id: bytes, priority: Priority) -> None:
        self.block_id = block_id
        self.priority = priority
        self.seq = next(self._seq)
        self.waiters = 0
        self.done = trio.Event()
        self.result: bytes | None = None
        self.abandoned = False
        self.queued = False
        self.heap_token = -1
        self.parked = False
        self.attempts: list[_Attempt] = []
        self.ended = trio.Event()  # delivered or abandoned
        self.announced = False  # on_holding was told of it (we have it)
        self.announced_fetching = False  # on_fetching was told of it
        self.fetching_since = math.inf  # first held back for a reader fetching it
        self.jittered = False  # held back once for another reader to take it from the seed
        self.on_delivered: list[Callable[[_Request], None]] = []  # fetch_batch's, told once
        self.deferred = False
        self.not_before = -math.inf
        self.excluded: set[bytes] = set()  # peers that cannot serve it (NotFound, bad block)
        self.soft_failed: set[bytes] = set()  # peers that failed it for a transient reason
        self.outcomes: dict[bytes, Outcome] = {}  # node id -> what happened, for error messages
        self.created = trio.current_time()
        self.blocked = False  # its last dispatch pass found every candidate busy or dialling
        # (seconds since created, what happened): why a slow read was slow (SLOW_READ)
        self.trace: list[tuple[float, str]] = []
        self.trace_dropped = 0  # events left out between the first ones and the latest

    def note(self, what: str) -> None:
        if len(self.trace) >= _MAX_TRACE:
            # the start says how it began, the latest why it is still waiting
            del self.trace[_MAX_TRACE // 2]
            self.trace_dropped += 1
        self.trace.append((trio.current_time() - self.created, what))

    def history(self) -> str:
        events = [f"{t:.2f}s {what}" for t, what in self.trace]
        if self.trace_dropped:
            events.insert(_MAX_TRACE // 2, f"({self.trace_dropped} more)")
        return "; ".join(events)

    @property
    def finished(self) -> bool:
        return self.abandoned or self.done.is_set()


@dataclass(eq=False)
class _Attempt:
    request: _Request
    peer: _Peer
    priority: Priority
    size_guess: int
    start: float  # when dispatched (hedging counts from here, connecting included)
    idle_start: bool  # the peer had nothing else of ours in flight
    sent: float = math.inf  # when the Want was handed to the connection
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    late: bool = False
    connection: BlockSource | None = None
    relay: bool = False  # asked a reader still fetching it: its silence is no stall
    moved: bool = False  # asked again at its peer while it still waited in its run: no verdict
    run: RunOfWants | None = None  # the run it is part of (one task for all of them)
    index: int = 0  # its place in that run
    probe: bool = False  # sent to its backed-off peer as a request's only source

    def cancel(self) -> None:
        """Its answer is no longer wanted (a hedge won, every waiter left, shutdown)."""
        self.scope.cancel()
        if self.run is not None:
            self.run.cancel(self.index)


class Fetcher:
    """Fetches blocks of one drive (one discovery key) from whichever providers have them.

    Use as `async with Fetcher(...) as fetcher:` or `await nursery.start(fetcher.run)`;
    every task (connections included) lives in the Fetcher's nursery.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        discovery_key: bytes,
        drive_secret: bytes,
        providers: ProvidersFn,
        *,
        connect: ConnectFn | None = None,
        on_notice: OnNotice | None = None,
        on_holding: Callable[[bytes], None] | None = None,
        on_fetching: Callable[[bytes], None] | None = None,
        config: FetchConfig | None = None,
        on_verified: OnVerified | None = None,
    ) -> None:
        """`on_holding(block_id)` is told of every block delivered and `on_fetching(block_id)`
        of every block this fetcher starts fetching from a peer that does not announce
        holding it (a seed): the node announces them to its own clients (Holding,
        Fetching), so readers of one drive fetch from each other.

        `on_verified(block_id, data)` is handed to every connection and source
        this fetcher uses: they call it in their own thread (a peer
        connection's receive thread, a mirror's fetch thread) with each block
        whose bytes they have checked against its id, before the event loop
        hears of it. It is opaque here: the drive layer decrypts there, off
        the event loop and with the GIL released (issue 12). It must not
        raise or block; it is never called with unchecked bytes."""
        self.identity = identity
        self.discovery_key = discovery_key
        self.drive_secret = drive_secret
        self.config = config or FetchConfig()
        self.stats = FetcherStats()
        self._providers_fn = providers
        self._connect: ConnectFn = connect or PeerConnection.connect
        self._on_notice = on_notice
        self._on_holding = on_holding
        self._on_fetching = on_fetching
        self.on_verified = on_verified
        self._peers: dict[bytes, _Peer] = {}
        self._dialling = 0  # background dials in progress
        # blocks delivered lately, served to other readers until the store has them
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._median_throughput: float | None = None
        self._deferred: list[_Request] = []  # readahead held back a moment (swarm_jitter)
        self._requests: dict[bytes, _Request] = {}
        self._heap: list[tuple[int, int, int, _Request]] = []
        self._heap_tokens = itertools.count()
        self._parked: set[_Request] = set()
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._refresh_wanted = trio.Event()
        self._providers_changed = False
        self._size_guess = float(_INITIAL_BLOCK_SIZE)
        self._last_refresh = -math.inf
        self._exit_stack: AsyncExitStack | None = None
        self._outer: trio.Nursery | None = None

    # ---- lifecycle ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._provider_refresher)
                nursery.start_soon(self._dispatcher)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for peer in self._peers.values():
                    if peer.source is not None:
                        await peer.source.aclose()

    async def __aenter__(self) -> Fetcher:
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(open_task_nursery())
        try:
            await nursery.start(self.run)
        except BaseException:
            nursery.cancel_scope.cancel()
            await stack.aclose()
            raise
        self._exit_stack, self._outer = stack, nursery
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._outer is not None and self._exit_stack is not None
        self._outer.cancel_scope.cancel()
        stack, self._exit_stack, self._outer = self._exit_stack, None, None
        return await stack.__aexit__(*exc_info)

    # ---- public -------------------------------------------------------------

    async def fetch(
        self,
        block_id: bytes,
        priority: Priority = Priority.READ,
        *,
        timeout: float | None = None,
    ) -> bytes:
        """The block's bytes (verified), from whichever peer answers first.

        Concurrent fetches of one block share the work (the most urgent
        priority wins). Raises FetchTimeout when no peer delivered within
        `timeout` seconds (default from the config).
        """
        if self._nursery is None:
            raise DhtError("the fetcher is not running (use it as an async context manager)")
        if len(block_id) != BLOCK_ID_LEN:
            raise DhtError(f"block id must be {BLOCK_ID_LEN} bytes, got {len(block_id)}")
        priority = Priority(priority)
        timeout = self.config.default_timeout if timeout is None else timeout
        request = self._join(block_id, priority)
        waiting_since = trio.current_time()
        try:
            with trio.move_on_after(timeout):
                await request.done.wait()
            if not request.done.is_set():
                self.stats.timeouts += 1
                raise self._timeout_error(request, timeout)
        finally:
            self._leave(request)
            waited = trio.current_time() - waiting_since
            if priority == Priority.READ and waited >= SLOW_READ:
                log.info("a read waited %.2fs for block %s…: %s", waited,
                         block_id.hex()[:16], request.history())
        assert request.result is not None
        return request.result

    async def fetch_ahead(
        self,
        block_ids: Sequence[bytes],
        priority: Priority = Priority.READAHEAD,
        *,
        timeout: float | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Fetch blocks wanted together, asked for at once in this order; how many came.

        A streaming reader's next blocks: queued in one step, before the
        dispatcher looks, so they go to a peer as runs (one WantRun, one
        attempt; see `_take_run`) in file order. `fetch` calls for the same
        blocks meanwhile (the reads that follow) join these requests. Started
        (`nursery.start`) once all are queued. A hint: a block not fetched
        within `timeout` is simply not counted (its own `fetch` reports why).
        """
        priority, timeout = self._check_batch(block_ids, priority, timeout)
        requests = [self._join(block_id, priority) for block_id in dict.fromkeys(block_ids)]
        task_status.started()
        try:
            with trio.move_on_after(timeout):
                for request in requests:
                    await request.done.wait()
        finally:
            for request in requests:
                self._leave(request)
        return sum(1 for request in requests if request.done.is_set())

    async def fetch_batch(
        self,
        block_ids: Sequence[bytes],
        priority: Priority,
        deliver: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]],
        *,
        timeout: float | None = None,
    ) -> None:
        """Fetch blocks wanted together (a pin's), handing them over in groups as they come.

        All are queued in one step, before the dispatcher looks, so they go to
        a peer in runs of up to `max_batch_run_blocks` (one WantRun frame and
        one task per run, not one request task per block), and no task waits
        per block here either: `await deliver([(id, verified bytes), ...])` is
        called with everything delivered since its last call, in completion
        order (the fetcher goes on meanwhile). The caller bounds what it asks
        for at once (the bytes of blocks delivered and not yet handed over are
        held here). Raises FetchTimeout (naming the oldest block still
        missing) when `timeout` seconds (default from the config) pass with no
        block of the batch delivered: a stall, not a bound on the whole batch.
        """
        priority, timeout = self._check_batch(block_ids, priority, timeout)
        came: list[_Request] = []
        arrived = trio.Event()

        def tell(request: _Request) -> None:
            came.append(request)
            arrived.set()

        requests = [self._join(block_id, priority) for block_id in dict.fromkeys(block_ids)]
        try:
            for request in requests:
                if request.done.is_set():
                    came.append(request)
                else:
                    request.on_delivered.append(tell)
            left = len(requests)
            while left:
                if not came:
                    arrived = trio.Event()
                    with trio.move_on_after(timeout):
                        await arrived.wait()
                    if not came:
                        self.stats.timeouts += 1
                        oldest = next(r for r in requests if not r.done.is_set())
                        raise self._timeout_error(oldest, timeout)
                handed, came[:] = list(came), []
                left -= len(handed)
                await deliver([(r.block_id, r.result) for r in handed])  # type: ignore[misc]
                for request in handed:
                    request.on_delivered.clear()
                    if self._requests.get(request.block_id) is request:
                        del self._requests[request.block_id]
        finally:
            for request in requests:
                if tell in request.on_delivered:
                    request.on_delivered.remove(tell)
                self._leave(request)
                if (request.done.is_set() and not request.on_delivered
                        and self._requests.get(request.block_id) is request):
                    del self._requests[request.block_id]

    def hurry(self, block_id: bytes, priority: Priority) -> bool:
        """Move the fetch of `block_id` in flight up to `priority`, if that is more urgent;
        False when no fetch of it is in flight (the caller fetches it itself).

        What a `fetch` at `priority` joining the request would do (`_join`), without
        a task and a waiter per block: a READ that catches up with the readahead's
        fetch of its block (most blocks of a cold sequential read) waits for that
        fetch, whose waiter keeps the request alive.
        """
        request = self._requests.get(block_id)
        if request is None or request.finished or request.waiters == 0:
            return False
        priority = Priority(priority)
        if priority < request.priority:
            request.note(f"wanted at {priority.name}")
            self._upgrade(request, priority)
        return True

    def _check_batch(self, block_ids: Sequence[bytes], priority: Priority,
                     timeout: float | None) -> tuple[Priority, float]:
        """(priority, timeout) of a call asking for several blocks; DhtError if the fetcher
        is not running or an id is not one."""
        if self._nursery is None:
            raise DhtError("the fetcher is not running (use it as an async context manager)")
        for block_id in block_ids:
            if len(block_id) != BLOCK_ID_LEN:
                raise DhtError(f"block id must be {BLOCK_ID_LEN} bytes, got {len(block_id)}")
        return Priority(priority), self.config.default_timeout if timeout is None else timeout

    def _join(self, block_id: bytes, priority: Priority) -> _Request:
        """The request for `block_id` (made and queued if there is none), one waiter more."""
        request = self._requests.get(block_id)
        if request is None:
            request = _Request(block_id, priority)
            request.note(f"wanted at {priority.name}")
            self._requests[block_id] = request
            self.stats.requests += 1
            self._enqueue(request)
        elif priority < request.priority:
            request.note(f"wanted at {priority.name}")
            self._upgrade(request, priority)
        request.waiters += 1
        return request

    def _leave(self, request: _Request) -> None:
        """One waiter less; the last one leaving an unfinished request abandons it."""
        request.waiters -= 1
        if request.waiters == 0 and not request.done.is_set():
            self._abandon(request)

    @trio.as_safe_channel
    async def fetch_many(
        self,
        block_ids: Iterable[bytes],
        priority: Priority = Priority.PIN,
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[tuple[bytes, bytes], None]:
        """Stream (block_id, bytes) for every id, in completion order, `concurrency` at a time.

        `async with fetcher.fetch_many(ids) as results: async for block_id, data in results:`.
        The first block that cannot be fetched ends the stream with its FetchTimeout.
        """
        limit = concurrency or self.config.fetch_many_concurrency
        ids = iter(block_ids)
        send, receive = trio.open_memory_channel[tuple[bytes, bytes]](limit)
        failure: list[DhtError] = []

        async def worker(nursery: trio.Nursery) -> None:
            for block_id in ids:
                try:
                    data = await self.fetch(block_id, priority, timeout=timeout)
                except DhtError as exc:
                    failure.append(exc)
                    nursery.cancel_scope.cancel()
                    return
                await send.send((block_id, data))

        async def run_workers() -> None:
            async with send, trio.open_nursery() as nursery:
                for _ in range(limit):
                    nursery.start_soon(worker, nursery)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_workers)
            async with receive:
                async for item in receive:
                    yield item
        if failure:
            raise failure[0]

    async def have_map(
        self, block_ids: Iterable[bytes], *, timeout: float | None = None
    ) -> dict[bytes, list[bool]]:
        """Which of `block_ids` each reachable provider holds: node id -> flags in id order.

        Every currently known provider is asked at once (connecting as
        needed) with Have frames; a provider that does not answer within
        `timeout` seconds (default `holders_timeout`), cannot be reached or
        refuses is left out. If the provider list is older than
        `holders_refresh_interval`, a re-read is requested in the background
        (a DHT lookup may take longer than an answer should), so the next
        call sees new providers. With no ids, the flags are empty and the map
        lists the providers that answered a ping: every reachable provider.
        Answers cannot be verified; a peer shunned for corrupt blocks is not
        asked.
        """
        if self._nursery is None:
            raise DhtError("the fetcher is not running (use it as an async context manager)")
        ids = list(block_ids)
        for block_id in ids:
            if len(block_id) != BLOCK_ID_LEN:
                raise DhtError(f"block id must be {BLOCK_ID_LEN} bytes, got {len(block_id)}")
        timeout = self.config.holders_timeout if timeout is None else timeout
        out: dict[bytes, list[bool]] = {}
        if trio.current_time() - self._last_refresh > self.config.holders_refresh_interval:
            self.request_provider_refresh()

        async def ask(peer: _Peer) -> None:
            try:
                conn = await self._connection(peer)
                if ids:
                    out[peer.node_id] = await conn.have(ids)
                else:
                    await conn.ping()
                    if not conn.closed:
                        out[peer.node_id] = []
            except DhtError:
                pass  # unreachable or broke: it counts as holding nothing

        now = trio.current_time()
        # a peer shunned for sending corrupt blocks is not believed about what it holds
        trusted = [p for p in self._peers.values()
                   if p.provider and not (p.bad_blocks and p.backoff_until > now)]
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for peer in trusted:
                    nursery.start_soon(ask, peer)
        return dict(out)

    async def whole_map(self, *, timeout: float | None = None) -> dict[bytes, frozenset[bytes]]:
        """What each reachable provider says it keeps whole: node id -> directory node ids.

        Providers push a Whole frame as a connection opens and whenever it
        changes (a node pushing to us does so over its push connection); every
        provider is pinged first (connecting as needed, as
        `have_map` with no ids), so what each said on connecting has arrived
        by its pong. One round trip per provider, whatever the tree's size.
        Claims, not proofs, and a peer shunned for corrupt blocks is not
        asked.
        """
        reachable = await self.have_map((), timeout=timeout)
        out: dict[bytes, frozenset[bytes]] = {}
        for node_id in reachable:
            peer = self._peers.get(node_id)
            # a peer pushing to us announces over its push connection (PushedSource.whole);
            # a mirror announces nothing: the layer above reads its head
            said = None if peer is None else peer.conn if peer.source is None else peer.source
            out[node_id] = getattr(said, "whole", None) or frozenset()
        return out

    async def count_holders(
        self, block_ids: Iterable[bytes], *, timeout: float | None = None
    ) -> int:
        """How many reachable providers hold every one of `block_ids` (see `have_map`)."""
        answers = await self.have_map(block_ids, timeout=timeout)
        return sum(1 for flags in answers.values() if all(flags))

    async def in_flight_block(self, block_id: bytes, *, timeout: float) -> bytes | None:
        """The block, if this fetcher holds it lately or is fetching it now (waiting up to
        `timeout` seconds); None otherwise.

        The node's server answers other readers from here for blocks it has
        announced (`on_holding`, `on_fetching`) but whose fetch is still running or whose
        bytes are not yet in the store.
        """
        data = self._recent.get(block_id)
        if data is not None:
            return data
        request = self._requests.get(block_id)
        if request is None:
            return None
        with trio.move_on_after(timeout):
            await request.ended.wait()
        return request.result

    def _remember(self, block_id: bytes, data: bytes) -> None:
        # counted with what an entry costs beside its bytes: a pin of 10^6 64-byte blocks
        # otherwise kept 360,000 of them, ~100 MB for a bound of 32 MiB
        self._recent[block_id] = data
        self._recent_bytes += len(data) + RECENT_ENTRY_OVERHEAD
        while self._recent_bytes > self.config.recent_bytes and self._recent:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old) + RECENT_ENTRY_OVERHEAD

    def stored(self, block_ids: list[bytes]) -> None:
        """These blocks are in the node's store now, where its server reads them for other
        readers: their copies kept for that (`in_flight_block`) go. The cache is bounded
        by bytes; held until pushed out, during a pin of small files it was ~57,000
        blocks of stored data (~20 MB of the mount's memory, tracemalloc at 10^5 files)."""
        recent = self._recent
        for block_id in block_ids:
            data = recent.pop(block_id, None)
            if data is not None:
                self._recent_bytes -= len(data) + RECENT_ENTRY_OVERHEAD

    def peer_stats(self) -> list[PeerStats]:
        now = trio.current_time()
        return [
            PeerStats(
                node_id=peer.node_id,
                addr=peer.label,
                provider=peer.provider,
                connected=peer.connected,
                in_flight=peer.in_flight,
                blocks=peer.blocks,
                bytes=peer.bytes,
                failures=peer.failures,
                incidents=peer.incidents,
                not_found=peer.not_found,
                bad_blocks=peer.bad_blocks,
                stalls=peer.stalls,
                late=peer.late,
                latency=peer.latency,
                throughput=peer.throughput,
                backoff_remaining=max(0.0, peer.backoff_until - now),
            )
            for peer in self._peers.values()
        ]

    def knows(self, node_id: bytes) -> bool:
        """Whether `node_id` is a provider this fetcher knows of now."""
        peer = self._peers.get(node_id)
        return peer is not None and peer.provider

    def request_provider_refresh(self) -> None:
        """Ask for the provider list to be re-read soon (rate limited)."""
        self._refresh_wanted.set()

    def set_sources(self, sources: Iterable[StaticSource]) -> None:
        """Sources beside the providers (HTTP mirrors): these from now on, the others dropped.

        A source already known (same `source_id`) keeps its statistics and
        penalties; the fetcher closes a source it drops and, when it stops,
        every source it holds.
        """
        wanted = {s.source_id: s for s in sources}
        for peer in self._peers.values():
            if peer.source is None or peer.pushed:
                continue
            if peer.node_id in wanted:
                wanted.pop(peer.node_id)
                if not peer.provider:
                    peer.provider = True
                    self._providers_changed = True
            elif peer.provider:
                peer.provider = False
                if self._nursery is not None:
                    self._nursery.start_soon(peer.source.aclose)
        for sid, source in wanted.items():
            if self.on_verified is not None and hasattr(source, "on_verified"):
                source.on_verified = self.on_verified
            old = self._peers.get(sid)
            if old is not None and old.source is not None and old.source is not source:
                if self._nursery is not None:
                    self._nursery.start_soon(old.source.aclose)
            self._peers[sid] = _Peer(None, source)
            self._providers_changed = True
        self._poke()

    def add_source(self, source: StaticSource, ended: Callable[[], Awaitable[object]]) -> None:
        """One more source until `ended()` returns: a peer serving us over its push connection.

        It takes the place of a provider with the same id (the pushing node
        may be one we cannot dial) and is dropped when its connection ends;
        the provider list is then read again.
        """
        assert self._nursery is not None, "the fetcher is not running"
        old = self._peers.get(source.source_id)
        if old is not None:
            closing = old.source if old.source is not None else old.conn
            if closing is not None and old.in_flight == 0:
                self._nursery.start_soon(closing.aclose)
        peer = self._peers[source.source_id] = _Peer(None, source)
        peer.pushed = True
        self._providers_changed = True
        self._poke()
        self._nursery.start_soon(self._drop_source_when_ended, peer, ended)

    async def _drop_source_when_ended(self, peer: _Peer, ended: Callable[[], Awaitable[object]]
                                      ) -> None:
        await ended()
        if self._peers.get(peer.node_id) is peer:
            del self._peers[peer.node_id]
            self.request_provider_refresh()
            self._poke()

    # ---- providers ----------------------------------------------------------

    async def _provider_refresher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        await self._refresh_providers()
        task_status.started()
        while True:
            last = trio.current_time()
            self._refresh_wanted = trio.Event()
            with trio.move_on_after(config.provider_refresh_interval):
                await self._refresh_wanted.wait()
            await trio.sleep_until(last + config.provider_refresh_min_interval)
            await self._refresh_providers()

    async def _refresh_providers(self) -> None:
        self.stats.provider_refreshes += 1
        with trio.move_on_after(self.config.providers_timeout):
            try:
                result = self._providers_fn()
                if inspect.isawaitable(result):
                    result = await result
                addrs = list(result)
            except (DhtError, OSError):
                return  # keep what we knew; the next refresh may do better
            self._apply_providers(addrs)
            self._last_refresh = trio.current_time()

    def _apply_providers(self, addrs: list[PeerAddr]) -> None:
        """Take a new provider list; a node listed at several addresses is one peer."""
        by_node: dict[bytes, list[PeerAddr]] = {}
        for addr in addrs:
            if addr.node_id != self.identity.node_id:
                by_node.setdefault(addr.node_id, []).append(addr)
        now = trio.current_time()
        for node_id, listed in by_node.items():
            peer = self._peers.get(node_id)
            if peer is not None and peer.source is not None:
                continue  # serving us over its push connection: no dialling
            if peer is None:
                peer = self._peers[node_id] = _Peer(listed[0])
                peer.set_addrs(listed)
                self._providers_changed = True
            else:
                if peer.set_addrs(listed) and not peer.connected:
                    # Reachable somewhere new: dial it now, whatever failed before.
                    peer.backoff_until = -math.inf
                    peer.consecutive_failures = 0
                    peer.probe_failures = 0
                    self._providers_changed = True
                if not peer.provider:
                    peer.provider = True
                    peer.left_at = math.inf
                    self._providers_changed = True
        for peer in self._peers.values():
            if peer.source is None and peer.node_id not in by_node and peer.provider:
                peer.provider = False
                peer.left_at = now
                if peer.in_flight == 0 and peer.conn is not None and self._nursery is not None:
                    self._nursery.start_soon(peer.conn.aclose)
                    peer.conn = None
        self._forget_former_peers()
        for peer in self._peers.values():
            self._dial_ahead(peer)
        self._poke()

    def _forget_former_peers(self) -> None:
        """Keep the statistics of at most `_MAX_FORMER_PEERS` peers no longer listed.

        Readers come and go; without this the table (and every dispatch pass
        over it) would grow with every reader the drive ever had.
        """
        former = [p for p in self._peers.values()
                  if not p.provider and p.source is None and p.in_flight == 0
                  and p.connecting is None]
        if len(former) <= _MAX_FORMER_PEERS:
            return
        former.sort(key=lambda p: p.left_at)
        for peer in former[: len(former) - _MAX_FORMER_PEERS]:
            del self._peers[peer.node_id]
            if peer.conn is not None and self._nursery is not None:
                self._nursery.start_soon(peer.conn.aclose)
                peer.conn = None

    def _dial_ahead(self, peer: _Peer) -> None:
        """Connect to a provider before it is needed, so no read waits on a dial.

        A provider that cannot be reached is then skipped (it is not
        connected, and requests prefer connected peers) instead of being
        waited on by a read.
        """
        if (
            self._nursery is None
            or peer.source is not None
            or not peer.provider
            or peer.conn is not None  # connected, or its failure is still being handled
            or peer.conn_ended  # it went away by itself: a request dials it when it wants it
            or peer.connecting is not None
            or peer.backoff_until > trio.current_time()
            or self._dialling >= _MAX_BACKGROUND_DIALS
        ):
            return
        self._dialling += 1
        self._nursery.start_soon(self._dial_in_background, peer)

    async def _dial_in_background(self, peer: _Peer) -> None:
        try:
            await self._connection(peer)
        except DhtError:
            pass  # penalised in _connection; requests go elsewhere
        finally:
            self._dialling -= 1
            self._poke()

    # ---- dispatching --------------------------------------------------------

    def _poke(self) -> None:
        self._wake.set()

    def _enqueue(self, request: _Request) -> None:
        request.queued = True
        request.deferred = False
        request.heap_token = next(self._heap_tokens)
        heapq.heappush(
            self._heap, (int(request.priority), request.seq, request.heap_token, request)
        )
        self._poke()

    def _upgrade(self, request: _Request, priority: Priority) -> None:
        request.priority = priority
        if request.queued:
            self._enqueue(request)  # the old heap entry is now stale
            return
        if len(request.attempts) >= self.config.max_parallel_attempts:
            return
        if any(a.peer.source is not None and not getattr(a.peer.source, "prioritises", True)
               for a in request.attempts):
            # A source that serves in arrival order whatever the priority (a static
            # HTTP mirror) has it under way: asking it again would only fetch the bytes
            # twice. Hedging still covers an attempt that runs late.
            return
        now = trio.current_time()
        for attempt in request.attempts:
            peer = attempt.peer
            if (attempt.priority > priority and peer.provider and peer.backoff_until <= now
                    and self._has_slot(peer, priority)
                    and not any(a.peer is peer and a.priority <= priority
                                for a in request.attempts)):
                # In flight at a lazier priority: ask the same peer again at the
                # urgent one. It answers that first, and no second source sends
                # the same bytes (the lazier attempt is cancelled once one lands).
                # Never a peer backing off (another of its requests failed since):
                # that second attempt filled the request's last slot
                # (max_parallel_attempts), so the READ could not be hedged to a
                # healthy source and waited out the failing one; alone, it was a
                # request beside the probe rule. The dispatcher chooses instead,
                # as for a new attempt (tests/test_fetch_upgrade.py).
                request.note(f"wanted at {priority.name} of the same peer")
                self._unpark(request)
                self._start_attempt(request, peer, priority)
                return
        # That peer is full: ask whoever can take it now. A parked request too: its
        # attempts are lazier than it is now (it parks again if nobody can).
        self._unpark(request)
        self._enqueue(request)

    def _park(self, request: _Request, why: str) -> None:
        """Set aside a request nobody can take now.

        A parked request is queued again when that may have changed (new
        providers, a backoff ended) and when its last attempt fails; one with
        no attempt at all also asks for the provider list to be re-read.
        """
        request.queued = False
        if not request.parked:
            request.note(f"parked: {why}")
            request.parked = True
            self._parked.add(request)
        if not request.attempts:
            self._refresh_wanted.set()

    def _unpark(self, request: _Request) -> None:
        if request.parked:
            request.parked = False
            self._parked.discard(request)

    def _abandon(self, request: _Request) -> None:
        request.abandoned = True
        request.ended.set()
        request.queued = False
        self._parked.discard(request)
        for attempt in request.attempts:
            attempt.cancel()
        if self._requests.get(request.block_id) is request:
            del self._requests[request.block_id]

    async def _dispatcher(self) -> None:
        backoff_checked = trio.current_time()
        while True:
            now = trio.current_time()
            # Parked requests had nobody to ask; look again once that may have
            # changed: new providers, a peer's backoff just ended, or it may be probed.
            backoff_ended = any(
                backoff_checked < p.backoff_until <= now
                or (p.backoff_until > now and backoff_checked < p.probe_at <= now)
                for p in self._peers.values()
            )
            backoff_checked = now
            if self._parked and (self._providers_changed or backoff_ended):
                for request in self._parked:
                    request.parked = False
                    if not request.finished:
                        self._enqueue(request)
                self._parked.clear()
            self._providers_changed = False
            self._dispatch(now)
            # A fresh event only now: pokes made by the pass itself (it re-queues
            # requests whose peers are busy) must not wake us into a busy loop.
            self._wake = trio.Event()
            wake_at = math.inf
            if self._parked or self._heap:
                wake_at = min(
                    (min(p.backoff_until, p.probe_at if now < p.probe_at else math.inf)
                     for p in self._peers.values() if p.backoff_until > now),
                    default=math.inf,
                )
            if self._deferred:
                wake_at = min(wake_at, min(r.not_before for r in self._deferred))
            with trio.move_on_at(wake_at):
                await self._wake.wait()

    def _has_slot(self, peer: _Peer, priority: Priority, *, in_run: bool = False,
                  hedge: bool = False) -> bool:
        """Whether `peer` may take one more request at `priority` now. `in_run`: as the
        next block of a run being made; `hedge`: a request with an attempt running."""
        config = self.config
        if priority == Priority.READ:
            # Lazier work never holds a READ up (the peer answers READs first, ahead of
            # whatever is queued there): a READ waits only behind READs, at most
            # max_in_flight_per_peer of them per peer.
            return peer.in_flight - peer.in_flight_lazy < config.max_in_flight_per_peer
        usual = config.max_in_flight_per_peer - config.foreground_reserve
        # background requests past the usual slots: small blocks in a deep pipeline
        deep = max(0, peer.in_flight_lazy - usual)
        if peer.in_flight - deep >= config.max_in_flight_per_peer:
            return False
        if (peer.serial_runs and priority < Priority.PIN and not in_run and not hedge
                and peer.in_flight_lazy):
            # A mirror's fetch thread takes a run's blocks one after the other: refilled
            # a block at a time as each answer landed, its readahead went out as runs of
            # 2.2 blocks on average, each a thread wake-up, a task and a watchdog on the
            # event loop (docs/benchmarks.md issue 10). Refilled a run at a time instead.
            refill = min(config.serial_run_min, peer.serial_runs, usual)
            return (peer.in_flight_lazy + refill <= usual
                    and peer.in_flight + refill <= config.max_in_flight_per_peer)
        if peer.in_flight_lazy < usual:
            return True
        if priority < Priority.PIN:  # READAHEAD keeps to the usual slots
            return False
        # Small blocks (a pin of many small files) go deeper: the server answers a
        # run of them in one read and one write, so a round trip carries many.
        # Once that pipeline is full it refills a run at a time (small_run_min slots free),
        # not a block at a time as each answer lands: a WantRun frame and a task per run.
        refill = config.small_run_min if peer.in_flight_lazy > usual and not in_run else 1
        return (peer.in_flight_lazy + refill <= config.max_small_in_flight_per_peer
                and peer.in_flight_bytes + refill * self._size_guess
                <= config.small_in_flight_bytes)

    def _dispatch(self, now: float) -> None:
        if self._deferred:
            due = [r for r in self._deferred if r.not_before <= now]
            self._deferred = [r for r in self._deferred if r.not_before > now]
            for request in due:
                if request.deferred and not request.finished:
                    self._enqueue(request)
        usable = [p for p in self._peers.values() if p.provider and p.backoff_until <= now]
        probed = [p for p in self._peers.values() if p.provider and p.backoff_until > now
                  and p.probe_at <= now and not p.probing and p.shunned_until <= now]
        measured = [p.throughput for p in usable if p.throughput is not None]
        self._median_throughput = statistics.median(measured) if measured else None
        blocked: list[_Request] = []
        while self._heap and len(blocked) < _MAX_BLOCKED_SCAN:
            prio, _seq, token, request = self._heap[0]
            if not request.queued or request.heap_token != token or request.finished:
                heapq.heappop(self._heap)
                continue
            priority = Priority(prio)
            if probed:
                target = self._probe_target(request, priority, usable, probed)
                if target is not None:
                    heapq.heappop(self._heap)
                    request.blocked = False
                    request.queued = False
                    self._unpark(request)
                    probed.remove(target)
                    self._start_probe(request, target, priority)
                    continue
            hedge = bool(request.attempts)
            if not any(self._has_slot(p, priority, hedge=hedge) for p in usable):
                # Every peer is full for this priority (lazier requests wait for
                # it: READs first); with no usable peer at all, ask for fresh
                # providers.
                if not usable:
                    self._refresh_wanted.set()
                break
            heapq.heappop(self._heap)
            candidates = [
                p
                for p in usable
                if p.node_id not in request.excluded
                and not any(
                    a.peer is p and a.priority <= request.priority and not _waits_in_run(a)
                    for a in request.attempts
                )
            ]
            if not candidates:
                # Nobody (else) to ask: wait for new providers or a backoff to end,
                # or for the attempt running to end.
                self._park(request, "nobody else to ask")
                continue
            # Readers that said they are fetching it (from a seed) and can take a READ now.
            fetchers = [p for p in candidates if priority == Priority.READ
                        and not request.attempts and p.fetching(request.block_id)
                        and self._has_slot(p, priority)]
            likely = [p for p in candidates if p.announced(request.block_id) is not False]
            if likely:
                # A reader that tells what it holds and did not name this block
                # would only answer NotFound (one round trip at a busy peer,
                # repeated over every such reader): the seed is waited on
                # instead, and they are asked only when nobody else is left.
                candidates = likely
            elif request.attempts:
                # A hedge: never at a reader that tells what it holds (on the
                # connection open now) and did not name this block; a peer known
                # to hold part of the drive only by an earlier NotFound (a seed
                # asked for a block of another version, say) may still take it.
                candidates = [p for p in candidates if not p.tells_holdings()]
                if not candidates:
                    self._park(request, "no hedge: only readers that lack it are free")
                    continue
            free = [p for p in candidates if self._has_slot(p, priority, hedge=hedge)]
            holders = [p for p in candidates if p.announced(request.block_id)]
            if holders and (not request.attempts or any(p.connected for p in holders)):
                # Peers that said they hold it go first: readers of one drive serve
                # each other and spare the seed. A hedge (the holder is late: a busy
                # process, or a node from before Fetching, whose Holding also meant
                # "fetching") goes to another holder if there is one, else to anyone.
                free = [p for p in holders if self._has_slot(p, priority, hedge=hedge)]
            elif fetchers:
                # Nobody holds it and a reader is fetching it now: a READ asks that
                # reader (it answers once its fetch lands) and is hedged to the seed
                # after `fetching_hedge`, not the usual hedge time: the block is on its
                # way there, and a busy seed asked again would send it twice.
                free = fetchers
            elif (
                priority >= Priority.READAHEAD
                and not request.attempts
                and now - min(request.fetching_since, now) < self.config.fetching_hold
                and any(p.fetching(request.block_id) for p in usable)
            ):
                # Another reader is fetching it (from the seed, as we would): hold
                # back a moment for its Holding rather than take the block from the
                # seed a second time; looked at again every _FETCHING_POLL. (A READ
                # asks that reader with a short hedge instead: `fetchers` above.)
                if request.fetching_since == math.inf:
                    request.fetching_since = now
                    request.note("held back: a reader is fetching it")
                request.deferred = True
                request.not_before = min(now + _FETCHING_POLL,
                                         request.fetching_since + self.config.fetching_hold)
                self._deferred.append(request)
                continue
            elif (
                priority >= Priority.READAHEAD
                and not request.jittered
                and not request.attempts
                and self.config.swarm_jitter > 0
                and sum(1 for p in usable if p.connected and p.source is None) >= 2
            ):
                # Several readers, nobody announced it: hold it back a random
                # moment, so that of readers wanting the same block one takes it
                # from the seed and the others, hearing its Holding, from it
                # (a randomised rarest-first; an urgent READ never waits).
                request.jittered = True
                request.deferred = True
                request.not_before = now + random.uniform(0, self.config.swarm_jitter)
                request.note(f"held back {request.not_before - now:.2f}s")
                self._deferred.append(request)
                continue
            elif any(p.connected for p in free):
                # A dial in progress is never waited on while a connected peer
                # can serve; the others connect in the background meanwhile.
                for p in free:
                    if not p.connected:
                        self._dial_ahead(p)
                free = [p for p in free if p.connected]
            elif any(p.connecting is not None for p in candidates):
                # Nobody connected yet: the first dial to succeed takes it
                # (dead providers never hold a read up).
                for p in candidates:
                    self._dial_ahead(p)
                if not request.blocked:
                    request.blocked = True
                    request.note(f"waits: {len(candidates)} peer(s) dialling")
                blocked.append(request)
                continue
            if not free:
                if not request.blocked:
                    request.blocked = True
                    request.note(f"waits: {len(candidates)} candidate(s) busy")
                blocked.append(request)
                continue
            request.blocked = False
            request.queued = False
            peer = self._choose(free, request, now)
            attempts = [self._new_attempt(request, peer, priority)]
            for queued in request.attempts[:-1]:
                if queued.peer is peer and _waits_in_run(queued):
                    # moved, not doubled: it had not been asked for there yet
                    queued.moved = True
                    queued.cancel()
            self._take_run(attempts, usable)
            assert self._nursery is not None
            if len(attempts) == 1:
                self._nursery.start_soon(self._run_attempt, attempts[0])
            else:
                conn = peer.source if peer.source is not None else peer.conn
                assert conn is not None  # _take_run makes runs over open connections only
                self._nursery.start_soon(self._run_attempts, attempts, conn)
        for request in blocked:
            self._enqueue(request)

    def _probe_target(self, request: _Request, priority: Priority, usable: list[_Peer],
                      probed: list[_Peer]) -> _Peer | None:
        """The backed-off peer `request` may probe now, if it has no other eligible source.

        Backoff is there to spread work over the other sources; with none left
        for this block (none listed, or all excluded from it: NotFound, a bad
        block) it would only make the read wait out the backoff. A peer already
        asked for it is probed again only if that attempt runs late (an HTTP
        mirror asks again on another connection; a stalled peer's connection is
        dropped anyway).
        """
        if any(p.node_id not in request.excluded for p in usable):
            return None  # another source can take it (or will, once free): no probe
        if len(request.attempts) >= self.config.max_parallel_attempts:
            return None
        targets = [p for p in probed
                   if p.node_id not in request.excluded and self._has_slot(p, priority)
                   and not any(a.peer is p and not a.late for a in request.attempts)]
        if not targets:
            return None
        return min(targets, key=lambda p: (p.probe_at, p.consecutive_failures))

    def _start_probe(self, request: _Request, peer: _Peer, priority: Priority) -> None:
        """One attempt at a backed-off peer: its answer ends the backoff (`_finish_attempt`)."""
        assert self._nursery is not None
        peer.probing = True
        self.stats.probes += 1
        attempt = self._new_attempt(request, peer, priority)
        attempt.probe = True
        request.note(f"probes {peer.label}: backing off "
                     f"{peer.backoff_until - trio.current_time():.1f}s, nobody else to ask")
        self._nursery.start_soon(self._run_attempt, attempt)

    def _estimate(self, peer: _Peer, request: _Request) -> float:
        """Seconds until `peer` would deliver one more block, by its measured speed."""
        throughput = peer.throughput or self._median_throughput or _DEFAULT_THROUGHPUT
        latency = peer.idle_latency or peer.latency or _DEFAULT_LATENCY
        estimate = (peer.in_flight_bytes + self._size_guess) / throughput + latency
        if not peer.connected:
            estimate += 2 * latency  # TCP + TLS handshakes first
        if peer.node_id in request.soft_failed:
            estimate += _SOFT_FAILURE_PENALTY
        if peer.announced(request.block_id) is False:
            estimate += _NOT_ANNOUNCED_PENALTY  # it tells what it has, and not this one
        return estimate

    def _choose(self, free: list[_Peer], request: _Request, now: float) -> _Peer:
        return min(free, key=lambda p: (self._estimate(p, request), p.in_flight, random.random()))

    def _take_run(self, attempts: list[_Attempt], usable: list[_Peer]) -> None:
        """Add to a fresh attempt the requests queued right behind it that its peer can take
        in the same run (one WantRun frame, one task and one watchdog for all).

        Only the heap's next entries, in order, while they are fresh requests of
        the same priority that this peer is as likely to hold, has a free slot
        for and would still be chosen for (no other peer holds or fetches it, no
        other connected peer with a free slot has a lower estimate: runs never
        undo the holder rules or the spreading by speed): a
        sequential reader's readahead, which asks for a file's next blocks in
        order. The first that does not fit ends the run, so nothing is taken
        out of its turn. At a source that serves in arrival order (a mirror), a
        READ's run also takes the READAHEAD requests queued behind it.
        """
        first = attempts[0]
        peer, priority, request = first.peer, first.priority, first.request
        conn = peer.source if peer.source is not None else peer.conn
        if (conn is None or conn.closed or first.request.attempts[:-1]
                or not callable(getattr(conn, "fetch_run", None))):
            return
        longest = min(self.config.max_batch_run_blocks if priority >= Priority.PIN
                      else self.config.max_run_blocks, getattr(conn, "max_wants", 1))
        standing = (peer.announced(request.block_id), peer.fetching(request.block_id))
        # readahead held back for other readers (swarm_jitter) is not taken ahead of that
        jitters = (priority >= Priority.READAHEAD and self.config.swarm_jitter > 0
                   and not any(standing)
                   and sum(1 for p in usable if p.connected and p.source is None) >= 2)
        rivals = [p for p in usable if p is not peer and p.connected]
        while len(attempts) < longest and self._heap:
            prio, _seq, token, other = self._heap[0]
            if not other.queued or other.heap_token != token or other.finished:
                heapq.heappop(self._heap)
                continue
            # A source that serves in arrival order (a mirror) takes the readahead queued
            # behind a READ into the READ's run: the blocks a sequential reader wants next,
            # each still counted at its own priority (most of a cold read's blocks are
            # READs that caught up with the readahead queued there: runs of one block)
            own = Priority(prio)
            if ((prio != priority and not (peer.serial_runs and priority == Priority.READ
                                            and own == Priority.READAHEAD))
                    or other.attempts or other.parked
                    or (jitters and not other.jittered)
                    or peer.node_id in other.excluded or peer.node_id in other.soft_failed
                    or (peer.announced(other.block_id), peer.fetching(other.block_id)) != standing
                    or not self._has_slot(peer, own, in_run=True)):
                return
            if any(p.announced(other.block_id) or p.fetching(other.block_id) for p in rivals):
                return  # another reader holds or fetches it: the dispatcher decides that one
            mine = self._estimate(peer, other)
            if any(self._estimate(p, other) < mine for p in rivals
                   if p.node_id not in other.excluded and self._has_slot(p, own)):
                return
            heapq.heappop(self._heap)
            other.blocked = False
            other.queued = False
            attempts.append(self._new_attempt(other, peer, own, len(attempts) + 1))

    def _start_attempt(self, request: _Request, peer: _Peer, priority: Priority) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._run_attempt, self._new_attempt(request, peer, priority))

    def _new_attempt(self, request: _Request, peer: _Peer, priority: Priority,
                     in_run: int = 1) -> _Attempt:
        """Count an attempt of `request` at `peer` (slots, statistics, announcements)."""
        size = int(self._size_guess)
        attempt = _Attempt(
            request, peer, priority, size, trio.current_time(), idle_start=peer.in_flight == 0,
            relay=peer.fetching(request.block_id),
        )
        request.attempts.append(attempt)
        request.outcomes[peer.node_id] = Outcome.IN_PROGRESS
        kind = {True: "holder", False: "not announced", None: "seed"}[peer.announced(request.block_id)]
        request.note(f"asks {peer.label} ({kind}"
                     f"{'' if peer.connected else ', dialling'}, {peer.in_flight} in flight"
                     f"{', a hedge' if request.attempts[:-1] else ''}"
                     f"{f', block {in_run} of a run' if in_run > 1 else ''})")
        if len(request.attempts) > 1:
            self.stats.hedges += 1
        self.stats.attempts += 1
        peer.in_flight += 1
        peer.in_flight_bytes += size
        if priority > Priority.READ:
            peer.in_flight_lazy += 1
        if self._on_fetching is not None and not request.announced_fetching and not (
            peer.announced(request.block_id) or peer.fetching(request.block_id)
        ):
            # Fetching it from a seed: tell our own clients, so that their readahead
            # waits a moment for our Holding instead of taking it from the seed too
            # (not when asking a reader that is fetching it: chains stay one hop deep).
            request.announced_fetching = True
            self._on_fetching(request.block_id)
        return attempt

    # ---- one attempt at one peer --------------------------------------------

    async def _run_attempt(self, attempt: _Attempt) -> None:
        request, peer = attempt.request, attempt.peer
        error: DhtError | None = None
        data: bytes | None = None
        finished = False
        try:
            with attempt.scope:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._watch_attempt, attempt)
                    try:
                        conn = await self._connection(peer)
                        attempt.connection = conn
                        attempt.sent = trio.current_time()
                        data = await conn.fetch(request.block_id, attempt.priority)
                    except DhtError as exc:
                        error = exc
                    watch.cancel_scope.cancel()
                    # Finished here, not once the watch task has unwound: that took two
                    # more passes of the scheduler before the block's readers were woken,
                    # each a wait for the CPU on a busy machine (issue 12, random reads).
                    finished = True
                    self._finish_attempt(attempt, data, error)
        finally:
            if not finished:
                self._finish_attempt(attempt, data, error)

    async def _run_attempts(self, attempts: list[_Attempt], conn: BlockSource) -> None:
        """Attempts of a run of requests at one peer (`_take_run`): one WantRun, one task.

        Each block ends as a single attempt does (`_finish_attempt`) as its
        answer comes; one cancelled (`_Attempt.cancel`) ends at once and is
        cancelled on the wire, the others go on. The run goes over `conn`, the
        connection it was made for: if that was dropped meanwhile (the peer
        lied on another request, say), the run fails with it and is never
        the reason the peer is dialled again.
        """
        first = attempts[0]
        run = RunOfWants([a.request.block_id for a in attempts], first.priority)
        for index, attempt in enumerate(attempts):
            attempt.run, attempt.index = run, index
        left = set(range(len(attempts)))
        error: DhtError | None = None

        def on_result(index: int, data: bytes | None, failure: DhtError | None) -> None:
            left.discard(index)
            self._finish_attempt(attempts[index], data, failure)

        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(self._watch_attempts, attempts)
                now = trio.current_time()
                for attempt in attempts:
                    attempt.connection, attempt.sent = conn, now
                try:
                    await conn.fetch_run(run, on_result)  # type: ignore[attr-defined]
                except DhtError as exc:
                    error = exc
                watch.cancel_scope.cancel()
        finally:
            for index in sorted(left):
                self._finish_attempt(attempts[index], None, error)

    def _finish_attempt(
        self,
        attempt: _Attempt,
        data: bytes | None,
        error: DhtError | None,
    ) -> None:
        self._settle_attempt(attempt, data, error)
        # the connection ended under this work (its failure, above, dropped it if it
        # broke it); the last attempt out lets go of it (see `_watch_connection`)
        self._connection_ended(attempt.peer)

    def _settle_attempt(
        self,
        attempt: _Attempt,
        data: bytes | None,
        error: DhtError | None,
    ) -> None:
        request, peer = attempt.request, attempt.peer
        now = trio.current_time()
        elapsed = now - attempt.start
        peer.in_flight -= 1
        peer.in_flight_bytes -= attempt.size_guess
        if attempt.priority > Priority.READ:
            peer.in_flight_lazy -= 1
        request.attempts.remove(attempt)
        self._poke()
        if attempt.probe:
            self._probe_ended(attempt, data, error, now)
        alpha = self.config.ewma_alpha
        request.note(f"{peer.label}: " + ("delivered" if data is not None else
                                          "cancelled" if error is None else
                                          type(error).__name__) + f" after {elapsed:.2f}s")

        if data is not None:
            took = now - attempt.sent
            service = now - max(attempt.sent, peer.last_delivery)
            peer.last_delivery = now
            peer.blocks += 1
            peer.bytes += len(data)
            peer.consecutive_failures = 0
            peer.probe_failures = 0
            peer.latency = _ewma(peer.latency, took, alpha)
            if attempt.idle_start:
                peer.idle_latency = _ewma(peer.idle_latency, took, alpha)
            if service > 0:
                peer.throughput = _ewma(peer.throughput, len(data) / service, alpha)
            self._size_guess = _ewma(self._size_guess, float(max(len(data), 1)), alpha)
            request.outcomes[peer.node_id] = Outcome.DELIVERED
            if not request.finished:
                request.result = data
                request.done.set()
                request.ended.set()
                for tell in request.on_delivered:
                    tell(request)
                self._remember(request.block_id, data)
                if self._on_holding is not None and not request.announced:
                    request.announced = True
                    self._on_holding(request.block_id)
                self.stats.completed += 1
                self._unpark(request)
                for other in request.attempts:
                    other.cancel()
                if self._requests.get(request.block_id) is request and not request.on_delivered:
                    # (a batch's block stays until handed over: a fetch meanwhile joins it)
                    del self._requests[request.block_id]
            return

        if error is None:
            if attempt.moved:
                return  # asked again on its own (`_waits_in_run`): that attempt tells
            # Cancelled: a hedge won, every waiter left, or we are shutting down.
            if attempt.late and not attempt.relay:
                peer.latency = _ewma(peer.latency, elapsed, alpha)
                if peer.last_delivery < attempt.start:
                    # Nothing at all from this peer while we waited: a stall.
                    peer.stalls += 1
                    self._penalise(peer, since=attempt.start)
                request.outcomes[peer.node_id] = Outcome.TOO_SLOW
            elif request.outcomes.get(peer.node_id) is Outcome.IN_PROGRESS:
                del request.outcomes[peer.node_id]
            return

        if isinstance(error, BlockNotFound):
            # Not a delivery: a peer that answers NotFound to decoys while it sits on
            # the wants it was asked must still count as stalled on those.
            peer.not_found += 1
            if peer.source is None:
                peer.partial = True
            request.excluded.add(peer.node_id)
            request.outcomes[peer.node_id] = Outcome.NOT_FOUND
        elif isinstance(error, BadBlockError):
            peer.bad_blocks += 1
            request.excluded.add(peer.node_id)
            request.outcomes[peer.node_id] = Outcome.CORRUPT
            # A peer that lies is shunned (over a push connection too). A static mirror
            # serves files it cannot vouch for: a rotten, truncated or half-uploaded file
            # says nothing of its other files, so the mirror is only never asked for this
            # block again (by this request), and not backed off at all: a backoff growing
            # with each damaged file (0.5 s, 1, 2, 4 ...) left the good blocks read next
            # unasked past their fetch timeout when the mirror was their only source
            # (issue 10). Every block it serves is still checked.
            if peer.source is None or peer.pushed:
                self._drop_connection(peer, attempt.connection)
                self._penalise(peer, self.config.bad_block_backoff)
        elif isinstance(error, PeerRefusedError | PeerIdentityError):
            request.excluded.add(peer.node_id)
            request.outcomes[peer.node_id] = Outcome.REFUSED
        else:
            # The connection broke or could not be made.
            request.soft_failed.add(peer.node_id)
            request.outcomes[peer.node_id] = Outcome.FAILED
            if attempt.connection is not None and self._drop_connection(peer, attempt.connection):
                self._penalise(peer, since=attempt.start)
        if not request.finished and not request.queued:
            if not any(not a.late for a in request.attempts):
                self._unpark(request)
                self._enqueue(request)

    def _probe_ended(self, attempt: _Attempt, data: bytes | None, error: DhtError | None,
                     now: float) -> None:
        """A probe's verdict: an answer ends its peer's backoff; a failure doubles the wait
        for the next probe (the failure itself is penalised as any other, below)."""
        peer = attempt.peer
        peer.probing = False
        self._providers_changed = True  # parked requests look again: usable, or probe again
        answered = (data is not None or isinstance(error, BlockNotFound)
                    or (isinstance(error, BadBlockError) and peer.source is not None
                        and not peer.pushed))  # a mirror's rotten file: the server is up
        if answered:
            if peer.shunned_until <= now and peer.backoff_until > now:
                attempt.request.note(f"{peer.label} answered a probe: backoff ended")
                peer.backoff_until = -math.inf
            peer.consecutive_failures = 0
            peer.probe_failures = 0
        elif error is not None or (attempt.late and not attempt.moved):
            peer.probe_failures += 1
            peer.probe_at = max(peer.probe_at, now + self._probe_wait(peer))
        # else cancelled in time (its waiters left, another source won): no verdict

    def probe_now(self) -> bool:
        """Let each backed-off source be probed at once; False if no source can be asked.

        For a reader that saw a block fail moments ago and is asked for it again
        (the mount's failure memory, vfs/drive.py): the source may have come back
        since, and waiting out its probe spacing (up to `probe_max`) would fail
        that read although one request would tell. So the next request that has
        no other source probes it now (one probe in flight per source, as
        always; a shunned source stays shunned). False when nothing could be
        asked now (no provider, or every one shunned): the read fails at once.
        """
        now = trio.current_time()
        askable = False
        for peer in self._peers.values():
            if not peer.provider or peer.shunned_until > now:
                continue
            askable = True
            if peer.backoff_until > now and not peer.probing:
                peer.probe_at = min(peer.probe_at, now)
        if askable:
            self._providers_changed = True  # parked requests look again
            self._poke()
        return askable

    def _probe_wait(self, peer: _Peer) -> float:
        config = self.config
        return min(config.probe_interval * 2 ** min(peer.probe_failures, 30), config.probe_max)

    async def _watch_attempt(self, attempt: _Attempt) -> None:
        await self._watch_attempts([attempt])

    async def _watch_attempts(self, attempts: list[_Attempt]) -> None:
        """Hedge when attempts (one, or a run's, all started together at one peer) run
        late; declare the peer stalled if it stays silent."""
        first = attempts[0]
        peer = first.peer
        config = self.config
        usual = peer.latency if peer.latency is not None else _DEFAULT_LATENCY
        if not peer.connected:
            usual += 2 * (peer.idle_latency or usual)
        hedge_after = max(config.hedge_floor, config.hedge_factor * usual)
        if peer.announced(first.request.block_id):
            # A reader asked for a block it announced may be waiting on its own fetch
            # of it (a node from before Fetching, from a seed as busy as ours): no
            # longer than this before the seed. (A run's blocks all stand alike at
            # its peer: see _take_run.)
            hedge_after = min(hedge_after, max(config.hedge_floor, config.holder_hedge_max))
        elif peer.fetching(first.request.block_id):
            hedge_after = min(hedge_after, config.fetching_hedge)
        hedge_at = first.start + hedge_after
        await trio.sleep_until(hedge_at)
        running = [a for a in attempts if a in a.request.attempts]
        for attempt in running:
            request = attempt.request
            attempt.late = True
            peer.late += 1
            request.note(f"{peer.label} late ({hedge_after:.2f}s)")
            if (
                not request.finished
                and not request.queued
                and not request.parked
                and len(request.attempts) < config.max_parallel_attempts
            ):
                self._enqueue(request)
        await trio.sleep_until(max(hedge_at, first.start + config.stall_timeout))
        if peer.last_delivery < first.start:
            for attempt in attempts:
                if attempt in attempt.request.attempts:
                    peer.stalls += 1
                    attempt.request.outcomes[peer.node_id] = Outcome.STALLED
            if self._drop_connection(peer, first.connection):
                self._penalise(peer, since=first.start)

    # ---- connections and penalties ------------------------------------------

    async def _connection(self, peer: _Peer) -> BlockSource:
        """The pooled connection to `peer`, dialling it if needed (one dial at a time)."""
        if peer.source is not None:
            if peer.source.closed:
                raise PeerGoneError(f"{peer.label}: source removed")
            return peer.source  # pools its own connections
        while True:
            if peer.conn is not None and not peer.conn.closed:
                return peer.conn
            if peer.connecting is not None:
                waiting_since = trio.current_time()
                await peer.connecting.wait()
                if peer.last_connect_failure >= waiting_since and peer.connect_error is not None:
                    raise copy.copy(peer.connect_error)  # the kept one stays without frames
                continue  # connected, or the dialler was cancelled: look again
            assert self._nursery is not None
            event = peer.connecting = trio.Event()
            try:
                conn = await self._dial(peer)
            except PeerRefusedError as exc:
                self._connect_failed(peer, exc, self.config.bad_block_backoff)
                raise
            except DhtError as exc:
                self._connect_failed(peer, exc, None)
                raise
            else:
                peer.conn = conn
                peer.conn_ended = False
                peer.consecutive_failures = 0
                if hasattr(conn, "wait_closed"):
                    self._nursery.start_soon(self._watch_connection, peer, conn)
            finally:
                peer.connecting = None
                event.set()

    async def _watch_connection(self, peer: _Peer, conn: PeerConnection) -> None:
        """Let go of `conn` when it ends, so a departed reader costs nothing but its entry.

        A reader that unmounts or is killed stays listed as a provider until its
        record expires (up to an hour); its closed connection (its Holding set,
        its frame decoder, its stream) used to stay in `peer.conn` as long. A
        connection that ends with work in flight is left to that work's failure
        (`_finish_attempt` drops it and backs the peer off); one that ends idle is
        dropped here, without a penalty: nothing failed. That it announced what it
        holds is kept (`partial`): a reader stays a reader without its connection.
        """
        await conn.wait_closed()
        if peer.conn is conn:
            self._connection_ended(peer)

    def _connection_ended(self, peer: _Peer) -> None:
        """Drop the peer's closed connection if no attempt still holds it (see
        `_watch_connection`)."""
        conn = peer.conn
        if conn is None or not conn.closed or peer.in_flight:
            return
        if getattr(conn, "holding", None) or getattr(conn, "fetching", None):
            peer.partial = True
        peer.conn = None
        peer.conn_ended = True

    async def _dial(self, peer: _Peer) -> PeerConnection:
        """Connect to the first of the peer's addresses that answers (happy eyeballs).

        Addresses are dialled in `dial_order`, the next one starting when the
        previous failed or after `HAPPY_EYEBALLS_DELAY`; the first connection
        made wins and the others are cancelled. A failing address is
        remembered against the address, never the peer; the peer has failed
        only when every address has. A refusal (the right node said no) ends
        the race at once.
        """
        assert self._nursery is not None
        nursery = self._nursery
        won: list[PeerConnection] = []
        errors: list[DhtError] = []

        async def attempt(addr: PeerAddr, failed: trio.Event, race: trio.CancelScope) -> None:
            try:
                conn = await self._connect(
                    addr, self.identity, self.discovery_key, self.drive_secret,
                    nursery=nursery, on_notice=self._on_notice,
                    timeout=self.config.connect_timeout,
                )
            except DhtError as exc:
                peer.addr_failed[(addr.host, addr.port)] = trio.current_time()
                errors.append(exc)
                failed.set()
                if isinstance(exc, PeerRefusedError):
                    race.cancel()
                return
            if won:
                nursery.start_soon(conn.aclose)  # another address was quicker
                return
            won.append(conn)
            if self.on_verified is not None and hasattr(conn, "on_verified"):
                conn.on_verified = self.on_verified
            peer.addr_failed.pop((addr.host, addr.port), None)
            if peer.addr != addr:
                peer.addr = addr
                peer.label = str(addr)
            race.cancel()

        addrs = peer.dial_order()
        async with trio.open_nursery() as race:
            for addr in addrs:
                failed = trio.Event()
                race.start_soon(attempt, addr, failed, race.cancel_scope)
                with trio.move_on_after(HAPPY_EYEBALLS_DELAY):
                    await failed.wait()
        if won:
            return won[0]
        refused = [e for e in errors if isinstance(e, PeerRefusedError)]
        if refused:
            raise refused[0]
        if len(errors) == 1:
            raise errors[0]
        if errors and all(isinstance(e, PeerIdentityError) for e in errors):
            raise errors[0]
        detail = "; ".join(str(e) for e in errors) or "no address"
        raise PeerGoneError(f"none of {len(addrs)} addresses of {peer.label} answered: {detail}")

    def _connect_failed(self, peer: _Peer, error: DhtError, backoff: float | None) -> None:
        # A copy: same type and message, without the traceback and context the raised one
        # carries, which keep every frame of the failed dial alive (its trio tasks, cancel
        # scopes, socket objects: ~12 kB a peer) for as long as the peer entry lives, and a
        # departed reader's lives until its provider record expires (up to an hour).
        peer.connect_error = copy.copy(error)
        peer.last_connect_failure = trio.current_time()
        self._penalise(peer, backoff)

    def _drop_connection(self, peer: _Peer, conn: BlockSource | None) -> bool:
        """Forget and close `conn` if it is still the peer's; False if someone already did."""
        if peer.source is not None:
            return conn is peer.source  # nothing to close: penalties alone keep it aside
        if conn is None or peer.conn is not conn:
            return False
        peer.conn = None
        if not conn.closed and self._nursery is not None:
            self._nursery.start_soon(conn.aclose)
        return True

    def _penalise(self, peer: _Peer, backoff: float | None = None, *,
                  since: float | None = None) -> None:
        """Back `peer` off: exponentially (`backoff` None; a lone source is probed meanwhile,
        see `_probe_target`), or shunned for `backoff` seconds (never probed).

        `since`: when the failed attempt was dispatched. One incident (a source
        that froze, a connection that broke) fails every request in flight there,
        each on its own verdict: a stall seen by a hedge or the watchdog, the
        error of each request, a watchdog per run. Counted one by one, a mirror
        frozen with 16 requests in flight reached 16-32 failures, the 60 s
        `backoff_max` at once, and with another source to take the work it was
        not probed but kept off that long after a hiccup of a second. So an
        attempt dispatched before the incident counted last (it was in flight
        when that happened) adds nothing to the backoff: the incident counts
        once. Its request is retried elsewhere at once all the same (the caller
        re-queues it). Its failure is still counted in `failures`, and an
        attempt dispatched after the incident (a probe, a retry once the
        backoff ended) that fails is a new incident, so a source that stays
        dead still backs off further. A shun (`backoff` given: a block with a
        wrong hash, a refusal) always counts: each lie is its own.
        """
        config = self.config
        now = trio.current_time()
        peer.failures += 1
        if backoff is None and since is not None and since <= peer.incident_at:
            return  # in flight when the incident counted last happened: part of it
        peer.incident_at = now
        peer.incidents += 1
        peer.consecutive_failures += 1
        if backoff is None:
            exponent = min(peer.consecutive_failures - 1, 30)
            backoff = min(config.backoff_base * 2**exponent, config.backoff_max)
            if peer.shunned_until <= now:
                peer.probe_at = now + self._probe_wait(peer)
        else:
            peer.shunned_until = max(peer.shunned_until, now + backoff)
            peer.probe_at = math.inf
        peer.backoff_until = max(peer.backoff_until, now + backoff)
        self._poke()

    # ---- errors -------------------------------------------------------------

    def _timeout_error(self, request: _Request, timeout: float) -> FetchTimeout:
        known = sum(1 for p in self._peers.values() if p.provider)
        tried = len(request.outcomes)
        block = request.block_id.hex()[:16]
        if tried == 0:
            if known == 0:
                why = "no peers are known to have this drive"
            else:
                why = f"none of {known} known peer(s) could be asked (all failing or backing off)"
        else:
            counts = Counter(request.outcomes.values())
            detail = ", ".join(f"{n} {outcome.value}" for outcome, n in
                               sorted(counts.items(), key=lambda item: item[0].value))
            why = f"tried {tried} of {known} known peer(s): {detail}"
        untried = [self._why_not_asked(p) for p in self._peers.values()
                   if p.provider and p.node_id not in request.outcomes]
        if tried and untried:
            why += "; not asked: " + ", ".join(untried[:4]) + (
                f" and {len(untried) - 4} more" if len(untried) > 4 else "")
        return FetchTimeout(
            f"block {block}… not fetched within {timeout:g}s: {why}", tried=tried, known=known
        )

    def _why_not_asked(self, peer: _Peer) -> str:
        """What kept a provider from being asked, as a timeout message says it."""
        backoff = peer.backoff_until - trio.current_time()
        if backoff > 0:
            state = f"backing off {backoff:.0f}s" + (", a probe in flight" if peer.probing else "")
        elif peer.connecting is not None:
            state = "dialling"
        elif not self._has_slot(peer, Priority.READ):
            state = f"busy ({peer.in_flight} in flight)"
        else:
            state = "connected" if peer.connected else "not connected"
        return f"{peer.label} {state}"


def _waits_in_run(attempt: _Attempt) -> bool:
    """Whether a late attempt's answer has not even begun: its source answers a run's
    blocks one after the other (an HTTP mirror, the run pipelined) and it still waits
    behind another block of its run, which may stall for the whole read timeout. Such an
    attempt does not keep its peer from being asked again (a hedge at the same mirror
    goes out at once, on another connection, and the waiting one is dropped from its
    run: its response there is not read, nor checked): else a good block queued behind a stalled file, at a mirror that
    is its only source, waits past its fetch timeout (issue 10)."""
    run = attempt.run
    return attempt.late and run is not None and run.behind[attempt.index]


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)
