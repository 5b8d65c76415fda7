"""`peerdrive dashboard`: serve the dashboard until Ctrl-C or SIGTERM.

One trio nursery holds the sampler (`DashboardState.run`), the HTTP server
(hypercorn's trio worker serving the Starlette app) and, when there is a
display, `xdg-open` of the URL. The URL carries the token; the caller (the
CLI) prints it through `on_ready`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from cache.store import BlockStore
from vfs.errors import PeerdriveError, UsageError
from vfs.home import Home
from vfs.network import parse_hostport

from .app import DashboardState, build_app
from .collect import SAMPLE_INTERVAL, Collector
from .security import new_token

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:0"
OPEN_TIMEOUT = 20.0


class DashboardError(PeerdriveError):
    exit_code = 1


@dataclass
class DashboardOptions:
    listen: str = DEFAULT_LISTEN  # HOST:PORT; port 0 picks a free one
    open_browser: bool = True  # xdg-open the URL when there is a display


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def url_for(bind: str, token: str) -> str:
    """`http://HOST:PORT` as hypercorn reports a bind, plus the path and the token."""
    return f"{bind}/?token={token}"


def run_dashboard(home: Home, opts: DashboardOptions, on_ready: Callable[[str], None]) -> None:
    host, port = parse_hostport(opts.listen, default_port=0)
    store = BlockStore(home.store_path)
    try:
        trio.run(_main, home, store, host, port, opts, on_ready)
    finally:
        store.close()


async def _open_browser(url: str) -> None:
    opener = shutil.which("xdg-open")
    if opener is None:
        return
    with trio.move_on_after(OPEN_TIMEOUT):
        try:
            await trio.run_process([opener, url], check=False, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as exc:
            log.info("xdg-open failed: %s", exc)


async def _main(home: Home, store: BlockStore, host: str, port: int, opts: DashboardOptions,
                on_ready: Callable[[str], None]) -> None:
    token = new_token()
    state = DashboardState(Collector(home, store))
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("dashboard.http")
    config.graceful_timeout = 1.0
    stop = trio.Event()

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()  # hypercorn closes its connections (1 s grace), serve returns
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(state.run, SAMPLE_INTERVAL)
        async with trio.open_nursery() as http:
            http.start_soon(stop_on_signal)
            try:
                binds = await http.start(partial(serve, build_app(state, token), config,
                                                 shutdown_trigger=stop.wait))
            except OSError as exc:
                raise DashboardError(f"cannot listen on {opts.listen}: "
                                     f"{exc.strerror or exc}") from exc
            if not binds:
                raise UsageError(f"{opts.listen}: nothing to listen on")
            url = url_for(binds[0], token)
            on_ready(url)
            if opts.open_browser and has_display():
                http.start_soon(_open_browser, url)
        nursery.cancel_scope.cancel()  # the server has ended: stop the sampler
