"""The peer handshake's decisions without sockets (dht/handshake.py): examples and properties."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.errors import PeerIdentityError, PeerProtocolError, PeerRefusedError
from dht.frames import (
    NONCE_LEN,
    Block,
    Challenge,
    FrameDecoder,
    Goodbye,
    Hello,
    Message,
    Ping,
    Push,
    Refused,
    Welcome,
    encode,
)
from dht.handshake import (
    REFUSED_BAD_PROOF,
    Accepted,
    ClientHandshake,
    HandshakeMisuse,
    Refusal,
    ServerHandshake,
    hello_signed_bytes,
    make_proof,
    push_signed_bytes,
)
from dht.identity import NodeIdentity

SERVER = NodeIdentity.generate()
CLIENT = NodeIdentity.generate()
SECRET = bytes(range(32))
DKEY = hashlib.sha256(b"discovery" + SECRET).digest()
OTHER_DKEY = bytes(32)
NONCE = bytes(range(100, 100 + NONCE_LEN))


def server(*, takes_push: bool = False, nonce: bytes = NONCE) -> ServerHandshake:
    return ServerHandshake(SERVER.node_id, {DKEY: SECRET}.get, 77, takes_push=takes_push,
                           nonce=nonce)


def client(*, secret: bytes = SECRET, dkey: bytes = DKEY, push: int | None = None,
           server_id: bytes = SERVER.node_id) -> ClientHandshake:
    return ClientHandshake(CLIENT, server_id, dkey, secret, peer="peer-x", push_max_wants=push)


def wire(msg: Message) -> Message:
    """Through the codec and back: the handshake sees what a real peer would send."""
    decoder = FrameDecoder()
    decoder.feed(encode(msg))
    out = decoder.next_event()
    assert out is not None
    return out


def run_handshake(srv: ServerHandshake, cli: ClientHandshake) -> Accepted | Refusal:
    greeting = cli.receive_challenge(wire(srv.challenge()))
    return srv.receive(wire(greeting))


# ---- the whole exchange ------------------------------------------------------


def test_a_client_that_knows_the_secret_is_welcomed_with_the_servers_limit() -> None:
    srv, cli = server(), client()
    decision = run_handshake(srv, cli)
    assert isinstance(decision, Accepted)
    assert decision.reply == Welcome(77)
    assert decision.discovery_key == DKEY and not decision.push
    assert decision.client_pubkey == CLIENT.public_bytes
    assert decision.client_id == CLIENT.node_id
    welcomed = cli.receive_reply(wire(decision.reply))
    assert welcomed.max_wants == 77 and welcomed.reply is None


def test_a_push_is_welcomed_only_by_a_node_that_takes_pushes_and_the_dialer_answers_welcome() -> None:
    cli = client(push=9)
    decision = run_handshake(server(takes_push=True), cli)
    assert isinstance(decision, Accepted) and decision.push
    welcomed = cli.receive_reply(decision.reply)
    assert welcomed.max_wants == 77 and welcomed.reply == Welcome(9)

    refused = run_handshake(server(takes_push=False), client(push=9))
    assert refused == Refusal(Refused(REFUSED_BAD_PROOF))


def test_a_wrong_secret_and_an_unknown_drive_get_the_same_answer() -> None:
    wrong = run_handshake(server(), client(secret=bytes(32)))
    unknown = run_handshake(server(), client(dkey=OTHER_DKEY))
    assert wrong == unknown == Refusal(Refused(REFUSED_BAD_PROOF))


def test_a_secret_of_the_wrong_length_serves_nothing() -> None:
    srv = ServerHandshake(SERVER.node_id, {DKEY: SECRET[:31]}.get, 77, nonce=NONCE)
    cli = ClientHandshake(CLIENT, SERVER.node_id, DKEY, SECRET[:31], peer="p")
    assert run_handshake(srv, cli) == Refusal(Refused(REFUSED_BAD_PROOF))


def test_a_bad_signature_is_refused_as_such() -> None:
    srv = server()
    srv.challenge()
    proof = make_proof(SECRET, SERVER.node_id, NONCE)
    forged = Hello(CLIENT.public_bytes, DKEY, proof, bytes(64))
    assert srv.receive(forged) == Refusal(Refused("bad hello signature"))
    srv = server(takes_push=True)
    srv.challenge()
    assert srv.receive(Push(CLIENT.public_bytes, DKEY, proof, bytes(64))) == Refusal(
        Refused("bad push signature"))


def test_a_hello_signed_for_another_nonce_or_as_a_push_is_refused() -> None:
    """Rule 1: a greeting is bound to one nonce and one kind: a replay gets nothing."""
    proof = make_proof(SECRET, SERVER.node_id, NONCE)
    replayed = Hello(CLIENT.public_bytes, DKEY, proof,
                     CLIENT.sign(hello_signed_bytes(SERVER.node_id, NONCE, DKEY, proof)))
    srv = server(nonce=bytes(NONCE_LEN))  # a fresh challenge
    srv.challenge()
    assert isinstance(srv.receive(replayed), Refusal)
    as_push = Push(CLIENT.public_bytes, DKEY, proof,
                   CLIENT.sign(hello_signed_bytes(SERVER.node_id, NONCE, DKEY, proof)))
    srv = server(takes_push=True)
    srv.challenge()
    assert srv.receive(as_push) == Refusal(Refused("bad push signature"))
    as_hello = Hello(CLIENT.public_bytes, DKEY, proof,
                     CLIENT.sign(push_signed_bytes(SERVER.node_id, NONCE, DKEY, proof)))
    srv = server(takes_push=True)
    srv.challenge()
    assert srv.receive(as_hello) == Refusal(Refused("bad hello signature"))


def test_a_first_frame_that_is_no_greeting_is_a_protocol_error() -> None:
    srv = server()
    srv.challenge()
    assert srv.receive(Ping(1)) == Refusal(Refused("expected hello, got ping"),
                                           protocol_error=True)


def test_every_challenge_has_a_fresh_nonce() -> None:
    a = ServerHandshake(SERVER.node_id, {}.get, 1).challenge()
    b = ServerHandshake(SERVER.node_id, {}.get, 1).challenge()
    assert a.nonce != b.nonce and len(a.nonce) == NONCE_LEN


# ---- the client's checks -----------------------------------------------------


def test_the_client_answers_only_a_challenge_from_the_pinned_node() -> None:
    with pytest.raises(PeerProtocolError, match="peer-x sent welcome instead of a challenge"):
        client().receive_challenge(Welcome(1))
    impostor = NodeIdentity.generate().node_id
    with pytest.raises(PeerIdentityError, match="claims to be node"):
        client().receive_challenge(Challenge(impostor, NONCE))


@pytest.mark.parametrize(("push", "what"), [(None, "connection"), (3, "push")])
def test_refused_or_goodbye_is_a_refusal_anything_else_a_protocol_error(push, what) -> None:
    for answer in (Refused("no thanks"), Goodbye("no thanks")):
        cli = client(push=push)
        cli.receive_challenge(Challenge(SERVER.node_id, NONCE))
        with pytest.raises(PeerRefusedError, match=f"peer-x refused the {what}: no thanks"):
            cli.receive_reply(answer)
    cli = client(push=push)
    cli.receive_challenge(Challenge(SERVER.node_id, NONCE))
    with pytest.raises(PeerProtocolError, match="sent block instead of welcome"):
        cli.receive_reply(Block(0, b"x"))


def test_steps_out_of_turn_are_our_bug_not_the_peers() -> None:
    srv = server()
    with pytest.raises(HandshakeMisuse):
        srv.receive(Ping(1))
    srv.challenge()
    with pytest.raises(HandshakeMisuse):
        srv.challenge()
    srv.receive(Ping(1))
    with pytest.raises(HandshakeMisuse):
        srv.receive(Ping(1))
    cli = client()
    with pytest.raises(HandshakeMisuse):
        cli.receive_reply(Welcome(1))
    cli.receive_challenge(Challenge(SERVER.node_id, NONCE))
    with pytest.raises(HandshakeMisuse):
        cli.receive_challenge(Challenge(SERVER.node_id, NONCE))
    with pytest.raises(HandshakeMisuse):
        ServerHandshake(SERVER.node_id, {}.get, 1, nonce=b"short")


# ---- properties --------------------------------------------------------------

b32 = st.binary(min_size=32, max_size=32)
greetings = st.builds(Hello, b32, b32, b32, st.binary(min_size=64, max_size=64)) | st.builds(
    Push, b32, b32, b32, st.binary(min_size=64, max_size=64))


@settings(max_examples=200, deadline=None)
@given(greeting=greetings, nonce=st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN),
       takes_push=st.booleans())
def test_no_greeting_made_without_the_keys_is_ever_accepted(greeting, nonce, takes_push) -> None:
    srv = server(takes_push=takes_push, nonce=nonce)
    srv.challenge()
    decision = srv.receive(wire(greeting))
    assert isinstance(decision, Refusal) and not decision.protocol_error
    assert decision.reply.reason in (REFUSED_BAD_PROOF, "bad hello signature",
                                     "bad push signature")


@settings(max_examples=50, deadline=None)
@given(secret=b32, dkey=b32, nonce=st.binary(min_size=NONCE_LEN, max_size=NONCE_LEN),
       push=st.none() | st.integers(1, 65535), takes_push=st.booleans())
def test_a_greeting_is_accepted_exactly_when_the_client_knows_the_drive_secret(
        secret, dkey, nonce, push, takes_push) -> None:
    srv = ServerHandshake(SERVER.node_id, {DKEY: SECRET}.get, 77, takes_push=takes_push,
                          nonce=nonce)
    cli = ClientHandshake(CLIENT, SERVER.node_id, dkey, secret, peer="p", push_max_wants=push)
    decision = run_handshake(srv, cli)
    knows = secret == SECRET and dkey == DKEY and (push is None or takes_push)
    assert isinstance(decision, Accepted) == knows
    if knows:
        assert decision.push == (push is not None)
        assert cli.receive_reply(wire(decision.reply)).max_wants == 77
    else:
        assert decision == Refusal(Refused(REFUSED_BAD_PROOF))
