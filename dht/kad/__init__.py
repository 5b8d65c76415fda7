"""The Kademlia DHT: the `kademlia` package, made to hold only verified records, run from trio.

The `kademlia` package (asyncio, msgpack RPC over UDP) stores whatever any node
sends, overwrites a key on every store and returns the most common answer of a
lookup. Here its classes are subclassed so that a node:

- keeps two key spaces apart: mutable records under their discovery key and
  provider sets under ``SHA-256(b"peerdrive providers" || dk)``; every stored
  value also carries a one-byte tag naming its kind (see `TAG_MUTABLE`);
- verifies every value before it stores or believes it (`RecordStorage.offer`),
  refusing garbage, forgeries, records under the wrong key and rollbacks;
- merges provider records into a bounded `ProviderSet` instead of overwriting;
- crawls a lookup through all of the k closest nodes and returns the highest
  valid sequence number (mutable) or the union of valid providers;
- never dies of a datagram: every datagram is bounded, parsed defensively, and
  a node that answers garbage is dropped from the routing table and ignored.

The id space is 256 bits (the package's is 160): keys are SHA-256 values, and a
DHT node's routing id is 32 random bytes unless one is given.

`Dht` is the trio-facing class. It runs the asyncio code on a trio-asyncio loop
inside the trio program (see docs/dht.md for why not a thread).
"""

from __future__ import annotations

from .crawl import (  # noqa: F401
    BoundedNodeHeap,
    CheckedNodeSpiderCrawl,
    LookupStats,
    RecordSpiderCrawl,
)
from .keys import (  # noqa: F401
    KadError,
    provider_key,
)
from .limits import (  # noqa: F401
    BOOTSTRAP_RETRY_INTERVAL,
    CRAWL_HEAP_LIMIT,
    DEAD_AFTER_SILENCE,
    DEAD_CONTACT_MEMORY,
    FIND_VALUE_BUDGET,
    KEY_LEN,
    MAX_CRAWL_ROUNDS,
    MAX_DATAGRAM,
    MAX_DEAD_CONTACTS,
    MAX_HEARD,
    MAX_LIVENESS_CHECKS,
    MAX_LOOKUP_PROVIDERS,
    MAX_NODES_IN_REPLY,
    MAX_STORED_KEYS,
    MAX_TRACKED_ADDRESSES,
    MAX_WELCOME_VALUES,
    MUTABLE_REPUBLISH_INTERVAL,
    MUTABLE_STORE_TTL,
    PROVIDER_KEY_PREFIX,
    REFRESH_INTERVAL,
    REQUEST_BURST,
    REQUESTS_PER_SECOND,
    TAG_MUTABLE,
    TAG_PROVIDER,
    TOKEN_LEN,
    TOKEN_ROTATE,
    UNVERIFIED_BYTES_BURST,
    UNVERIFIED_BYTES_PER_SECOND,
    UNVERIFIED_REPLY_MAX,
    UNVERIFIED_REQUEST_BURST,
    UNVERIFIED_REQUESTS_PER_SECOND,
    VERIFIED_TTL,
    VERIFY_PINGS_PER_SECOND,
)
from .node import (  # noqa: F401
    Dht,
)
from .protocol import (  # noqa: F401
    PeerdriveProtocol,
    WideRoutingTable,
)
from .server import (  # noqa: F401
    DhtServer,
)
from .storage import (  # noqa: F401
    RecordStorage,
)
