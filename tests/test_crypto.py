"""Convergent block encryption: round trips, convergence, and tamper detection.

The promise under test: `decrypt_block` returns exactly the chunk that was
encrypted, or raises IntegrityError. It never returns other bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vfs.crypto import (
    HASH_LEN,
    MAX_BLOCK_PLAINTEXT,
    TAG_LEN,
    Ref,
    block_id_of,
    chunk_key,
    decrypt_block,
    decrypt_checked_block,
    encrypt_chunk,
)
from vfs.errors import FormatError, IntegrityError

keys = st.binary(min_size=32, max_size=32)
chunks = st.binary(max_size=4096)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@given(keys, chunks)
def test_round_trip(read_key: bytes, chunk: bytes) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    assert decrypt_block(read_key, ref, ciphertext) == chunk


@given(keys, chunks)
def test_ref_fields_and_block_id(read_key: bytes, chunk: bytes) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    assert len(ciphertext) == len(chunk) + TAG_LEN
    assert ref.block_id == hashlib.sha256(ciphertext).digest() == block_id_of(ciphertext)
    assert ref.chunk_hash == hashlib.sha256(chunk).digest()
    assert len(ref.block_id) == len(ref.chunk_hash) == HASH_LEN
    assert ref.length == len(chunk)


@given(keys, chunks)
def test_block_is_the_documented_construction(read_key: bytes, chunk: bytes) -> None:
    """Recompute the block from the formula in docs/formats.md with plain primitives."""
    h = hashlib.sha256(chunk).digest()
    k_chunk = hmac.new(read_key, b"chunk" + h, hashlib.sha256).digest()
    assert chunk_key(read_key, h) == k_chunk
    expected = AESGCM(k_chunk).encrypt(bytes(12), chunk, None)
    _, ciphertext = encrypt_chunk(read_key, chunk)
    assert ciphertext == expected


@given(keys, chunks)
def test_convergence_same_chunk_same_key_same_block(read_key: bytes, chunk: bytes) -> None:
    assert encrypt_chunk(read_key, chunk) == encrypt_chunk(read_key, chunk)
    # A memoryview (how publish hands over slices of an mmap) gives the same block.
    padded = b"xx" + chunk + b"yy"
    assert encrypt_chunk(read_key, memoryview(padded)[2 : 2 + len(chunk)]) == encrypt_chunk(
        read_key, chunk
    )


@given(keys, keys, chunks)
def test_different_read_keys_give_different_blocks(
    key_a: bytes, key_b: bytes, chunk: bytes
) -> None:
    assume(key_a != key_b)
    ref_a, ct_a = encrypt_chunk(key_a, chunk)
    ref_b, ct_b = encrypt_chunk(key_b, chunk)
    assert ct_a != ct_b
    assert ref_a.block_id != ref_b.block_id
    assert ref_a.chunk_hash == ref_b.chunk_hash  # the plaintext hash is key-independent
    with pytest.raises(IntegrityError):
        decrypt_block(key_b, ref_a, ct_a)


@given(keys, chunks, chunks)
def test_different_chunks_give_different_blocks(read_key: bytes, a: bytes, b: bytes) -> None:
    assume(a != b)
    assert encrypt_chunk(read_key, a)[0].block_id != encrypt_chunk(read_key, b)[0].block_id


def test_every_single_bit_flip_of_a_block_is_detected() -> None:
    """Exhaustive over a small block: every bit of the ciphertext and of the tag."""
    chunk = b"the quick brown fox jumps over the lazy dog" * 3
    ref, ciphertext = encrypt_chunk(KEY, chunk)
    for i in range(len(ciphertext)):
        for bit in range(8):
            bad = bytearray(ciphertext)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError, match="does not decrypt"):
                decrypt_block(KEY, ref, bytes(bad))


@settings(max_examples=300)
@given(keys, st.binary(min_size=0, max_size=2048), st.data())
def test_any_byte_change_is_detected(read_key: bytes, chunk: bytes, data: st.DataObject) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    i = data.draw(st.integers(0, len(ciphertext) - 1))
    delta = data.draw(st.integers(1, 255))
    bad = bytearray(ciphertext)
    bad[i] ^= delta
    with pytest.raises(IntegrityError):
        decrypt_block(read_key, ref, bytes(bad))


@given(keys, st.binary(min_size=1, max_size=512))
def test_truncated_or_extended_blocks_are_detected(read_key: bytes, chunk: bytes) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    for bad in (ciphertext[:-1], ciphertext[1:], ciphertext + b"\x00", b"", ciphertext[:TAG_LEN]):
        with pytest.raises(IntegrityError):
            decrypt_block(read_key, ref, bad)


@given(keys, st.binary(min_size=1, max_size=512), st.binary(min_size=32, max_size=32))
def test_wrong_chunk_hash_is_detected(read_key: bytes, chunk: bytes, other: bytes) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    assume(other != ref.chunk_hash)
    with pytest.raises(IntegrityError):
        decrypt_block(read_key, Ref(ref.block_id, other, ref.length), ciphertext)


@given(keys, st.binary(min_size=1, max_size=512), st.integers(0, 4096))
def test_wrong_length_is_detected(read_key: bytes, chunk: bytes, length: int) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    assume(length != ref.length)
    with pytest.raises(IntegrityError, match="expected"):
        decrypt_block(read_key, Ref(ref.block_id, ref.chunk_hash, length), ciphertext)


def test_swapping_blocks_of_equal_length_is_detected() -> None:
    """A peer answering with another (valid) block of the drive is caught by the key."""
    ref_a, ct_a = encrypt_chunk(KEY, b"a" * 100)
    ref_b, ct_b = encrypt_chunk(KEY, b"b" * 100)
    with pytest.raises(IntegrityError):
        decrypt_block(KEY, ref_a, ct_b)
    with pytest.raises(IntegrityError):
        decrypt_block(KEY, ref_b, ct_a)


def test_decrypt_checks_the_plaintext_hash_after_the_tag() -> None:
    """A block sealed under the right key but holding other bytes is still refused.

    Only someone with the read key can make such a block (a buggy or malicious
    writer); the final hash check makes decrypt's guarantee independent of the
    key derivation.
    """
    real = b"real content"
    forged = b"fake content"
    h = hashlib.sha256(real).digest()
    ciphertext = AESGCM(chunk_key(KEY, h)).encrypt(bytes(12), forged, None)
    ref = Ref(block_id_of(ciphertext), h, len(real))
    with pytest.raises(IntegrityError, match="wrong content"):
        decrypt_block(KEY, ref, ciphertext)


@settings(max_examples=300)
@given(keys, st.binary(max_size=256), st.binary(min_size=32, max_size=32), st.integers(0, 300))
def test_decrypt_never_returns_wrong_bytes(
    read_key: bytes, ciphertext: bytes, chunk_hash: bytes, length: int
) -> None:
    """Arbitrary (ref, ciphertext): IntegrityError, or bytes that hash to the ref."""
    ref = Ref(hashlib.sha256(ciphertext).digest(), chunk_hash, length)
    try:
        plain = decrypt_block(read_key, ref, ciphertext)
    except IntegrityError:
        return
    assert hashlib.sha256(plain).digest() == chunk_hash and len(plain) == length


@settings(max_examples=200)
@given(keys, st.binary(max_size=512), st.data())
def test_tampered_blocks_decrypt_to_the_original_or_fail(
    read_key: bytes, chunk: bytes, data: st.DataObject
) -> None:
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    tampered = data.draw(
        st.one_of(
            st.binary(max_size=len(ciphertext) + 4),
            st.just(ciphertext[::-1]),
            st.just(os.urandom(len(ciphertext))),
        )
    )
    try:
        plain = decrypt_block(read_key, ref, tampered)
    except IntegrityError:
        return
    assert plain == chunk


def test_integrity_error_is_a_format_error() -> None:
    assert issubclass(IntegrityError, FormatError)


def test_block_size_limit() -> None:
    ref, ciphertext = encrypt_chunk(KEY, bytes(MAX_BLOCK_PLAINTEXT))
    assert len(ciphertext) == MAX_BLOCK_PLAINTEXT + TAG_LEN == 4 * 1024 * 1024
    assert decrypt_block(KEY, ref, ciphertext) == bytes(MAX_BLOCK_PLAINTEXT)
    with pytest.raises(ValueError):
        encrypt_chunk(KEY, bytes(MAX_BLOCK_PLAINTEXT + 1))


def test_empty_chunk() -> None:
    ref, ciphertext = encrypt_chunk(KEY, b"")
    assert len(ciphertext) == TAG_LEN and ref.length == 0
    assert decrypt_block(KEY, ref, ciphertext) == b""
    assert encrypt_chunk(OTHER_KEY, b"")[1] != ciphertext


@settings(max_examples=200)
@given(keys, st.binary(max_size=2048), st.data())
def test_checked_decrypt_of_a_changed_block_gives_the_chunk_or_fails(
    read_key: bytes, chunk: bytes, data: st.DataObject
) -> None:
    """`decrypt_checked_block` (the read path: the ciphertext's id was checked on its way
    in) skips the plaintext hash; any later change of the bytes, of any length, is
    still refused by the GCM tag, and a view into a larger buffer reads in place."""
    ref, ciphertext = encrypt_chunk(read_key, chunk)
    padded = b"ab" + ciphertext + b"cd"
    assert decrypt_checked_block(read_key, ref, memoryview(padded)[2:-2]) == chunk
    tampered = data.draw(st.one_of(
        st.binary(max_size=len(ciphertext) + 4),
        st.builds(lambda i, d: ciphertext[:i] + bytes([ciphertext[i] ^ d]) + ciphertext[i + 1:],
                  st.integers(0, len(ciphertext) - 1), st.integers(1, 255)),
    ))
    try:
        plain = decrypt_checked_block(read_key, ref, memoryview(tampered))
    except IntegrityError:
        return
    assert plain == chunk and tampered == ciphertext


def test_checked_decrypt_trusts_the_id_check_for_what_the_tag_cannot_tell() -> None:
    """The one difference from `decrypt_block`: a block sealed under the right key but
    holding other bytes than its ref's hash names. Only a holder of the read key can
    make it, and its id is its own SHA-256, so a reader meets it only where the signed
    tree names that id: the publisher's own content (docs/security.md)."""
    real, forged = b"real content", b"fake content"
    h = hashlib.sha256(real).digest()
    ciphertext = AESGCM(chunk_key(KEY, h)).encrypt(bytes(12), forged, None)
    ref = Ref(block_id_of(ciphertext), h, len(real))
    assert decrypt_checked_block(KEY, ref, ciphertext) == forged
    with pytest.raises(IntegrityError, match="wrong content"):
        decrypt_block(KEY, ref, ciphertext)
