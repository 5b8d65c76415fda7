"""Small value types shared by the DHT, the peer protocol and the fetch scheduler.

They live in their own module so that the record codecs, the Kademlia glue and
the block-transfer code can all name a peer the same way without importing
each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NODE_ID_LEN = 32
BLOCK_ID_LEN = 32
DISCOVERY_KEY_LEN = 32


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """Where to reach a peer, and who it must prove to be.

    `node_id` is SHA-256 of the peer's raw Ed25519 public key; the TLS dialer
    refuses a server whose certificate key does not hash to it (key pinning).
    """

    node_id: bytes
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.node_id.hex()[:12]}@{self.host}:{self.port}"


class Priority(enum.IntEnum):
    """Fetch priorities: lower is more urgent. A peer serves its queue in this order."""

    READ = 0  # a process is blocked in read() on this block now
    READAHEAD = 1  # sequential readahead just past what is being read
    PIN = 2  # pinning: fetch everything under a path in the background
    PREFETCH = 3  # speculative / seeding
