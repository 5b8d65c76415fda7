"""Lab for the read path: one publisher and one reader mount, the reader's CPU per read.

    .venv/bin/python scripts/read_lab.py [--size 128M] [--hot N] [--py-spy PATH] [--mirror]

Publishes a file of random bytes (scripts/bench.py's data and helpers), then
reads it with `cat` through a fresh reader mount with an empty cache (cold:
every block from the publisher over TLS on loopback), then `--hot` more
times through fresh mounts of the same reader home (every block in its
store), the page cache dropped before each read. Prints MB/s, the mount
process's CPU seconds (user + system, from /proc/PID/stat) and the blocks
the publisher was asked for (and how many WantRun frames carried them) per
read, with the share of the mount's CPU its event-loop (main) thread used
and the publisher's `peerdrive serve` CPU: on a shared machine the CPU per
byte is the steadier figure. With `--py-spy`,
each read is profiled (`py-spy record --threads -f raw`) into
read-lab-<n>.txt in the current directory. With `--mirror`, the cold read
goes through an HTTP mirror instead (`peerdrive mirror` of the drive on
loopback nginx, a reader with no peer: scripts/bench.py's
figure_read_mirror), and the hot reads are from that reader's store. To
compare two versions, run it from two checkouts in turn. Measures; asserts
nothing.

Each read also reports the mount's context switches (voluntary: its threads
went to sleep, on a socket, a lock or the GIL; involuntary: preempted) and
the share of both cores idle and in iowait (a reader blocked on the mount's
pages while a core has nothing to run: docs/benchmarks.md, issue 10).
`--boost` (root) gives the mount's, nginx's and this script's sessions
autogroup nice -20 for the read: with autogroup scheduling every session
weighs the same, so on a machine other sessions load, each read gets a
share of the cores that depends on how many of them run; boosted, the read
gets the cores first (the others wait meanwhile: use it for labs, not for
the bench's figures).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402


def _cpu_ticks(pid: int, tid: int | None = None) -> int:
    """CPU ticks of a process (or of one of its threads: the main thread is tid == pid)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _thread_times(pid: int) -> dict[int, tuple[str, int, int, int, int]]:
    """Each thread of a process: its name (trio names its worker threads; the main
    thread, the event loop, is "loop"), the ns it ran, the ns it waited runnable for a
    core (/proc/PID/task/TID/schedstat), and its voluntary and involuntary context
    switches (/proc/PID/task/TID/status)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = "loop" if int(task.name) == pid else (task / "comm").read_text().strip()
            ran, waited = (task / "schedstat").read_text().split()[:2]
            switches = [0, 0]
            for line in (task / "status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "voluntary_ctxt_switches":
                    switches[0] = int(value)
                elif key == "nonvoluntary_ctxt_switches":
                    switches[1] = int(value)
            found[int(task.name)] = (name, int(ran), int(waited), *switches)
    return found


def _thread_report(before: dict[int, tuple[str, int, int, int, int]],
                   after: dict[int, tuple[str, int, int, int, int]]) -> str:
    """Per thread name over a read: CPU seconds / seconds waited for a core /
    voluntary / involuntary context switches (threads that ended before the read did
    are missing; trio's worker threads are summed as "Trio thread *")."""
    by_name: dict[str, list[float]] = {}
    for tid, (name, ran, waited, vol, invol) in after.items():
        _, ran0, waited0, vol0, invol0 = before.get(tid, (name, 0, 0, 0, 0))
        if ran - ran0 or waited - waited0:
            if name.startswith("Trio thread"):
                name = "Trio thread *"
            total = by_name.setdefault(name, [0.0, 0.0, 0, 0])
            total[0] += (ran - ran0) / 1e9
            total[1] += (waited - waited0) / 1e9
            total[2] += vol - vol0
            total[3] += invol - invol0
    return ", ".join(f"{name} {ran:.2f}/{waited:.2f}/{vol:.0f}/{invol:.0f}"
                     for name, (ran, waited, vol, invol) in
                     sorted(by_name.items(), key=lambda item: -item[1][0]))


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all of a process's threads."""
    counts = [0, 0]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name == "voluntary_ctxt_switches":
                    counts[0] += int(value)
                elif name == "nonvoluntary_ctxt_switches":
                    counts[1] += int(value)
    return counts[0], counts[1]


def _cores() -> list[int]:
    """The machine's CPU ticks from /proc/stat: user, nice, system, idle, iowait, ..."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


@contextlib.contextmanager
def _boosted(pids: list[int]) -> Iterator[None]:
    """Autogroup nice -20 for the sessions of `pids` while the block runs, each put back
    as it was after (this script's own session outlives it: the shell's)."""
    before: dict[str, tuple[Path, str]] = {}  # by group: several pids may share one
    for pid in pids:
        path = Path(f"/proc/{pid}/autogroup")
        group, _, nice = path.read_text().split()  # "/autogroup-N nice V"
        before.setdefault(group, (path, nice))
        path.write_text("-20\n")
    try:
        yield
    finally:
        for path, nice in before.values():
            with contextlib.suppress(OSError):  # a mount that ended took its session along
                path.write_text(f"{nice}\n")


def _nginx_pids(workdir: Path) -> list[int]:
    """This lab's nginx processes (their command line names its work directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (proc.name.isdigit() and (proc / "comm").read_text().strip() == "nginx"
                    and str(workdir).encode() in (proc / "cmdline").read_bytes()):
                found.append(int(proc.name))
    return found


def _serve_pid(bench: B.Bench) -> int | None:
    return None if bench._serve is None else bench._serve[0].pid


def _mirror(bench: B.Bench, link: str) -> str:
    """`peerdrive mirror` of the drive under nginx's root; the mirror's base URL."""
    port = bench.nginx()
    mirror = bench.data / "mirror-lab"
    bench.peerdrive(bench.publisher_home, "mirror", link, str(mirror), "--json")
    return f"http://127.0.0.1:{port}/{mirror.name}"


def _asked_of_publisher(bench: B.Bench) -> tuple[int, int]:
    """(wants, want_run frames) the publisher's serve has received so far (0, 0 with none)."""
    if bench._serve is None:
        return 0, 0
    server = bench.serve_counters()
    return int(server.get("wants_received", 0)), int(server.get("runs_received", 0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="128M", help="file size (default 128M)")
    p.add_argument("--hot", type=int, default=2, help="hot reads after the cold one")
    p.add_argument("--py-spy", default=None, help="path of a py-spy binary: profile each read")
    p.add_argument("--workdir", default=None, help="where the temporary directory goes")
    p.add_argument("--mirror", action="store_true",
                   help="cold read through an HTTP mirror on loopback nginx, no peer")
    p.add_argument("--boost", action="store_true",
                   help="autogroup nice -20 for the read's processes (root; see above)")
    args = p.parse_args()
    size = B.parse_size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="read-lab-", dir=args.workdir))
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.ExitStack() as stack:
        bench = B.Bench(size=size, files=10, folders=1, runs=1, quick=True, workdir=workdir,
                        peerdrive_argv=B.peerdrive_argv(), stack=stack)
        stack.callback(B.cleanup, workdir)
        big = bench.big()
        links = bench.links()
        home = bench.fresh("home-reader")
        url = _mirror(bench, links["big"]) if args.mirror else None
        for n in range(1 + args.hot):
            if url is not None:
                mounted = bench.mirror_mount(home, bench.fresh("mnt-lab"), "read lab",
                                             links["big"], url)
            else:
                mounted = bench.peerdrive_mount("big", "read lab", home=home)
            with mounted as m:
                bench.drop_page_cache()
                spy = serve_spy = None
                if args.py_spy:
                    spy = subprocess.Popen(
                        [args.py_spy, "record", "-p", str(m.pid), "-o", f"read-lab-{n}.txt",
                         "-f", "raw", "--threads", "-r", "200", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    serve = _serve_pid(bench)
                    if serve is not None:
                        serve_spy = subprocess.Popen(
                            [args.py_spy, "record", "-p", str(serve), "-o",
                             f"read-lab-{n}-serve.txt", "-f", "raw", "--threads", "-r", "200",
                             "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1)
                serve = _serve_pid(bench)
                if args.boost:
                    stack.enter_context(_boosted([os.getpid(), m.pid, *([serve] if serve else []),
                                                  *_nginx_pids(workdir)]))
                asked = _asked_of_publisher(bench)
                before = _cpu_ticks(m.pid)
                loop_before = _cpu_ticks(m.pid, m.pid)
                serve_before = _cpu_ticks(serve) if serve else 0
                threads_before = _thread_times(m.pid)
                switches = _switches(m.pid)
                cores = _cores()
                started = time.perf_counter()
                B.cat_to_null(m.path / big.name)
                took = time.perf_counter() - started
                cpu = (_cpu_ticks(m.pid) - before) / tick
                loop_cpu = (_cpu_ticks(m.pid, m.pid) - loop_before) / tick
                serve_cpu = (_cpu_ticks(serve) - serve_before) / tick if serve else 0.0
                threads = _thread_report(threads_before, _thread_times(m.pid))
                voluntary, involuntary = (a - b for a, b in zip(_switches(m.pid), switches,
                                                                 strict=True))
                ticks = [a - b for a, b in zip(_cores(), cores, strict=True)]
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait()
                if serve_spy is not None:
                    serve_spy.send_signal(2)
                    serve_spy.wait()
                what = "cold" if n == 0 else f"hot {n}"
                wants, runs = (a - b for a, b in zip(_asked_of_publisher(bench), asked, strict=True))
                print(f"{what}: {size / took / 1e6:.0f} MB/s, mount CPU {cpu:.2f} s "
                      f"(event-loop thread {loop_cpu:.2f} s), serve CPU {serve_cpu:.2f} s, "
                      f"load average {os.getloadavg()[0]:.1f}; publisher asked for {wants} "
                      f"blocks in {runs} want_run frames and single wants", flush=True)
                print(f"  mount threads, CPU s / s runnable waiting for a core / voluntary / involuntary "
                      f"switches: {threads}", flush=True)
                print(f"  mount context switches: {voluntary} voluntary, {involuntary} "
                      f"involuntary; cores idle {100 * ticks[3] / sum(ticks):.0f}%, iowait "
                      f"{100 * ticks[4] / sum(ticks):.0f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
