"""The operations of one write transaction on the block store's sub-databases.

`BlockStore` opens the transaction, hands it to a `Writer`, and commits or
aborts; every change to blocks, the LRU order, pins and counters is made here,
so the invariants of docs/cache.md are kept in one place:

* `lru` holds exactly the present, unpinned blocks, keyed by their tick;
* `pin_refs` counts, for every id, the pins that name it;
* the counters match the blocks (total, count, pinned bytes and count);
* `members` names only present blocks (deleting a block deletes its tags).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import lmdb

from cache import schema
from cache.errors import StoreFull, UnknownPin
from cache.schema import Counters


class _Unread:
    """Type of `_UNREAD`: a value not read from the transaction yet."""


_UNREAD = _Unread()


class Dbs(NamedTuple):
    blocks: Any
    meta: Any
    lru: Any
    pin_refs: Any
    pin_names: Any
    pins: Any
    state: Any
    records: Any
    members: Any


class Writer:
    """One write transaction's operations on the store's sub-databases.

    The counters are read once at the start and written once at the end
    (`finish`). Every method keeps the invariants documented in docs/cache.md:
    `lru` holds exactly the present, unpinned blocks; `pin_refs` counts the pins
    naming an id; the counters match the blocks.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs, held: frozenset[bytes]) -> None:
        self.txn = txn
        self.dbs = dbs
        self.held = held
        self.c = Counters.decode(txn.get(schema.STATE_COUNTERS, db=dbs.state))
        self._start = self.c.encode()
        self._limit: int | None | _Unread = _UNREAD  # read once per transaction
        self._any_pinned: bool | None = None  # whether pin_refs holds anything (None: unread)

    def finish(self) -> None:
        encoded = self.c.encode()
        if encoded != self._start:
            self.txn.put(schema.STATE_COUNTERS, encoded, db=self.dbs.state)

    # -- small pieces ---------------------------------------------------------------

    def limit(self) -> int | None:
        if isinstance(self._limit, _Unread):
            raw = self.txn.get(schema.STATE_LIMIT, db=self.dbs.state)
            self._limit = None if raw is None else schema.decode_u64(raw)
        return self._limit

    def set_limit(self, limit: int | None) -> None:
        self._limit = limit
        if limit is None:
            self.txn.delete(schema.STATE_LIMIT, db=self.dbs.state)
        else:
            self.txn.put(schema.STATE_LIMIT, schema.encode_u64(limit), db=self.dbs.state)

    def tick(self) -> int:
        tick = self.c.next_tick
        self.c.next_tick += 1
        return tick

    def meta(self, block_id: bytes) -> tuple[int, int] | None:
        raw = self.txn.get(block_id, db=self.dbs.meta)
        return None if raw is None else schema.decode_meta(raw)

    def is_pinned(self, block_id: bytes) -> bool:
        # a store without pins (a reader's cache) answers without a lookup per block:
        # one stat per transaction instead
        if self._any_pinned is None:
            self._any_pinned = self.txn.stat(self.dbs.pin_refs)["entries"] > 0
        if not self._any_pinned:
            return False
        return self.txn.get(block_id, db=self.dbs.pin_refs) is not None

    def held_bytes(self) -> int:
        total = 0
        for block_id in self.held:
            meta = self.meta(block_id)
            if meta is not None and not self.is_pinned(block_id):
                total += meta[1]
        return total

    # -- recency --------------------------------------------------------------------

    def touch(self, block_id: bytes) -> None:
        """Make a present block the most recently used."""
        meta = self.meta(block_id)
        if meta is None:
            return
        old_tick, size = meta
        tick = self.tick()
        self.txn.put(block_id, schema.encode_meta(tick, size), db=self.dbs.meta)
        if self.txn.delete(schema.lru_key(old_tick, block_id), db=self.dbs.lru):
            self.txn.put(schema.lru_key(tick, block_id), b"", db=self.dbs.lru)

    # -- blocks ---------------------------------------------------------------------

    def insert(self, block_id: bytes, data: bytes | memoryview, digest: int) -> bool:
        """Store one verified block, evicting LRU blocks to make room; False if it was
        already here.

        A new block costs three LMDB calls (the value put without overwriting,
        which is also the presence check, its meta and LRU keys), a fourth for its
        pin count when the store holds any pins, and its member tag; the limit
        and whether any pins exist are read once per transaction. Each call gives
        the GIL away and waits to get it back, which a busy event loop makes
        slow (it was seven calls). The value goes in before the evictions
        it may need: it is not in the LRU, so they cannot take it, and a refusal
        (StoreFull) aborts the whole transaction.
        """
        value = schema.encode_block_value(digest, data)
        if not self.txn.put(block_id, value, db=self.dbs.blocks, overwrite=False):
            existing = self.txn.get(block_id, db=self.dbs.blocks)
            if existing is not None and schema.block_value_data(existing) is not None:
                self.touch(block_id)
                self.evict_to_limit(keep=block_id)  # may be over it since holds kept blocks
                return False
            self.delete(block_id)  # rotted copy: replaced by the good bytes
            self.txn.put(block_id, value, db=self.dbs.blocks)
        size = len(data)
        pinned = self.is_pinned(block_id)
        limit = self.limit()
        if limit is not None and self.c.total_bytes + size > limit:
            if not pinned and size > limit:
                raise StoreFull(
                    f"a block of {size} bytes is larger than the whole cache limit of {limit} "
                    "bytes; raise the limit"
                )
            self.evict_down_to(limit - size)
            if not pinned and self.c.total_bytes + size > limit:
                raise StoreFull(
                    f"a block of {size} bytes does not fit under the cache limit of {limit} "
                    f"bytes: {self.c.total_bytes} bytes are stored, {self.c.pinned_bytes} of "
                    f"them pinned and {self.held_bytes()} held by reads in flight; unpin "
                    "something or raise the limit"
                )
        tick = self.tick()
        self.txn.put(block_id, schema.encode_meta(tick, size), db=self.dbs.meta)
        if pinned:
            self.c.pinned_bytes += size
            self.c.pinned_count += 1
        else:
            self.txn.put(schema.lru_key(tick, block_id), b"", db=self.dbs.lru)
        self.c.total_bytes += size
        self.c.count += 1
        return True

    def add_member(self, block_id: bytes, tag: bytes) -> None:
        """Record that a present block was stored for `tag` (idempotent)."""
        self.txn.put(schema.member_key(block_id, tag), b"", db=self.dbs.members)

    def _delete_members(self, block_id: bytes) -> None:
        with self.txn.cursor(db=self.dbs.members) as cursor:
            if not cursor.set_range(block_id):
                return
            while cursor.key()[: schema.ID_LEN] == block_id:
                if not cursor.delete():
                    break

    def delete(self, block_id: bytes) -> int:
        """Remove a block whatever holds it, with its member tags; returns its size (0 if absent)."""
        meta = self.meta(block_id)
        if meta is None:
            return 0
        tick, size = meta
        self._delete_members(block_id)
        self.txn.delete(block_id, db=self.dbs.blocks)
        self.txn.delete(block_id, db=self.dbs.meta)
        if self.is_pinned(block_id):
            self.c.pinned_bytes -= size
            self.c.pinned_count -= 1
        else:
            self.txn.delete(schema.lru_key(tick, block_id), db=self.dbs.lru)
        self.c.total_bytes -= size
        self.c.count -= 1
        return size

    def delete_if_rotten(self, block_id: bytes) -> bool:
        value = self.txn.get(block_id, db=self.dbs.blocks)
        if value is None or schema.block_value_data(value) is not None:
            return False
        self.delete(block_id)
        return True

    def evict_down_to(
        self, target: int, keep: bytes | None = None, max_blocks: int | None = None
    ) -> int:
        """Evict least recently used unpinned, unheld blocks (but `keep`) until total <= target.

        Stops early after `max_blocks` blocks, for callers that evict in steps.
        """
        freed = 0
        if self.c.total_bytes <= target:
            return 0
        budget = -1 if max_blocks is None else max_blocks
        cursor = self.txn.cursor(db=self.dbs.lru)
        found = cursor.first()
        while found and self.c.total_bytes > target and budget != 0:
            key = bytes(cursor.key())
            _, block_id = schema.split_lru_key(key)
            if block_id in self.held or block_id == keep:
                found = cursor.next()
                continue
            cursor.delete()
            meta = self.meta(block_id)
            if meta is not None:
                size = meta[1]
                self._delete_members(block_id)  # its tags go with it, as in delete()
                self.txn.delete(block_id, db=self.dbs.blocks)
                self.txn.delete(block_id, db=self.dbs.meta)
                self.c.total_bytes -= size
                self.c.count -= 1
                freed += size
            budget -= 1
            found = cursor.set_range(key)
        return freed

    def evict_to_limit(self, keep: bytes | None = None) -> int:
        limit = self.limit()
        return 0 if limit is None else self.evict_down_to(limit, keep)

    def evict_ids(self, ids: Iterable[bytes]) -> int:
        freed = 0
        for block_id in ids:
            if block_id in self.held or self.is_pinned(block_id):
                continue
            freed += self.delete(block_id)
        return freed

    # -- pins -----------------------------------------------------------------------

    def _ref(self, block_id: bytes, delta: int) -> None:
        """Change how many pins name `block_id`, moving it in or out of the LRU."""
        raw = self.txn.get(block_id, db=self.dbs.pin_refs)
        before = 0 if raw is None else schema.decode_u32(raw)
        after = before + delta
        if after > 0:
            self.txn.put(block_id, schema.encode_u32(after), db=self.dbs.pin_refs)
            self._any_pinned = True
        else:
            self.txn.delete(block_id, db=self.dbs.pin_refs)
        if (before == 0) == (after == 0):
            return
        meta = self.meta(block_id)
        if meta is None:
            return
        tick, size = meta
        if after > 0:  # became pinned
            self.txn.delete(schema.lru_key(tick, block_id), db=self.dbs.lru)
            self.c.pinned_bytes += size
            self.c.pinned_count += 1
        else:  # became evictable, at its old place in the LRU order
            self.txn.put(schema.lru_key(tick, block_id), b"", db=self.dbs.lru)
            self.c.pinned_bytes -= size
            self.c.pinned_count -= 1

    def pin_head(self, name_utf8: bytes) -> tuple[int, int] | None:
        raw = self.txn.get(schema.pin_name_key(name_utf8), db=self.dbs.pin_names)
        if raw is None:
            return None
        number, count, _ = schema.decode_pin_head(raw)
        return number, count

    def _save_pin_head(self, name_utf8: bytes, number: int, count: int) -> None:
        self.txn.put(
            schema.pin_name_key(name_utf8),
            schema.encode_pin_head(number, count, name_utf8),
            db=self.dbs.pin_names,
        )

    def _pin_number(self, name_utf8: bytes) -> tuple[int, int]:
        head = self.pin_head(name_utf8)
        if head is not None:
            return head
        number = self.c.next_pin
        self.c.next_pin += 1
        return number, 0

    def set_pin(self, name_utf8: bytes, ids: set[bytes]) -> None:
        number, _ = self._pin_number(name_utf8)
        old = set(pin_members(self.txn, self.dbs, number))
        for block_id in sorted(ids - old):
            self.txn.put(schema.pin_member_key(number, block_id), b"", db=self.dbs.pins)
            self._ref(block_id, +1)
        for block_id in sorted(old - ids):
            self.txn.delete(schema.pin_member_key(number, block_id), db=self.dbs.pins)
            self._ref(block_id, -1)
        self._save_pin_head(name_utf8, number, len(ids))

    def add_to_pin(self, name_utf8: bytes, ids: Iterable[bytes]) -> None:
        number, count = self._pin_number(name_utf8)
        for block_id in ids:
            if self.txn.put(
                schema.pin_member_key(number, block_id), b"", db=self.dbs.pins, overwrite=False
            ):
                self._ref(block_id, +1)
                count += 1
        self._save_pin_head(name_utf8, number, count)

    def remove_from_pin(self, name_utf8: bytes, ids: Iterable[bytes]) -> None:
        head = self.pin_head(name_utf8)
        if head is None:
            raise UnknownPin(f"no pin named {show_name(name_utf8)}")
        number, count = head
        for block_id in ids:
            if self.txn.delete(schema.pin_member_key(number, block_id), db=self.dbs.pins):
                self._ref(block_id, -1)
                count -= 1
        self._save_pin_head(name_utf8, number, count)

    def unpin(self, name_utf8: bytes) -> bool:
        head = self.pin_head(name_utf8)
        if head is None:
            return False
        self._drop_members(head[0])
        self.txn.delete(schema.pin_name_key(name_utf8), db=self.dbs.pin_names)
        return True

    def replace_pin(self, name_utf8: bytes, source_utf8: bytes) -> None:
        """Pin `name` holds exactly what pin `source` holds; `source` is gone.

        The source's members become the pin's as they are (its number moves
        to the name), then the old members are released: a block in both is
        never unpinned on the way. Nothing is held in memory but a chunk of
        ids, whatever the pins' sizes.
        """
        source = self.pin_head(source_utf8)
        if source is None:
            raise UnknownPin(f"no pin named {show_name(source_utf8)}")
        if source_utf8 == name_utf8:
            return
        old = self.pin_head(name_utf8)
        self.txn.delete(schema.pin_name_key(source_utf8), db=self.dbs.pin_names)
        self._save_pin_head(name_utf8, *source)
        if old is not None:
            self._drop_members(old[0])

    def merge_pin(self, name_utf8: bytes, source_utf8: bytes) -> None:
        """Pin `name` also holds what pin `source` holds; `source` is gone (no-op without
        one). A chunk of ids at a time, whatever the sizes."""
        source = self.pin_head(source_utf8)
        if source is None or source_utf8 == name_utf8:
            return
        number, count = self._pin_number(name_utf8)
        while True:
            chunk = list(itertools.islice(pin_members(self.txn, self.dbs, source[0]), 4096))
            if not chunk:
                break
            for block_id in chunk:
                self.txn.delete(schema.pin_member_key(source[0], block_id), db=self.dbs.pins)
                if self.txn.put(schema.pin_member_key(number, block_id), b"",
                                db=self.dbs.pins, overwrite=False):
                    count += 1  # moved: one pin names it, as before
                else:
                    self._ref(block_id, -1)  # both named it: one fewer now
        self._save_pin_head(name_utf8, number, count)
        self.txn.delete(schema.pin_name_key(source_utf8), db=self.dbs.pin_names)

    def move_to_pin(self, name_utf8: bytes, source_utf8: bytes, ids: list[bytes]) -> None:
        """Pin `name` holds exactly `ids` (sorted, distinct); pin `source` is gone.

        An id `source` held moves over: one pin names it before and after, so
        its count and its place (pinned) stay as they are; an id `source`
        lacked is added, and what `source` held beyond `ids` is released. Per
        id that is a delete and a put, where `set_pin` then `unpin` cost two
        of each and two count updates (a publish of 10^6 files moves 10^6
        ids from its pending pin to its version's pin). A `name` that already
        exists gets `set_pin`'s exact set first.
        """
        source = self.pin_head(source_utf8)
        if source_utf8 == name_utf8 or self.pin_head(name_utf8) is not None:
            self.set_pin(name_utf8, set(ids))
            if source is not None and source_utf8 != name_utf8:
                self.unpin(source_utf8)
            return
        number, _ = self._pin_number(name_utf8)
        for block_id in ids:
            self.txn.put(schema.pin_member_key(number, block_id), b"", db=self.dbs.pins)
            if source is None or not self.txn.delete(schema.pin_member_key(source[0], block_id),
                                                     db=self.dbs.pins):
                self._ref(block_id, +1)
        self._save_pin_head(name_utf8, number, len(ids))
        if source is not None:
            self._drop_members(source[0])
            self.txn.delete(schema.pin_name_key(source_utf8), db=self.dbs.pin_names)

    def _drop_members(self, number: int) -> None:
        """Release every member of pin `number`, a chunk at a time."""
        while True:
            chunk = list(itertools.islice(pin_members(self.txn, self.dbs, number), 4096))
            if not chunk:
                return
            for block_id in chunk:
                self.txn.delete(schema.pin_member_key(number, block_id), db=self.dbs.pins)
                self._ref(block_id, -1)


def pin_members(txn: lmdb.Transaction, dbs: Dbs, number: int) -> Iterator[bytes]:
    prefix = schema.pin_prefix(number)
    cursor = txn.cursor(db=dbs.pins)
    if not cursor.set_range(prefix):
        return
    for key in cursor.iternext(keys=True, values=False):
        key = bytes(key)
        if not key.startswith(prefix):
            return
        yield key[len(prefix) :]


def show_name(name_utf8: bytes) -> str:
    return repr(name_utf8.decode("utf-8", "surrogateescape"))
