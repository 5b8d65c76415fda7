"""Dialling a peer: TCP, TLS pinned to a node id, then the client side of the handshake.

The one way out of this node to a peer's server, shared by the client
(client.py: a Hello) and by push connections (push.py: a Push, after which
the roles swap). The decisions are handshake.py's `ClientHandshake`; this
module moves its frames and turns every way a dial can fail into our errors,
dropping the half-open connection.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import trio

from .errors import PeerGoneError
from .frames import MAX_CLIENT_FRAME
from .handshake import ClientHandshake
from .identity import NodeIdentity
from .streams import FrameStream, abort, set_keepalive
from .tls import client_context, pinned_public_key
from .tlsstream import TlsStream


@dataclass(frozen=True, slots=True)
class Dialled:
    """A connection past its handshake: the frames, the peer's key and what it accepted."""

    frames: FrameStream
    peer_public_key: bytes
    node_id: bytes  # SHA-256 of peer_public_key
    max_wants: int


async def dial(host: str, port: int, pinned: bytes | None, identity: NodeIdentity,
               discovery_key: bytes, drive_secret: bytes, *, peer: str, timeout: float,
               push_max_wants: int | None = None) -> Dialled:
    """TCP, TLS (the server's key pinned to `pinned`, or learnt if None), then the handshake.

    With `push_max_wants` the greeting is a Push and our own Welcome goes out
    before this returns (push.py). Raises PeerGoneError (unreachable, broke,
    timed out: `timeout` bounds it all), PeerIdentityError, PeerRefusedError
    or PeerProtocolError; the connection is dropped on any error.
    """
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port)
            stream = tcp
            set_keepalive(tcp)
            tls = TlsStream(tcp, client_context())
            stream = tls
            await tls.do_handshake()
            key = pinned_public_key(tls.getpeercert(binary_form=True), pinned)
            node_id = hashlib.sha256(key).digest()
            handshake = ClientHandshake(identity, node_id, discovery_key, drive_secret,
                                        peer=peer, push_max_wants=push_max_wants)
            frames = FrameStream(tls, peer)
            await frames.send(handshake.receive_challenge(await frames.receive()))
            welcomed = handshake.receive_reply(await frames.receive())
            if welcomed.reply is not None:
                # roles reverse: we serve, so the other side's frames are a client's (small)
                frames.set_max_frame(MAX_CLIENT_FRAME)
                await frames.send(welcomed.reply)
    except trio.TooSlowError:
        await abort(stream)
        what = "push handshake" if push_max_wants is not None else "handshake"
        raise PeerGoneError(f"{what} with {peer} timed out after {timeout:g}s") from None
    except OSError as exc:
        await abort(stream)
        raise PeerGoneError(f"cannot connect to {peer}: {exc.strerror or exc}") from None
    except trio.BrokenResourceError as exc:
        await abort(stream)
        raise PeerGoneError(f"TLS handshake with {peer} failed: {exc}") from None
    except BaseException:
        await abort(stream)
        raise
    return Dialled(frames, key, node_id, welcomed.max_wants)
