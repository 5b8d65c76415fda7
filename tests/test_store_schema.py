"""cache.schema: every layout round-trips, and every decoder fed arbitrary bytes
either decodes or raises CorruptMetadata (our error), nothing else."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache import schema
from cache.errors import CorruptMetadata, InvalidArgument, StoreError

U64 = st.integers(min_value=0, max_value=2**64 - 1)
IDS = st.binary(min_size=32, max_size=32)

DECODERS: list[Callable[[bytes], object]] = [
    schema.decode_meta,
    schema.decode_u32,
    schema.decode_u64,
    schema.decode_pin_head,
    schema.split_lru_key,
    schema.Counters.decode,
    schema.block_value_data,
]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__qualname__)
@given(raw=st.binary(max_size=120))
def test_decoders_raise_only_our_error(decode: Callable[[bytes], object], raw: bytes) -> None:
    try:
        decode(raw)
    except StoreError as exc:
        assert isinstance(exc, CorruptMetadata)


@given(tick=U64, size=U64)
def test_meta_round_trips(tick: int, size: int) -> None:
    assert schema.decode_meta(schema.encode_meta(tick, size)) == (tick, size)


@given(tick=U64, block_id=IDS)
def test_lru_keys_round_trip_and_sort_by_tick(tick: int, block_id: bytes) -> None:
    key = schema.lru_key(tick, block_id)
    assert schema.split_lru_key(key) == (tick, block_id)
    if tick < 2**64 - 1:
        assert key < schema.lru_key(tick + 1, b"\0" * 32)


@given(number=U64, count=U64, name=st.text(min_size=1, max_size=50))
def test_pin_heads_round_trip(number: int, count: int, name: str) -> None:
    raw = schema.encode_pin_name(name)
    assert schema.decode_pin_head(schema.encode_pin_head(number, count, raw)) == (
        number,
        count,
        name,
    )


@given(values=st.tuples(U64, U64, U64, U64, U64, U64))
def test_counters_round_trip(values: tuple[int, ...]) -> None:
    counters = schema.Counters(*values)
    assert schema.Counters.decode(counters.encode()) == counters
    assert schema.Counters.decode(None) == schema.Counters()


@given(data=st.binary(max_size=3000))
def test_block_values_check_their_bytes(data: bytes) -> None:
    value = schema.encode_block_value(schema.digest_of(data), data)
    view = schema.block_value_data(value)
    assert view is not None and bytes(view) == data
    assert schema.block_value_size(value) == len(data)
    if data:
        flipped = bytearray(value)
        flipped[-1] ^= 1
        assert schema.block_value_data(bytes(flipped)) is None


@given(key=st.binary(max_size=600))
def test_record_keys(key: bytes) -> None:
    if 1 <= len(key) <= 511:
        assert schema.check_record_key(key) == key
    else:
        with pytest.raises(InvalidArgument):
            schema.check_record_key(key)


@given(block_id=st.binary(max_size=40))
def test_ids(block_id: bytes) -> None:
    if len(block_id) == 32:
        assert schema.check_id(bytearray(block_id)) == block_id
    else:
        with pytest.raises(InvalidArgument):
            schema.check_id(block_id)
