"""Where a process's log goes: stderr, or a size-rotated file for background mounts.

A background mount (`peerdrive mount` without `--foreground`) runs with
`--log-file PATH` (`Home.mount_log_path`, which `peerdrive status` reports):
its log records go to PATH, rotated at LOG_MAX_BYTES with LOG_BACKUPS old
files kept (PATH.1, PATH.2, ...). Its stdout and stderr are that file too
(whatever a crash prints lands beside the log), and follow it to the new file
at each rotation, so one file never grows without bound.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

LOG_MAX_BYTES = 8 * 1024 * 1024
LOG_BACKUPS = 3
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StdioFollowingHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that points fds 1 and 2 at the file it writes, after each roll."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._follow()

    def _follow(self) -> None:
        if self.stream is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        fd = self.stream.fileno()
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    def doRollover(self) -> None:  # noqa: N802 (the logging API's name)
        super().doRollover()
        self._follow()


def setup_logging(verbose: int, log_file: Path | None = None, *,
                  max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv; to `log_file` (rotated) if given."""
    level = logging.WARNING - 10 * min(verbose, 2)
    if log_file is None:
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = _StdioFollowingHandler(log_file, max_bytes, backups)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
