"""Human sizes for the command line: `500M`, `10G`, `1.5GiB` and back."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a size such as `500M`, `10G`, `2GiB`, `1048576` (binary units)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"not a size: {text!r} (use a number with an optional K, M, G or T)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 0 or value > 1 << 60:
        raise UsageError(f"size out of range: {text!r}")
    return int(value)


def format_size(n: int | float | None) -> str:
    if n is None:
        return "unlimited"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
