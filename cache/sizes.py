"""Byte sizes as people write them ("10G", "512 MiB", "1.5GB") and as we show them.

Used for the cache limit on the command line and in the config file. Units:
a bare number is bytes; K, M, G, T, P and KiB...PiB are powers of 1024 (as in
`du` and `truncate`); KB, MB, GB, TB, PB are powers of 1000. Case does not
matter; a trailing "B" alone means bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from cache.errors import InvalidArgument

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _UNITS[_letter] = 1024**_power
    _UNITS[_letter + "ib"] = 1024**_power
    _UNITS[_letter + "b"] = 1000**_power

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")
_MAX_TEXT = 64
MAX_SIZE = 1 << 62  # far above any disk; keeps every limit a valid u64
_UNLIMITED = {"none", "unlimited", "off"}


class InvalidSize(InvalidArgument):
    """A size that cannot be read, e.g. "10 GX" or "-1"."""


def parse_size(text: str) -> int:
    """Bytes in `text`; raises InvalidSize with a message naming the accepted forms."""
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise InvalidSize(f"not a size: {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InvalidSize(f"not a size: {text!r} (try 500M, 10G, 2GiB or 1.5TB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise InvalidSize(f"unknown unit {unit!r} in {text!r} (use K, M, G, T, KiB..., KB...)")
    try:
        value = int(Decimal(number) * factor)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise InvalidSize(f"not a size: {text!r}") from exc
    if value > MAX_SIZE:
        raise InvalidSize(f"size {text!r} is too large")
    return value


def parse_limit(text: str) -> int | None:
    """A cache limit: a size, or "none"/"unlimited"/"off" for no limit (None)."""
    if isinstance(text, str) and text.strip().lower() in _UNLIMITED:
        return None
    return parse_size(text)


def format_size(n: int) -> str:
    """A short human form: 0 B, 512 B, 1.5 KiB, 10.0 GiB."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"
