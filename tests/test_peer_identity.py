"""Node identity files and TLS key pinning (real TLS over 127.0.0.1)."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dht.errors import IdentityError, PeerIdentityError
from dht.identity import KEY_FILE_NAME, NodeIdentity
from dht.tls import ALPN_PROTOCOL, client_context, pinned_public_key, server_context


def test_create_then_load_gives_the_same_node(tmp_path: Path) -> None:
    path = tmp_path / "home" / "node.key"
    first = NodeIdentity.load_or_create(path)
    assert path.stat().st_size == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = NodeIdentity.load_or_create(path)
    assert second.public_bytes == first.public_bytes
    assert first.node_id == hashlib.sha256(first.public_bytes).digest()
    assert len(first.public_bytes) == 32
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp file left


def test_a_home_directory_holds_the_key_file(tmp_path: Path) -> None:
    ident = NodeIdentity.load_or_create(tmp_path)
    assert (tmp_path / KEY_FILE_NAME).exists()
    assert NodeIdentity.load_or_create(tmp_path / KEY_FILE_NAME).node_id == ident.node_id


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 33])
def test_corrupt_key_file_is_an_error_and_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match="corrupt"):
        NodeIdentity.load_or_create(path)
    assert path.read_bytes() == content


def test_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.mkdir()
    (path / KEY_FILE_NAME).mkdir()  # a directory where the key should be
    with pytest.raises(IdentityError):
        NodeIdentity.load_or_create(path)


def test_sign_and_verify() -> None:
    ident = NodeIdentity.generate()
    sig = ident.sign(b"message")
    assert NodeIdentity.verify(ident.public_bytes, sig, b"message")
    assert not NodeIdentity.verify(ident.public_bytes, sig, b"messagE")
    assert not NodeIdentity.verify(NodeIdentity.generate().public_bytes, sig, b"message")
    assert not NodeIdentity.verify(ident.public_bytes, sig[:-1], b"message")
    assert not NodeIdentity.verify(b"\x00" * 31, sig, b"message")


def test_certificate_carries_the_node_key() -> None:
    ident = NodeIdentity.generate()
    cert_pem, _key_pem = ident.tls_pem()
    assert ident.tls_pem()[0] == cert_pem  # cached
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pinned_public_key(der, ident.node_id) == ident.public_bytes
    with pytest.raises(PeerIdentityError, match="not the expected"):
        pinned_public_key(der, NodeIdentity.generate().node_id)


def test_pinning_rejects_junk_and_non_ed25519_certificates() -> None:
    with pytest.raises(PeerIdentityError, match="no TLS certificate"):
        pinned_public_key(None, b"\x00" * 32)
    with pytest.raises(PeerIdentityError, match="does not parse"):
        pinned_public_key(b"not a certificate", b"\x00" * 32)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PeerIdentityError, match="not Ed25519"):
        pinned_public_key(cert.public_bytes(serialization.Encoding.DER), b"\x00" * 32)


def test_tls13_handshake_with_trio_and_pinning() -> None:
    server_ident = NodeIdentity.generate()
    context = server_context(server_ident)

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        await tls.do_handshake()
        await tls.send_all(b"ok")
        await tls.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(tcp, client_context(), server_hostname=None)
            with trio.fail_after(10):
                await tls.do_handshake()
            assert tls.version() == "TLSv1.3"
            assert tls.selected_alpn_protocol() == ALPN_PROTOCOL
            der = tls.getpeercert(binary_form=True)
            assert pinned_public_key(der, server_ident.node_id) == server_ident.public_bytes
            with pytest.raises(PeerIdentityError):
                pinned_public_key(der, os.urandom(32))
            assert await tls.receive_some() == b"ok"
            await tls.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_concurrent_creation_yields_one_identity(tmp_path: Path) -> None:
    """Many processes creating one node's key at the same moment all end up with one key.

    Each process finds no key file and creates one (link() never replaces an
    existing file, so the first link wins and every other creator loads it).
    """
    path = tmp_path / "home" / "node.key"
    racers = 8
    start = time.time() + 1.0  # every process past its imports, then all at once
    code = ("import sys, time; from pathlib import Path; from dht.identity import NodeIdentity;"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()));"
            "print(NodeIdentity.load_or_create(Path(sys.argv[1])).node_id.hex())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), repr(start)],
                              cwd=Path(__file__).resolve().parent.parent,
                              stdout=subprocess.PIPE, text=True) for _ in range(racers)]
    ids = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(ids)) == 1 and len(ids[0]) == 64
    assert NodeIdentity.load_or_create(path).node_id.hex() == ids[0]
    assert sorted(os.listdir(path.parent)) == ["node.key"]  # no temporary file left behind
