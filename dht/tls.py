"""TLS 1.3 contexts for the peer protocol, with node-id key pinning.

There is no certificate authority: every node presents a self-signed
certificate for its Ed25519 node key, and a dialer accepts a server exactly
when SHA-256 of that key equals the node id it looked up (the node id came
from a signed provider record or a LAN announcement). So the TLS layer runs
with chain and hostname checks off, and `pinned_public_key` does the one check
that matters right after the handshake, before anything secret is sent. TLS
1.3 makes the server prove possession of the private key (CertificateVerify),
so a pinned key cannot be replayed by someone who only copied the certificate.

The stdlib `ssl` module loads keys only from files. We hand it the PEM through
an anonymous memory file (`memfd_create`, read back through /proc/self/fd), so
the private key never gets a second copy on disk; where memfd is unavailable a
0600 temporary file in a 0700 directory is written, loaded and deleted at once.
The one on-disk copy remains the raw node key under the node home.
"""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import PeerIdentityError
from .identity import NodeIdentity

ALPN_PROTOCOL = "peerdrive/1"


def _load_identity(ctx: ssl.SSLContext, identity: NodeIdentity) -> None:
    cert_pem, key_pem = identity.tls_pem()
    pem = key_pem + cert_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and Path("/proc/self/fd").is_dir():
        fd = memfd_create("peerdrive-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="peerdrive-tls-") as tmpdir:
        path = Path(tmpdir) / "node.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)


def _tls13_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_PROTOCOL])


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting the node's self-signed Ed25519 certificate.

    Clients present no certificate; they authenticate inside the protocol
    (the signed Hello). Build it once per server and reuse it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    ctx.verify_mode = ssl.CERT_NONE
    _load_identity(ctx, identity)
    return ctx


@functools.cache
def client_context() -> ssl.SSLContext:
    """A TLS 1.3 client context that accepts any certificate; call `pinned_public_key` after.

    Shared by every connection of the process (an SSLContext is safe to reuse).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_public_key(der_certificate: bytes | None, expected_node_id: bytes | None) -> bytes:
    """The server's raw Ed25519 public key, if SHA-256 of it is `expected_node_id`.

    With `expected_node_id` None any Ed25519 key is taken (a push dialer given
    only HOST:PORT, which learns the node id from it).

    Raises PeerIdentityError if there is no certificate, it does not parse,
    its key is not Ed25519, or the key hashes to another node id.
    """
    if not der_certificate:
        raise PeerIdentityError("the peer presented no TLS certificate")
    try:
        cert = x509.load_der_x509_certificate(der_certificate)
        key = cert.public_key()
    except ValueError as exc:
        raise PeerIdentityError(f"the peer's TLS certificate does not parse: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PeerIdentityError(
            f"the peer's TLS key is {type(key).__name__}, not Ed25519: not a peerdrive node"
        )
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    node_id = hashlib.sha256(raw).digest()
    if expected_node_id is not None and node_id != expected_node_id:
        raise PeerIdentityError(
            f"the peer is node {node_id.hex()[:12]}, not the expected "
            f"{expected_node_id.hex()[:12]}: refusing to talk to it"
        )
    return raw
