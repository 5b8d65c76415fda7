"""A shared/exclusive gate around one process's use of an LMDB environment.

LMDB allows any number of transactions at once, but changing the size of the
memory map (`mdb_env_set_mapsize`) or closing the environment is only allowed
while *no* transaction of this process is open: the map is unmapped and mapped
again. Every transaction therefore runs inside `shared()`, and a resize or
close runs inside `exclusive()`, which waits for the open transactions to end
and keeps new ones out (waiting exclusive users go first, so a steady stream of
reads cannot starve a resize).

`shared()` is re-entrant per thread. A thread that holds it cannot enter
`exclusive()` (it would wait for itself forever); it gets `StoreError` instead,
and so does an exclusive user that waited `exclusive_timeout` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cache.errors import StoreError


class ResizeGate:
    def __init__(self, exclusive_timeout: float = 60.0) -> None:
        # A resize waits this long for open transactions (views) to end, then gives up
        # with an error: a view held across an await that waits for the resizing
        # thread would otherwise be a deadlock.
        self.exclusive_timeout = exclusive_timeout
        self._cond = threading.Condition(threading.Lock())
        self._active = 0  # threads inside shared()
        self._exclusive = False
        self._waiting_exclusive = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def acquire_shared(self) -> None:
        depth = self._depth()
        if depth == 0:
            with self._cond:
                while self._exclusive or self._waiting_exclusive:
                    self._cond.wait()
                self._active += 1
        self._local.depth = depth + 1

    def release_shared(self) -> None:
        depth = self._local.depth - 1
        self._local.depth = depth
        if depth == 0:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self._depth():
            raise StoreError(
                "the block store must resize or close its map while this thread still has a "
                "block view open; leave the get_view() block first"
            )
        deadline = time.monotonic() + self.exclusive_timeout
        with self._cond:
            self._waiting_exclusive += 1
            try:
                while self._exclusive or self._active:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError(
                            "the block store could not resize or close its map: a block view "
                            f"stayed open for over {self.exclusive_timeout:.0f} s (do not await "
                            "inside get_view())"
                        )
                    self._cond.wait(left)
            finally:
                self._waiting_exclusive -= 1
                self._cond.notify_all()  # shared users waiting behind us may go on
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
