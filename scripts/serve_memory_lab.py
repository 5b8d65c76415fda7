"""Lab for a serve's memory per version: a publisher serve and a host, N versions.

    .venv/bin/python scripts/serve_memory_lab.py [--versions 30] [CHECKOUT]

Runs the real command line of CHECKOUT (default: this one; another is a
`git archive` of an older commit with a `.venv` link) on 127.0.0.1 with
`PEERDRIVE_TIME_SCALE=600`, as tests/test_uptime.py does: publishes a small
folder, starts a publisher `serve` and a host, then publishes `--versions`
new versions (tests/test_uptime.make_version: a file that changes, one named
after the version), each followed by the host, and prints each process's
anonymous RSS (RssAnon, from /proc) after every version, then the CPU seconds
each used. No readers: what a version costs, not what a reader does. Run two
checkouts in turn (old, new, old, new) on a shared machine. Measures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def anon_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no RssAnon for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--versions", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, args.checkout)
    os.environ["PEERDRIVE_TIME_SCALE"] = "600"
    from tests.helpers import peerdrive
    from tests.swarm_helpers import Swarm
    from tests.test_uptime import hosted, make_version, wait_for

    tmp = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    try:
        src, P, H = tmp / "src", tmp / "P", tmp / "H"
        make_version(src, 1)
        with Swarm(tmp / "swarm") as sw:
            pub = json.loads(peerdrive(P, "publish", str(src), "--json",
                                       "--keep-versions", "2").stdout)
            publisher = sw.serve("publisher", P, extra=["--keep-versions", "2"])
            host = sw.serve("host", H, bootstrap=[publisher.addr])
            link = json.loads(peerdrive(P, "share", pub["read_link"], "--store",
                                        "--json").stdout)["link"]
            peerdrive(H, "host", link, "--json", "--stall-timeout", "120")
            print("seq  publisher MB  host MB (RssAnon)")
            for seq in range(2, args.versions + 2):
                make_version(src, seq)
                peerdrive(P, "publish", str(src), "--json", "--keep-versions", "2")
                wait_for(lambda s=seq: (hosted(host, pub["drive"]) or {}).get("hosted_seq") == s,
                         90, f"the host never held version {seq}", sw.diagnostics)
                time.sleep(1)  # the serves' polls (2 s) have seen it
                print(f"{seq:3d}  {anon_mb(publisher.pid):12.1f}  {anon_mb(host.pid):7.1f}",
                      flush=True)
            print(f"CPU s: publisher {cpu_seconds(publisher.pid):.2f}, "
                  f"host {cpu_seconds(host.pid):.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
