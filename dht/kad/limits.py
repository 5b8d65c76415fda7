"""Every bound and interval of the DHT, in one place (the other modules import them)."""

from __future__ import annotations

from dht.timescale import scaled

KEY_LEN = 32
"""Every DHT key and routing id is 32 bytes (a 256-bit Kademlia id space)."""

PROVIDER_KEY_PREFIX = b"peerdrive providers"

TAG_MUTABLE = 0x01
"""First byte of a stored value holding a `MutableRecord` wire."""
TAG_PROVIDER = 0x02
"""First byte of a stored value holding a `ProviderRecord` wire."""

MAX_DATAGRAM = 16 * 1024
"""Largest DHT datagram sent or accepted; larger ones are dropped unread."""

FIND_VALUE_BUDGET = 12 * 1024
"""Bytes of stored values one find_value reply may carry (the rest of a datagram is nodes)."""

MAX_NODES_IN_REPLY = 64
"""A reply listing more contacts than this is garbage (an honest one lists at most k)."""

MAX_STORED_KEYS = 8192
"""Per kind (mutable / provider sets): a node stores at most this many keys for others."""

MAX_LOOKUP_PROVIDERS = 100
"""Most provider records a lookup returns (the union over all answers, latest-expiring first)."""

MUTABLE_STORE_TTL = scaled(24 * 3600)
"""A stored mutable record is dropped this long after it was last stored (or re-stored)."""

MUTABLE_REPUBLISH_INTERVAL = scaled(3600)
"""How often a node re-stores the mutable records it put, so they outlive MUTABLE_STORE_TTL."""

REFRESH_INTERVAL = scaled(15 * 60)
"""How often the routing table's idle buckets are refreshed and storage culled."""

BOOTSTRAP_RETRY_INTERVAL = scaled(30)
"""How often a node with an empty routing table tries its bootstrap contacts again."""

DEAD_CONTACT_MEMORY = scaled(120.0)
"""Seconds an address that did not answer stays skipped by lookups (unless it speaks first)."""

DEAD_AFTER_SILENCE = 10.0
"""A timeout marks an address dead only if nothing came from it for this long: a node that
answered a moment ago and missed one reply is slow (a loaded machine), not gone."""

MAX_DEAD_CONTACTS = 1024
"""Addresses remembered as dead, at most (oldest forgotten first)."""

MAX_LIVENESS_CHECKS = 16
"""Liveness pings outstanding at once, at most."""

MAX_HEARD = 4096
"""Addresses whose last datagram time is remembered, at most."""

UNVERIFIED_REPLY_MAX = 1280
"""Largest reply sent to an address that has not shown it receives our datagrams.

A request's source address is unauthenticated: a forged one makes us answer a
victim. Replies to an unverified address are cut to this (about 12 times a
~100-byte request, a full find_node contact list) and carry a token instead of
what did not fit; asking again with the token proves the address and gets all.
"""

TOKEN_LEN = 16
TOKEN_ROTATE = scaled(300.0)
"""Seconds between two token secrets; a token is valid for one to two of these."""

VERIFIED_TTL = scaled(1800.0)
"""An address that answered one of our requests counts as verified this long."""

MAX_TRACKED_ADDRESSES = 4096
"""Bound of every per-address table (verified addresses, tokens held, rate buckets)."""

REQUESTS_PER_SECOND = 100.0
REQUEST_BURST = 400.0
"""Requests one source address (ip, port) may send: a sustained rate and a burst."""

UNVERIFIED_REQUESTS_PER_SECOND = 200.0
UNVERIFIED_REQUEST_BURST = 800.0
"""Requests all unverified addresses of one IP may send (a spoofer varies the source port)."""

UNVERIFIED_BYTES_PER_SECOND = 64 * 1024
UNVERIFIED_BYTES_BURST = 256 * 1024
"""Reply bytes all unverified addresses of one IP may draw, so a spoofed flood stays small."""

VERIFY_PINGS_PER_SECOND = 50.0
"""Pings sent to check that a new contact really is at its source address, at most."""

MAX_WELCOME_VALUES = 8
"""Values handed to a newly verified contact that is closer to their keys (paper §2.5)."""

MAX_CRAWL_ROUNDS = 24
"""Rounds a lookup may take (1000 nodes need 3-6): a node feeding fake contacts ends there."""

CRAWL_HEAP_LIMIT = 4
"""A lookup keeps at most this many times k candidate contacts."""

_REQUEST = 0x00
_RESPONSE = 0x01
_MSG_ID_LEN = 20
