"""Listed folders whose kernel attributes the mount refreshes itself, and when (pure code).

After every READDIR it sends, the kernel marks the folder's atime stale
(`fuse_invalidate_atime` in fs/fuse/readdir.c; skipped only on a read-only
superblock, which a peerdrive mount cannot be: pins are set with setxattr).
The next stat(2) of the folder then asks the mount for its attributes again
(a GETATTR), whatever the attribute timeout. A cold `find` or `ls -lR` stats
each folder *before* listing it, so the listing leaves every folder stale and
the first warm walk sent one GETATTR per folder: 201 of the 201 requests a
warm `find` over 200 folders sent, doubling its time (issue 12).

So the mount stats each folder itself shortly after answering the READDIR
that ended its listing (the empty one): its own stat sends that GETATTR
while the cold walk goes on, and the warm walk finds every folder fresh. The
kernel marks the folder stale only once the lister's getdents(2) has taken
our reply, which the mount cannot see, so a folder waits `settle` seconds
before its stat; a stat that still came first costs one GETATTR in the next
walk, nothing else. This object only decides which folders are due when;
`vfs.fs.DriveOperations` makes the stats (in a worker thread: the stat's
GETATTR is answered by the event loop).
"""

from __future__ import annotations

from collections import deque

# Seconds between the READDIR that ended a folder's listing and the mount's stat of it.
SETTLE = 0.02
# Folders waiting at most: a walk faster than the stats forgets the oldest (one GETATTR
# each in the next walk, as before).
MAX_WAITING = 65536


class FolderRefresh:
    """Folders (by inode) listed to their end, and when each is due for its stat."""

    def __init__(self, settle: float = SETTLE, max_waiting: int = MAX_WAITING) -> None:
        self.settle = settle
        self._waiting: deque[tuple[float, int]] = deque(maxlen=max_waiting)
        self._queued: set[int] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    def listed(self, ino: int, now: float) -> None:
        """The listing of folder `ino` ended at `now` (one stat for it, however many ends)."""
        if ino in self._queued:
            return
        if len(self._waiting) == self._waiting.maxlen:
            self._queued.discard(self._waiting[0][1])
        self._waiting.append((now + self.settle, ino))
        self._queued.add(ino)

    def next_due(self) -> float | None:
        """When the first waiting folder is due, or None if none waits."""
        return self._waiting[0][0] if self._waiting else None

    def due(self, now: float) -> list[int]:
        """The folders due by `now`, in the order they were listed; they wait no more."""
        out: list[int] = []
        while self._waiting and self._waiting[0][0] <= now:
            _, ino = self._waiting.popleft()
            self._queued.discard(ino)
            out.append(ino)
        return out
