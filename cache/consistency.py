"""A full check of the block store's invariants, for tests, `peerdrive status` and support.

Reads one consistent snapshot (a read transaction) and reports, in words, every
place where the sub-databases disagree with each other or with the counters.
An empty list means the store is consistent.
"""

from __future__ import annotations

from collections import Counter

import lmdb

from cache import schema
from cache.schema import Counters
from cache.writer import Dbs


def find_problems(txn: lmdb.Transaction, dbs: Dbs, *, deep: bool = False) -> list[str]:
    """Every inconsistency in the snapshot `txn` sees; `deep` also hashes every block (slow)."""
    problems: list[str] = []
    d = dbs
    c = Counters.decode(txn.get(schema.STATE_COUNTERS, db=d.state))
    refs = {bytes(k): schema.decode_u32(v) for k, v in txn.cursor(db=d.pin_refs)}
    pins: dict[int, tuple[str, int]] = {}
    for value in txn.cursor(db=d.pin_names).iternext(keys=False):
        number, members, name = schema.decode_pin_head(value)
        pins[number] = (name, members)
    counted: Counter[bytes] = Counter()
    per_pin: Counter[int] = Counter()
    for key in txn.cursor(db=d.pins).iternext(values=False):
        number = schema.decode_u64(key[:8])
        per_pin[number] += 1
        counted[bytes(key[8:])] += 1
        if number not in pins:
            problems.append(f"pin member of unknown pin number {number}")
    for number, (name, members) in pins.items():
        if per_pin[number] != members:
            problems.append(f"pin {name!r} says {members} members, has {per_pin[number]}")
        if number >= c.next_pin:
            problems.append(f"pin {name!r} has number {number} >= next {c.next_pin}")
    if dict(counted) != refs:
        problems.append("pin_refs do not match the pin members")
    lru = {}
    for key in txn.cursor(db=d.lru).iternext(values=False):
        tick, block_id = schema.split_lru_key(key)
        lru[block_id] = tick
    total = count = pinned_bytes = pinned_count = 0
    for key, raw in txn.cursor(db=d.meta):
        block_id = bytes(key)
        tick, size = schema.decode_meta(raw)
        total += size
        count += 1
        if tick >= c.next_tick:
            problems.append(f"block {block_id.hex()} tick {tick} >= clock {c.next_tick}")
        value = txn.get(block_id, db=d.blocks)
        if value is None:
            problems.append(f"block {block_id.hex()} has metadata but no bytes")
            continue
        if schema.block_value_size(value) != size:
            problems.append(f"block {block_id.hex()} size differs from its metadata")
        data = schema.block_value_data(value)
        if data is None:
            problems.append(f"block {block_id.hex()} fails its checksum")
        elif deep and schema.block_id_of(data) != block_id:
            problems.append(f"block {block_id.hex()} does not hash to its id")
        if block_id in refs:
            pinned_bytes += size
            pinned_count += 1
            if block_id in lru:
                problems.append(f"pinned block {block_id.hex()} is in the LRU")
        elif lru.pop(block_id, None) != tick:
            problems.append(f"block {block_id.hex()} is not in the LRU at its tick")
    for block_id in lru:
        if block_id not in refs:
            problems.append(f"LRU entry for absent block {block_id.hex()}")
    if txn.stat(d.blocks)["entries"] != count:
        problems.append("blocks and metadata differ in number")
    if (total, count) != (c.total_bytes, c.count):
        problems.append(
            f"counters say {c.count} blocks, {c.total_bytes} bytes; found {count}, {total}"
        )
    if (pinned_bytes, pinned_count) != (c.pinned_bytes, c.pinned_count):
        problems.append(
            f"counters say {c.pinned_count} pinned blocks, {c.pinned_bytes} bytes; "
            f"found {pinned_count}, {pinned_bytes}"
        )
    for key in txn.cursor(db=d.members).iternext(values=False):
        key = bytes(key)
        if len(key) != schema.ID_LEN + schema.TAG_LEN:
            problems.append(f"member key of {len(key)} bytes")
        elif txn.get(key[: schema.ID_LEN], db=d.meta) is None:
            problems.append(f"member tag of absent block {key[: schema.ID_LEN].hex()}")
    return problems
