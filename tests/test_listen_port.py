"""A node told to listen on port 0 finds a number free for TCP and UDP alike.

A node serves blocks over TCP and the DHT over UDP on one port number. With
port 0 (every `peerdrive mount` by default) the kernel picked a free TCP
port, and the node then bound UDP on the same number: on a busy machine that
UDP port could belong to another process, and the mount died at start
("cannot listen for DHT traffic on UDP ...: Address already in use"; seen as
"mount exited 1" in test_swarm and test_cli_process runs at load 20-30).

To make that collision certain rather than rare, the test runs `peerdrive
serve --listen 127.0.0.1:0` in a network namespace of its own whose ephemeral
range is two ports, 40000-40001, while another process there holds UDP
40001: the kernel's first pick for a listening socket is the odd 40001.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.netns_helpers import PYTHON, Lab, LabError

pytestmark = [pytest.mark.netns]

RANGE = (40000, 40001)
HOLD_UDP = ("import socket, sys; socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) "
            "for _ in sys.argv[1:]]; [s.bind(('127.0.0.1', int(p))) for s, p in "
            "zip(socks, sys.argv[1:])]; print('held', flush=True); sys.stdin.read()")


def hold_udp(lab: Lab, *ports: int) -> subprocess.Popen[str]:
    """A process in the lab's host holding UDP 127.0.0.1:PORT for each port, until stdin ends."""
    host = lab.hosts[0]
    proc = subprocess.Popen(host.argv(PYTHON, "-c", HOLD_UDP, *map(str, ports)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.track(proc.pid)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def narrow_range(lab: Lab) -> None:
    host = lab.hosts[0]
    subprocess.run(host.argv("sysctl", "-q", "-w",
                             f"net.ipv4.ip_local_port_range={RANGE[0]} {RANGE[1]}"),
                   check=True, capture_output=True, text=True)


def test_port_0_skips_a_tcp_port_whose_udp_twin_is_taken(labs_possible, tmp_path: Path) -> None:
    with Lab(tmp_path / "lab", 1) as lab:
        host = lab.hosts[0]
        narrow_range(lab)
        holder = hold_udp(lab, RANGE[1])
        served = host.serve("--listen", "127.0.0.1:0", "--no-lan")
        assert served.info["port"] == RANGE[0], served.info
        snap = served.snapshot(0.0, timeout=60)  # the node runs: its DHT is up on that port
        assert snap["port"] == RANGE[0] and served.proc.poll() is None
        holder.stdin.close()  # type: ignore[union-attr]


def test_port_0_with_no_pair_left_fails_with_a_clear_error(labs_possible,
                                                           tmp_path: Path) -> None:
    with Lab(tmp_path / "lab", 1) as lab:
        host = lab.hosts[0]
        narrow_range(lab)
        holder = hold_udp(lab, *RANGE)
        with pytest.raises(LabError) as failed:
            host.serve("--listen", "127.0.0.1:0", "--no-lan")
        assert "exited (1) before reporting" in str(failed.value)
        log = (host.home / "serve.log").read_text()
        assert "peerdrive: error:" in log and "Address already in use" in log, log
        assert "Traceback" not in log, log
        holder.stdin.close()  # type: ignore[union-attr]
