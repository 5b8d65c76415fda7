"""Capabilities and their share links.

A drive has three capabilities, each a strict subset of the one before:

* write: the drive's Ed25519 signing key and the read key. Publishes versions.
* read: the drive's public key and the 32-byte read key. Mounts and decrypts.
* store: the drive's public key only. Verifies, stores and serves ciphertext.

A link is text a person can paste::

    peerdrive:r1:<base32 pubkey>:<base32 read key>:<check>

Base32 (RFC 4648, lower case, no padding) survives copy and paste through
chat and mail; the check is the first five bytes of a SHA-256 over the kind
and payload, so a mistyped or truncated link is an error, never another drive.
`LINK@SEQ` names one old version of a drive (`mount LINK@3`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import LinkError

LINK_SCHEME = "peerdrive"
KEY_LEN = 32
CHECK_LEN = 5

_KIND_WRITE = "w1"
_KIND_READ = "r1"
_KIND_STORE = "s1"


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str, what: str) -> bytes:
    pad = "=" * (-len(text) % 8)
    message = f"the {what} in the link is not valid base32: the link is mistyped"
    try:
        data = base64.b32decode(text.upper() + pad, casefold=False)
    except (binascii.Error, ValueError) as exc:
        raise LinkError(message) from exc
    # b32decode ignores the unused low bits of the last character (a 32-byte key
    # leaves 4), so several spellings would decode to one key: accept only ours.
    if _b32(data) != text.lower():
        raise LinkError(message)
    return data


def _check(kind: str, payload: bytes) -> bytes:
    return hashlib.sha256(b"peerdrive link\x00" + kind.encode() + b"\x00" + payload).digest()[
        :CHECK_LEN
    ]


@functools.lru_cache(maxsize=1024)
def discovery_key(drive_pubkey: bytes) -> bytes:
    """The key a drive is found by in the DHT: DHT nodes never learn the drive key.

    Cached: the read path asks for it per fetch batch (`StoreCap.discovery_key`), and a
    SHA-256 there was 2.5% of the event loop's samples during a cold read."""
    return hashlib.sha256(b"peerdrive discovery" + drive_pubkey).digest()


@dataclass(frozen=True, slots=True)
class StoreCap:
    """Verify, store and serve a drive's ciphertext; never read it."""

    pubkey: bytes

    @property
    def discovery_key(self) -> bytes:
        return discovery_key(self.pubkey)

    @property
    def drive_id(self) -> str:
        """A short, stable name for the drive in status output and on disk."""
        return self.pubkey.hex()

    def link(self) -> str:
        return _encode(_KIND_STORE, [self.pubkey])


@dataclass(frozen=True, slots=True)
class ReadCap(StoreCap):
    """Mount, decrypt and seed a drive."""

    read_key: bytes

    def link(self) -> str:
        return _encode(_KIND_READ, [self.pubkey, self.read_key])

    def store_cap(self) -> StoreCap:
        return StoreCap(self.pubkey)


@dataclass(frozen=True, slots=True)
class WriteCap(ReadCap):
    """Publish new versions of a drive. Never printed unless asked for."""

    signing_seed: bytes

    @classmethod
    def generate(cls) -> WriteCap:
        seed = os.urandom(KEY_LEN)
        return cls.from_secrets(seed, os.urandom(KEY_LEN))

    @classmethod
    def from_secrets(cls, signing_seed: bytes, read_key: bytes) -> WriteCap:
        if len(signing_seed) != KEY_LEN or len(read_key) != KEY_LEN:
            raise LinkError("a write capability needs a 32-byte signing key and read key")
        private = Ed25519PrivateKey.from_private_bytes(signing_seed)
        pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(pubkey=pub, read_key=read_key, signing_seed=signing_seed)

    def signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.signing_seed)

    def read_cap(self) -> ReadCap:
        return ReadCap(self.pubkey, self.read_key)

    def link(self) -> str:
        return _encode(_KIND_WRITE, [self.signing_seed, self.read_key])


def _encode(kind: str, fields: list[bytes]) -> str:
    payload = b"".join(fields)
    parts = [LINK_SCHEME, kind, *(_b32(f) for f in fields), _b32(_check(kind, payload))]
    return ":".join(parts)


_FIELDS = {_KIND_WRITE: 2, _KIND_READ: 2, _KIND_STORE: 1}


def parse_link(text: str) -> StoreCap:
    """Parse any capability link; the result's type says what it allows.

    Raises LinkError with a message that says what is wrong with the link.
    """
    if not isinstance(text, str):
        raise LinkError("a link must be text")
    text = text.strip()
    if not text.isascii():
        raise LinkError("a peerdrive link is plain ASCII text: this one has other characters "
                        "in it, so it is mistyped")
    if len(text) > 400:
        raise LinkError("that is too long to be a peerdrive link")
    parts = text.split(":")
    if len(parts) < 2 or parts[0].lower() != LINK_SCHEME:
        raise LinkError(f"not a peerdrive link (it must start with '{LINK_SCHEME}:')")
    kind = parts[1].lower()
    if kind not in _FIELDS:
        raise LinkError(
            f"unknown link kind {parts[1]!r}: this version of peerdrive knows "
            "w1 (write), r1 (read) and s1 (store)"
        )
    want = _FIELDS[kind] + 1
    if len(parts) - 2 != want:
        raise LinkError(f"the link has {len(parts) - 2} fields after the kind, expected {want}: "
                        "it is truncated or mistyped")
    fields = [_unb32(p.lower(), "key") for p in parts[2:-1]]
    for f in fields:
        if len(f) != KEY_LEN:
            raise LinkError("a key in the link has the wrong length: the link is mistyped")
    check = _unb32(parts[-1].lower(), "check")
    if not hmac.compare_digest(check, _check(kind, b"".join(fields))):
        raise LinkError("the link's check does not match: it is mistyped or truncated")
    if kind == _KIND_WRITE:
        return WriteCap.from_secrets(fields[0], fields[1])
    if kind == _KIND_READ:
        return ReadCap(fields[0], fields[1])
    return StoreCap(fields[0])


def require_read(cap: StoreCap) -> ReadCap:
    """Narrow to a read capability or explain why this link cannot be mounted."""
    if not isinstance(cap, ReadCap):
        raise LinkError("this is a store link: it can hold and serve the drive but not read it; "
                        "ask the owner for the read link")
    return cap


_AT = re.compile(r"^(?P<link>.+)@(?P<seq>[0-9]{1,20})$")  # LINK@SEQ


def split_version(link: str) -> tuple[str, int | None]:
    """`LINK@SEQ` -> (LINK, SEQ); a link without `@` -> (link, None). (Links are base32
    and never hold an `@`.)"""
    text = link.strip()
    m = _AT.match(text)
    if m is None:
        if "@" in text:
            raise LinkError(f"{text.rsplit('@', 1)[1]!r} is not a version number (LINK@SEQ, "
                            "e.g. LINK@3; `peerdrive log LINK` lists them)")
        return text, None
    seq = int(m["seq"])
    if seq < 1:
        raise LinkError("versions are numbered from 1")
    return m["link"], seq
