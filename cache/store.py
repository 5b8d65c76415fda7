"""The block store of one node: content-addressed blocks in LMDB, an LRU order, pins.

One LMDB environment (a directory) per node, opened by every process of the
node at once: a `serve` process, a `publish` command, a mount. Everything that
must be the same for all of them (blocks, the byte total, the LRU order, pins,
records) lives in LMDB and changes only inside write transactions, so each
process sees one consistent store and a killed process leaves nothing
half-written. The layout of every sub-database is in `cache/schema.py` and
docs/cache.md.

The store knows nothing of drives, paths or the network: 32-byte block ids
(SHA-256 of the block bytes, which are ciphertext) and bytes.

Two things are deliberately per process:

* recency of reads: `get` runs one read transaction and no write; the access
  is remembered in memory and written (as a new LRU position) by the next
  write transaction of this process, by `flush()` or by `close()`. A killed
  process loses at most those unflushed recency updates.
* holds: `hold(ids)` protects blocks a read in flight needs from eviction by
  this process.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import lmdb

from cache import schema
from cache.consistency import find_problems
from cache.errors import (
    CorruptBlock,
    DiskFull,
    InvalidArgument,
    StoreClosed,
    StoreError,
    StoreFull,
    UnknownPin,
)
from cache.gate import ResizeGate
from cache.mapread import StoreReadahead
from cache.schema import Counters
from cache.writer import Dbs, Writer, pin_members

MiB = 1 << 20
DEFAULT_INITIAL_MAP_BYTES = 64 * MiB
DEFAULT_MAX_MAP_BYTES = 1 << 40
DEFAULT_TOUCH_BATCH = 4096
# An I/O error on commit counts as "disk full" when the filesystem has less free
# space than what the transaction wanted to write plus this margin.
_DISK_FULL_MARGIN = 8 * MiB
# What a write of N bytes in B blocks may take of the map, for growing it ahead of a large
# write (`_room_for`): a value of a few KiB fills two pages (LMDB's overflow pages), so
# twice the bytes, plus the index entries of each block (meta, LRU, pin, pin count, tag).
_ROOM_PER_BYTE = 2
_ROOM_PER_BLOCK = 1024
# Writes smaller than this just retry after a MapFullError: the redone work is small.
_ROOM_CHECK_BYTES = 4 * MiB
_MAX_RETRIES = 64
_STATE_INDEX = schema.ALL_DBS.index(schema.DB_STATE)
_READAHEAD_MIN = 64 * 1024  # reads of values this big drive StoreReadahead
# Blocks evicted per transaction when evicting on request (evict, a lower limit,
# a released pin). On a full disk the steps shrink to one block: each commit
# needs a few new pages, and pages a commit frees are reusable two commits on.
# Each commit rewrites about a page per block in each id-keyed index and has a large
# fixed cost besides, so small steps are expensive: evicting 200,000 blocks wrote 36 GB
# in steps of 256, 18 GB in steps of 1,024 (docs/benchmarks.md, issue 17). Larger steps
# cost memory instead: LMDB keeps the pages of its largest transaction allocated.
_EVICT_STEP = 2048

T = TypeVar("T")


class _Keep:
    """Type of `KEEP`: "leave the persisted setting as it is"."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


class PinProgress(NamedTuple):
    """How much of a pin is on this device."""

    present_count: int
    present_bytes: int
    total_count: int

    @property
    def complete(self) -> bool:
        return self.present_count == self.total_count


def _check_limit(limit_bytes: object) -> None:
    if limit_bytes is not None and (
        not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0
    ):
        raise InvalidArgument(f"the cache limit is a number of bytes >= 0, not {limit_bytes!r}")


def _ids(ids: Iterable[object]) -> list[bytes]:
    return [schema.check_id(block_id) for block_id in ids]


def _unique(ids: Iterable[bytes]) -> list[bytes]:
    return list(dict.fromkeys(ids))


class BlockStore:
    """The blocks on this device: content-addressed, size-limited LRU, with pins.

    Open one `BlockStore` per process and share it between threads; several
    processes may open the same directory at once. Use as a context manager or
    call `close()` (which writes the batched recency updates).

    `limit_bytes`: the cache limit (None: unlimited). Left as `KEEP`, the limit
    stored by an earlier open stays; a new value is stored and applied at once.
    `sync`: fsync every commit (the data pages; the meta page is synced by the
    next commit or `close`, so an OS crash may undo the last commit, never
    corrupt). False trades durability of the last commits on an OS crash or
    power loss, and integrity on filesystems that reorder writes, for speed; a
    killed process loses nothing either way.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        limit_bytes: int | None | _Keep = KEEP,
        sync: bool = True,
        initial_map_bytes: int = DEFAULT_INITIAL_MAP_BYTES,
        max_map_bytes: int = DEFAULT_MAX_MAP_BYTES,
        touch_batch: int = DEFAULT_TOUCH_BATCH,
    ) -> None:
        if initial_map_bytes <= 0 or max_map_bytes < initial_map_bytes:
            raise InvalidArgument("need 0 < initial_map_bytes <= max_map_bytes")
        if touch_batch < 1:
            raise InvalidArgument("touch_batch must be at least 1")
        self.path = os.fspath(path)
        self._sync = sync
        self._initial_map = initial_map_bytes
        self._max_map = max_map_bytes
        self._touch_batch = touch_batch
        self._gate = ResizeGate()
        self._lock = threading.Lock()  # guards _touches and _held
        self._touches: dict[bytes, None] = {}  # ids read since the last write, oldest first
        self._held: Counter[bytes] = Counter()
        if not isinstance(limit_bytes, _Keep):
            _check_limit(limit_bytes)
        self._env: lmdb.Environment | None = None
        self._env, self._dbs = self._open_env()
        self._page_size = self._env.stat()["psize"]
        self._readahead: StoreReadahead | None
        try:
            self._readahead = StoreReadahead(os.path.join(self.path, "data.mdb"))
        except OSError:
            self._readahead = None  # reads in file order then fault page by page
        if not isinstance(limit_bytes, _Keep):
            try:
                self.set_limit(limit_bytes)
            except BaseException:
                self._env.close()  # nobody else can: the object is never returned
                self._env = None
                if self._readahead is not None:
                    self._readahead.close()
                raise

    # -- opening and closing --------------------------------------------------------

    def _open_env(self) -> tuple[lmdb.Environment, Dbs]:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            try:
                existing = os.path.getsize(os.path.join(self.path, "data.mdb"))
            except FileNotFoundError:
                existing = 0
            map_size = max(self._initial_map, min(self._max_map, 2 * existing))
            map_size = -(-map_size // MiB) * MiB
            env = lmdb.open(
                self.path,
                subdir=True,
                map_size=map_size,
                max_dbs=len(schema.ALL_DBS) + 4,
                max_readers=256,
                max_spare_txns=8,
                lock=True,
                sync=self._sync,
                metasync=False,  # one fsync per commit; an OS crash may undo only the last
                writemap=False,
                readahead=False,  # MADV_RANDOM; _lookup_block asks for a big value's pages
                meminit=True,
                mode=0o600,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the block store at {self.path}: {exc}") from exc
        except OSError as exc:
            raise StoreError(
                f"cannot open the block store at {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            env.reader_check()  # free reader slots of killed processes
            dbs = self._open_dbs(env)
        except BaseException:
            env.close()
            raise
        return env, dbs

    def _open_dbs(self, env: lmdb.Environment) -> Dbs:
        """Open the sub-databases, creating them (in one write) only if one is missing."""
        try:
            # Handles outlive their transaction only if it commits (py-lmdb aborts read-only
            # ones), so a write transaction that writes nothing: it works on a full disk too.
            with env.begin(write=True) as txn:
                handles = [env.open_db(name, txn=txn, create=False) for name in schema.ALL_DBS]
                version = txn.get(schema.STATE_SCHEMA, db=handles[_STATE_INDEX])
        except (lmdb.NotFoundError, lmdb.ReadonlyError):
            handles = None
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
        if handles is None:
            try:
                with env.begin(write=True) as txn:
                    handles = [env.open_db(name, txn=txn, create=True) for name in schema.ALL_DBS]
                    version = txn.get(schema.STATE_SCHEMA, db=handles[_STATE_INDEX])
                    if version is None:
                        txn.put(
                            schema.STATE_SCHEMA,
                            schema.encode_u32(schema.SCHEMA_VERSION),
                            db=handles[_STATE_INDEX],
                        )
                        version = schema.encode_u32(schema.SCHEMA_VERSION)
            except (lmdb.MapFullError, lmdb.DiskError) as exc:
                raise DiskFull(f"cannot create the block store at {self.path}: {exc}") from exc
            except lmdb.Error as exc:
                raise StoreError(f"cannot create the block store at {self.path}: {exc}") from exc
        if version is None or schema.decode_u32(version) != schema.SCHEMA_VERSION:
            found = "none" if version is None else schema.decode_u32(version)
            raise StoreError(
                f"the block store at {self.path} has schema version {found}; this peerdrive "
                f"reads version {schema.SCHEMA_VERSION}"
            )
        return Dbs(*handles)

    def close(self) -> None:
        """Write batched recency updates (best effort) and close the environment."""
        if self._env is None:
            return
        try:
            self.flush()
        except StoreError:
            pass  # recency updates are an optimisation; losing them is documented
        with self._gate.exclusive():
            if self._env is not None:
                if self._sync:
                    try:
                        self._env.sync(True)  # the last meta page too (metasync is off)
                    except lmdb.Error:
                        pass  # the commits themselves were synced; only the last may wait
                self._env.close()
                self._env = None
                if self._readahead is not None:
                    self._readahead.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def release_mapped_pages(self) -> None:
        """Unmap the pages of data.mdb this process has touched (cache.mapread).

        Writes touch pages of the map too (LMDB copies the B-tree pages it
        changes from it); a writer calls this after a batch, so what it wrote
        does not stay in its RSS. The page cache keeps every page.
        """
        readahead = self._readahead
        if readahead is None:
            return
        txn = self._begin_read()  # holds the map in place while it is advised
        try:
            cursor = txn.cursor(db=self._dbs.meta)
            if cursor.first():
                readahead.release(cursor.value())
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
        finally:
            self._end_read(txn)

    @property
    def readahead_windows(self) -> int:
        """How many times reads in stored order made the store read ahead (cache.mapread)."""
        return 0 if self._readahead is None else self._readahead.windows

    @property
    def closed(self) -> bool:
        return self._env is None

    def _live_env(self) -> lmdb.Environment:
        env = self._env
        if env is None:
            raise StoreClosed(f"the block store at {self.path} is closed")
        return env

    # -- map size -------------------------------------------------------------------

    def _grow_map(self) -> None:
        with self._gate.exclusive():
            env = self._live_env()
            current = env.info()["map_size"]
            if current >= self._max_map:
                raise DiskFull(
                    f"the block store at {self.path} reached its maximum size of "
                    f"{self._max_map} bytes (max_map_bytes); lower the cache limit or unpin "
                    "something"
                )
            try:
                env.set_mapsize(min(self._max_map, current * 2))
            finally:
                self._mapping_changed()

    def _room_for(self, need_bytes: int, need_blocks: int) -> None:
        """Grow the map before a write of `need_bytes` (in `need_blocks` blocks) that may
        not fit in what is left of it.

        Growing only on MapFullError aborts the transaction and runs it again:
        a publish's first commit of 64 MiB of small files' blocks into a new
        store (a 64 MiB map) inserted 35,524 blocks for 20,201 stored, two
        aborted passes. The estimate errs high (pages freed inside the file
        are not counted as room); an estimate too low still ends in the
        MapFullError retry, so it only ever saves work.
        """
        if need_bytes < _ROOM_CHECK_BYTES:
            return

        def short_by() -> tuple[int, int]:
            env = self._live_env()
            info = env.info()
            used = (info["last_pgno"] + 1) * env.stat()["psize"]
            want = used + _ROOM_PER_BYTE * need_bytes + _ROOM_PER_BLOCK * need_blocks
            current = info["map_size"]
            return (0 if current >= self._max_map else want - current), current

        if short_by()[0] <= 0:  # the usual case: no exclusive section (it waits for views)
            return
        with self._gate.exclusive():
            short, current = short_by()
            if short <= 0:
                return
            size = min(self._max_map, -(-max(current + short, 2 * current) // MiB) * MiB)
            try:
                self._live_env().set_mapsize(size)
            finally:
                self._mapping_changed()

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            try:
                self._live_env().set_mapsize(0)  # 0: take the size another process grew it to
            finally:
                self._mapping_changed()

    def _mapping_changed(self) -> None:
        """data.mdb was mapped anew (in the exclusive section: no view is open)."""
        if self._readahead is not None:
            self._readahead.forget_mapping()

    # -- transactions ---------------------------------------------------------------

    def _begin_read(self) -> lmdb.Transaction:
        """A read transaction (buffers=True: values are views valid until it ends).

        Holds the gate's shared side until `_end_read`. Adopts a map that another
        process grew (MapResizedError) and tries again.
        """
        for _ in range(_MAX_RETRIES):
            self._gate.acquire_shared()
            try:
                return self._live_env().begin(buffers=True)
            except lmdb.MapResizedError:
                self._gate.release_shared()
            except lmdb.Error as exc:
                self._gate.release_shared()
                raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
            except BaseException:
                self._gate.release_shared()
                raise
            self._adopt_map_size()
        raise StoreError(f"the block store at {self.path} keeps being resized by another process")

    def _end_read(self, txn: lmdb.Transaction) -> None:
        try:
            txn.abort()
        finally:
            self._gate.release_shared()

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        txn = self._begin_read()
        try:
            yield txn
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
        finally:
            self._end_read(txn)

    def _write(self, op: Callable[[Writer], T], *, need_bytes: int = 0,
               need_blocks: int = 0) -> T:
        """Run `op` in one write transaction, after applying this process's batched reads.

        Retries after growing the map (MapFullError) or adopting another
        process's map size; `op` must therefore have no effect outside the
        transaction. Nothing is written unless everything is. A large write
        (`need_bytes` in `need_blocks` blocks) grows the map first if it may
        not fit (`_room_for`), so its work is not thrown away and redone.
        """
        self._room_for(need_bytes, need_blocks)
        for _ in range(_MAX_RETRIES):
            batch = self._take_touches()
            with self._lock:
                held = frozenset(self._held)
            try:
                with self._gate.shared():
                    txn = self._live_env().begin(write=True, buffers=True)
                    try:
                        writer = Writer(txn, self._dbs, held)
                        for block_id in batch:
                            writer.touch(block_id)
                        result = op(writer)
                        writer.finish()
                    except BaseException:
                        txn.abort()
                        raise
                    txn.commit()
                return result
            except lmdb.MapFullError:
                self._restore_touches(batch)
                self._grow_map()
            except lmdb.MapResizedError:
                self._restore_touches(batch)
                self._adopt_map_size()
            except lmdb.Error as exc:
                self._restore_touches(batch)
                raise self._write_error(exc, need_bytes) from exc
            except BaseException:
                self._restore_touches(batch)
                raise
        raise StoreError(f"the block store at {self.path} could not grow its map")

    def _write_error(self, exc: lmdb.Error, need_bytes: int) -> StoreError:
        """Name a failed write for what it is: a full disk, or an I/O error."""
        if isinstance(exc, lmdb.DiskError) or self._disk_looks_full(need_bytes):
            return DiskFull(
                f"the disk holding the block store at {self.path} is full; nothing was "
                f"written ({exc}); free some space or lower the cache limit"
            )
        if isinstance(exc, lmdb.PanicError):
            return StoreError(
                f"the block store at {self.path} hit a fatal LMDB error and must be reopened: {exc}"
            )
        return StoreError(f"cannot write to the block store at {self.path}: {exc}")

    def _disk_looks_full(self, need_bytes: int) -> bool:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < need_bytes + _DISK_FULL_MARGIN

    # -- batched recency ------------------------------------------------------------

    def _note_access(self, block_id: bytes) -> bool:
        """Remember a read; True when the batch is big enough to be written."""
        with self._lock:
            self._touches.pop(block_id, None)
            self._touches[block_id] = None
            return len(self._touches) >= self._touch_batch

    def _take_touches(self) -> list[bytes]:
        with self._lock:
            batch = list(self._touches)
            self._touches = {}
        return batch

    def _restore_touches(self, batch: list[bytes]) -> None:
        """Put back a batch whose transaction failed, older than anything read since."""
        if not batch:
            return
        with self._lock:
            merged = dict.fromkeys(batch)
            for block_id in self._touches:
                merged.pop(block_id, None)
                merged[block_id] = None
            self._touches = merged

    def _flush_quietly(self) -> None:
        """Write the recency batch from a read path: a failure there must not fail the read."""
        try:
            self.flush()
        except StoreError:
            with self._lock:  # keep the newest entries, forget the rest
                if len(self._touches) > 4 * self._touch_batch:
                    keep = list(self._touches)[-self._touch_batch :]
                    self._touches = dict.fromkeys(keep)

    def flush(self) -> None:
        """Write the recency of reads since the last write (no-op if there were none).

        The owner should call this now and then (say every few seconds) so that a
        killed process loses little LRU information.
        """
        with self._lock:
            if not self._touches:
                return
        self._write(lambda writer: None)

    @property
    def pending_touches(self) -> int:
        with self._lock:
            return len(self._touches)

    # -- blocks: writing ------------------------------------------------------------

    def put(self, block_id: bytes, data: bytes | bytearray | memoryview) -> bool:
        """Store one block; True if it was new, False if it was already here (now recent).

        Raises CorruptBlock if SHA-256(data) != block_id, StoreFull (storing
        nothing) if an unpinned block does not fit under the limit, DiskFull if
        the disk is full even after shrinking the cache.
        """
        return self.put_many([(block_id, data)]) == 1

    def put_many(
        self,
        items: Iterable[tuple[bytes, bytes | bytearray | memoryview]],
        *,
        ids_checked: bool = False,
        tag: bytes | None = None,
    ) -> int:
        """Store several blocks in one transaction (all or none); returns how many were new.

        `ids_checked=True` says the caller has itself just computed or verified
        every id as SHA-256 of these very bytes (publish hashes each block it
        encrypts; a fetch verifies each block it receives), so the store does
        not hash them a second time (SHA-256 is most of a put's CPU). Only
        immutable `bytes` are accepted then, so the bytes cannot have changed
        since they were hashed; every block still gets its xxh3 checksum,
        checked on each read (by `get_decoded` when its decode fails), and
        readers check what they decrypt.

        `tag` (32 bytes, opaque here) records, in the same transaction, that
        every block given was stored for it, new or already present (see
        `is_member`).
        """
        if tag is not None:
            schema.check_tag(tag)
        prepared: list[tuple[bytes, bytes | bytearray | memoryview, int]] = []
        for block_id, data in items:
            block_id = schema.check_id(block_id)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise InvalidArgument(f"block data is bytes, not {type(data).__name__}")
            if ids_checked:
                if type(data) is not bytes:
                    raise InvalidArgument("blocks whose ids are checked by the caller must be "
                                          f"bytes, not {type(data).__name__}")
                prepared.append((block_id, data, schema.digest_of(data)))
                continue
            if isinstance(data, memoryview) and (data.itemsize != 1 or not data.c_contiguous):
                data = data.tobytes()  # len() must count bytes
            if schema.block_id_of(data) != block_id:
                raise CorruptBlock(
                    f"block {block_id.hex()}: the bytes offered do not hash to this id"
                )
            prepared.append((block_id, data, schema.digest_of(data)))
        if not prepared:
            return 0
        need = sum(len(data) for _, data, _ in prepared)

        def op(writer: Writer) -> int:
            new = sum(writer.insert(*item) for item in prepared)
            if tag is not None:
                for block_id, _, _ in prepared:
                    writer.add_member(block_id, tag)
            return new

        try:
            return self._write(op, need_bytes=need, need_blocks=len(prepared))
        except DiskFull:
            if not self._shrink_for_disk(need):
                raise
        except StoreFull:
            # the refused put's evictions were rolled back with it; a store left over
            # its limit (a limit set while reads held blocks) still comes back under it
            self._evict_to_limit()
            raise
        return self._write(op, need_bytes=need, need_blocks=len(prepared))

    def put_pinned(
        self,
        pin: str,
        items: Iterable[tuple[bytes, bytes | bytearray | memoryview]],
        *,
        ids_checked: bool = False,
        tag: bytes | None = None,
    ) -> list[bytes]:
        """Add blocks to pin `pin` (created if new) and store them, in one transaction.

        Returns the ids that were not stored before (first occurrence, in
        order). The same as `add_to_pin` then `put_many`, with one commit (one
        fsync) instead of two and no eviction window between them, and the
        caller learns exactly which blocks it added (publish counts them).
        Pinned blocks never meet StoreFull; a full disk raises DiskFull with
        nothing pinned or stored. `ids_checked` and `tag` as in `put_many`.
        """
        if tag is not None:
            schema.check_tag(tag)
        name_utf8 = schema.encode_pin_name(pin)
        prepared: dict[bytes, tuple[bytes, bytes | bytearray | memoryview, int]] = {}
        for block_id, data in items:
            block_id = schema.check_id(block_id)
            if ids_checked:
                if type(data) is not bytes:
                    raise InvalidArgument("blocks whose ids are checked by the caller must be "
                                          f"bytes, not {type(data).__name__}")
            else:
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise InvalidArgument(f"block data is bytes, not {type(data).__name__}")
                if isinstance(data, memoryview) and (data.itemsize != 1 or not data.c_contiguous):
                    data = data.tobytes()  # len() must count bytes
                if schema.block_id_of(data) != block_id:
                    raise CorruptBlock(
                        f"block {block_id.hex()}: the bytes offered do not hash to this id"
                    )
            if block_id not in prepared:
                prepared[block_id] = (block_id, data, schema.digest_of(data))
        if not prepared:
            return []
        ids = sorted(prepared)
        need = sum(len(data) for _, data, _ in prepared.values())

        def op(writer: Writer) -> list[bytes]:
            writer.add_to_pin(name_utf8, ids)  # first: the inserts then skip the LRU
            new = [item[0] for item in prepared.values() if writer.insert(*item)]
            if tag is not None:
                for block_id in ids:
                    writer.add_member(block_id, tag)
            return new

        try:
            return self._write(op, need_bytes=need, need_blocks=len(prepared))
        except DiskFull:
            if not self._shrink_for_disk(need):
                raise
        return self._write(op, need_bytes=need, need_blocks=len(prepared))

    def _shrink_for_disk(self, need: int) -> bool:
        """After a full disk: evict LRU blocks worth twice `need` so their pages can be reused.

        LMDB reuses pages freed by a transaction only from the second
        transaction after it, hence the extra (tiny) commit. Returns False when
        nothing could be evicted.
        """
        try:
            if self._evict_down_to(max(0, self.total_bytes - 2 * need)) == 0:
                return False
            self._write(lambda writer: writer.tick())
        except StoreError:
            return False
        return True

    # -- blocks: reading ------------------------------------------------------------

    def get(self, block_id: bytes) -> bytes | None:
        """The block's bytes, or None if absent. A block failing its checksum is
        removed and reported absent: never wrong bytes. One read transaction."""
        block_id = schema.check_id(block_id)
        txn = self._begin_read()  # the hot path: no context-manager layers
        try:
            value = self._lookup_block(txn, block_id)
            if value is None:
                return None
            result = self._copy_block(value)
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
        finally:
            self._end_read(txn)
        if result is None:
            self._drop_rotten(block_id)
            return None
        if self._note_access(block_id):
            self._flush_quietly()
        return result

    def get_many(self, block_ids: Sequence[bytes], *, tag: bytes | None = None,
                 budget: int | None = None,
                 not_members: list[bytes] | None = None) -> list[bytes | None]:
        """`get` of several blocks in one read transaction (a peer's run of wants).

        With `tag`, a block not stored for that tag is reported absent, as
        `is_member` would say (one read per block, in the same transaction),
        and its id appended to `not_members` if given. Stops once the bytes
        read reach `budget`: the answer may cover only the first ids. A block
        failing its checksum is dropped and reported absent, as `get` does.
        """
        ids = [schema.check_id(b) for b in block_ids]
        if tag is not None:
            schema.check_tag(tag)
        out: list[bytes | None] = []
        rotten: list[bytes] = []
        total = 0
        members = self._dbs.members
        txn = self._begin_read()
        try:
            for block_id in ids:
                if tag is not None and txn.get(schema.member_key(block_id, tag),
                                               db=members) is None:
                    out.append(None)
                    if not_members is not None:
                        not_members.append(block_id)
                    continue
                value = self._lookup_block(txn, block_id)
                data = None if value is None else self._copy_block(value)
                if value is not None and data is None:
                    rotten.append(block_id)
                out.append(data)
                if data is not None:
                    total += len(data)
                    if budget is not None and total >= budget:
                        break
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
        finally:
            self._end_read(txn)
        for block_id in rotten:
            self._drop_rotten(block_id)
        flush = False
        for block_id, data in zip(ids, out, strict=False):
            if data is not None:
                flush = self._note_access(block_id) or flush
        if flush:
            self._flush_quietly()
        return out

    def get_decoded(self, block_id: bytes, decode: Callable[[memoryview], T]) -> T | None:
        """`decode` of the block's bytes read in place (no copy); None if the block is absent.

        For a caller whose `decode` authenticates what it reads (AES-GCM does:
        vfs/blocks.py) the bytes are not checked against their xxh3 first:
        one check proves them. Should `decode` raise, the xxh3 check tells rot
        (the block is dropped and None returned, as `get` does) from intact
        bytes (the exception propagates). `decode` runs inside a read
        transaction, in the calling thread: keep it synchronous, and keep
        nothing of the view it is given.
        """
        block_id = schema.check_id(block_id)
        rotten = False
        txn = self._begin_read()
        try:
            value = self._lookup_block(txn, block_id)
            if value is None:
                return None
            readahead = self._readahead
            if readahead is not None and len(value) >= _READAHEAD_MIN:
                readahead.note_read(value)
            data = schema.block_value_unchecked(value)
            if data is None:
                rotten = True
            else:
                try:
                    result = decode(data)
                except Exception:
                    if schema.block_value_data(value) is not None:
                        raise
                    rotten = True
                finally:
                    with contextlib.suppress(BufferError):  # an export kept: txn end still ends it
                        data.release()
        except lmdb.Error as exc:
            raise StoreError(f"cannot read the block store at {self.path}: {exc}") from exc
        finally:
            self._end_read(txn)
        if rotten:
            self._drop_rotten(block_id)
            return None
        if self._note_access(block_id):
            self._flush_quietly()
        return result

    def _lookup_block(self, txn: lmdb.Transaction, block_id: bytes) -> memoryview | None:
        """The stored value of a block (a view into the map), its pages asked for first.

        txn.get would touch every page of the value before returning (py-lmdb
        preloads), one 4 KiB disk read at a time when cold; a cursor's
        set_key finds the record without touching the value, so its pages
        can be asked for in one read (StoreReadahead.will_need) first.
        """
        readahead = self._readahead
        if readahead is None:
            return txn.get(block_id, db=self._dbs.blocks)
        cursor = txn.cursor(db=self._dbs.blocks)
        try:
            if not cursor.set_key(block_id):
                return None
            readahead.will_need(cursor.key(), self._page_size, _READAHEAD_MIN)
            return cursor.value()
        finally:
            cursor.close()

    def _copy_block(self, value: memoryview) -> bytes | None:
        """The checked block bytes of a stored value (None if they fail their xxh3 check).

        Large values also drive the store's readahead (cache.mapread): blocks
        read in the order they were stored are read ahead of the reader.
        """
        readahead = self._readahead
        if readahead is not None and len(value) >= _READAHEAD_MIN:
            readahead.note_read(value)
        view = schema.block_value_data(value)
        return None if view is None else bytes(view)

    @contextmanager
    def get_view(self, block_id: bytes) -> Iterator[memoryview | None]:
        """Zero-copy read: a read-only view of the block, valid only inside the `with`.

        The view points into LMDB's map; it is released on exit (using it
        afterwards raises ValueError). Do not keep slices of it, do not write
        to the store from the same thread inside the block, and do not await
        inside it: while it is open, a map resize in another thread waits (up
        to a minute, then fails with StoreError).
        """
        block_id = schema.check_id(block_id)
        rotten = False
        with self._read() as txn:
            value = self._lookup_block(txn, block_id)
            data = None if value is None else schema.block_value_data(value)
            if value is not None and data is None:
                rotten = True
            else:
                if data is not None:
                    self._note_access(block_id)
                try:
                    yield data
                finally:
                    if data is not None:
                        try:
                            data.release()
                        except BufferError:
                            pass  # a caller kept an export; the txn ending still ends validity
        if rotten:
            self._drop_rotten(block_id)
            yield None
        elif self.pending_touches >= self._touch_batch:
            self._flush_quietly()

    def _drop_rotten(self, block_id: bytes) -> None:
        try:
            self._write(lambda writer: writer.delete_if_rotten(block_id))
        except StoreError:
            pass  # still reported missing; the next put of this id replaces it

    def has(self, block_id: bytes) -> bool:
        """Whether the block is stored (its bytes are checked only when read)."""
        block_id = schema.check_id(block_id)
        with self._read() as txn:
            return txn.get(block_id, db=self._dbs.meta) is not None

    def is_member(self, tag: bytes, block_id: bytes) -> bool:
        """Whether the block is stored and was stored for `tag` (one read, O(1)).

        The node layer tags each block with the discovery key of the drive it
        was published, fetched or pinned for, and serves a connection for one
        drive only its members (docs/cache.md, docs/security.md).
        """
        block_id = schema.check_id(block_id)
        key = schema.member_key(block_id, schema.check_tag(tag))
        with self._read() as txn:
            return txn.get(key, db=self._dbs.members) is not None

    def add_members(self, tag: bytes, ids: Iterable[bytes]) -> int:
        """Tag blocks already stored (one transaction); returns how many were present."""
        schema.check_tag(tag)
        wanted = _unique(_ids(ids))

        def op(writer: Writer) -> int:
            present = [b for b in wanted if writer.meta(b) is not None]
            for block_id in present:
                writer.add_member(block_id, tag)
            return len(present)

        return self._write(op)

    def size_of(self, block_id: bytes) -> int | None:
        block_id = schema.check_id(block_id)
        with self._read() as txn:
            raw = txn.get(block_id, db=self._dbs.meta)
            return None if raw is None else schema.decode_meta(raw)[1]

    def missing(self, ids: Iterable[bytes]) -> list[bytes]:
        """The ids (first occurrence, in order) that are not stored."""
        wanted = _unique(_ids(ids))
        with self._read() as txn:
            return [b for b in wanted if txn.get(b, db=self._dbs.meta) is None]

    def count_present(self, ids: Iterable[bytes]) -> tuple[int, int]:
        """(count, bytes) of the distinct given ids that are stored."""
        count = size = 0
        wanted = _unique(_ids(ids))
        with self._read() as txn:
            for block_id in wanted:
                raw = txn.get(block_id, db=self._dbs.meta)
                if raw is not None:
                    count += 1
                    size += schema.decode_meta(raw)[1]
        return count, size

    def _counters(self) -> Counters:
        with self._read() as txn:
            return Counters.decode(txn.get(schema.STATE_COUNTERS, db=self._dbs.state))

    @property
    def total_bytes(self) -> int:
        return self._counters().total_bytes

    @property
    def count(self) -> int:
        return self._counters().count

    @property
    def pinned_bytes(self) -> int:
        return self._counters().pinned_bytes

    # -- limit and eviction ---------------------------------------------------------

    @property
    def limit_bytes(self) -> int | None:
        with self._read() as txn:
            raw = txn.get(schema.STATE_LIMIT, db=self._dbs.state)
            return None if raw is None else schema.decode_u64(raw)

    def set_limit(self, limit_bytes: int | None) -> int:
        """Store a new limit (None: unlimited) and evict down to it; returns bytes freed."""
        _check_limit(limit_bytes)

        self._write(lambda writer: writer.set_limit(limit_bytes))
        return self._evict_to_limit()

    def evict(self, ids: Iterable[bytes]) -> int:
        """Remove the given blocks now, except pinned or held ones; returns bytes freed.

        Runs as a series of transactions (each block goes whole or not at all),
        so it also works to free room on a full disk.
        """
        wanted = _unique(_ids(ids))
        freed, done, step = 0, 0, _EVICT_STEP
        while done < len(wanted):
            chunk = wanted[done : done + step]
            try:
                freed += self._write(lambda writer, chunk=chunk: writer.evict_ids(chunk))
            except DiskFull:
                if step == 1:
                    raise
                step = 1
                continue
            done += len(chunk)
        return freed

    def evict_to(self, target_bytes: int) -> int:
        """Evict LRU unpinned, unheld blocks until the total is <= target; returns bytes freed."""
        if not isinstance(target_bytes, int) or isinstance(target_bytes, bool) or target_bytes < 0:
            raise InvalidArgument(f"target_bytes is a number >= 0, not {target_bytes!r}")
        return self._evict_down_to(target_bytes)

    def _evict_down_to(self, target: int) -> int:
        freed, step = 0, _EVICT_STEP
        while True:
            try:
                got, under = self._write(
                    lambda writer, n=step: (
                        writer.evict_down_to(target, max_blocks=n),
                        writer.c.total_bytes <= target,
                    )
                )
            except DiskFull:
                if step == 1:
                    raise
                step = 1
                continue
            freed += got
            if under or got == 0:
                return freed

    def _evict_to_limit(self) -> int:
        """After a change that may leave the store over its limit, evict down to it."""
        with self._read() as txn:
            c = Counters.decode(txn.get(schema.STATE_COUNTERS, db=self._dbs.state))
            raw = txn.get(schema.STATE_LIMIT, db=self._dbs.state)
            limit = None if raw is None else schema.decode_u64(raw)
        if limit is None or c.total_bytes <= limit:
            return 0
        return self._evict_down_to(limit)

    def eviction_order(self) -> list[bytes]:
        """The evictable blocks, next to go first (counting this process's unwritten reads)."""
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs.lru)
            order = [schema.split_lru_key(key)[1] for key in cursor.iternext(values=False)]
        evictable = set(order)
        with self._lock:
            recent = [b for b in self._touches if b in evictable]
        moved = set(recent)
        return [b for b in order if b not in moved] + recent

    @contextmanager
    def hold(self, ids: Iterable[bytes]) -> Iterator[None]:
        """Keep these blocks from being evicted by this process while the block runs."""
        held = _ids(ids)
        with self._lock:
            self._held.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._held.subtract(held)
                for block_id in held:
                    if self._held[block_id] <= 0:
                        del self._held[block_id]

    # -- pins -----------------------------------------------------------------------

    def set_pin(self, name: str, ids: Iterable[bytes]) -> None:
        """Make pin `name` hold exactly `ids` (created if new), atomically.

        Ids no longer named become evictable (and the cache is brought back
        under its limit); ids not yet stored are held as soon as they arrive.
        """
        name_utf8 = schema.encode_pin_name(name)
        wanted = set(_ids(ids))
        self._write(lambda writer: writer.set_pin(name_utf8, wanted))
        self._evict_to_limit()

    def add_to_pin(self, name: str, ids: Iterable[bytes]) -> None:
        """Add ids to pin `name` (created if new)."""
        name_utf8 = schema.encode_pin_name(name)
        wanted = sorted(set(_ids(ids)))
        self._write(lambda writer: writer.add_to_pin(name_utf8, wanted))

    def remove_from_pin(self, name: str, ids: Iterable[bytes]) -> None:
        """Release ids from pin `name`; raises UnknownPin if there is no such pin."""
        name_utf8 = schema.encode_pin_name(name)
        unwanted = sorted(set(_ids(ids)))
        self._write(lambda writer: writer.remove_from_pin(name_utf8, unwanted))
        self._evict_to_limit()

    def unpin(self, name: str) -> bool:
        """Drop pin `name`; its blocks become evictable. False if there was no such pin."""
        name_utf8 = schema.encode_pin_name(name)
        existed = self._write(lambda writer: writer.unpin(name_utf8))
        self._evict_to_limit()
        return existed

    def replace_pin(self, name: str, source: str) -> None:
        """Make pin `name` hold exactly what pin `source` holds, and drop `source`, atomically.

        How a pin built a batch at a time (into `source`) replaces the old set
        without either set ever being in memory; raises UnknownPin if there is
        no `source`.
        """
        name_utf8 = schema.encode_pin_name(name)
        source_utf8 = schema.encode_pin_name(source)
        self._write(lambda writer: writer.replace_pin(name_utf8, source_utf8))
        self._evict_to_limit()

    def move_to_pin(self, name: str, source: str, ids: Iterable[bytes]) -> None:
        """Make pin `name` hold exactly `ids`, taking those pin `source` holds from it, and
        drop `source`, atomically (`source` may not exist).

        A publish's blocks wait under a pending pin until the version's head is
        saved, then become the version's pin: moving them costs a delete and a
        put per id, where `set_pin` then `unpin` cost twice that.
        """
        name_utf8 = schema.encode_pin_name(name)
        source_utf8 = schema.encode_pin_name(source)
        wanted = sorted(set(_ids(ids)))
        self._write(lambda writer: writer.move_to_pin(name_utf8, source_utf8, wanted))
        self._evict_to_limit()

    def merge_pin(self, name: str, source: str) -> None:
        """Make pin `name` (created if new) also hold what pin `source` holds, and drop
        `source`, atomically; nothing happens if there is no `source`. What a pin built a
        batch at a time keeps when its round is cut short."""
        name_utf8 = schema.encode_pin_name(name)
        source_utf8 = schema.encode_pin_name(source)
        self._write(lambda writer: writer.merge_pin(name_utf8, source_utf8))

    def pin_names(self) -> list[str]:
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs.pin_names)
            return sorted(schema.decode_pin_head(v)[2] for v in cursor.iternext(keys=False))

    def has_pin(self, name: str) -> bool:
        name_utf8 = schema.encode_pin_name(name)
        with self._read() as txn:
            return txn.get(schema.pin_name_key(name_utf8), db=self._dbs.pin_names) is not None

    def _pin_number(self, txn: lmdb.Transaction, name: str) -> int:
        name_utf8 = schema.encode_pin_name(name)
        raw = txn.get(schema.pin_name_key(name_utf8), db=self._dbs.pin_names)
        if raw is None:
            raise UnknownPin(f"no pin named {name!r}")
        return schema.decode_pin_head(raw)[0]

    def pin_ids(self, name: str) -> list[bytes]:
        """The ids pin `name` holds, sorted; raises UnknownPin."""
        with self._read() as txn:
            return list(pin_members(txn, self._dbs, self._pin_number(txn, name)))

    def is_pinned(self, block_id: bytes) -> bool:
        block_id = schema.check_id(block_id)
        with self._read() as txn:
            return txn.get(block_id, db=self._dbs.pin_refs) is not None

    def pin_progress(self, name: str) -> PinProgress:
        """How much of pin `name` is stored here (one lookup per member)."""
        count = size = total = 0
        with self._read() as txn:
            for block_id in pin_members(txn, self._dbs, self._pin_number(txn, name)):
                total += 1
                raw = txn.get(block_id, db=self._dbs.meta)
                if raw is not None:
                    count += 1
                    size += schema.decode_meta(raw)[1]
        return PinProgress(count, size, total)

    # -- records --------------------------------------------------------------------

    def put_record(self, key: bytes, value: bytes) -> None:
        """Store a small value under `key` (1..511 bytes) for the layers above."""
        key = schema.check_record_key(key)
        value = _as_bytes(value)
        self._write(
            lambda writer: writer.txn.put(key, value, db=self._dbs.records),
            need_bytes=len(value),
        )

    def update_record(
        self, key: bytes, update: Callable[[bytes | None], bytes | None]
    ) -> bytes | None:
        """Atomically replace a record with update(old) (None deletes it), across processes.

        `update` runs inside the write transaction (maybe more than once on a
        retry): keep it quick and free of side effects. Returns the new value.
        """
        key = schema.check_record_key(key)

        def op(writer: Writer) -> bytes | None:
            old = writer.txn.get(key, db=self._dbs.records)
            new = update(None if old is None else bytes(old))
            if new is None:
                writer.txn.delete(key, db=self._dbs.records)
            else:
                writer.txn.put(key, _as_bytes(new), db=self._dbs.records)
            return new

        return self._write(op)

    def get_record(self, key: bytes) -> bytes | None:
        key = schema.check_record_key(key)
        with self._read() as txn:
            value = txn.get(key, db=self._dbs.records)
            return None if value is None else bytes(value)

    def delete_record(self, key: bytes) -> bool:
        key = schema.check_record_key(key)
        return self._write(lambda writer: writer.txn.delete(key, db=self._dbs.records))

    def records(self, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix`, in key order."""
        prefix = _as_bytes(prefix)
        out: list[tuple[bytes, bytes]] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self._dbs.records)
            found = cursor.set_range(prefix) if prefix else cursor.first()
            if not found:
                return out
            for key, value in cursor.iternext():
                key = bytes(key)
                if not key.startswith(prefix):
                    break
                out.append((key, bytes(value)))
        return out

    # -- inspection -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Numbers for `peerdrive status --json`."""
        with self._read() as txn:
            c = Counters.decode(txn.get(schema.STATE_COUNTERS, db=self._dbs.state))
            raw_limit = txn.get(schema.STATE_LIMIT, db=self._dbs.state)
            pins = {}
            for value in txn.cursor(db=self._dbs.pin_names).iternext(keys=False):
                _, members, name = schema.decode_pin_head(value)
                pins[name] = members
            map_size = self._live_env().info()["map_size"]
        with self._lock:
            held = len(self._held)
            pending = len(self._touches)
        try:
            file_bytes = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            file_bytes = 0
        return {
            "path": self.path,
            "count": c.count,
            "total_bytes": c.total_bytes,
            "limit_bytes": None if raw_limit is None else schema.decode_u64(raw_limit),
            "pinned_count": c.pinned_count,
            "pinned_bytes": c.pinned_bytes,
            "evictable_bytes": c.total_bytes - c.pinned_bytes,
            "pins": dict(sorted(pins.items())),
            "held_count": held,
            "pending_touches": pending,
            "file_bytes": file_bytes,
            "map_bytes": map_size,
        }

    def check_consistency(self, *, deep: bool = False) -> list[str]:
        """Check every invariant of the schema; returns the problems found (empty: fine).

        `deep` also checks every block's bytes against its id (SHA-256): slow.
        Blocks whose bytes merely rotted are reported too (`get` drops those).
        """
        with self._read() as txn:
            return find_problems(txn, self._dbs, deep=deep)

    def scrub(self) -> list[bytes]:
        """Check every block against its id (SHA-256) and remove the bad ones; returns them."""
        bad: list[bytes] = []
        with self._read() as txn:
            for key, value in txn.cursor(db=self._dbs.blocks):
                data = schema.block_value_data(value)
                if data is None or schema.block_id_of(data) != key:
                    bad.append(bytes(key))
        if bad:
            self._write(lambda writer: [writer.delete(block_id) for block_id in bad])
        return bad


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidArgument(f"expected bytes, not {type(value).__name__}")


__all__ = [
    "KEEP",
    "BlockStore",
    "PinProgress",
    "StoreError",
    "StoreFull",
    "DiskFull",
    "CorruptBlock",
    "UnknownPin",
]
