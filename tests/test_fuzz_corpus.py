"""The seeded fuzz corpus, replayed: every decoder of untrusted bytes on every saved input.

`tests/corpus/<target>/` holds small inputs (generated seeds, and inputs the long
`scripts/fuzz` runs found interesting or that once crashed a target). Each must
come out of its target with nothing but the target's own error types, within
`INPUT_SECONDS` and `INPUT_MEMORY` of Python allocations. A short random-bytes
run per target (hypothesis) adds fresh inputs each time.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import CORPUS, INPUT_MEMORY, INPUT_SECONDS, corpus_files, load_targets

TARGETS = load_targets()


def test_every_corpus_folder_is_a_target_and_every_target_has_seeds():
    folders = {p.name for p in CORPUS.iterdir() if p.is_dir()}
    assert folders <= set(TARGETS), f"corpus folders without a target: {folders - set(TARGETS)}"
    for name in TARGETS:
        assert corpus_files(name), f"fuzz target {name} has no corpus under {CORPUS / name}"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_cleanly_in_bounded_time_and_memory(name):
    target = TARGETS[name]
    tracemalloc.start()
    try:
        for path in corpus_files(name):
            data = path.read_bytes()
            tracemalloc.reset_peak()
            start = time.perf_counter()
            target.check(data)  # FuzzCrash names the input's target and the exception
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            assert elapsed < INPUT_SECONDS, f"{path.name}: {elapsed:.2f} s"
            assert peak < INPUT_MEMORY, f"{path.name}: {peak} bytes allocated"
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_random_bytes_never_crash_a_target(name, data):
    TARGETS[name].check(data)
