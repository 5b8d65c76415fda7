"""The fuzz harness: every decoder of untrusted bytes, one registry, two ways to run it.

A *target* is a function of one byte string that feeds it to a decoder (or a
protocol handler) and checks what comes out. It may raise only the error types
it names: the project's own errors for bad input (FrameError, RecordError,
LanError, FormatError, ...). Anything else — an IndexError, a RecursionError, a
MemoryError, an AssertionError from the target's own checks (a decoded value
that re-encodes differently, a reply larger than allowed) — is a crash.

- `./scripts/test` replays the seeded corpus, `tests/corpus/<target>/*` (small
  files, committed), through every target in `tests/test_fuzz_corpus.py`, with
  bounded time and memory per input.
- `./scripts/fuzz TARGET [--seconds N]` runs one target (or `all`) under
  atheris, a coverage-guided fuzzer (libFuzzer for Python), for long runs
  outside CI; new interesting inputs go to `fuzz-out/<target>/corpus/`, crashes
  to `fuzz-out/<target>/crash-*`. `--engine mutate` runs a plain mutational
  loop over the corpus (no coverage feedback) where atheris is missing.
- `./scripts/fuzz seed` writes the generated seeds of every target into
  `tests/corpus/` (deterministic: same files every time).

Targets live in modules listed in `TARGET_MODULES` and register themselves
with `@target(name, allowed=(...))`; a module may also give seeds with
`@seeds(name)`. Keep the harness free of drive or network imports so atheris
can instrument the modules under test when they are first imported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
OUT = ROOT / "fuzz-out"

TARGET_MODULES = ["tests.fuzz_net", "tests.fuzz_drive"]
"""Modules that register targets (network decoders here; drive decoders add theirs)."""

INSTRUMENTED_PACKAGES = ["dht", "vfs", "cache", "kademlia"]
"""What atheris instruments for coverage (the code under test, not the harness)."""

MAX_INPUT = 64 * 1024
"""Longest input a fuzzer generates: larger than any datagram, frame header or record."""

INPUT_SECONDS = 2.0
"""An input taking longer than this is a hang (the corpus test and atheris' -timeout)."""

INPUT_MEMORY = 64 * 1024 * 1024
"""Peak Python allocation per input in the corpus test (bytes)."""

RSS_LIMIT_MB = 1024
"""atheris' process memory limit during long runs."""


class FuzzCrash(Exception):
    """A target let out an exception it does not allow (or its own check failed)."""


@dataclass
class Target:
    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], Iterable[bytes]] | None = None
    doc: str = field(default="")

    def check(self, data: bytes) -> None:
        """Run one input; FuzzCrash (chained to the cause) if anything unallowed came out."""
        try:
            self.run(data)
        except self.allowed:
            return
        except Exception as exc:  # RecursionError and MemoryError included
            raise FuzzCrash(f"{self.name}: {type(exc).__name__}: {exc}") from exc


TARGETS: dict[str, Target] = {}


def target(name: str, *, allowed: tuple[type[BaseException], ...] = ()) -> Callable:
    """Register `fn(data: bytes)` as fuzz target `name`, allowed to raise only `allowed`."""

    def register(fn: Callable[[bytes], object]) -> Callable[[bytes], object]:
        if name in TARGETS:
            raise ValueError(f"fuzz target {name!r} is registered twice")
        TARGETS[name] = Target(name, fn, allowed, doc=(fn.__doc__ or "").strip())
        return fn

    return register


def seeds(name: str) -> Callable:
    """Register a generator of seed inputs for target `name` (written by `scripts/fuzz seed`)."""

    def register(fn: Callable[[], Iterable[bytes]]) -> Callable[[], Iterable[bytes]]:
        TARGETS[name].seeds = fn
        return fn

    return register


def load_targets() -> dict[str, Target]:
    for module in TARGET_MODULES:
        importlib.import_module(module)
    return TARGETS


def corpus_files(name: str) -> list[Path]:
    folder = CORPUS / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def write_seeds(names: Iterable[str]) -> int:
    """Write each target's generated seeds as tests/corpus/<target>/seed-<sha256 prefix>."""
    written = 0
    for name in names:
        t = TARGETS[name]
        if t.seeds is None:
            continue
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in t.seeds():
            path = folder / f"seed-{hashlib.sha256(data).hexdigest()[:16]}"
            if not path.exists():
                path.write_bytes(data)
                written += 1
    return written


# ---- engines ------------------------------------------------------------------------


def run_atheris(name: str, seconds: int, extra: list[str]) -> int:
    import atheris  # noqa: PLC0415 - only the long runs need it

    with atheris.instrument_imports(include=INSTRUMENTED_PACKAGES):
        load_targets()
    t = TARGETS[name]
    work = OUT / name / "corpus"
    work.mkdir(parents=True, exist_ok=True)

    def one_input(data: bytes) -> None:
        t.check(data)  # a FuzzCrash escapes: atheris prints it and writes the input

    args = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-timeout={int(INPUT_SECONDS * 5)}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_INPUT}",
        f"-artifact_prefix={OUT / name}/",
        "-print_final_stats=1",
        *extra,
        str(work),
        str(CORPUS / name),
    ]
    atheris.Setup(args, one_input)
    atheris.Fuzz()  # exits the process
    return 0


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One random edit: flip, insert, delete, splice with another input, or overwrite an int."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and buf:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3 and pool:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 4 and buf:
            buf[pos % len(buf)] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC4, 0xCC, 0xCF, 0xDC,
                                              0xDD, 0xDE, 0xDF, 0xFF])
        elif op == 5:
            buf = buf[:pos] + buf[pos:][::-1]
    return bytes(buf[:MAX_INPUT])


def run_mutate(name: str, seconds: float, seed: int) -> tuple[int, list[Path]]:
    """Mutational fuzzing without coverage feedback; returns (inputs run, crash files)."""
    load_targets()
    t = TARGETS[name]
    pool = [p.read_bytes() for p in corpus_files(name)] or [b""]
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = 0
    crashes: list[Path] = []
    (OUT / name).mkdir(parents=True, exist_ok=True)
    while time.monotonic() < deadline:
        data = mutate(rng.choice(pool), rng, pool)
        runs += 1
        try:
            t.check(data)
        except FuzzCrash as exc:
            path = OUT / name / f"crash-{hashlib.sha256(data).hexdigest()[:16]}"
            path.write_bytes(data)
            crashes.append(path)
            print(f"CRASH {exc} -> {path}", file=sys.stderr)
    return runs, crashes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/fuzz",
        description="Fuzz peerdrive's decoders of untrusted bytes (see tests/fuzzing.py).",
    )
    p.add_argument("target", help="a target name, 'all', 'list' or 'seed'")
    p.add_argument("--seconds", type=int, default=600, help="per target (default 600)")
    p.add_argument("--engine", choices=["atheris", "mutate"], default="atheris")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutate engine")
    args, extra = p.parse_known_args(argv)
    if args.target == "list":
        for t in load_targets().values():
            print(f"{t.name:16} {len(corpus_files(t.name)):4} seeds  {t.doc.splitlines()[0]}")
        return 0
    if args.target == "seed":
        n = write_seeds(load_targets())
        print(f"wrote {n} new seed files under {CORPUS}")
        return 0
    if args.engine == "atheris" and args.target != "all":
        return run_atheris(args.target, args.seconds, extra)
    names = list(load_targets()) if args.target == "all" else [args.target]
    if args.target == "all" and args.engine == "atheris":
        # atheris runs one target per process (it exits when done): one child each
        import subprocess  # noqa: PLC0415

        failed = 0
        for name in names:
            rc = subprocess.call([sys.executable, "-m", "tests.fuzzing", name,
                                  "--seconds", str(args.seconds), *extra], cwd=ROOT)
            failed += rc != 0
        return 1 if failed else 0
    failed = 0
    for name in names:
        runs, crashes = run_mutate(name, args.seconds, args.seed)
        print(f"{name}: {runs} inputs in {args.seconds} s, {len(crashes)} crashes")
        failed += bool(crashes)
    return 1 if failed else 0


if __name__ == "__main__":
    # run as `python -m tests.fuzzing`: the targets register in the importable module,
    # not in this __main__ copy of it
    os.chdir(ROOT)
    from tests import fuzzing

    sys.exit(fuzzing.main())
