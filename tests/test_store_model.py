"""The block store against a plain in-memory model, driven by hypothesis.

The model is an exact, sequential LRU cache with pins and holds: a list of
present blocks, least recently used first. Every rule runs the same operation
on the store and on the model and compares results; the invariants compare
the whole observable state after every step. Bit rot is simulated by flipping
bytes inside data.mdb behind LMDB's back: the store must then report the
block missing, never return wrong bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cache.errors import StoreFull, UnknownPin
from cache.store import BlockStore, PinProgress
from tests.test_store import corrupt_on_disk, make_block

SIZES = [64, 300, 700, 900, 1200, 1800, 2048, 2500, 3300, 4000, 5000, 9000]
POOL = [make_block(f"model{i}", size) for i, size in enumerate(SIZES)]
INDEXES = st.integers(min_value=0, max_value=len(POOL) - 1)
INDEX_SETS = st.sets(INDEXES, max_size=6)
PIN_NAMES = st.sampled_from(["a", "b", "c"])
LIMITS = st.sampled_from([None, 3000, 6000, 8000, 12000, 20000])


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="peerdrive-store-model-")
        self.store: BlockStore | None = None
        self.limit: int | None = None
        self.present: dict[int, int] = {}  # index -> size, rotten ones included
        self.recency: list[int] = []  # present indexes, least recently used first
        self.rotten: set[int] = set()
        self.pins: dict[str, set[int]] = {}
        self.holds: list[tuple[ExitStack, list[int]]] = []
        self.guarded: set[int] = set()  # pinned, present, sound after the last step
        self.lost_to_rot: set[int] = set()  # dropped for failing their checksum this step

    @initialize(limit=LIMITS)
    def open_store(self, limit: int | None) -> None:
        self.store = BlockStore(self.dir, sync=False, limit_bytes=limit, touch_batch=5)
        self.limit = limit

    def teardown(self) -> None:
        for stack, _ in self.holds:
            stack.close()
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the model ---------------------------------------------------------------------

    @property
    def s(self) -> BlockStore:
        assert self.store is not None
        return self.store

    def pinned(self, i: int) -> bool:
        return any(i in ids for ids in self.pins.values())

    def held(self, i: int) -> bool:
        return any(i in ids for _, ids in self.holds)

    def total(self) -> int:
        return sum(self.present.values())

    def remove(self, i: int) -> None:
        del self.present[i]
        self.recency.remove(i)
        self.rotten.discard(i)

    def touch(self, i: int) -> None:
        self.recency.remove(i)
        self.recency.append(i)

    def evict_down_to(self, target: int, keep: int | None = None) -> int:
        freed = 0
        for i in [i for i in self.recency if not self.pinned(i) and not self.held(i)]:
            if i == keep:
                continue
            if self.total() <= target:
                break
            freed += self.present[i]
            self.remove(i)
        return freed

    def evict_to_limit(self) -> None:
        if self.limit is not None:
            self.evict_down_to(self.limit)

    def snapshot(self) -> tuple[dict[int, int], list[int], set[int]]:
        return dict(self.present), list(self.recency), set(self.rotten)

    def restore(self, snap: tuple[dict[int, int], list[int], set[int]]) -> None:
        self.present, self.recency, self.rotten = dict(snap[0]), list(snap[1]), set(snap[2])

    def model_put(self, i: int) -> bool | None:
        """True: stored; False: already there; None: StoreFull (model unchanged)."""
        if i in self.present and i not in self.rotten:
            self.touch(i)
            if self.limit is not None:
                self.evict_down_to(self.limit, keep=i)
            return False
        snap = self.snapshot()
        if i in self.rotten:
            self.remove(i)
            self.lost_to_rot.add(i)
        size = SIZES[i]
        pinned = self.pinned(i)
        if self.limit is not None and self.total() + size > self.limit:
            if not pinned and size > self.limit:
                self.restore(snap)
                return None
            self.evict_down_to(self.limit - size)
            if not pinned and self.total() + size > self.limit:
                self.restore(snap)
                return None
        self.present[i] = size
        self.recency.append(i)
        return True

    def check_limit_after_write(self, just_put: int | None = None) -> None:
        """After a write: under the limit unless pinned + held data (+ the block just put,
        which a put never evicts) alone exceed it."""
        if self.limit is None:
            return
        kept = sum(
            size
            for i, size in self.present.items()
            if self.pinned(i) or self.held(i) or i == just_put
        )
        if kept <= self.limit:
            assert self.s.total_bytes <= self.limit

    # -- rules --------------------------------------------------------------------------

    @rule(i=INDEXES)
    def put(self, i: int) -> None:
        expected = self.model_put(i)
        if expected is None:
            with pytest.raises(StoreFull):
                self.s.put(*POOL[i])
            self.evict_to_limit()  # a refused put still brings the store under its limit
        else:
            assert self.s.put(*POOL[i]) is expected
        self.check_limit_after_write(just_put=i)

    @rule(items=st.lists(INDEXES, min_size=1, max_size=4))
    def put_many(self, items: list[int]) -> None:
        snap = self.snapshot()
        results = [self.model_put(i) for i in items]
        if None in results:
            self.restore(snap)
            with pytest.raises(StoreFull):
                self.s.put_many([POOL[i] for i in items])
            self.evict_to_limit()  # a refused put still brings the store under its limit
        else:
            assert self.s.put_many([POOL[i] for i in items]) == sum(bool(r) for r in results)
        self.check_limit_after_write(just_put=items[-1])

    def model_get(self, i: int) -> bytes | None:
        if i not in self.present:
            return None
        if i in self.rotten:
            self.remove(i)
            self.lost_to_rot.add(i)
            return None
        self.touch(i)
        return POOL[i][1]

    @rule(i=INDEXES)
    def get(self, i: int) -> None:
        assert self.s.get(POOL[i][0]) == self.model_get(i)

    @rule(i=INDEXES)
    def get_view(self, i: int) -> None:
        expected = self.model_get(i)
        with self.s.get_view(POOL[i][0]) as view:
            assert (None if view is None else bytes(view)) == expected

    @rule(name=PIN_NAMES, ids=INDEX_SETS)
    def set_pin(self, name: str, ids: set[int]) -> None:
        self.pins[name] = set(ids)
        self.evict_to_limit()
        self.s.set_pin(name, [POOL[i][0] for i in ids])
        self.check_limit_after_write()

    @rule(name=PIN_NAMES, ids=INDEX_SETS)
    def add_to_pin(self, name: str, ids: set[int]) -> None:
        self.pins.setdefault(name, set()).update(ids)
        self.s.add_to_pin(name, [POOL[i][0] for i in ids])

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), ids=INDEX_SETS)
    def remove_from_pin(self, data: st.DataObject, ids: set[int]) -> None:
        name = data.draw(st.sampled_from(sorted(self.pins)))
        self.pins[name] -= ids
        self.evict_to_limit()
        self.s.remove_from_pin(name, [POOL[i][0] for i in ids])
        self.check_limit_after_write()

    @rule(name=PIN_NAMES, source=PIN_NAMES)
    def replace_pin(self, name: str, source: str) -> None:
        if source not in self.pins:
            with pytest.raises(UnknownPin):
                self.s.replace_pin(name, source)
            return
        self.pins[name] = self.pins.pop(source)
        self.evict_to_limit()
        self.s.replace_pin(name, source)
        self.check_limit_after_write()

    @rule(name=PIN_NAMES, source=PIN_NAMES)
    def merge_pin(self, name: str, source: str) -> None:
        if source in self.pins and source != name:
            self.pins.setdefault(name, set()).update(self.pins.pop(source))
        self.s.merge_pin(name, source)

    @rule(name=PIN_NAMES)
    def unpin(self, name: str) -> None:
        existed = self.pins.pop(name, None) is not None
        self.evict_to_limit()
        assert self.s.unpin(name) is existed
        self.check_limit_after_write()

    @rule(ids=INDEX_SETS)
    def evict(self, ids: set[int]) -> None:
        freed = 0
        for i in sorted(ids):
            if i in self.present and not self.pinned(i) and not self.held(i):
                freed += self.present[i]
                self.remove(i)
        assert self.s.evict([POOL[i][0] for i in sorted(ids)]) == freed

    @rule(goal=st.integers(min_value=0, max_value=25000))
    def evict_to(self, goal: int) -> None:
        assert self.s.evict_to(goal) == self.evict_down_to(goal)

    @rule(limit=LIMITS)
    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        freed = 0 if limit is None else self.evict_down_to(limit)
        assert self.s.set_limit(limit) == freed
        self.check_limit_after_write()

    @rule(ids=st.lists(INDEXES, min_size=1, max_size=3))
    def hold(self, ids: list[int]) -> None:
        stack = ExitStack()
        stack.enter_context(self.s.hold([POOL[i][0] for i in ids]))
        self.holds.append((stack, ids))

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(min_value=0, max_value=len(self.holds) - 1))
        stack, _ = self.holds.pop(k)
        stack.close()

    @rule()
    def flush(self) -> None:
        self.s.flush()
        assert self.s.pending_touches == 0

    @rule()
    def restart(self) -> None:
        for stack, _ in self.holds:  # holds belong to the process that made them
            stack.close()
        self.holds.clear()
        self.s.close()
        self.store = BlockStore(self.dir, sync=False, touch_batch=5)
        assert self.s.limit_bytes == self.limit

    @precondition(lambda self: set(self.present) - self.rotten)
    @rule(data=st.data())
    def rot(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(set(self.present) - self.rotten)))
        assert corrupt_on_disk(self.dir, POOL[i][1]) >= 1
        self.rotten.add(i)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def same_blocks(self) -> None:
        if self.store is None:
            return
        ids = [block_id for block_id, _ in POOL]
        assert self.s.missing(ids) == [
            POOL[i][0] for i in range(len(POOL)) if i not in self.present
        ]
        assert self.s.total_bytes == self.total()
        assert self.s.count == len(self.present)
        pinned_bytes = sum(size for i, size in self.present.items() if self.pinned(i))
        assert self.s.pinned_bytes == pinned_bytes

    @invariant()
    def same_lru_order(self) -> None:
        if self.store is None:
            return
        expected = [POOL[i][0] for i in self.recency if not self.pinned(i)]
        assert self.s.eviction_order() == expected

    @invariant()
    def same_pins(self) -> None:
        if self.store is None:
            return
        assert self.s.pin_names() == sorted(self.pins)
        for name, ids in self.pins.items():
            assert self.s.pin_ids(name) == sorted(POOL[i][0] for i in ids)
            present = [i for i in ids if i in self.present]
            assert self.s.pin_progress(name) == PinProgress(
                len(present), sum(SIZES[i] for i in present), len(ids)
            )

    @invariant()
    def pinned_blocks_stay(self) -> None:
        if self.store is None:
            return
        for i in self.guarded:
            if self.pinned(i) and i not in self.rotten and i not in self.lost_to_rot:
                assert self.s.has(POOL[i][0]), f"pinned block {i} disappeared"
        self.guarded = {i for i in self.present if self.pinned(i) and i not in self.rotten}
        self.lost_to_rot.clear()

    @invariant()
    def consistent_but_for_rot(self) -> None:
        if self.store is None:
            return
        problems = self.s.check_consistency()
        assert len(problems) == len(self.rotten)
        assert all("fails its checksum" in p for p in problems)


StoreModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_against_model = StoreModel.TestCase
