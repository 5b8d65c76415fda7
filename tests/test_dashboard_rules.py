"""The dashboard's pure decisions: who may ask, how safe a drive is, where it may act."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashboard.collect import mount_of, percent, safety
from dashboard.security import allowed, new_token
from vfs.errors import UsageError

TOKEN = new_token()


def test_token_rules() -> None:
    assert len(TOKEN) >= 43 and new_token() != TOKEN  # 32 random bytes, url-safe
    assert allowed("GET", TOKEN, None, TOKEN) and allowed("GET", None, TOKEN, TOKEN)
    assert allowed("HEAD", TOKEN, None, TOKEN)
    assert not allowed("GET", None, None, TOKEN)
    assert not allowed("GET", TOKEN[:-1], None, TOKEN)
    assert not allowed("GET", "", "", TOKEN)
    # a change needs the header: a link or a form can carry the token only in the URL/body
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert not allowed(method, TOKEN, None, TOKEN)
        assert not allowed(method, TOKEN, "wrong", TOKEN)
        assert allowed(method, None, TOKEN, TOKEN)


@given(st.text(max_size=60), st.text(max_size=60), st.sampled_from(["GET", "POST", "DELETE"]))
def test_no_other_token_passes(query: str, header: str, method: str) -> None:
    if TOKEN not in (query, header):
        assert not allowed(method, query, header, TOKEN)


def test_safety_light() -> None:
    assert safety(None, False, True) == "red"  # unknown: nothing known to be safe
    assert safety(0, False, False) == "red"  # nowhere whole
    assert safety(1, True, True) == "red"  # only here
    assert safety(1, False, False) == "amber"  # one other copy
    assert safety(2, True, True) == "amber"  # here and one other
    assert safety(3, True, False) == "amber"  # two others, none always on
    assert safety(3, True, True) == "green"
    assert safety(2, False, True) == "green"
    assert percent(0, 0) == 100.0 and percent(1, 3) == 33.3 and percent(5, 4) == 100.0


def test_acts_only_inside_live_mounts(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    (mnt / "a").mkdir(parents=True)
    (tmp_path / "mnt2").mkdir()
    os.symlink(tmp_path, mnt / "a" / "escape")
    mounts = [{"mountpoint": str(mnt), "pid": 1, "drive": "d"}]
    assert mount_of(str(mnt / "a"), mounts)["drive"] == "d"
    assert mount_of(str(mnt), mounts)["drive"] == "d"
    for outside in (tmp_path / "mnt2", mnt / "a" / "escape", mnt / ".." / "mnt2", Path("/etc")):
        with pytest.raises(UsageError, match="not inside a live peerdrive mount"):
            mount_of(str(outside), mounts)
