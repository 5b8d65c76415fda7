"""The CLI boundary: options as dataclasses, the home's layout in one place, status as data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vfs.cli import build_parser, mount_options, node_flags, render_node_status, serve_options
from vfs.home import Config, Home, live_records
from vfs.options import MOUNT_LISTEN, SERVE_LISTEN, MountOptions, NodeOptions
from vfs.status import node_status


def _config(**kw) -> Config:
    base = {"bootstrap": ["10.0.0.1:4100"], "cache_size": "1G", "listen": None, "lan": True,
            "fetch_timeout": 20.0}
    return Config(**{**base, **kw})


def test_flags_become_dataclasses_and_back() -> None:
    args = build_parser().parse_args(
        ["-vv", "mount", "LINK", "/mnt", "--bootstrap", "127.0.0.1:1", "--bootstrap",
         "127.0.0.1:2", "--cache-size", "5M", "--listen", "127.0.0.1:0", "--no-lan",
         "--fetch-timeout", "3.5"])
    opts = mount_options(args)
    assert opts == MountOptions(bootstrap=["127.0.0.1:1", "127.0.0.1:2"], listen="127.0.0.1:0",
                                cache_size="5M", lan=False, fetch_timeout=3.5, ready_fd=None,
                                verbose=2)
    # the background mount is handed exactly these options again
    again = mount_options(build_parser().parse_args(
        ["mount", "LINK", "/mnt", *node_flags(opts)]))
    assert NodeOptions(**{k: getattr(again, k) for k in NodeOptions.__dataclass_fields__}) == \
        NodeOptions(**{k: getattr(opts, k) for k in NodeOptions.__dataclass_fields__})
    serve = serve_options(build_parser().parse_args(["serve"]))
    assert serve.bootstrap == [] and serve.lan and serve.listen is None


def test_options_over_config_over_defaults() -> None:
    plain = NodeOptions().resolve(_config(), SERVE_LISTEN)
    assert plain.bootstrap == ["10.0.0.1:4100"] and plain.listen == SERVE_LISTEN
    assert plain.cache_size == "1G" and plain.lan and plain.fetch_timeout == 20.0
    given = NodeOptions(bootstrap=["127.0.0.1:9"], listen="127.0.0.1:0", cache_size="2M",
                        lan=False, fetch_timeout=1.0).resolve(_config(listen="0.0.0.0:1"),
                                                              MOUNT_LISTEN)
    assert given.bootstrap == ["127.0.0.1:9"] and given.listen == "127.0.0.1:0"
    assert given.cache_size == "2M" and not given.lan and given.fetch_timeout == 1.0
    assert NodeOptions().resolve(_config(listen="0.0.0.0:1", lan=False), MOUNT_LISTEN).listen \
        == "0.0.0.0:1"
    assert not NodeOptions().resolve(_config(lan=False), MOUNT_LISTEN).lan


def test_live_records_skip_dead_and_broken(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / "a.json").write_text(json.dumps({"pid": os.getpid(), "x": 1}))
    (tmp_path / "b.json").write_text(json.dumps({"pid": int(dead.stdout)}))
    (tmp_path / "c.json").write_text("{half")
    (tmp_path / "d.json").write_text(json.dumps({"no": "pid"}))
    (tmp_path / "e.json").write_text(json.dumps([1, 2]))
    (tmp_path / "f.tmp").write_text(json.dumps({"pid": os.getpid()}))
    assert live_records(tmp_path) == [{"pid": os.getpid(), "x": 1}]


def test_node_status_is_data_and_the_cli_renders_it(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.run_dir.mkdir()
    snap = {"pid": os.getpid(), "port": 4100, "dht_contacts": 3,
            "server": {"blocks_served": 7, "bytes_served": 7 * 1024},
            "drives": {"ab" * 32: {"peers": [{"node_id": "cd" * 32, "addr": "127.0.0.1:5",
                                              "blocks": 2, "bytes": 2048, "connected": True}]}}}
    (home.run_dir / f"{os.getpid()}.json").write_text(json.dumps(snap))
    data = node_status(home)
    json.dumps(data)  # plain JSON types only
    assert data["nodes"] == [snap] and data["mounts"] == [] and data["drives"] == []
    assert data["home"] == str(home.path) and data["cache"]["limit_bytes"] is None
    text = render_node_status(data)
    assert f"node    pid {os.getpid()} port 4100  3 DHT contacts, served 7 blocks" in text
    assert "  peer  cdcdcdcdcdcd 127.0.0.1:5  drive abababababab  got 2 blocks" in text


# What only a node that serves or mounts needs: a short command never loads it.
_NODE_ONLY = ("trio", "pyfuse3", "kademlia", "httpx", "vfs.fs", "vfs.drive", "vfs.node",
              "vfs.network", "vfs.host", "vfs.publish")
_LOADED = """
import runpy, sys
sys.argv = ["peerdrive", *sys.argv[1:]]
try:
    runpy.run_module("vfs.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("\\nLOADED", code, " ".join(sorted(sys.modules)))
"""


def test_short_commands_load_neither_fuse_nor_the_network(tmp_path: Path) -> None:
    """The tests and a user's scripts start the CLI thousands of times: a command that
    only reads files (help, keys, share, status, unmount, pin, host --list) or starts
    a background mount imports what it runs, not trio, pyfuse3 or the DHT (which
    doubled each start-up). Checked from the modules loaded, not from a time."""
    env = {**os.environ, "PEERDRIVE_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    (tmp_path / "mnt").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    link = "peerdrive:r1:" + ":".join(["a" * 52] * 2) + ":aaaaaaaa"
    for argv, code in ((["--help"], 0), (["keys", "--json"], 0), (["status", "--json"], 0),
                       (["share", str(tmp_path)], 2), (["unmount", str(tmp_path / "mnt")], 6),
                       (["pin", str(tmp_path / "gone")], 2), (["host", "--list"], 0),
                       (["mount", link, str(tmp_path / "full")], 2)):
        res = subprocess.run([sys.executable, "-c", _LOADED, *argv], env=env,
                             capture_output=True, text=True, timeout=120)
        loaded = res.stdout.rsplit("\nLOADED ", 1)[1].split()
        assert loaded[0] == str(code), (argv, res.stdout, res.stderr)
        assert not set(loaded[1:]) & set(_NODE_ONLY), (argv, set(loaded[1:]) & set(_NODE_ONLY))
