"""Where things live in a static HTTP mirror, and which base URLs are acceptable (pure code).

A mirror is a directory served as it is by any static web server, bucket or
CDN (docs/formats.md, "Mirror layout"):

    {base}/head                    the signed head record, exact bytes as signed
    {base}/blocks/ab/abcdef...     one file per block, named by its id in hex

The writer (`vfs/mirror.py`) and the reader (`dht/http_source.py`) both name
paths through this module, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from .errors import DhtError

HEAD_PATH = "head"
BLOCKS_DIR = "blocks"
MAX_BLOCK = 4 * 1024 * 1024  # the largest block the formats allow (docs/formats.md)
MAX_URL_LEN = 512


class MirrorUrlError(DhtError):
    """A mirror URL that cannot be used (scheme, length, form)."""


def block_path(block_id: bytes) -> str:
    """Where a block lives under a mirror's base: `blocks/<first 2 hex>/<64 hex>`."""
    name = block_id.hex()
    return f"{BLOCKS_DIR}/{name[:2]}/{name}"


def check_base_url(url: str) -> str:
    """A mirror's base URL in canonical form (no trailing slash), or MirrorUrlError.

    Only http and https; a host is required; no user:password (a URL may be
    published in a signed head for anyone to read), no query and no fragment
    (paths are appended to it); at most MAX_URL_LEN characters, printable ASCII.
    """
    if not isinstance(url, str):
        raise MirrorUrlError("a mirror URL must be text")
    if not url or len(url) > MAX_URL_LEN:
        raise MirrorUrlError(f"a mirror URL must be 1 to {MAX_URL_LEN} characters long")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise MirrorUrlError(f"mirror URL {url!r} must be printable ASCII without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MirrorUrlError(f"mirror URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise MirrorUrlError(f"mirror URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise MirrorUrlError(f"mirror URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise MirrorUrlError(f"mirror URL {url!r} must not carry a user name or password")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise MirrorUrlError(f"mirror URL {url!r} must not have a query or fragment")
    if port == 0:
        raise MirrorUrlError(f"mirror URL {url!r} has port 0")
    return url.rstrip("/")


def source_id(base_url: str) -> bytes:
    """A 32-byte id for a mirror, so the fetcher can key it like a peer's node id."""
    return hashlib.sha256(b"peerdrive http source\x00" + base_url.encode()).digest()
