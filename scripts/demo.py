"""The demo behind ./scripts/demo: publish a sample folder, mount it, stream, status.

Runs real `peerdrive` processes with their own PEERDRIVE_HOME in a temporary
directory, prints each command before running it, and cleans up (unmounts,
stops every process it started by PID) whatever happens.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(home: Path, *args: str, check: bool = True) -> str:
    print(f"\n$ PEERDRIVE_HOME={home.name} peerdrive {shlex.join(args)}", flush=True)
    env = dict(os.environ, PEERDRIVE_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "vfs.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}")
    return proc.stdout


def sh(cmd: str) -> None:
    print(f"\n$ {cmd}", flush=True)
    subprocess.run(cmd, shell=True, check=True)


def make_sample(folder: Path) -> None:
    (folder / "Photos" / "2024").mkdir(parents=True)
    (folder / "Docs").mkdir()
    for i in range(5):
        (folder / "Photos" / "2024" / f"img_{i:03d}.jpg").write_bytes(os.urandom(400_000 + i))
    (folder / "Docs" / "readme.txt").write_text("Hello from peerdrive!\n")
    with open(folder / "movie.bin", "wb") as f:
        for _ in range(8):
            f.write(os.urandom(4 << 20))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(home: Path, port: int) -> subprocess.Popen:
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--no-lan"]
    print(f"\n$ PEERDRIVE_HOME={home.name} peerdrive {shlex.join(args)} &", flush=True)
    env = dict(os.environ, PEERDRIVE_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "vfs.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("demo: serve did not start")
    print(line, end="", flush=True)
    return proc


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="peerdrive-demo-"))
    publisher, reader = work / "node-a", work / "node-b"
    sample, mnt = work / "sample", work / "Drive"
    for p in (publisher, reader, sample, mnt):
        p.mkdir()
    make_sample(sample)
    mounted_on: list[tuple[Path, Path]] = []
    server: subprocess.Popen | None = None
    try:
        print("== node A publishes a folder and serves it")
        out = run(publisher, "publish", str(sample))
        link = out.strip().splitlines()[-1]
        run(publisher, "share", link, "--store")
        port = free_port()
        server = start_serve(publisher, port)

        print("\n== node B mounts it from the link alone, finding node A through the DHT")
        run(reader, "mount", link, str(mnt), "--bootstrap", f"127.0.0.1:{port}",
            "--listen", "127.0.0.1:0", "--no-lan", "--fetch-timeout", "3")
        mounted_on.append((reader, mnt))
        sh(f"ls -lR {mnt} | head -30")
        run(reader, "status", str(mnt / "movie.bin"))
        sh(f"cat {mnt}/Docs/readme.txt")
        t = time.monotonic()
        sh(f"cmp {mnt}/movie.bin {sample}/movie.bin && echo 'movie.bin: identical'")
        print(f"streamed 32 MiB from node A in {time.monotonic() - t:.2f} s")
        run(reader, "status", str(mnt / "movie.bin"))

        print("\n== node B pins a folder: fetched whole, kept on the device, never evicted")
        run(reader, "pin", str(mnt / "Photos"))
        run(reader, "status", str(mnt / "Photos"))
        sh(f"getfattr -d -m user.peerdrive {mnt}/Photos/2024/img_000.jpg")

        print("\n== node A goes offline: the pinned folder still reads, a cloud file does not")
        server.terminate()
        server.wait(10)
        server = None
        sh(f"cat {mnt}/Photos/2024/*.jpg | wc -c")
        run(reader, "evict", str(mnt / "movie.bin"))
        sh(f"cat {mnt}/movie.bin > /dev/null || echo 'movie.bin: evicted and no peer online (EIO)'")
        run(reader, "status")
        run(reader, "unmount", str(mnt))
        mounted_on.clear()
        print("\ndemo: done")
        return 0
    finally:
        for home, m in mounted_on:
            run(home, "unmount", str(m), check=False)
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
