"""The command line's contracts, checked in process: exit codes, config.toml, status data.

README: "Exit codes: 0 ok, 1 other failure, 2 usage or bad link, 3 corrupt or
forged data, 4 data unavailable (no peer, no head), 5 no space, 6 mount
failure, 130 interrupted." `vfs.cli.main` is the one place errors become exit
codes; here every error a command can raise is sent through it. The same
codes from real processes are in tests/test_cli_process.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from pathlib import Path

import pytest

import vfs.cli as cli
from cache.errors import StoreError, StoreFull
from vfs import errors
from vfs.home import Home
from vfs.node import network_for
from vfs.options import MOUNT_LISTEN, SERVE_LISTEN, NodeOptions
from vfs.status import node_status

EXPECTED_EXIT = [
    (None, 0),
    (errors.PeerdriveError("other"), 1),
    (StoreError("store broke"), 1),
    (FileNotFoundError(2, "No such file or directory", "/x"), 1),
    (errors.UsageError("bad path"), 2),
    (errors.LinkError("bad link"), 2),
    (errors.FormatError("malformed"), 3),
    (errors.IntegrityError("forged"), 3),
    (errors.RollbackError("older head"), 3),
    (errors.BlockUnavailable("no peer"), 4),
    (errors.DriveNotFound("no head"), 4),
    (errors.NoSpaceError("disk full"), 5),
    (StoreFull("store full"), 5),
    (errors.MountError("not a directory"), 6),
    (KeyboardInterrupt(), 130),
    # a nursery's group holding one real error: that error's code
    (ExceptionGroup("nursery", [errors.IntegrityError("forged")]), 3),
]


@pytest.mark.parametrize(("raised", "code"), EXPECTED_EXIT,
                         ids=[f"{type(r).__name__}-{c}" for r, c in EXPECTED_EXIT])
def test_every_error_has_its_exit_code(monkeypatch, capsys, tmp_path: Path,
                                       raised: BaseException | None, code: int) -> None:
    def command(args: argparse.Namespace) -> int:
        if raised is not None:
            raise raised
        return 0

    monkeypatch.setattr(cli, "cmd_keys", command)
    assert cli.main(["--home", str(tmp_path), "keys"]) == code
    err = capsys.readouterr().err
    if code == 130:
        assert "interrupted" in err
    elif code:
        assert err.startswith("peerdrive: error: ")
        assert ("broke" if code == 1 and isinstance(raised, StoreError) else
                "/x" if isinstance(raised, OSError) else "forged" if code == 3 and
                isinstance(raised, ExceptionGroup) else str(raised)) in err


def write_config(home: Path, text: str) -> Home:
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(text)
    return Home(home)


def test_config_toml_sets_every_default(tmp_path: Path) -> None:
    home = write_config(tmp_path / "h", 'bootstrap = ["10.1.2.3:4100", "peer.example:4200"]\n'
                        'cache_size = "10G"\nlisten = "127.0.0.1:4555"\nlan = false\n'
                        'fetch_timeout = 7.5\n')
    cfg = home.config()
    assert cfg.bootstrap == ["10.1.2.3:4100", "peer.example:4200"]
    assert cfg.cache_size == "10G" and cfg.listen == "127.0.0.1:4555"
    assert cfg.lan is False and cfg.fetch_timeout == 7.5
    resolved = NodeOptions().resolve(cfg, SERVE_LISTEN)
    assert resolved.cache_size == "10G"
    net = network_for(home, None, resolved)
    assert net.listen == ("127.0.0.1", 4555)
    assert net.bootstrap == [("10.1.2.3", 4100), ("peer.example", 4200)]
    assert net.lan is False and net.fetch_timeout == 7.5


def test_command_line_options_win_over_config(tmp_path: Path) -> None:
    home = write_config(tmp_path / "h", 'bootstrap = "10.1.2.3:4100"\nlisten = "127.0.0.1:4555"\n'
                        'fetch_timeout = 7.5\n')
    cfg = home.config()
    assert cfg.bootstrap == ["10.1.2.3:4100"]  # one string is one peer
    opts = NodeOptions(bootstrap=["127.0.0.2:9"], listen="127.0.0.1:0", lan=False,
                       fetch_timeout=3.0, cache_size="1G")
    assert opts.resolve(cfg, SERVE_LISTEN).cache_size == "1G"
    net = network_for(home, None, opts.resolve(cfg, SERVE_LISTEN))
    assert net.listen == ("127.0.0.1", 0) and net.bootstrap == [("127.0.0.2", 9)]
    assert net.lan is False and net.fetch_timeout == 3.0


def test_no_config_gives_the_documented_defaults(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    cfg = home.config()
    assert (cfg.bootstrap, cfg.cache_size, cfg.listen, cfg.lan, cfg.fetch_timeout) == \
        ([], None, None, True, 20.0)
    serve = network_for(home, None, NodeOptions().resolve(cfg, SERVE_LISTEN))
    assert serve.listen == ("0.0.0.0", 4100) and serve.lan is True and serve.bootstrap == []
    assert serve.fetch_timeout == 20.0
    mount = network_for(home, None, NodeOptions().resolve(cfg, MOUNT_LISTEN))
    assert mount.listen == ("0.0.0.0", 0)


def test_a_broken_config_is_a_usage_error(tmp_path: Path) -> None:
    home = write_config(tmp_path / "h", "bootstrap = [unclosed\n")
    with pytest.raises(errors.UsageError, match="config.toml: not valid TOML"):
        home.config()
    assert cli.main(["--home", str(home.path), "status"]) == 0  # status reads no config
    res = cli.main(["--home", str(home.path), "serve", "--listen", "127.0.0.1:0"])
    assert res == 2


def test_node_status_lists_live_mounts_and_nodes(tmp_path: Path) -> None:
    """`status --json` of the node: cache, drives, and every live mount and node with values."""
    home = Home(tmp_path / "h")
    me = os.getpid()
    mount = {"pid": me, "mountpoint": str(tmp_path / "mnt"), "drive": "ab" * 32, "port": 4321}
    home.register_mount(tmp_path / "mnt", mount)
    home.register_mount(tmp_path / "gone", {**mount, "pid": 2 ** 22 + 12345,
                                            "mountpoint": str(tmp_path / "gone")})
    run = home.path / "run"
    run.mkdir()
    snap = {"pid": me, "node_id": "cd" * 32, "port": 4321, "dht_contacts": 3,
            "server": {"blocks_served": 7, "bytes_served": 7000, "connections_active": 1,
                       "not_found": 0},
            "drives": {"ab" * 32: {"discovery_key": "ef" * 32, "peers": [
                {"node_id": "01" * 32, "addr": "127.0.0.1:9", "connected": True, "blocks": 5,
                 "bytes": 5000, "failures": 0, "bad_blocks": 0, "in_flight": 0}]}},
            "time": 1.0}
    (run / f"{me}.json").write_text(json.dumps(snap))
    (run / f"{2 ** 22 + 12345}.json").write_text(json.dumps({**snap, "pid": 2 ** 22 + 12345}))
    data = node_status(home)
    text = cli.render_node_status(data)
    assert data["mounts"] == [mount]  # the dead one is not listed
    assert data["nodes"] == [snap]
    assert data["home"] == str(home.path) and data["drives"] == []
    assert data["cache"] == {"used_bytes": 0, "limit_bytes": None}
    assert f"mount   {tmp_path / 'mnt'}  drive {'ab' * 8}  pid {me}" in text
    assert f"node    pid {me} port 4321  3 DHT contacts, served 7 blocks" in text
    assert "peer  010101010101 127.0.0.1:9" in text and "got 5 blocks" in text


def test_pin_unpin_evict_errors_say_what_to_do(monkeypatch, tmp_path: Path) -> None:
    """The errno a mount answers becomes the error (and exit code) a user can act on."""
    from vfs import flags

    answers = {"pinned": errno.ENOSPC}

    def setxattr(path, name, value):
        raise OSError(answers[name.rsplit(".", 1)[1]], os.strerror(answers[name.rsplit(".", 1)[1]]))

    def getxattr(path, name):
        return b"1"  # pinned, through a folder above

    monkeypatch.setattr(os, "setxattr", setxattr)
    monkeypatch.setattr(os, "getxattr", getxattr)
    monkeypatch.setattr(flags, "require_in_mount", lambda path: None)  # tmp_path plays a mount
    with pytest.raises(errors.NoSpaceError, match="full"):
        flags.pin(tmp_path)
    answers["pinned"] = errno.EINVAL
    with pytest.raises(errors.UsageError, match="pinned through a folder above it"):
        flags.unpin(tmp_path)
    answers["evict"] = errno.ENOTSUP
    with pytest.raises(errors.UsageError, match="not inside a peerdrive mount"):
        flags.evict(tmp_path)
