"""What one DHT node holds for others: verified records only, bounded, expiring."""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from kademlia.storage import IStorage

from dht.records import (
    MAX_PROVIDERS_PER_KEY,
    MutableRecord,
    ProviderRecord,
    ProviderSet,
    RecordError,
    source_group,
)

from .keys import _is_key, provider_key
from .limits import FIND_VALUE_BUDGET, MAX_STORED_KEYS, MUTABLE_STORE_TTL, TAG_MUTABLE, TAG_PROVIDER

log = logging.getLogger(__name__)

class _KeysBySource:
    """Which source group stored each key, so a full table evicts from the group holding most.

    Node keys and drive keys are free: a sender signing thousands of junk records
    must not flush everyone else's (the table used to evict the oldest key, whoever
    stored it). Each key counts for the group (/24, /48; None: this node) that
    stored it last; the victim is the oldest key of the largest group, so a
    flooder churns its own keys. O(groups) per eviction, O(1) otherwise.
    """

    def __init__(self) -> None:
        self._group: dict[bytes, Hashable] = {}
        self._keys: dict[Hashable, OrderedDict[bytes, None]] = {}

    def stored(self, key: bytes, group: Hashable) -> None:
        self.forget(key)
        self._group[key] = group
        self._keys.setdefault(group, OrderedDict())[key] = None

    def forget(self, key: bytes) -> None:
        if key in self._group:
            group = self._group.pop(key)
            keys = self._keys[group]
            del keys[key]
            if not keys:
                del self._keys[group]

    def victim(self) -> bytes | None:
        if not self._keys:
            return None
        return next(iter(max(self._keys.values(), key=len)))


class RecordStorage(IStorage):
    """What one DHT node holds for others: verified records only, bounded, expiring.

    Values handed in and out are *tagged*: one tag byte (`TAG_MUTABLE` or
    `TAG_PROVIDER`) followed by the record's wire bytes. `offer` is the single
    door in; it decodes and verifies, checks that the record belongs under the
    key, and applies the replacement rules.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        mutable_ttl: float = MUTABLE_STORE_TTL,
        max_keys: int = MAX_STORED_KEYS,
        providers_per_key: int = MAX_PROVIDERS_PER_KEY,
    ) -> None:
        self._clock = clock
        self._mutable_ttl = mutable_ttl
        self._max_keys = max_keys
        self._providers_per_key = providers_per_key
        # key -> (time last stored, record); oldest first
        self._mutable: OrderedDict[bytes, tuple[float, MutableRecord]] = OrderedDict()
        # key -> provider set; least recently offered first
        self._providers: OrderedDict[bytes, ProviderSet] = OrderedDict()
        # every key held, sorted: the keys XOR-closest to an id sit around its position
        self._index: list[bytes] = []
        self._mutable_from = _KeysBySource()
        self._providers_from = _KeysBySource()

    def _indexed(self, key: bytes) -> None:
        i = bisect.bisect_left(self._index, key)
        if i == len(self._index) or self._index[i] != key:
            self._index.insert(i, key)

    def _unindexed(self, key: bytes) -> None:
        if key not in self._mutable:
            self._mutable_from.forget(key)
        if key not in self._providers:
            self._providers_from.forget(key)
        if key in self._mutable or key in self._providers:
            return
        i = bisect.bisect_left(self._index, key)
        if i < len(self._index) and self._index[i] == key:
            del self._index[i]

    def keys_near(self, node_id: bytes, count: int) -> list[bytes]:
        """Up to `count` held keys sharing the longest prefixes with `node_id` (O(log n + count)).

        Keys with a common prefix of at least L bits with `node_id` form one run
        of the sorted index around its position, so the nearest by XOR are among
        its neighbours there.
        """
        i = bisect.bisect_left(self._index, node_id)
        return self._index[max(0, i - count // 2) : i + (count + 1) // 2]

    # -- the door in

    def offer(self, key: bytes, value: bytes, source: str | None = None) -> bool:
        """Verify and store a tagged value under `key`; False (and nothing stored) if refused.

        `source` is the IP address the value came from (None: this node), which a
        full provider set uses to spread its places over senders (`ProviderSet`).
        """
        if not _is_key(key) or not isinstance(value, bytes) or len(value) < 2:
            return False
        tag, wire = value[0], value[1:]
        group = None if source is None else source_group(source)
        try:
            if tag == TAG_MUTABLE:
                return self._offer_mutable(key, MutableRecord.decode(wire), group)
            if tag == TAG_PROVIDER:
                now = self._clock()
                return self._offer_provider(key, ProviderRecord.decode(wire, now=now), now,
                                            group)
        except RecordError as exc:
            log.debug("refused a value for %s: %s", key.hex()[:16], exc)
        return False

    def _offer_mutable(self, key: bytes, record: MutableRecord, group: str | None) -> bool:
        if record.key != key:
            return False
        now = self._clock()
        self._cull_mutable(now)
        current = self._mutable.get(key)
        if current is not None:
            held = current[1]
            if record.seq < held.seq:
                return False
            if record.seq == held.seq:
                # equal seq, other bytes (two writers signed one seq while apart): the
                # larger wire wins, as every reader orders them (records.newest_mutable);
                # keeping the first one here would hide the winner from the loser, which
                # then never rebases onto it
                if record.wire < held.wire:
                    return False
                if record.wire == held.wire:
                    record = held
            del self._mutable[key]
        elif len(self._mutable) >= self._max_keys:
            victim = self._mutable_from.victim()
            del self._mutable[victim]
            self._unindexed(victim)
        self._mutable[key] = (now, record)
        self._mutable_from.stored(key, group)
        self._indexed(key)
        return True

    def _offer_provider(self, key: bytes, record: ProviderRecord, now: float,
                        group: str | None) -> bool:
        if provider_key(record.dk) != key:
            return False
        pset = self._providers.pop(key, None)
        if pset is None:
            if len(self._providers) >= self._max_keys:
                self.cull()
            if len(self._providers) >= self._max_keys:
                victim = self._providers_from.victim()
                del self._providers[victim]
                self._unindexed(victim)
            pset = ProviderSet(record.dk, self._providers_per_key)
        accepted = pset.offer(record, now, group)
        if len(pset):
            self._providers[key] = pset
            if accepted:
                self._providers_from.stored(key, group)
            self._indexed(key)
        else:
            self._unindexed(key)
        return accepted

    # -- reads

    def mutable(self, key: bytes) -> MutableRecord | None:
        """The live mutable record stored under `key`, if any (amortised O(1))."""
        self._cull_mutable(self._clock())
        entry = self._mutable.get(key)
        return None if entry is None else entry[1]

    def providers(self, key: bytes) -> list[ProviderRecord]:
        """Live provider records under `key`, latest-expiring first.

        Only this key's set is culled: a read costs O(one set), never O(every set)
        (a find_value is a request any stranger may send).
        """
        pset = self._providers.get(key)
        if pset is None:
            return []
        records = pset.records(self._clock())
        if not records:
            del self._providers[key]
            self._unindexed(key)
        return records

    def values(self, key: bytes, budget: int = FIND_VALUE_BUDGET) -> list[bytes]:
        """Tagged values under `key` for a find_value reply, at most `budget` bytes in all."""
        out: list[bytes] = []
        used = 0
        record = self.mutable(key)
        if record is not None:
            out.append(bytes([TAG_MUTABLE]) + record.wire)
            used += len(record.wire) + 1
        for provider in self.providers(key):
            size = len(provider.wire) + 1
            if used + size > budget:
                break
            out.append(bytes([TAG_PROVIDER]) + provider.wire)
            used += size
        return out

    def _cull_mutable(self, now: float) -> None:
        """Drop mutable records not re-stored within their TTL (oldest first: amortised O(1))."""
        while self._mutable:
            key, (stored, _) = next(iter(self._mutable.items()))
            if stored > now - self._mutable_ttl:
                break
            del self._mutable[key]
            self._unindexed(key)

    def cull(self) -> None:
        """Drop stale mutable records and expired provider records: O(stored), for upkeep only."""
        now = self._clock()
        self._cull_mutable(now)
        for key in list(self._providers):
            pset = self._providers[key]
            pset.expire(now)
            if not len(pset):
                del self._providers[key]
                self._unindexed(key)

    def counts(self) -> dict[str, int]:
        """How much is held right now, entries expired but not yet dropped included (no
        cull: what the upkeep left is what a long-running node's status shows)."""
        return {"mutable_keys": len(self._mutable), "provider_keys": len(self._providers),
                "provider_records": sum(len(p) for p in self._providers.values()),
                "indexed_keys": len(self._index)}

    def __len__(self) -> int:
        self.cull()
        return len(self._mutable) + sum(len(p) for p in self._providers.values())

    # -- the kademlia IStorage interface

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if not self.offer(key, value):
            raise RecordError("the DHT storage refused this value (invalid, stale or misplaced)")

    def __getitem__(self, key: bytes) -> list[bytes]:
        values = self.values(key)
        if not values:
            raise KeyError(key)
        return values

    def get(self, key: bytes, default: Any = None) -> Any:
        return self.values(key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Mutable records last stored more than `seconds_old` ago (tagged).

        Provider records are re-signed and republished by their owners, never by
        the nodes that store them, so they are not listed.
        """
        self.cull()
        limit = self._clock() - seconds_old
        return [
            (key, bytes([TAG_MUTABLE]) + record.wire)
            for key, (stored, record) in self._mutable.items()
            if stored <= limit
        ]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self.cull()
        items: list[tuple[bytes, bytes]] = [
            (key, bytes([TAG_MUTABLE]) + record.wire) for key, (_, record) in self._mutable.items()
        ]
        now = self._clock()
        for key, pset in self._providers.items():
            items.extend((key, bytes([TAG_PROVIDER]) + r.wire) for r in pset.records(now))
        return iter(items)
