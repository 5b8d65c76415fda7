"""Content-defined chunking parameters and helpers (pure code).

FastCDC cuts where the content says, not at fixed offsets, so inserting bytes
near the start of a file moves only the chunks around the insertion and every
later chunk (and so every later block) is shared with the previous version.

The sizes trade first-byte latency and random-read cost (a read fetches and
decrypts whole chunks) against per-block overhead (one id, one request, one
LMDB record per block). docs/benchmarks.md shows the measurements behind
them ("Chunks of about 1 MiB"): at ~256 KiB a cold read spent most of its CPU
per block, not per byte (the mount's threads, their hand-offs, a request
each), and a cold mirror read ran at 0.3x rclone; at ~1 MiB it uses ~30% less
CPU per byte and reads ~30% faster, while a random 4 KiB read that misses
fetches and checks ~1 MiB (p50 ~2.5x, p99 still under rclone's) and an edit
changes about twice the bytes. CernVM-FS (8 MiB), borg (2 MiB) and restic
(1 MiB) cut larger still. pyfastcdc's real average is `avg_size + min_size`;
the names below are what it is given. The reader never needs these: a file
record lists its blocks, so drives cut with other sizes read the same.
"""

from __future__ import annotations

from collections.abc import Iterator

from pyfastcdc import FastCDC

CDC_MIN = 256 * 1024
CDC_AVG = 768 * 1024  # pyfastcdc adds min_size: the real average is about 1 MiB
CDC_MAX = 2 * 1024 * 1024


def make_chunker() -> FastCDC:
    return FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=1)


def cut_buffer(buf: bytes | memoryview) -> Iterator[memoryview]:
    """Cut an in-memory buffer into chunks (memoryviews into `buf`)."""
    if len(buf) == 0:
        return
    for c in make_chunker().cut_buf(buf):
        yield c.data
