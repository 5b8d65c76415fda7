"""`peerdrive serve` that stops itself (SIGSTOP) once it has served a given number of bytes.

    python -m tests.freezing_serve BYTES serve [serve options...]

A test that needs a peer frozen part-way through a transfer cannot get one by
sending SIGSTOP when it sees the transfer running: on a fast or idle machine
the whole transfer can end between the look and the signal (a host once
reached `complete` with 64 MiB before the stop landed). This serve is the real
one (`vfs.cli`), except that its block server counts the bytes it reads for
its clients and, on the read that would take the total past BYTES, stops its
own process before that batch is sent. So the peer freezes mid-transfer
whatever the machine's speed, having sent less than BYTES; the test waits for
the stopped state (`is_stopped`) and sends SIGCONT when it is done.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from dht.server import PeerServer


def is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (state T in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1].startswith("T")


def freeze_after(budget: int) -> None:
    """Make every PeerServer of this process stop the process once it read `budget` bytes."""
    lookup_many = PeerServer.lookup_many
    served = [0]
    lock = threading.Lock()  # lookups run in several worker threads

    def counting(self: PeerServer, discovery_key: bytes, block_ids: list[bytes],
                 budget_bytes: int) -> list[bytes | None]:
        found = lookup_many(self, discovery_key, block_ids, budget_bytes)
        with lock:
            served[0] += sum(len(data) for data in found if data is not None)
            if served[0] >= budget:
                os.kill(os.getpid(), signal.SIGSTOP)  # this batch goes out after SIGCONT
        return found

    PeerServer.lookup_many = counting  # type: ignore[method-assign]


def main() -> None:
    budget = int(sys.argv[1])
    freeze_after(budget)
    from vfs.cli import main as cli_main

    sys.exit(cli_main(sys.argv[2:]))


if __name__ == "__main__":
    main()
