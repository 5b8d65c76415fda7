"""A private nginx serving a directory as static files, for tests and scripts/bench.py.

Debian's nginx (scripts/setup installs it), started with its own nginx.conf
and prefix in a directory the caller owns, listening on one address the
caller chooses (127.0.0.1, or an address inside a network namespace the test
made, started through `argv_prefix=["ip", "netns", "exec", NS]`), never the
system's configuration or service. It is stopped by its PID, and waited for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class NginxError(RuntimeError):
    """nginx would not start (its error log's tail is in the message)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Nginx:
    """`with Nginx(root, prefix) as server:` serves `root` at `server.url` until the block ends.

    `extra` is inserted into the server block (locations a test needs: a
    redirect loop, a rate limit), `http_extra` into the http block (a
    `log_format`). `autoindex` lists directories (rclone's
    HTTP remote reads listings).
    """

    def __init__(self, root: Path, prefix: Path, *, host: str = "127.0.0.1",
                 port: int | None = None, autoindex: bool = False, extra: str = "",
                 http_extra: str = "", argv_prefix: list[str] | None = None, wait_port: bool = True) -> None:
        self.root = Path(root)
        self.prefix = Path(prefix)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.autoindex = autoindex
        self.extra = extra
        self.http_extra = http_extra
        self.argv_prefix = argv_prefix or []
        self.wait_port = wait_port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config(self) -> str:
        p = self.prefix
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the caller's tmp
        return f"""\
{user}worker_processes 1;
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {p}/client;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
{self.http_extra}
    server {{
        listen {self.host}:{self.port};
        root {self.root};
        autoindex {"on" if self.autoindex else "off"};
{self.extra}
    }}
}}
"""

    def start(self, timeout: float = 20.0) -> Nginx:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.config())
        stderr = open(self.prefix / "stderr.log", "wb")  # noqa: SIM115 - nginx keeps it
        try:
            self.proc = subprocess.Popen(
                [*self.argv_prefix, "nginx", "-p", str(self.prefix), "-c", str(conf),
                 "-e", str(self.prefix / "error.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        finally:
            stderr.close()
        if not self.wait_port:
            return self
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.host, self.port), timeout=1):
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NginxError("nginx did not start: " + self._log_tail())

    def _log_tail(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                out.append((self.prefix / name).read_text()[-1000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Stop nginx by the PID we started (its master stops its workers), and wait."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
