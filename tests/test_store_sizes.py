"""cache.sizes: the sizes people type for the cache limit, and how we show them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.errors import InvalidArgument, StoreError
from cache.sizes import InvalidSize, format_size, parse_limit, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("12B", 12),
        ("64K", 64 * 1024),
        ("64k", 64 * 1024),
        ("64KiB", 64 * 1024),
        ("512 MiB", 512 * 1024**2),
        ("10G", 10 * 1024**3),
        ("10GB", 10 * 1000**3),
        ("1.5G", 3 * 1024**3 // 2),
        (".5M", 512 * 1024),
        (" 2 TiB ", 2 * 1024**4),
        ("1PB", 1000**5),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1", "1e9", "10 GX", "1..5G", "ten", "1 2", "9" * 80])
def test_parse_size_refuses_with_our_error(text: str) -> None:
    with pytest.raises(InvalidSize) as info:
        parse_size(text)
    assert isinstance(info.value, InvalidArgument)
    assert str(info.value)


def test_parse_size_refuses_absurd_sizes() -> None:
    with pytest.raises(InvalidSize, match="too large"):
        parse_size("99999999P")


def test_parse_limit() -> None:
    assert parse_limit("none") is None
    assert parse_limit("Unlimited") is None
    assert parse_limit("off") is None
    assert parse_limit("2G") == 2 * 1024**3


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (10 * 1024**3, "10.0 GiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_of_huge_numbers_stays_in_pib() -> None:
    assert format_size(2 * 1024**6) == "2048.0 PiB"


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_only_invalid_size(text: str) -> None:
    try:
        value = parse_size(text)
    except StoreError as exc:
        assert isinstance(exc, InvalidSize)
    else:
        assert 0 <= value <= 1 << 62


@given(st.integers(min_value=0, max_value=1 << 62))
def test_formatted_sizes_parse_back_close(n: int) -> None:
    shown = format_size(n)
    back = parse_size(shown.replace(" ", ""))
    assert abs(back - n) <= max(1, n) * 0.05
