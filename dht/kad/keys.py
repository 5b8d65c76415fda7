"""DHT keys: the provider key of a discovery key, id checks, value tags, `KadError`."""

from __future__ import annotations

import hashlib
from typing import Any

from dht.errors import DhtError
from dht.types import DISCOVERY_KEY_LEN

from .limits import KEY_LEN, PROVIDER_KEY_PREFIX


class KadError(DhtError):
    """The DHT cannot do what was asked (not running, cannot listen, bad argument)."""


def provider_key(dk: bytes) -> bytes:
    """DHT key of the provider set of discovery key `dk`."""
    _check_dk(dk)
    return hashlib.sha256(PROVIDER_KEY_PREFIX + dk).digest()


def _check_dk(dk: bytes) -> None:
    if not isinstance(dk, bytes) or len(dk) != DISCOVERY_KEY_LEN:
        raise KadError(f"a discovery key is {DISCOVERY_KEY_LEN} bytes")


def _is_key(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_LEN



def _tag(tag: int, wire: bytes) -> bytes:
    return bytes([tag]) + wire
