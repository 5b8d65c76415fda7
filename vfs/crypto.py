"""Convergent block encryption (pure code, no I/O).

    k_chunk    = HMAC-SHA256(read_key, "chunk" || SHA-256(chunk))
    ciphertext = AES-256-GCM(k_chunk, nonce = 12 zero bytes, chunk)
    block id   = SHA-256(ciphertext)

The key is unique per plaintext, so the fixed nonce is never reused with one
key for two messages; equal chunks of one drive give equal blocks, which is
what lets versions and files share storage. Any node can verify a block by
its id without being able to read it.

Two ways to open a block:

* `decrypt_block` for bytes of unknown origin: the GCM tag, then the
  plaintext against its hash, so what it returns is the chunk whose hash the
  ref names, whatever the bytes were.
* `decrypt_checked_block` for the read path, whose bytes are already proven
  the publisher's own: a fetched block's SHA-256 matched its id when it was
  received, and the node's store takes a block only after that check. One
  SHA-256 of the ciphertext against an id from the signed tree fixes the
  ciphertext, AES-GCM decryption under a fixed key and nonce is a function,
  so the plaintext is the publisher's too: hashing it again proves nothing
  new (it cost a fifth of a hot read's worker time). The GCM tag is still
  checked: it is what catches bytes that changed in the store after they
  were checked (rot), see docs/security.md.

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


def decrypt_checked_block(read_key: bytes, ref: Ref, ciphertext: bytes | memoryview) -> bytes:
    """Decrypt a block whose ciphertext was checked against `ref.block_id` (SHA-256) when
    it was received; raises IntegrityError if the length or the GCM tag is wrong.

    The buffer is read where it lies (a view into the store's map is fine):
    copying 256 KiB into a fresh `bytes` first made a decryption ~4x as
    costly (a new allocation, its pages faulted in, then freed).
    """
    if len(ciphertext) != ref.length + TAG_LEN:
        raise IntegrityError(
            f"block {ref.block_id.hex()[:16]} has {len(ciphertext)} bytes, expected "
            f"{ref.length + TAG_LEN}"
        )
    try:
        return AESGCM(chunk_key(read_key, ref.chunk_hash)).decrypt(_NONCE, ciphertext, None)
    except InvalidTag as exc:
        raise IntegrityError(f"block {ref.block_id.hex()[:16]} does not decrypt with this "
                             "drive's key: corrupt or forged") from exc


def decrypt_block(read_key: bytes, ref: Ref, ciphertext: bytes | memoryview) -> bytes:
    """Decrypt and check one block of any origin; raises IntegrityError on any mismatch:
    what it returns is the chunk whose hash `ref` names."""
    plain = decrypt_checked_block(read_key, ref, ciphertext)
    if hashlib.sha256(plain).digest() != ref.chunk_hash:
        raise IntegrityError(f"block {ref.block_id.hex()[:16]} decrypted to the wrong content")
    return plain
