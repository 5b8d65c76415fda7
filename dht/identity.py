"""The node's long-term Ed25519 identity.

Each node home holds one raw 32-byte Ed25519 private key. Its public key
authenticates the node in two places: the TLS certificate it presents as a
server (dialers pin SHA-256 of the public key, the *node id*), and the
signature a client puts on its handshake. The key file is never silently
replaced: a node id is what other nodes know us by, so losing it by accident
must be loud.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .errors import IdentityError

PRIVATE_KEY_LEN = 32
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
KEY_FILE_NAME = "node.key"

# The certificate only carries the key for TLS; nobody checks its dates (the
# dialer pins the key), so it is valid from a day ago for ten years to keep
# clocks that are slightly off out of the picture.
_CERT_BACKDATE = datetime.timedelta(days=1)
_CERT_LIFETIME = datetime.timedelta(days=3650)


class NodeIdentity:
    """An Ed25519 key pair naming one node; node id = SHA-256(raw public key)."""

    def __init__(self, private_key: Ed25519PrivateKey, key_path: Path | None = None) -> None:
        self._private = private_key
        self.key_path = key_path
        self.public_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id: bytes = hashlib.sha256(self.public_bytes).digest()
        self._tls_pem: tuple[bytes, bytes] | None = None

    # ---- construction -------------------------------------------------------

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh identity held only in memory (tests, throwaway nodes)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes, key_path: Path | None = None) -> NodeIdentity:
        if len(raw) != PRIVATE_KEY_LEN:
            where = f" in {key_path}" if key_path else ""
            raise IdentityError(
                f"node key{where} is {len(raw)} bytes, expected {PRIVATE_KEY_LEN}: the file is "
                "corrupt; move it away to create a new node identity (peers will see a new node id)"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(raw), key_path)

    @classmethod
    def load_or_create(cls, path: Path) -> NodeIdentity:
        """Load the node key at `path`, creating it (mode 0600, atomically) if absent.

        `path` is the key file; if it names an existing directory (a node
        home), the key file is `path / "node.key"`. A file of the wrong size
        raises IdentityError and is left untouched.
        """
        path = Path(path)
        if path.is_dir():
            path = path / KEY_FILE_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls._create(path)
        except OSError as exc:
            raise IdentityError(f"cannot read node key {path}: {exc.strerror or exc}") from exc
        return cls.from_private_bytes(raw, path)

    @classmethod
    def _create(cls, path: Path) -> NodeIdentity:
        raw = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link() never replaces an existing file: if another process
                # created the key meanwhile, theirs wins and we load it.
                os.link(tmp, path)
            except FileExistsError:
                return cls.load_or_create(path)
            except OSError:
                # File systems without hard links: rename, which is atomic
                # but would replace; the window is the exists() check only.
                if path.exists():
                    return cls.load_or_create(path)
                os.rename(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise IdentityError(f"cannot create node key {path}: {exc.strerror or exc}") from exc
        return cls.from_private_bytes(raw, path)

    # ---- signatures ---------------------------------------------------------

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The signing key, for record codecs that sign on this node's behalf."""
        return self._private

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @staticmethod
    def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
        """True iff `signature` is a valid Ed25519 signature of `data` by `public_key`."""
        if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    # ---- TLS ----------------------------------------------------------------

    def tls_pem(self) -> tuple[bytes, bytes]:
        """(certificate PEM, PKCS#8 private key PEM) for this node's TLS server.

        The certificate is self-signed with the node key and made once per
        process; only its public key matters (dialers pin it).
        """
        if self._tls_pem is None:
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_id.hex())])
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self._private.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _CERT_BACKDATE)
                .not_valid_after(now + _CERT_LIFETIME)
                .sign(self._private, algorithm=None)
            )
            key_pem = self._private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self._tls_pem = (cert.public_bytes(serialization.Encoding.PEM), key_pem)
        return self._tls_pem

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id.hex()[:12]})"
