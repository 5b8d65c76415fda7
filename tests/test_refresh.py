"""Which listed folders the mount stats, and when (vfs/refresh.py; pure, times given)."""

from __future__ import annotations

from vfs.refresh import FolderRefresh


def test_a_folder_is_due_only_once_it_settled_and_once_however_often_listed() -> None:
    r = FolderRefresh(settle=0.5)
    assert r.next_due() is None and r.due(100.0) == []
    r.listed(7, 10.0)
    r.listed(7, 10.2)  # listed to its end again before its stat: still one stat
    r.listed(3, 10.1)
    assert len(r) == 2 and r.next_due() == 10.5
    assert r.due(10.49) == []  # the kernel may not have marked it yet
    assert r.due(10.55) == [7]
    assert r.due(11.0) == [3] and r.next_due() is None
    r.listed(7, 12.0)  # a later listing (a new version's): due again
    assert r.due(12.5) == [7]


def test_past_its_bound_the_oldest_waiting_folder_is_let_go() -> None:
    r = FolderRefresh(settle=1.0, max_waiting=3)
    for ino in (1, 2, 3, 4):
        r.listed(ino, 0.0)
    assert len(r) == 3
    r.listed(1, 0.5)  # let go, so it may wait again
    assert r.due(5.0) == [3, 4, 1]
