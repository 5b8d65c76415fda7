"""peerdrive benchmarks: publish, cold reads through a real mount, first bytes.

Run it as `scripts/bench` (which installs what is missing first):

    scripts/bench            1 GiB, median of 3 runs per figure; writes
                             docs/benchmarks.md and docs/benchmarks.json
    scripts/bench --quick    256 MiB, 1 run each; prints the table only
                             (unless --md / --json name files to write)

Everything runs as separate processes, the way a user runs them: the real
`peerdrive` command (publish, mount, unmount) beside plain reference tools
(`cp`, `cat` of the source file), each in a fresh PEERDRIVE_HOME under one
temporary directory that is removed at the end. Cold figures drop the page
cache (`echo 3 > /proc/sys/vm/drop_caches`, after `sync`) before each run and
mount afresh, so neither the kernel nor the mount process remembers the
previous run; where dropping is not permitted the output says so.

Structure, for adding systems and figures later: one function per figure
(`figure_*`, listed in FIGURES) takes the `Bench` context and returns `Row`s,
one per system measured, one of them the reference the others are compared
with; the results are one dict (`results_dict`) written as JSON and as a
markdown table (`markdown`). A new system is a new row in a figure; a new
figure is a new function in FIGURES.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB
FIRST_BYTES = 64 * 1024
# the mount reads only this node's store: no LAN, loopback only
MOUNT_OPTIONS = ("--listen", "127.0.0.1:0", "--no-lan")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One system's runs of one figure."""

    figure: str
    system: str
    unit: str  # "MB/s" (10^6 bytes per second) or "ms"
    runs: list[float]
    higher_is_better: bool
    reference: bool = False
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass
class Bench:
    """What every figure needs: options, the work directory, the source file, notes."""

    size: int
    runs: int
    quick: bool
    workdir: Path
    peerdrive_argv: list[str]
    notes: list[str] = field(default_factory=list)
    cache_drops: int = 0
    cache_drop_failures: int = 0
    _source: Path | None = None
    _published: tuple[Path, str] | None = None

    # -- inputs -----------------------------------------------------------------------

    def source(self) -> Path:
        """The random source file (made once, in 4 MiB pieces, then synced)."""
        if self._source is None:
            folder = self.workdir / "source"
            folder.mkdir()
            path = folder / "random.bin"
            log(f"writing {self.size / MiB:.0f} MiB of random data to {path}")
            with open(path, "wb") as f:
                left = self.size
                while left:
                    n = min(left, 4 * MiB)
                    f.write(os.urandom(n))
                    left -= n
            sync()
            self._source = path
        return self._source

    def published(self) -> tuple[Path, str]:
        """A node home holding the source folder published once, and its read link."""
        if self._published is None:
            home = self.workdir / "home-read"
            info = publish(self, home, self.source().parent)
            self._published = (home, info["read_link"])
        return self._published

    # -- the page cache -----------------------------------------------------------------

    def drop_page_cache(self) -> None:
        """Write dirty pages, then drop the page cache; remember whether it worked."""
        sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            self.cache_drops += 1
        except OSError as exc:
            if self.cache_drop_failures == 0:
                msg = (f"the page cache could not be dropped ({exc.strerror}): "
                       "'cold' figures were measured with whatever the cache held")
                self.notes.append(msg)
                log("note: " + msg)
            self.cache_drop_failures += 1


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    subprocess.run(["sync"], check=False)


# ----------------------------------------------------------------------------- processes


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PEERDRIVE_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("PEERDRIVE_BOOTSTRAP", None)
    return env


def run_peerdrive(bench: Bench, home: Path, *args: str,
                  timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*bench.peerdrive_argv, *args], env=env_for(home), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchError(f"peerdrive {' '.join(args)} exited {proc.returncode}: "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def publish(bench: Bench, home: Path, folder: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    return json.loads(run_peerdrive(bench, home, "publish", str(folder), "--json").stdout)


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Mounted:
    path: Path
    pid: int
    seconds: float  # wall time of `peerdrive mount` until it returned (mount ready)


@contextlib.contextmanager
def mounted(bench: Bench, home: Path, link: str, name: str) -> Iterator[Mounted]:
    """`peerdrive mount` in the background; unmounted and its process stopped on exit."""
    mnt = bench.workdir / name
    mnt.mkdir(exist_ok=True)
    pid: int | None = None
    try:
        started = time.perf_counter()
        out = run_peerdrive(bench, home, "mount", link, str(mnt), *MOUNT_OPTIONS, "--json",
                            timeout=180)
        seconds = time.perf_counter() - started
        pid = int(json.loads(out.stdout)["pid"])
        if not is_mounted(mnt):
            raise BenchError(f"peerdrive mount returned but nothing is mounted at {mnt}")
        yield Mounted(mnt, pid, seconds)
    finally:
        if is_mounted(mnt):
            res = subprocess.run([*bench.peerdrive_argv, "unmount", str(mnt)],
                                 env=env_for(home), cwd=ROOT, capture_output=True,
                                 text=True, timeout=60, check=False)
            if res.returncode != 0 and is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)],
                               capture_output=True, check=False)
        if pid is not None:
            stop_pid(pid)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def cat_to_null(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def first_bytes(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, FIRST_BYTES)
    finally:
        os.close(fd)
    if len(data) != FIRST_BYTES:
        raise BenchError(f"{path}: read {len(data)} bytes, expected {FIRST_BYTES}")


def same_samples(a: Path, b: Path, size: int) -> bool:
    """Spot check that two files agree (start, middle, end, some odd offsets)."""
    offsets = {0, 1, size // 3 + 12345, size // 2, max(0, size - MiB)}
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in sorted(offsets):
            fa.seek(off)
            fb.seek(off)
            if fa.read(MiB) != fb.read(MiB):
                return False
    return True


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds


# ----------------------------------------------------------------------------- figures


def figure_publish(bench: Bench) -> list[Row]:
    """Publish one large random file into a fresh PEERDRIVE_HOME, beside `cp` + `sync`.

    The source is warm in the page cache, so this measures cutting, hashing,
    encrypting and storing (LMDB, fsync per commit), not the source disk.
    """
    src = bench.source()
    name = f"publish {fmt_size(bench.size)} random file"
    own, wall, copy = [], [], []
    for i in range(bench.runs):
        home = bench.workdir / f"home-publish-{i}"
        sync()
        started = time.perf_counter()
        info = publish(bench, home, src.parent)
        wall_s = time.perf_counter() - started
        if info["bytes"] != bench.size or info["new_bytes"] < bench.size:
            raise BenchError(f"publish reported {info['bytes']} bytes, {info['new_bytes']} new")
        own.append(mb_per_s(bench.size, info["seconds"]))
        wall.append(mb_per_s(bench.size, wall_s))
        log(f"publish run {i + 1}: {info['seconds']:.2f} s own, {wall_s:.2f} s wall, "
            f"{info['new_blocks']} blocks")
        shutil.rmtree(home)

        dest = bench.workdir / f"copy-{i}.bin"
        sync()
        seconds = timed(lambda d=dest: (shutil.copyfile(src, d), sync()))
        copy.append(mb_per_s(bench.size, seconds))
        dest.unlink()
    return [
        Row(name, "cp + sync (reference)", "MB/s", copy, True, reference=True,
            note="copy to the same disk, then sync: the disk's write bound"),
        Row(name, "peerdrive publish (its `seconds`)", "MB/s", own, True,
            note="walk, cut, encrypt, store, head; as reported by --json"),
        Row(name, "peerdrive publish (wall)", "MB/s", wall, True,
            note="the whole command, process start included"),
    ]


def figure_mount_ready(bench: Bench) -> list[Row]:
    """Wall time of `peerdrive mount` until the mount is live (daemon ready)."""
    home, link = bench.published()
    times = []
    for i in range(bench.runs):
        with mounted(bench, home, link, f"mnt-ready-{i}") as m:
            times.append(m.seconds * 1000)
    return [Row("mount until ready", "peerdrive mount", "ms", times, False,
                note="starts the daemon, opens the store, network on loopback only")]


def figure_read_cold(bench: Bench) -> list[Row]:
    """`cat FILE > /dev/null` through a fresh mount with the page cache dropped, beside
    `cat` of the source file with the page cache dropped too."""
    home, link = bench.published()
    src = bench.source()
    name = f"sequential read {fmt_size(bench.size)}, cold"
    local, mount = [], []
    for i in range(bench.runs):
        bench.drop_page_cache()
        local.append(mb_per_s(bench.size, timed(lambda: cat_to_null(src))))
        with mounted(bench, home, link, f"mnt-read-{i}") as m:
            target = m.path / src.name
            bench.drop_page_cache()
            seconds = timed(lambda t=target: cat_to_null(t))
            mount.append(mb_per_s(bench.size, seconds))
            log(f"cold read run {i + 1}: mount {mount[-1]:.0f} MB/s, source {local[-1]:.0f} MB/s")
            if not same_samples(target, src, bench.size):
                raise BenchError("the mount returned different bytes from the source")
    return [
        Row(name, "cat source file (reference)", "MB/s", local, True, reference=True,
            note="the same bytes from the local disk"),
        Row(name, "cat through peerdrive mount", "MB/s", mount, True,
            note="fresh mount; blocks in this node's store; decrypt per chunk"),
    ]


def figure_read_warm(bench: Bench) -> list[Row]:
    """The same read with the store and the source in the page cache: the cost of the
    FUSE path and decryption alone, without the disk's access pattern."""
    home, link = bench.published()
    src = bench.source()
    name = f"sequential read {fmt_size(bench.size)}, store in page cache"
    local, mount = [], []
    for i in range(bench.runs):
        for f in sorted((home / "store").iterdir()):
            cat_to_null(f)
        cat_to_null(src)
        local.append(mb_per_s(bench.size, timed(lambda: cat_to_null(src))))
        with mounted(bench, home, link, f"mnt-warm-{i}") as m:
            target = m.path / src.name
            mount.append(mb_per_s(bench.size, timed(lambda t=target: cat_to_null(t))))
            log(f"warm read run {i + 1}: mount {mount[-1]:.0f} MB/s, source {local[-1]:.0f} MB/s")
    return [
        Row(name, "cat source file (reference)", "MB/s", local, True, reference=True,
            note="from the page cache"),
        Row(name, "cat through peerdrive mount", "MB/s", mount, True,
            note="fresh mount (its own caches empty), store pages in the page cache"),
    ]


def figure_first_bytes(bench: Bench) -> list[Row]:
    """Open and read the first 64 KiB, cold: through a fresh mount and from the source."""
    home, link = bench.published()
    src = bench.source()
    name = "open + first 64 KiB, cold"
    local, mount = [], []
    for i in range(bench.runs):
        bench.drop_page_cache()
        local.append(timed(lambda: first_bytes(src)) * 1000)
        with mounted(bench, home, link, f"mnt-first-{i}") as m:
            target = m.path / src.name
            bench.drop_page_cache()
            mount.append(timed(lambda t=target: first_bytes(t)) * 1000)
            log(f"first bytes run {i + 1}: mount {mount[-1]:.1f} ms, source {local[-1]:.1f} ms")
    return [
        Row(name, "source file (reference)", "ms", local, False, reference=True),
        Row(name, "peerdrive mount", "ms", mount, False,
            note="first lookup, chunk list, one block read and decrypted"),
    ]


FIGURES: list[Callable[[Bench], list[Row]]] = [
    figure_publish,
    figure_mount_ready,
    figure_read_cold,
    figure_read_warm,
    figure_first_bytes,
]


# ----------------------------------------------------------------------------- the machine


def machine_info(workdir: Path) -> dict:
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fstype = command_output(["df", "--output=fstype", str(workdir)]).splitlines()[-1:]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem_kib * 1024,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "work_filesystem": fstype[0].strip() if fstype else "",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
    except OSError:
        return ""


def versions() -> dict:
    out = {}
    for dist in ("peerdrive", "pyfuse3", "trio", "cryptography", "lmdb", "pyfastcdc",
                 "msgpack", "kademlia"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                            "vfs", "dht", "cache"])
    out["git_commit"] = commit + ("+uncommitted changes" if dirty else "")
    out["fuse"] = command_output(["fusermount3", "--version"]).replace(
        "fusermount3 version: ", "")
    out["coreutils"] = command_output(["cat", "--version"]).splitlines()[0:1]
    out["coreutils"] = out["coreutils"][0] if out["coreutils"] else ""
    return out


# ----------------------------------------------------------------------------- output


def fmt_size(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    return f"{n / MiB:.0f} MiB"


def fmt_value(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def row_ratio(row: Row, rows: list[Row]) -> float | None:
    """This row's median over its figure's reference median."""
    ref = next((r for r in rows if r.figure == row.figure and r.reference), None)
    if ref is None or ref is row or ref.median == 0:
        return None
    return row.median / ref.median


def results_dict(bench: Bench, rows: list[Row], machine: dict, vers: dict,
                 argv: list[str], seconds: float) -> dict:
    return {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["scripts/bench", *argv]),
        "config": {
            "size_bytes": bench.size,
            "runs": bench.runs,
            "quick": bench.quick,
            "page_cache_dropped": bench.cache_drop_failures == 0 and bench.cache_drops > 0,
            "mb": "10^6 bytes",
            "seconds_total": round(seconds, 1),
        },
        "machine": machine,
        "versions": vers,
        "figures": [
            {
                "figure": r.figure,
                "system": r.system,
                "unit": r.unit,
                "higher_is_better": r.higher_is_better,
                "reference": r.reference,
                "runs": [round(x, 3) for x in r.runs],
                "median": round(r.median, 3),
                "ratio_to_reference": (None if (q := row_ratio(r, rows)) is None
                                       else round(q, 3)),
                "note": r.note,
            }
            for r in rows
        ],
        "notes": bench.notes,
    }


def table(results: dict) -> str:
    lines = ["| figure | system | median | unit | runs | vs reference |",
             "|---|---|---:|---|---|---:|"]
    for f in results["figures"]:
        runs = ", ".join(fmt_value(x) for x in f["runs"])
        if f["reference"]:
            ratio = "reference"
        elif f["ratio_to_reference"] is None:
            ratio = "–"
        else:
            ratio = f"{f['ratio_to_reference']:.2f}×"
        lines.append(f"| {f['figure']} | {f['system']} | {fmt_value(f['median'])} | "
                     f"{f['unit']} | {runs} | {ratio} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, v, c = results["machine"], results["versions"], results["config"]
    cold = ("the page cache was dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) "
            "before every cold run" if c["page_cache_dropped"] else
            "**the page cache could not be dropped**: cold figures are not cold")
    notes_block = "".join(f"\n- {n}" for n in results["notes"])
    notes_block = f"\nNotes:\n{notes_block}\n" if notes_block else ""
    figure_notes = "".join(
        f"- *{f['system']}* ({f['figure']}): {f['note']}\n" for f in results["figures"]
        if f["note"])
    return f"""# peerdrive benchmarks

Produced by `{results['command']}` on {results['generated']}
(`scripts/bench.py`; the same figures as JSON are in `benchmarks.json`).
Regenerate with `scripts/bench` (a few minutes) or try `scripts/bench --quick`.

Each figure is the median of {c['runs']} run(s) on a {fmt_size(c['size_bytes'])} file of
random bytes, measured with real processes: the `peerdrive` command publishing
into a fresh `PEERDRIVE_HOME`, and a real FUSE mount (`peerdrive mount`, a
background daemon, mounted afresh for every run) read with `cat` and `open`/`read`.
MB/s is 10^6 bytes per second. "vs reference" is the median divided by the
reference's median: above 1 is faster for MB/s, slower for ms. For the cold
figures {cold}. The mount reads blocks from the publishing node's own store
(no network: `--listen 127.0.0.1:0 --no-lan`), so these figures are the local
cost of the format and the FUSE path, not of peers. Machines are noisy: the
runs column shows the spread, and the load averages below show how busy this
one was.

{table(results)}

What each system does:

{figure_notes}{notes_block}
## Machine

| | |
|---|---|
| CPU | {m['cpu']} |
| nproc | {m['nproc']} |
| memory | {m['memory_bytes'] / GiB:.1f} GiB |
| kernel | {m['kernel']} |
| OS | {m['os']} |
| Python | {m['python']} |
| work directory filesystem | {m['work_filesystem']} |
| load average at start (1, 5, 15 min) | {', '.join(str(x) for x in m['load_average_at_start'])} |
| load average at end (1, 5, 15 min) | {', '.join(str(x) for x in m['load_average_at_end'])} |
| peerdrive | {v['peerdrive']} (git {v['git_commit']}) |
| pyfuse3 / libfuse | {v['pyfuse3']} / {v['fuse']} |
| trio | {v['trio']} |
| cryptography | {v['cryptography']} |
| lmdb | {v['lmdb']} |
| pyfastcdc | {v['pyfastcdc']} |
| msgpack | {v['msgpack']} |
| coreutils | {v['coreutils']} |
"""


# ----------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1024, "M": MiB, "G": GiB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMG" else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M or 1G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return int(value * units[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=(
        "Measure peerdrive (publish, cold reads through a real mount, first bytes) "
        "beside reference tools; write docs/benchmarks.md and docs/benchmarks.json."))
    p.add_argument("--quick", action="store_true",
                   help="256 MiB and 1 run per figure; writes files only if --md/--json say")
    p.add_argument("--runs", type=int, help="runs per figure (default 3, --quick 1)")
    p.add_argument("--size", type=parse_size, help="file size, e.g. 1G (default 1G, --quick 256M)")
    p.add_argument("--md", type=Path, help="markdown output (default docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="JSON output (default docs/benchmarks.json)")
    p.add_argument("--workdir", type=Path,
                   help="where the temporary directory goes (default: $TMPDIR or /tmp)")
    p.add_argument("--only", action="append", metavar="FIGURE",
                   help="run only this figure (e.g. publish, read_cold; repeatable)")
    return p


def peerdrive_argv() -> list[str]:
    script = Path(sys.executable).parent / "peerdrive"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vfs.cli"]


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run the cleanup in `main`'s finally blocks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    size = args.size or (256 * MiB if args.quick else GiB)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        print("bench: --runs must be at least 1", file=sys.stderr)
        return 2
    md_path = args.md or (None if args.quick else ROOT / "docs" / "benchmarks.md")
    json_path = args.json or (None if args.quick else ROOT / "docs" / "benchmarks.json")
    figures = FIGURES
    if args.only:
        known = {f.__name__.removeprefix("figure_"): f for f in FIGURES}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            print(f"bench: unknown figure(s) {', '.join(unknown)}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
        figures = [known[n] for n in args.only]
    signal.signal(signal.SIGTERM, _terminate)

    workdir = Path(tempfile.mkdtemp(prefix="peerdrive-bench-run-", dir=args.workdir))
    bench = Bench(size=size, runs=runs, quick=args.quick, workdir=workdir,
                  peerdrive_argv=peerdrive_argv())
    started = time.monotonic()
    rows: list[Row] = []
    try:
        machine = machine_info(workdir)
        for fig in figures:
            log(f"{fig.__name__.removeprefix('figure_')}: {runs} run(s)")
            rows.extend(fig(bench))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(workdir)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = results_dict(bench, rows, machine, versions(), argv,
                           time.monotonic() - started)
    print(table(results))
    for n in bench.notes:
        print(f"note: {n}")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {json_path}")
    if md_path is not None:
        md_path.write_text(markdown(results))
        log(f"wrote {md_path}")
    return 0


def cleanup(workdir: Path) -> None:
    """Remove the work directory, never while anything under it is still mounted."""
    still = []
    with open("/proc/mounts") as f:
        for line in f:
            point = line.split()[1]
            if point.startswith(str(workdir) + "/"):
                still.append(point)
    for point in still:
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True, check=False)
    if any(is_mounted(Path(p)) for p in still):
        log(f"left {workdir} in place: something is still mounted under it")
        return
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
