"""Content-defined chunking parameters and helpers (pure code).

FastCDC cuts where the content says, not at fixed offsets, so inserting bytes
near the start of a file moves only the chunks around the insertion and every
later chunk (and so every later block) is shared with the previous version.

The sizes trade first-byte latency and random-read cost (a read fetches and
decrypts whole chunks) against per-block overhead (one id, one request, one
LMDB record per block). docs/benchmarks.md shows the measurements behind
them. pyfastcdc's real average is `avg_size + min_size`; the names below are
what it is given.
"""

from __future__ import annotations

from collections.abc import Iterator

from pyfastcdc import FastCDC

CDC_MIN = 64 * 1024
CDC_AVG = 192 * 1024  # pyfastcdc adds min_size: the real average is about 256 KiB
CDC_MAX = 1024 * 1024


def make_chunker() -> FastCDC:
    return FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=1)


def cut_buffer(buf: bytes | memoryview) -> Iterator[memoryview]:
    """Cut an in-memory buffer into chunks (memoryviews into `buf`)."""
    if len(buf) == 0:
        return
    for c in make_chunker().cut_buf(buf):
        yield c.data
