"""A private network lab for end-to-end tests: hosts in network namespaces on one bridge.

Why: several seeders, per-host bandwidth caps and LAN multicast cannot be
tested on 127.0.0.1 alone: every node would share one network stack and one
unlimited loopback. A `Lab` builds, for one test:

* a bridge (`br0`) in a namespace of its own, `<prefix>-br`;
* N hosts, namespaces `<prefix>-h1..hN`, each with `lo` up and a veth `eth0`
  whose peer is a port of the bridge, an address in a private /24 of
  10.77.0.0/16 and a route for multicast (224.0.0.0/4) through `eth0`.

The prefix is random per lab, so concurrent runs never collide; the
addresses exist only inside these namespaces, and nothing in the host's own
namespace (interfaces, routes, qdiscs) is touched. `Lab.close()` (the
context manager's exit) stops every process the lab started, by PID, and
deletes every namespace, even when the test failed.

Real `peerdrive` processes run inside a host with `ip netns exec`. That
command also gives the process a mount namespace of its own whose mounts do
not propagate back (it re-mounts /sys for the network namespace), so a FUSE
mount made there is invisible to the test process. A `Mount` therefore reads
its files from inside the mount daemon's own mount namespace (`nsenter
--target PID --mount`); and when the daemon ends, its mount namespace ends
with it, so a killed mount can never be left behind on the host. The copy of
our mounts that namespace starts with is dropped first (`in_netns`): it would
keep every FUSE mount of that moment alive after it is unmounted here.

This file is also the small reader program those reads run
(`python netns_helpers.py read PATH`): it streams a file, hashes it and
reports bytes, SHA-256 and seconds as one JSON line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SUBNET_PREFIX = "10.77"
MULTICAST_NET = "224.0.0.0/4"
PEER_PORT = 4100


class LabError(Exception):
    """The lab could not be built or a process in it misbehaved."""


def require_labs(nat: bool = False) -> None:
    """Skip the calling test if this machine cannot run a lab; with `nat`, fail it if
    nftables (the labs' NAT routers) is missing, which scripts/setup installs.

    The one guard of every netns test file, through the `labs_possible` and
    `nat_labs_possible` fixtures of tests/conftest.py.
    """
    import pytest

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    if nat and shutil.which("nft") is None:
        pytest.fail("nft (nftables) is missing: scripts/setup installs it")


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why this machine cannot run a lab (for pytest.skip), or None if it can (probed
    once per test run: the answer does not change while it runs)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "tc", "nsenter", "fusermount3"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    probe = f"pd-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        veth = subprocess.run(
            ["ip", "-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0"],
            capture_output=True, text=True)
        if veth.returncode != 0:
            return f"cannot create veth pairs here: {veth.stderr.strip()}"
        bridge = subprocess.run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
                                capture_output=True, text=True)
        if bridge.returncode != 0:
            return f"cannot create a bridge here: {bridge.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


# `ip netns exec` gives the command a mount namespace of its own, a copy of ours as
# it is then. On a machine whose mounts are private (no shared propagation: this
# container's), an unmount here never reaches that copy: every FUSE mount that
# existed when a lab process started stays held by it for as long as it runs, so
# unmounting one (a test's, a bench's, another engineer's) did not end its FUSE
# session and its daemon did not exit (test_cli_process's lazy unmount waited in
# vain; `peerdrive unmount` fell back to SIGTERM after 20 s). The lab's command
# first detaches those copies in its own namespace, then runs.
_DROP_FUSE_COPIES = ('awk \'$3 == "fuse" || $3 == "fuseblk" || $3 ~ /^fuse\\./ {print $2}\' '
                     '/proc/self/mounts | while read -r m; do '
                     'umount -l -c "$(printf "%b" "$m")" 2>/dev/null; done; exec "$@"')


def in_netns(ns: str, *cmd: str) -> list[str]:
    """`cmd` run in network namespace `ns` holding no copy of this namespace's FUSE mounts."""
    return ["ip", "netns", "exec", ns, "sh", "-c", _DROP_FUSE_COPIES, "sh", *cmd]


def _run(argv: list[str], *, timeout: float = 30.0, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}\n"
                       f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict:
    """The first line a child prints on stdout, as JSON (without ever blocking past timeout)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LabError(f"no output from pid {proc.pid} within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise LabError(f"pid {proc.pid} exited ({proc.wait()}) before reporting")
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


@dataclass
class Served:
    """A `peerdrive serve` process inside a host."""

    host: Host
    proc: subprocess.Popen[bytes]
    info: dict

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self, after: float = 0.0, timeout: float = 10.0) -> dict:
        return self.host.snapshot(self.pid, after, timeout)


@dataclass
class Mount:
    """A background `peerdrive mount` daemon inside a host and its mount point.

    The mount lives in the daemon's mount namespace: `run` executes a command
    there (with the host's network namespace too, though readers need none).
    """

    host: Host
    pid: int
    path: Path

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--mount", "--", *cmd]

    def run(self, *cmd: str, timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(*cmd), timeout=timeout, check=check)

    def read(self, rel: str, timeout: float = 300.0) -> dict:
        """Stream one file: {"bytes", "sha256", "seconds", "first_mib_seconds"} (timed in the reader)."""
        res = self.run(PYTHON, str(Path(__file__).resolve()), "read", str(self.path / rel),
                       timeout=timeout, check=False)
        if res.returncode != 0:
            raise LabError(f"reading {rel} on {self.host.name} failed ({res.returncode}): "
                           f"{res.stderr.strip()}\n--- mount log ---\n{self.host.logs()}")
        return json.loads(res.stdout)

    def is_mounted(self) -> bool:
        try:
            text = Path(f"/proc/{self.pid}/mounts").read_text()
        except OSError:
            return False
        return any(line.split()[1] == str(self.path) for line in text.splitlines())

    def snapshot(self, after: float = 0.0, timeout: float = 10.0) -> dict:
        return self.host.snapshot(self.pid, after, timeout)


@dataclass
class Host:
    lab: Lab
    index: int
    ns: str
    address: str
    home: Path
    iface: str = "eth0"
    mounts: list[Mount] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def endpoint(self) -> str:
        """HOST:PORT this host's node listens on (TCP blocks and UDP DHT)."""
        return f"{self.address}:{PEER_PORT}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PEERDRIVE_HOME"] = str(self.home)
        env["PYTHONPATH"] = str(ROOT)
        env.pop("PEERDRIVE_BOOTSTRAP", None)
        return env

    def argv(self, *cmd: str) -> list[str]:
        return in_netns(self.ns, *cmd)

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "-n", self.ns, *args])

    def peerdrive(self, *args: str, timeout: float = 180.0,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """The real command line, run inside this host's namespace."""
        res = _run(self.argv(PYTHON, "-m", "vfs.cli", *args), timeout=timeout, check=False,
                   env=self.env())
        if check and res.returncode != 0:
            raise LabError(f"[{self.name}] peerdrive {' '.join(args)} exited {res.returncode}\n"
                           f"stdout: {res.stdout}\nstderr: {res.stderr}\n"
                           f"--- logs ---\n{self.logs()}")
        return res

    def publish(self, folder: Path) -> dict:
        return json.loads(self.peerdrive("publish", str(folder), "--json").stdout)

    def serve(self, *extra: str, timeout: float = 60.0) -> Served:
        """`peerdrive serve --listen ENDPOINT --json EXTRA` in the background; ready on return."""
        log_path = self.home / "serve.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                self.argv(PYTHON, "-m", "vfs.cli", "serve", "--listen", self.endpoint,
                          "--json", *extra),
                env=self.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=logf,
                stdin=subprocess.DEVNULL)
        self.lab.track(proc.pid)
        try:
            info = read_json_line(proc, timeout)
        except LabError as exc:
            raise LabError(f"[{self.name}] serve did not start: {exc}\n{self.logs()}") from None
        return Served(self, proc, info)

    def mount(self, link: str, mountpoint: Path, *extra: str) -> Mount:
        """`peerdrive mount LINK MNT --listen ENDPOINT EXTRA` (daemon); live on return."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        res = self.peerdrive("mount", link, str(mountpoint), "--listen", self.endpoint,
                             "--json", *extra)
        pid = int(json.loads(res.stdout)["pid"])
        self.lab.track(pid)
        mount = Mount(self, pid, mountpoint)
        self.mounts.append(mount)
        if not mount.is_mounted():
            raise LabError(f"[{self.name}] mount reported ready but {mountpoint} is not mounted "
                           f"in pid {pid}'s namespace\n{self.logs()}")
        return mount

    def limit_egress(self, rate: str, burst: str = "32kb", latency: str = "100ms") -> None:
        """Cap what this host sends (token bucket on its side of the link)."""
        _run(self.argv("tc", "qdisc", "replace", "dev", self.iface, "root", "tbf",
                       "rate", rate, "burst", burst, "latency", latency))

    def snapshot(self, pid: int, after: float = 0.0, timeout: float = 10.0) -> dict:
        """The status snapshot process `pid` writes every second, taken after time `after`."""
        path = self.home / "run" / f"{pid}.json"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if data.get("time", 0) > after:
                    return data
            if time.monotonic() > deadline:
                raise LabError(f"[{self.name}] no status snapshot of pid {pid} after {after}")
            time.sleep(0.1)

    def logs(self) -> str:
        """The tail of every log this host's processes wrote (for failure messages)."""
        out = []
        for path in sorted([*self.home.glob("*.log"), *self.home.glob("logs/*.log")]):
            with contextlib.suppress(OSError):
                out.append(f"== {self.name} {path.name}\n{path.read_text()[-4000:]}")
        return "\n".join(out)


class Lab:
    """Namespaces on one bridge; use as `with Lab(tmp_path, 4) as lab: h1, ... = lab.hosts`."""

    def __init__(self, workdir: Path, hosts: int) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError("a lab holds 1..250 hosts")
        self.prefix = f"pd-{secrets.token_hex(3)}"
        self.subnet = f"{SUBNET_PREFIX}.{secrets.randbelow(256)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.workdir = workdir
        self.hosts: list[Host] = []
        self._count = hosts
        self._namespaces: list[str] = []
        self._pids: list[int] = []

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def track(self, pid: int) -> None:
        self._pids.append(pid)

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        self._add_ns(self.bridge_ns)
        br = ["ip", "-n", self.bridge_ns]
        _run([*br, "link", "add", "br0", "type", "bridge"])
        # flood multicast to every port: no IGMP querier runs on this bridge
        _run([*br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0"])
        _run([*br, "link", "set", "br0", "up"])
        for i in range(1, self._count + 1):
            ns = f"{self.prefix}-h{i}"
            self._add_ns(ns)
            port = f"p{i}"
            # both ends are created directly inside their namespaces
            _run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth",
                  "peer", "name", port, "netns", self.bridge_ns])
            _run([*br, "link", "set", port, "master", "br0"])
            _run([*br, "link", "set", port, "up"])
            address = f"{self.subnet}.{i}"
            host = Host(self, i, ns, address, self.workdir / f"home-h{i}")
            host.home.mkdir(parents=True, exist_ok=True)
            host.ip("addr", "add", f"{address}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")
            host.ip("route", "add", MULTICAST_NET, "dev", "eth0")
            self.hosts.append(host)
        self._wait_linked()

    def add_nat_host(self) -> Host:
        """One more host, behind a NAT router of its own, like a laptop on a home network.

        The router (namespace `<prefix>-rN`) has a port on the bridge with an
        address of the lab's subnet (`.200 + N`) and a private /24 of its own
        (10.78.<random>.0/24) towards the host, and masquerades (nftables) what
        the host sends out to the bridge: the host reaches every lab address,
        and nothing on the bridge can open a connection to it. The host's
        `address` is its private one.
        """
        if shutil.which("nft") is None:
            raise LabError("a NAT host needs nft (nftables)")
        n = sum(1 for ns in self._namespaces if ns.startswith(f"{self.prefix}-r")) + 1
        index = 200 + n
        router = f"{self.prefix}-r{n}"
        self._add_ns(router)
        inner = f"10.78.{secrets.randbelow(256)}"
        br = ["ip", "-n", self.bridge_ns]
        port = f"p{index}"
        _run(["ip", "link", "add", "eth0", "netns", router, "type", "veth",
              "peer", "name", port, "netns", self.bridge_ns])
        _run([*br, "link", "set", port, "master", "br0"])
        _run([*br, "link", "set", port, "up"])
        rt = ["ip", "-n", router]
        _run([*rt, "addr", "add", f"{self.subnet}.{index}/24", "dev", "eth0"])
        _run([*rt, "link", "set", "eth0", "up"])
        ns = f"{self.prefix}-n{n}"
        self._add_ns(ns)
        _run(["ip", "link", "add", "lan0", "netns", router, "type", "veth",
              "peer", "name", "eth0", "netns", ns])
        _run([*rt, "addr", "add", f"{inner}.1/24", "dev", "lan0"])
        _run([*rt, "link", "set", "lan0", "up"])
        _run(["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        rules = f"""\
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority 100;
        ip saddr {inner}.0/24 oifname "eth0" masquerade
    }}
}}
table ip filter {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "eth0" accept
    }}
}}
"""
        res = subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules,
                             capture_output=True, text=True, timeout=30, check=False)
        if res.returncode != 0:
            raise LabError(f"nft rules for the NAT router failed: {res.stderr.strip()}")
        host = Host(self, index, ns, f"{inner}.2", self.workdir / f"home-n{n}")
        host.home.mkdir(parents=True, exist_ok=True)
        host.ip("addr", "add", f"{inner}.2/24", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        host.ip("route", "add", "default", "via", f"{inner}.1")
        deadline = time.monotonic() + 10
        while "LOWER_UP" not in host.ip("link", "show", "dev", "eth0").stdout:
            if time.monotonic() > deadline:
                raise LabError("the NAT host's link did not come up")
            time.sleep(0.05)
        self.hosts.append(host)
        return host

    def _wait_linked(self, timeout: float = 10.0) -> None:
        """Until every host's link is up (a bridge without STP forwards at once then)."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while "LOWER_UP" not in host.ip("link", "show", "dev", host.iface).stdout:
                if time.monotonic() > deadline:
                    raise LabError(f"{host.name}'s link to the bridge did not come up")
                time.sleep(0.05)

    def close(self) -> None:
        """Stop every process started here (by PID), then delete every namespace."""
        from tests.processes import stop_pid  # not at the top: the reader runs as a script

        for pid in reversed(self._pids):
            stop_pid(pid)
        self._pids.clear()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()


def _read_main(path: str) -> None:
    digest = hashlib.sha256()
    total = 0
    first: float | None = None
    started = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            if first is None:
                first = time.monotonic() - started
            digest.update(chunk)
            total += len(chunk)
    seconds = time.monotonic() - started
    print(json.dumps({"bytes": total, "sha256": digest.hexdigest(), "seconds": seconds,
                      "first_mib_seconds": first}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "read":
        _read_main(sys.argv[2])
    else:
        sys.exit("usage: netns_helpers.py read PATH")
