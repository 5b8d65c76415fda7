"""Wiring one node together for a mount: store, drive, FUSE, and (later) peers.

The command line calls `run_mount_foreground`; everything it starts lives in
one trio nursery and ends when the mount ends.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import trio

from .capability import ReadCap
from .drive import Drive
from .errors import DriveNotFound
from .fs import DriveOperations
from .home import Home
from .mount import check_mountpoint, report_ready, serve_fuse
from .storage import DriveStorage
from .units import parse_size

log = logging.getLogger(__name__)


def run_mount_foreground(home: Home, cap: ReadCap, mountpoint: Path,
                         args: argparse.Namespace) -> None:
    from cache.store import BlockStore

    check_mountpoint(mountpoint)
    limit = parse_size(args.cache_size) if args.cache_size else None
    store = BlockStore(home.store_path, limit_bytes=limit) if limit is not None else \
        BlockStore(home.store_path)
    try:
        storage = DriveStorage(store)
        head = storage.load_head(cap)
        if head is None:
            raise DriveNotFound(f"no version of drive {cap.drive_id[:16]} is known to this node")
        drive = Drive(cap, storage, head)
        ops = DriveOperations(drive)

        def ready() -> None:
            home.register_mount(mountpoint, {"pid": os.getpid(), "mountpoint": str(mountpoint),
                                             "drive": cap.drive_id})
            report_ready(args.ready_fd)

        try:
            trio.run(serve_fuse, ops, mountpoint, drive.run, ready)
        finally:
            home.unregister_mount(mountpoint)
    finally:
        store.close()
