"""What fuzzing the drive decoders found (tests/fuzz_drive.py), kept as plain tests."""

from __future__ import annotations

import pytest

from tests.fuzzing import CORPUS
from vfs.errors import FormatError
from vfs.formats import decode_dir_node


def test_unknown_keys_of_mixed_types_are_a_format_error() -> None:
    """`scripts/fuzz dir_node` found this in 30 s: a directory entry with unknown map keys
    of both str and bytes made the decoder raise TypeError while writing its own
    error message (sorted() over mixed types); a malicious drive could use it to
    fail a listing with an unexpected exception instead of EIO."""
    data = (CORPUS / "dir_node" / "crash-mixed-key-types").read_bytes()
    with pytest.raises(FormatError, match="unknown fields"):
        decode_dir_node(data)
