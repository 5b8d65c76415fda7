"""Errors raised by the dht package.

Every error the DHT, the peer protocol and the fetch scheduler raise is a
`DhtError`, so the drive layer can catch one type at its boundary and turn it
into a message (or an errno) without knowing which module failed.
"""

from __future__ import annotations


class DhtError(Exception):
    """Base class of every error raised by the dht package."""


class IdentityError(DhtError):
    """The node identity key file is missing, unreadable or malformed."""


class FrameError(DhtError):
    """Bytes on the wire are not a valid peer-protocol frame (or a message cannot be encoded)."""


class PeerIdentityError(DhtError):
    """A peer is not the node we meant to reach: its TLS key does not hash to the pinned node id."""


class PeerRefusedError(DhtError):
    """A peer refused our handshake (it does not serve this drive, or our proof was wrong)."""


class PeerGoneError(DhtError):
    """The connection to a peer could not be made, was closed, or broke; pending fetches fail."""


class PeerStuckError(PeerGoneError):
    """The peer stopped reading: a frame could not be sent within the send timeout."""


class PeerProtocolError(PeerGoneError):
    """A peer broke the protocol (bad frame, unexpected message); the connection was dropped."""


class BadBlockError(DhtError):
    """A peer sent bytes whose SHA-256 is not the block id asked for; the peer lied."""


class NodeStoppedError(DhtError):
    """The node is not running (it stopped, or has yet to start): nothing can be fetched."""


class BlockNotFound(DhtError):
    """A peer answered that it does not hold the requested block."""


class FetchTimeout(DhtError):
    """No peer delivered a block within the allowed time.

    `tried` is how many distinct peers were asked; `known` how many providers
    were known when the wait ended.
    """

    def __init__(self, message: str, *, tried: int = 0, known: int = 0) -> None:
        super().__init__(message)
        self.tried = tried
        self.known = known
