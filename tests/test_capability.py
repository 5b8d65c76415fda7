"""Capabilities and share links: round trips, narrowing, and mistyped links.

The promise under test: a link either parses to exactly the capability that
was shared, or raises LinkError with a message a person can act on. A
mistyped link is never another drive (or another key of the same drive).
"""

from __future__ import annotations

import hashlib
import string

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.records import discovery_key as dht_discovery_key
from vfs.capability import (
    CHECK_LEN,
    KEY_LEN,
    LINK_SCHEME,
    ReadCap,
    StoreCap,
    WriteCap,
    _b32,
    _check,
    discovery_key,
    parse_link,
    require_read,
)
from vfs.errors import LinkError, UsageError

B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
# Characters a mistyping (or a chat client) can put in a link: the base32 alphabet in
# both cases, digits base32 lacks, separators, whitespace, and non-ASCII look-alikes
# whose upper() or lower() is ASCII (long s -> S, dotless i -> I, Kelvin sign -> k).
MUTATION_CHARS = (
    B32_ALPHABET + B32_ALPHABET.upper() + "0189=:-_ ./\t\n" + "\u017f\u0131\u212a\u00e9\u200b"
)

keys = st.binary(min_size=KEY_LEN, max_size=KEY_LEN)


@st.composite
def caps(draw: st.DrawFn) -> StoreCap:
    write = WriteCap.from_secrets(draw(keys), draw(keys))
    kind = draw(st.sampled_from(["w", "r", "s"]))
    if kind == "w":
        return write
    if kind == "r":
        return write.read_cap()
    return write.read_cap().store_cap()


def fixed_caps() -> list[StoreCap]:
    write = WriteCap.from_secrets(bytes(range(32)), bytes(range(100, 132)))
    return [write, write.read_cap(), write.read_cap().store_cap()]


def is_harmless(original: str, mutated: str) -> bool:
    """The only edits a link may survive: a change of letter case, surrounding whitespace."""
    return mutated.strip().lower() == original.lower()


def assert_rejected_or_same(original: StoreCap, text: str) -> None:
    link = original.link()
    try:
        parsed = parse_link(text)
    except LinkError as exc:
        assert str(exc), "a LinkError must say what is wrong"
        return
    assert is_harmless(link, text), f"mutated link {text!r} parsed (from {link!r})"
    assert parsed == original
    assert type(parsed) is type(original)


# ----------------------------------------------------------------------------- round trips


@given(caps())
def test_link_round_trips_to_the_same_capability(cap: StoreCap) -> None:
    parsed = parse_link(cap.link())
    assert parsed == cap
    assert type(parsed) is type(cap)


@given(caps())
def test_link_shape(cap: StoreCap) -> None:
    link = cap.link()
    parts = link.split(":")
    assert parts[0] == LINK_SCHEME
    expected_kind = {WriteCap: "w1", ReadCap: "r1", StoreCap: "s1"}[type(cap)]
    assert parts[1] == expected_kind
    assert len(parts) == (4 if type(cap) is StoreCap else 5)
    assert link == link.lower() and link.isascii()
    assert all(set(p) <= set(B32_ALPHABET) for p in parts[2:])
    assert len(parts[-1]) == 8  # 5 check bytes = 40 bits = exactly 8 base32 characters


@given(caps())
def test_link_is_case_insensitive_and_tolerates_surrounding_whitespace(cap: StoreCap) -> None:
    link = cap.link()
    assert parse_link(link.upper()) == cap
    assert parse_link(f"  {link}\n") == cap


def test_link_fields_are_the_documented_encoding() -> None:
    write, read, store = fixed_caps()
    assert read.link() == ":".join(
        [
            "peerdrive",
            "r1",
            _b32(read.pubkey),
            _b32(read.read_key),
            _b32(_check("r1", read.pubkey + read.read_key)),
        ]
    )
    assert store.link() == ":".join(
        ["peerdrive", "s1", _b32(store.pubkey), _b32(_check("s1", store.pubkey))]
    )
    # A write link carries the signing seed, not the public key (which derives from it).
    assert write.link().split(":")[2] == _b32(write.signing_seed)
    digest = hashlib.sha256(b"peerdrive link\x00r1\x00" + read.pubkey + read.read_key).digest()
    assert _check("r1", read.pubkey + read.read_key) == digest[:CHECK_LEN]


# ----------------------------------------------------------------------------- narrowing


@given(keys, keys)
def test_read_from_write_and_store_from_read(seed: bytes, read_key: bytes) -> None:
    write = WriteCap.from_secrets(seed, read_key)
    expected_pub = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    assert write.pubkey == expected_pub
    read = write.read_cap()
    assert type(read) is ReadCap
    assert read == ReadCap(expected_pub, read_key)
    store = read.store_cap()
    assert type(store) is StoreCap
    assert store == StoreCap(expected_pub)
    # A narrower capability is never equal to a wider one with the same fields.
    assert read != write and store != read
    assert (
        write.signing_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        == expected_pub
    )


def test_generate_gives_fresh_working_keys() -> None:
    a, b = WriteCap.generate(), WriteCap.generate()
    assert a.pubkey != b.pubkey and a.read_key != b.read_key
    assert parse_link(a.link()) == a


def test_from_secrets_rejects_wrong_lengths() -> None:
    with pytest.raises(LinkError):
        WriteCap.from_secrets(bytes(31), bytes(32))
    with pytest.raises(LinkError):
        WriteCap.from_secrets(bytes(32), bytes(33))


def test_require_read() -> None:
    write, read, store = fixed_caps()
    assert require_read(write) is write
    assert require_read(read) is read
    with pytest.raises(LinkError, match="store link"):
        require_read(store)
    with pytest.raises(LinkError, match="store link"):
        require_read(parse_link(store.link()))


def test_discovery_key_is_the_dht_one() -> None:
    _, read, store = fixed_caps()
    expected = hashlib.sha256(b"peerdrive discovery" + read.pubkey).digest()
    assert discovery_key(read.pubkey) == expected == dht_discovery_key(read.pubkey)
    assert read.discovery_key == store.discovery_key == expected
    assert store.drive_id == read.pubkey.hex()


def test_link_error_is_a_usage_error() -> None:
    assert issubclass(LinkError, UsageError)
    assert LinkError("x").exit_code == 2


# ----------------------------------------------------------------------------- bad links


@pytest.mark.parametrize("cap", fixed_caps(), ids=["write", "read", "store"])
def test_every_single_character_substitution_is_caught(cap: StoreCap) -> None:
    """Exhaustive: every position, every plausible wrong character."""
    link = cap.link()
    for i, ch in enumerate(link):
        for new in MUTATION_CHARS:
            if new == ch:
                continue
            assert_rejected_or_same(cap, link[:i] + new + link[i + 1 :])


@pytest.mark.parametrize("cap", fixed_caps(), ids=["write", "read", "store"])
def test_every_deletion_truncation_and_insertion_is_caught(cap: StoreCap) -> None:
    link = cap.link()
    for i in range(len(link)):
        assert_rejected_or_same(cap, link[:i] + link[i + 1 :])  # one character dropped
        assert_rejected_or_same(cap, link[:i])  # truncated
        for new in "a7:= ":
            assert_rejected_or_same(cap, link[:i] + new + link[i:])  # one character added


def test_trailing_bits_of_a_key_cannot_be_respelled() -> None:
    """A 32-byte key is 52 base32 characters carrying 260 bits: the last 4 bits are unused.

    A decoder that ignored them would accept 16 spellings of every key; only the
    canonical one (unused bits zero) is accepted.
    """
    _, read, _ = fixed_caps()
    parts = read.link().split(":")
    last = parts[2][-1]
    for ch in B32_ALPHABET:
        if ch == last:
            continue
        respelled = ":".join([*parts[:2], parts[2][:-1] + ch, *parts[3:]])
        with pytest.raises(LinkError) as info:
            parse_link(respelled)
        if B32_ALPHABET.index(ch) >> 4 == B32_ALPHABET.index(last) >> 4:
            # The same 32 bytes spelled differently: refused as non-canonical base32,
            # before the check (which would match) is even looked at.
            assert "base32" in str(info.value)


@st.composite
def mutated_links(draw: st.DrawFn) -> tuple[StoreCap, str]:
    cap = draw(caps())
    text = cap.link()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "delete", "insert", "truncate", "append", "swap"]))
        i = draw(st.integers(0, max(0, len(text) - 1)))
        ch = draw(st.sampled_from(MUTATION_CHARS))
        if op == "replace" and text:
            text = text[:i] + ch + text[i + 1 :]
        elif op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "insert":
            text = text[:i] + ch + text[i:]
        elif op == "truncate":
            text = text[:i]
        elif op == "append":
            text = text + draw(st.sampled_from([":", ":aaaa", ch, ":" + text.split(":")[-1]]))
        elif op == "swap" and i + 1 < len(text):
            text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return cap, text


@settings(max_examples=400)
@given(mutated_links())
def test_random_mutations_are_rejected_unless_only_case_changed(case: tuple[StoreCap, str]) -> None:
    cap, text = case
    assert_rejected_or_same(cap, text)


def relink(kind: str, fields: list[bytes], check: bytes | None = None) -> str:
    check = _check(kind, b"".join(fields)) if check is None else check
    return ":".join([LINK_SCHEME, kind, *(_b32(f) for f in fields), _b32(check)])


def test_wrong_kind_is_caught_by_field_count_or_check() -> None:
    write, read, store = fixed_caps()
    r_parts = read.link().split(":")
    # r1 -> w1: same number of fields, so only the check (which covers the kind) catches it.
    with pytest.raises(LinkError, match="check"):
        parse_link(":".join(["peerdrive", "w1", *r_parts[2:]]))
    with pytest.raises(LinkError, match="check"):
        parse_link(":".join(["peerdrive", "r1", *write.link().split(":")[2:]]))
    with pytest.raises(LinkError, match="fields"):
        parse_link(":".join(["peerdrive", "s1", *r_parts[2:]]))
    with pytest.raises(LinkError, match="fields"):
        parse_link(":".join(["peerdrive", "r1", *store.link().split(":")[2:]]))
    with pytest.raises(LinkError, match="unknown link kind"):
        parse_link(":".join(["peerdrive", "r2", *r_parts[2:]]))
    with pytest.raises(LinkError, match="unknown link kind"):
        parse_link(":".join(["peerdrive", "x1", *r_parts[2:]]))


def test_messages_say_what_is_wrong() -> None:
    _, read, _ = fixed_caps()
    link = read.link()
    parts = link.split(":")
    cases = {
        "https://example.org/drive": "must start with 'peerdrive:'",
        "peerdrive": "must start with 'peerdrive:'",
        "": "must start with 'peerdrive:'",
        link + ":" + parts[-1]: "fields after the kind",
        ":".join(parts[:-1]): "fields after the kind",
        link.replace(parts[2], _b32(read.pubkey[:20])): "wrong length",
        link.replace(parts[2], "0" + parts[2][1:]): "base32",
        link.replace(parts[3], "1" + parts[3][1:]): "base32",
        link[:-1] + ("a" if link[-1] != "a" else "b"): "check does not match",
        ":".join([*parts[:-1], "aaaaaaaa"]): "check does not match",
        link[:14] + "\u00e1" + link[15:]: "ASCII",
        "x" * 401: "too long",
    }
    for text, fragment in cases.items():
        with pytest.raises(LinkError) as info:
            parse_link(text)
        assert fragment in str(info.value), (text, str(info.value))


def test_wrong_checksum_over_valid_keys() -> None:
    _, read, _ = fixed_caps()
    fields = [read.pubkey, read.read_key]
    assert parse_link(relink("r1", fields)) == read
    with pytest.raises(LinkError, match="check does not match"):
        parse_link(relink("r1", fields, bytes(CHECK_LEN)))
    with pytest.raises(LinkError, match="check does not match"):
        parse_link(relink("r1", fields, _check("r1", read.read_key + read.pubkey)))
    # Swapping the two keys keeps every field well formed; the check still catches it.
    swapped = read.link().split(":")
    swapped[2], swapped[3] = swapped[3], swapped[2]
    with pytest.raises(LinkError, match="check does not match"):
        parse_link(":".join(swapped))


def test_non_text_is_a_link_error() -> None:
    for value in (None, 42, b"peerdrive:r1", ["peerdrive"]):
        with pytest.raises(LinkError):
            parse_link(value)  # type: ignore[arg-type]


@given(st.text(max_size=500))
def test_arbitrary_text_raises_only_link_error(text: str) -> None:
    try:
        cap = parse_link(text)
    except LinkError:
        return
    raise AssertionError(f"arbitrary text parsed as a capability: {text!r} -> {cap!r}")


@given(
    st.sampled_from(["w1", "r1", "s1", "W1", "x1", ""]),
    st.lists(st.text(alphabet=string.ascii_letters + string.digits + "=", max_size=60), max_size=4),
)
def test_link_shaped_text_raises_only_link_error(kind: str, fields: list[str]) -> None:
    text = ":".join(["peerdrive", kind, *fields])
    with pytest.raises(LinkError):
        parse_link(text)
