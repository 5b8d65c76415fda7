"""The dashboard's web application (Starlette, on trio through anyio).

    GET  /                      the page (static/index.html with the token in it)
    GET  /static/NAME           app.js, style.css
    GET  /api/status            the same JSON as `peerdrive status --json`
    GET  /api/status?path=P     the same JSON as `peerdrive status P --json`
    GET  /api/dashboard         everything the page shows (drives, peers, cache)
    GET  /api/tree?path=P       one folder of a mount: its entries and their state
                                (`&copies=1` also asks peers for copies: slow)
    GET  /api/events[?path=P]   server-sent events: `dashboard` every second, and
                                `tree` for folder P, so the page updates live
    POST /api/pin|unpin|evict   {"path": P}: what `peerdrive pin|unpin|evict P
                                --json` does (pin returns at once, like --no-wait;
                                the answer leaves out copies, which asks peers)

Every request passes `security.TokenGate` first. Blocking work (extended
attributes go through the mount process, the store is LMDB) runs in worker
threads, at most four at a time, so a busy browser cannot pile up threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vfs import flags
from vfs.errors import PeerdriveError, UsageError
from vfs.status import node_status, path_status, path_status_with_cache

from .collect import CHEAP, Collector, list_folder, mount_of
from .security import TokenGate

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
MAX_BODY = 64 * 1024
FOLDER_INTERVAL = 1.0  # seconds between two listings of a watched folder


def static_text(name: str) -> str:
    return resources.files("dashboard").joinpath("static", name).read_text(encoding="utf-8")


@dataclass
class FolderWatch:
    """The latest listing of one folder that at least one page is looking at."""

    watchers: int = 0
    listing: dict | None = None
    version: int = 0


class DashboardState:
    """The latest snapshot and the watched folders' listings, refreshed in the background.

    Pages wait on one event that is set at every new snapshot or listing, so a
    slow listing (a big folder, a busy mount) never holds back the snapshot,
    and pages looking at the same folder share one listing loop.
    """

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.snapshot: dict | None = None
        self.version = 0
        self.folders: dict[str, FolderWatch] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.limiter = trio.CapacityLimiter(4)  # worker threads for requests

    async def run(self, interval: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .collect import COPIES_INTERVAL

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._sample()
            nursery.start_soon(self._copies_loop, COPIES_INTERVAL)
            task_status.started()
            while True:
                await trio.sleep(interval)
                await self._sample()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> None:
        await self._changed.wait()

    async def _sample(self) -> None:
        try:
            snap = await trio.to_thread.run_sync(self.collector.sample)
        except Exception:  # a half-written record, a store being resized: next second
            log.exception("dashboard sample failed")
            return
        self.snapshot = snap
        self.version += 1
        self._notify()

    async def _copies_loop(self, interval: float) -> None:
        while True:
            await trio.to_thread.run_sync(self.collector.refresh_copies)
            await trio.sleep(interval)

    @contextlib.contextmanager
    def watching(self, path: str) -> Iterator[FolderWatch]:
        """Keep `path`'s listing fresh while the caller (a page's stream) looks at it."""
        assert self._nursery is not None
        watch = self.folders.get(path)
        if watch is None:
            watch = self.folders[path] = FolderWatch()
            self._nursery.start_soon(self._list_loop, path, watch)
        watch.watchers += 1
        try:
            yield watch
        finally:
            watch.watchers -= 1

    async def _list_loop(self, path: str, watch: FolderWatch) -> None:
        try:
            while watch.watchers > 0:
                try:
                    listing = await self.in_thread(list_folder, path,
                                                   self.collector.home.live_mounts())
                except PeerdriveError as exc:
                    listing = {"path": path, "error": str(exc)}
                watch.listing = listing
                watch.version += 1
                self._notify()
                await trio.sleep(FOLDER_INTERVAL)
        finally:
            if self.folders.get(path) is watch:
                del self.folders[path]

    async def next_snapshot(self, seen: int) -> tuple[int, dict]:
        """The first snapshot newer than version `seen` (waits for it)."""
        while self.version <= seen or self.snapshot is None:
            await self.wait_change()
        return self.version, self.snapshot

    async def in_thread(self, fn, *args):
        return await trio.to_thread.run_sync(lambda: fn(*args), limiter=self.limiter)


def _error(exc: Exception) -> JSONResponse:
    status = 400 if isinstance(exc, UsageError) else 500
    return JSONResponse({"error": str(exc)}, status_code=status)


def build_app(state: DashboardState, token: str) -> TokenGate:
    collector = state.collector
    home = collector.home

    async def index(request: Request) -> Response:
        html = static_text("index.html").replace("__TOKEN__", token)
        return Response(html, media_type="text/html; charset=utf-8")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return Response(static_text(name), media_type=STATIC[name])

    async def api_status(request: Request) -> Response:
        path = request.query_params.get("path")
        try:
            if path:
                mount_of(path, home.live_mounts())
                data = await state.in_thread(path_status_with_cache, home, Path(path),
                                             collector.store)
            else:
                data = await state.in_thread(node_status, home, collector.store)
        except PeerdriveError as exc:
            return _error(exc)
        return JSONResponse(data)

    async def api_dashboard(request: Request) -> Response:
        _, snap = await state.next_snapshot(0)
        return JSONResponse(snap)

    async def api_tree(request: Request) -> Response:
        path = request.query_params.get("path")
        copies = request.query_params.get("copies") == "1"
        try:
            if not path:
                raise UsageError("give ?path= of a folder inside a mount")
            data = await state.in_thread(list_folder, path, home.live_mounts(), copies)
        except PeerdriveError as exc:
            return _error(exc)
        return JSONResponse(data)

    async def api_events(request: Request) -> Response:
        path = request.query_params.get("path")

        async def stream():
            seen_snapshot = seen_folder = 0
            yield "retry: 2000\n\n"
            with state.watching(path) if path else contextlib.nullcontext() as watch:
                while True:
                    sent = False
                    if state.snapshot is not None and state.version > seen_snapshot:
                        seen_snapshot = state.version
                        yield f"event: dashboard\ndata: {json.dumps(state.snapshot)}\n\n"
                        sent = True
                    if watch is not None and watch.listing is not None \
                            and watch.version > seen_folder:
                        seen_folder = watch.version
                        yield f"event: tree\ndata: {json.dumps(watch.listing)}\n\n"
                        sent = True
                    if not sent:
                        await state.wait_change()

        return StreamingResponse(stream(), media_type="text/event-stream")

    def action(kind: str):
        async def handler(request: Request) -> Response:
            if request.headers.get("content-type", "").split(";")[0].strip() != \
                    "application/json":
                return JSONResponse({"error": "send a JSON body"}, status_code=415)
            body = await request.body()
            if len(body) > MAX_BODY:
                return JSONResponse({"error": "body too large"}, status_code=413)
            try:
                req = json.loads(body)
                path = req["path"] if isinstance(req, dict) else None
                if not isinstance(path, str):
                    raise UsageError('send {"path": "..."}')
            except (ValueError, KeyError):
                return _error(UsageError('send {"path": "..."}'))
            try:
                mount_of(path, home.live_mounts())
                p = Path(path)
                if kind == "pin":
                    await state.in_thread(flags.pin, p)
                    data = {"pinned": [await state.in_thread(path_status, p, CHEAP)]}
                elif kind == "unpin":
                    await state.in_thread(flags.unpin, p)
                    data = {"unpinned": [path]}
                else:
                    await state.in_thread(flags.evict, p)
                    data = {"evicted": [await state.in_thread(path_status, p, CHEAP)]}
            except PeerdriveError as exc:
                return _error(exc)
            log.info("%s %s", kind, path)
            return JSONResponse(data)

        return handler

    routes = [
        Route("/", index),
        Route("/static/{name}", static),
        Route("/api/status", api_status),
        Route("/api/dashboard", api_dashboard),
        Route("/api/tree", api_tree),
        Route("/api/events", api_events),
        Route("/api/pin", action("pin"), methods=["POST"]),
        Route("/api/unpin", action("unpin"), methods=["POST"]),
        Route("/api/evict", action("evict"), methods=["POST"]),
    ]
    return TokenGate(Starlette(routes=routes), token)
