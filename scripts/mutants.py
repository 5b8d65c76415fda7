"""Run mutmut over peerdrive in a scratch copy and report the surviving mutants.

`scripts/mutants` installs mutmut and calls this. The working tree is never
touched: the files git knows (committed or not) are copied to a scratch
directory with a setup.cfg saying what to mutate and which tests to run, and
mutmut runs there (`mutants/` inside it holds every mutant and its result, so a
second run with `--workdir` continues where the first stopped).

Only in-process tests are run against mutants: the mount and swarm tests
start other processes and take minutes each. The default target is every
module the issue names (vfs/, dht/fetch.py, cache/store.py); a bounded run
names a few files with `--mutate`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MUTATE = ["vfs/*.py", "dht/fetch.py", "cache/store.py"]
# in-process tests only: milliseconds to seconds each, no mounts, no peer processes
DEFAULT_TESTS = [
    "tests/test_read_path.py", "tests/test_fs_ops.py", "tests/test_drive_inprocess.py",
    "tests/test_cli_inprocess.py", "tests/test_drive_prefetch.py", "tests/test_publish.py",
    "tests/test_formats.py", "tests/test_crypto.py", "tests/test_capability.py",
    "tests/test_head.py", "tests/test_chunker.py", "tests/test_versions.py",
    "tests/test_fetch.py", "tests/test_have.py",
    "tests/test_store.py", "tests/test_store_bulk.py", "tests/test_store_model.py",
    "tests/test_store_schema.py", "tests/test_store_sizes.py", "tests/test_mapread.py",
]


def copy_tree(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        src = ROOT / rel
        if not src.is_file() or src.is_symlink():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def write_config(dest: Path, mutate: list[str], tests: list[str]) -> None:
    # pyproject.toml has no [tool.mutmut], so mutmut reads setup.cfg
    lines = ["[mutmut]", "source_paths =", "    vfs", "    dht", "    cache",
             "only_mutate ="]
    lines += [f"    {m}" for m in mutate]
    lines += ["pytest_add_cli_args_test_selection ="]
    lines += [f"    {t}" for t in tests if (dest / t).exists()]
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider",
              "    -m", "    not fuse and not netns", "use_git_change_detection = false", ""]
    (dest / "setup.cfg").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutate", nargs="+", default=DEFAULT_MUTATE, metavar="GLOB",
                   help="files to mutate (globs relative to the repository), default: "
                   + " ".join(DEFAULT_MUTATE))
    p.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, metavar="FILE",
                   help="test files run against the mutants (in-process ones by default)")
    p.add_argument("--workdir", type=Path,
                   help="scratch directory (kept; run again with it to continue)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                   help="mutants tested at once")
    p.add_argument("--report", type=Path, help="also write the survivors to this file")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="peerdrive-mutants-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "mutants").exists():
        copy_tree(work)
    write_config(work, args.mutate, args.tests)
    mutmut = [str(Path(sys.executable).with_name("mutmut"))]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    started = time.monotonic()
    print(f"mutants: mutating {' '.join(args.mutate)} in {work}", file=sys.stderr)
    run = subprocess.run([*mutmut, "run", "--max-children", str(args.jobs)], cwd=work, env=env,
                         check=False)
    results = subprocess.run([*mutmut, "results"], cwd=work, env=env, capture_output=True,
                             text=True, check=False)
    survivors = [line.strip() for line in results.stdout.splitlines() if line.strip()]
    report = "\n".join(survivors)
    print(report)
    print(f"mutants: {len(survivors)} not killed (survived, timed out or untested) in "
          f"{time.monotonic() - started:.0f} s; `cd {work} && {mutmut[0]} show NAME` shows one",
          file=sys.stderr)
    if args.report is not None:
        args.report.write_text(report + "\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
