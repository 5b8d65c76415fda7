"""Sizes on the command line: the cache's own parser, with the drive layer's errors.

`cache.sizes` defines the accepted forms (500M, 10G, 2GiB, 1.5TB, "unlimited");
this adapter only turns its error into a UsageError (exit code 2) and shows
"no limit" for None.
"""

from __future__ import annotations

from cache.sizes import InvalidSize, parse_limit
from cache.sizes import format_size as _format_size

from .errors import UsageError


def parse_size(text: str) -> int | None:
    """A size or cache limit; None means no limit ("unlimited", "none", "off")."""
    try:
        return parse_limit(text)
    except InvalidSize as exc:
        raise UsageError(str(exc)) from exc


def format_size(n: int | float | None) -> str:
    return "unlimited" if n is None else _format_size(int(n))
