"""Convergent block encryption (pure code, no I/O).

    k_chunk    = HMAC-SHA256(read_key, "chunk" || SHA-256(chunk))
    ciphertext = AES-256-GCM(k_chunk, nonce = 12 zero bytes, chunk)
    block id   = SHA-256(ciphertext)

The key is unique per plaintext, so the fixed nonce is never reused with one
key for two messages; equal chunks of one drive give equal blocks, which is
what lets versions and files share storage. Any node can verify a block by
its id without being able to read it. After decryption the plaintext is
checked against its hash too, so a block that decrypts is the exact chunk the
publisher cut.

These functions work on whole buffers and release the GIL inside OpenSSL;
callers run large ones in worker threads.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError

HASH_LEN = 32
TAG_LEN = 16
MAX_BLOCK_PLAINTEXT = 4 * 1024 * 1024 - TAG_LEN
_NONCE = bytes(12)


@dataclass(frozen=True, slots=True)
class Ref:
    """How to find and open one encrypted block.

    `block_id` finds it (any node can check it); `chunk_hash` and the read key
    give its key and check the plaintext; `length` is the plaintext length.
    """

    block_id: bytes
    chunk_hash: bytes
    length: int


def chunk_key(read_key: bytes, chunk_hash: bytes) -> bytes:
    # hmac.digest is OpenSSL's one-shot HMAC: the same bytes as hmac.new(...).digest()
    # without building an HMAC object, about half the cost per block (one per block
    # published or read: 10^6 of them for a drive of 10^6 small files)
    return hmac.digest(read_key, b"chunk" + chunk_hash, "sha256")


def block_id_of(ciphertext: bytes | memoryview) -> bytes:
    return hashlib.sha256(ciphertext).digest()


def encrypt_chunk(read_key: bytes, chunk: bytes | memoryview) -> tuple[Ref, bytes]:
    """Encrypt one chunk; returns its Ref and the ciphertext to store."""
    if len(chunk) > MAX_BLOCK_PLAINTEXT:
        raise ValueError(f"chunk of {len(chunk)} bytes exceeds the block limit")
    h = hashlib.sha256(chunk).digest()
    # AES-GCM reads the buffer where it is: no copy of a chunk cut from a larger one
    ciphertext = AESGCM(chunk_key(read_key, h)).encrypt(_NONCE, chunk, None)
    return Ref(block_id_of(ciphertext), h, len(chunk)), ciphertext


def decrypt_block(read_key: bytes, ref: Ref, ciphertext: bytes | memoryview) -> bytes:
    """Decrypt and check one block; raises IntegrityError on any mismatch."""
    if len(ciphertext) != ref.length + TAG_LEN:
        raise IntegrityError(
            f"block {ref.block_id.hex()[:16]} has {len(ciphertext)} bytes, expected "
            f"{ref.length + TAG_LEN}"
        )
    try:
        plain = AESGCM(chunk_key(read_key, ref.chunk_hash)).decrypt(_NONCE, bytes(ciphertext), None)
    except InvalidTag as exc:
        raise IntegrityError(f"block {ref.block_id.hex()[:16]} does not decrypt with this "
                             "drive's key: corrupt or forged") from exc
    if hashlib.sha256(plain).digest() != ref.chunk_hash:
        raise IntegrityError(f"block {ref.block_id.hex()[:16]} decrypted to the wrong content")
    return plain
