"""How a background mount starts (issue 9: a fresh mount is ready quickly).

`peerdrive mount` forks its daemon (one interpreter start and the command
line's imports fewer than a new interpreter) once the link it was given on its
command line is blanked out of what /proc/PID/cmdline shows, and starts a new
interpreter where that cannot be done. tests/test_local_user.py checks the
daemon's command line and environment for the key over a real mount; these
check the blanking itself, each in a process of its own (it rewrites that
process's own command line).
"""

from __future__ import annotations

import json
import subprocess

from tests.helpers import PYTHON, ROOT

PROGRAM = """
import json, sys
from vfs.mount import _blank_argument
link = "peerdrive:r1:" + "k" * 52 + ":" + "s" * 52
ok = _blank_argument(link)
with open("/proc/self/cmdline", "rb") as f:
    shown = f.read()
print(json.dumps({"ok": ok, "has_link": link.encode() in shown,
                  "args": [a.decode() for a in shown.split(b"\\0") if a][-3:]}))
"""


LINK = "peerdrive:r1:" + "k" * 52 + ":" + "s" * 52


def blank(*argv: str) -> dict:
    res = subprocess.run([PYTHON, "-c", PROGRAM, *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True)
    return json.loads(res.stdout)


def test_the_link_is_blanked_out_of_the_command_line() -> None:
    out = blank(LINK, "/mnt/x", "--no-lan")
    assert out["ok"] is True and out["has_link"] is False
    assert out["args"] == ["-", "/mnt/x", "--no-lan"]  # the other arguments stay


def test_a_link_inside_another_argument_is_not_blanked_and_says_so() -> None:
    """Only a whole argument is blanked: the caller then starts a new interpreter, whose
    command line never had the link."""
    out = blank(LINK, "--x=" + LINK)
    assert out["ok"] is False and out["has_link"] is True


WRITING_MODULES = ("vfs.writer", "vfs.worktree", "vfs.write_buffer", "vfs.write_journal",
                   "vfs.publish", "vfs.watch", "vfs.writers", "vfs.host", "vfs.copies")

DAEMON_IMPORTS = """
import json, sys
import vfs.cli, vfs.mount, vfs.node  # what a mount's daemon runs (vfs.node: the whole node)
print(json.dumps(sorted(m for m in sys.modules if m in set(sys.argv[1:]))))
"""


def test_a_read_only_mount_imports_none_of_the_writing_modules() -> None:
    """About 0.45 s of a mount's start-up CPU was imports, some of them the modules that
    only a writable mount, `serve` or `--watch` use (vfs/node.py and vfs/fs.py imported
    them at the top): those are imported where they are used, so a read-only mount,
    the usual one, never pays for them."""
    res = subprocess.run([PYTHON, "-c", DAEMON_IMPORTS, *WRITING_MODULES], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=True)
    assert json.loads(res.stdout) == []


MIRRORS = """
import json, sys
from cache.store import BlockStore
from dht.identity import NodeIdentity
import vfs.cli, vfs.mount, vfs.node
from vfs.capability import StoreCap
from vfs.network import NetworkNode

client = ("dht.http_source", "dht.http_connection", "h11")
node = NetworkNode(NodeIdentity.generate(), BlockStore(sys.argv[1]), listen=("127.0.0.1", 0),
                   lan=False)
cap = StoreCap(NodeIdentity.generate().public_bytes)
node.serve_drive(cap)
node.set_mirrors(cap, [])  # what every mount does with the mirrors its head names
without = [m for m in client if m in sys.modules]
node.set_mirrors(cap, ["http://127.0.0.1:1/drive/"])
print(json.dumps({"without": without, "with": [m for m in client if m in sys.modules],
                  "mirrors": list(node.drives[cap.discovery_key].mirrors)}))
"""


def test_a_mount_without_mirrors_never_imports_the_mirror_client(tmp_path) -> None:
    """The HTTP mirror client is 20-35 ms of a mount's start-up CPU; loaded once a mirror
    is set, not by every mount."""
    res = subprocess.run([PYTHON, "-c", MIRRORS, str(tmp_path / "store")], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=True)
    got = json.loads(res.stdout)
    assert got["without"] == []
    assert got["with"] == ["dht.http_source", "dht.http_connection", "h11"]
    assert got["mirrors"] == ["http://127.0.0.1:1/drive"]
