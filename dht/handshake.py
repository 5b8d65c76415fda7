"""The peer handshake as sans-io decisions: no sockets, no clocks, no tasks.

Rules (docs/protocol.md, "The handshake, byte by byte"; the server speaks first):

    server -> Challenge(server_id, nonce)
    client -> Hello(client_pubkey, discovery_key, proof, sig)      (or Push)
    server -> Welcome(max_wants) | Refused(reason)
    pushing dialer only, after the listener's Welcome: Welcome(its max_wants)

1. `proof` = HMAC-SHA256(drive_secret, "peerdrive proof v1" || server_id ||
   nonce): the client knows the secret behind the discovery key without
   revealing it. `sig` is the client's node key over CONTEXT || server_id ||
   nonce || discovery_key || proof, with CONTEXT "peerdrive hello v1" for Hello
   and "peerdrive push v1" for Push, so a greeting is bound to one server, one
   nonce and one kind and cannot be replayed anywhere else.
2. The server accepts a greeting only if the signature verifies and the proof
   matches a drive it serves (a Push also only if the node takes pushes). It
   computes the proof even for an unknown drive and gives one answer for an
   unknown drive and a wrong proof, so a prober learns nothing of which drives
   it serves. A bad signature is refused as such. A first frame that is neither
   Hello nor Push is refused as a protocol error.
3. The client answers only a Challenge that names the node whose key TLS
   pinned (PeerIdentityError otherwise), and takes only Welcome for an answer:
   Refused or Goodbye is PeerRefusedError, anything else PeerProtocolError.
4. Each side's steps run once, in order; calling one out of turn is a bug in
   the caller (HandshakeMisuse), never something a peer can cause.

`ServerHandshake` and `ClientHandshake` hold these decisions; server.py and
dial.py move the frames (tests/test_handshake.py drives them
with no network at all).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PeerIdentityError, PeerProtocolError, PeerRefusedError
from .frames import (
    NONCE_LEN,
    Challenge,
    Goodbye,
    Hello,
    Message,
    Push,
    Refused,
    Welcome,
)
from .identity import NodeIdentity

PROOF_CONTEXT = b"peerdrive proof v1"
HELLO_CONTEXT = b"peerdrive hello v1"
PUSH_CONTEXT = b"peerdrive push v1"
DRIVE_SECRET_LEN = 32

REFUSED_BAD_PROOF = "this node does not serve that drive, or the proof is wrong"


class HandshakeMisuse(RuntimeError):
    """A handshake step was called out of turn: a bug in our code, not the peer's doing."""


def make_proof(drive_secret: bytes, server_id: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256(drive_secret, "peerdrive proof v1" || server_id || nonce)."""
    return hmac.new(drive_secret, PROOF_CONTEXT + server_id + nonce, hashlib.sha256).digest()


def hello_signed_bytes(server_id: bytes, nonce: bytes, discovery_key: bytes, proof: bytes) -> bytes:
    """The exact bytes a client signs with its node key in Hello."""
    return HELLO_CONTEXT + server_id + nonce + discovery_key + proof


def push_signed_bytes(server_id: bytes, nonce: bytes, discovery_key: bytes, proof: bytes) -> bytes:
    """The exact bytes a pushing dialer signs with its node key in Push."""
    return PUSH_CONTEXT + server_id + nonce + discovery_key + proof


# ---- server side ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """The greeting passed: send `reply` (Welcome), then serve (Hello) or fetch (Push)."""

    reply: Welcome
    discovery_key: bytes
    client_pubkey: bytes
    client_id: bytes  # SHA-256 of client_pubkey: the client's node id
    push: bool  # the client sent Push: it will serve and we will fetch


@dataclass(frozen=True, slots=True)
class Refusal:
    """The greeting failed: send `reply` (Refused) and close.

    `protocol_error` is True when the first frame was not a greeting at all
    (counted as a protocol error, not a refused handshake).
    """

    reply: Refused
    protocol_error: bool = False


class ServerHandshake:
    """The server's decisions for one connection: `challenge()`, then `receive(first frame)`.

    `secret_for(discovery_key)` gives the 32-byte drive secret of a drive this
    node serves, or None; `takes_push` says whether a Push may be accepted.
    """

    def __init__(self, server_id: bytes, secret_for: Callable[[bytes], bytes | None],
                 max_wants: int, *, takes_push: bool = False, nonce: bytes | None = None) -> None:
        self.server_id = server_id
        self.nonce = secrets.token_bytes(NONCE_LEN) if nonce is None else nonce
        if len(self.nonce) != NONCE_LEN:
            raise HandshakeMisuse(f"the nonce must be {NONCE_LEN} bytes")
        self.max_wants = max_wants
        self.takes_push = takes_push
        self._secret_for = secret_for
        self._state = "start"  # -> "challenged" -> "decided"

    def challenge(self) -> Challenge:
        """The first frame to send."""
        self._step("start", "challenged")
        return Challenge(self.server_id, self.nonce)

    def receive(self, msg: Message) -> Accepted | Refusal:
        """Judge the client's first frame; the decision carries the frame to answer with."""
        self._step("challenged", "decided")
        if isinstance(msg, Hello):
            signed = hello_signed_bytes(self.server_id, self.nonce, msg.discovery_key, msg.proof)
            kind, allowed = "hello", True
        elif isinstance(msg, Push):
            signed = push_signed_bytes(self.server_id, self.nonce, msg.discovery_key, msg.proof)
            kind, allowed = "push", self.takes_push
        else:
            return Refusal(Refused(f"expected hello, got {msg.TYPE}"), protocol_error=True)
        secret = self._secret(msg.discovery_key)
        # The proof is computed even for an unknown drive (rule 2).
        expected = make_proof(secret or bytes(DRIVE_SECRET_LEN), self.server_id, self.nonce)
        proof_ok = hmac.compare_digest(expected, msg.proof) and secret is not None and allowed
        if not NodeIdentity.verify(msg.client_pubkey, msg.sig, signed):
            return Refusal(Refused(f"bad {kind} signature"))
        if not proof_ok:
            return Refusal(Refused(REFUSED_BAD_PROOF))
        return Accepted(Welcome(self.max_wants), msg.discovery_key, msg.client_pubkey,
                        hashlib.sha256(msg.client_pubkey).digest(), push=kind == "push")

    def _secret(self, discovery_key: bytes) -> bytes | None:
        secret = self._secret_for(discovery_key)
        if secret is None or len(secret) != DRIVE_SECRET_LEN:
            return None
        return secret

    def _step(self, expected: str, then: str) -> None:
        if self._state != expected:
            raise HandshakeMisuse(f"server handshake step out of turn (state {self._state})")
        self._state = then


# ---- client side ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The server accepted: it takes `max_wants` outstanding requests.

    For a push, `reply` is the dialer's own Welcome, sent as the roles swap
    (from then on the other side's frames are a client's: small).
    """

    max_wants: int
    reply: Welcome | None = None


class ClientHandshake:
    """The dialer's decisions: `receive_challenge(frame)` -> greeting, `receive_reply(frame)`.

    `server_id` is the node id TLS pinned (SHA-256 of the server's key);
    `peer` names the server in errors. With `push_max_wants` set the greeting
    is a Push and the dialer offers to serve that many outstanding wants.
    """

    def __init__(self, identity: NodeIdentity, server_id: bytes, discovery_key: bytes,
                 drive_secret: bytes, *, peer: str, push_max_wants: int | None = None) -> None:
        self.identity = identity
        self.server_id = server_id
        self.discovery_key = discovery_key
        self.peer = peer
        self.push_max_wants = push_max_wants
        self._drive_secret = drive_secret
        self._state = "start"  # -> "greeted" -> "welcomed"

    @property
    def push(self) -> bool:
        return self.push_max_wants is not None

    def receive_challenge(self, msg: Message) -> Hello | Push:
        """The greeting to answer the server's Challenge with (rule 3)."""
        self._step("start", "greeted")
        if not isinstance(msg, Challenge):
            raise PeerProtocolError(f"{self.peer} sent {msg.TYPE} instead of a challenge")
        if msg.server_id != self.server_id:
            raise PeerIdentityError(
                f"{self.peer} claims to be node {msg.server_id.hex()[:12]} in its challenge"
            )
        proof = make_proof(self._drive_secret, msg.server_id, msg.nonce)
        identity = self.identity
        if self.push:
            signed = push_signed_bytes(msg.server_id, msg.nonce, self.discovery_key, proof)
            return Push(identity.public_bytes, self.discovery_key, proof, identity.sign(signed))
        signed = hello_signed_bytes(msg.server_id, msg.nonce, self.discovery_key, proof)
        return Hello(identity.public_bytes, self.discovery_key, proof, identity.sign(signed))

    def receive_reply(self, msg: Message) -> Welcomed:
        """The server's answer to the greeting: Welcome, or an error saying why not."""
        self._step("greeted", "welcomed")
        if isinstance(msg, Refused | Goodbye):
            what = "push" if self.push else "connection"
            raise PeerRefusedError(f"{self.peer} refused the {what}: {msg.reason}")
        if not isinstance(msg, Welcome):
            raise PeerProtocolError(f"{self.peer} sent {msg.TYPE} instead of welcome")
        if self.push_max_wants is not None:
            return Welcomed(msg.max_wants, Welcome(self.push_max_wants))
        return Welcomed(msg.max_wants)

    def _step(self, expected: str, then: str) -> None:
        if self._state != expected:
            raise HandshakeMisuse(f"client handshake step out of turn (state {self._state})")
        self._state = then
