"""Noise_IK_25519_ChaChaPoly_BLAKE2s against published vectors, and its failure behaviour."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpunch.errors import NoiseError, WgpunchError
from wgpunch.natpunch.noise import PROTOCOL_NAME, CipherState, HandshakeIK, ReplayWindow, public_key

VECTORS_FILE = Path(__file__).parent / "data" / "noise_ik_25519_chachapoly_blake2s.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
PROLOGUE = b"natpunch-go is the best :)"
TIMESTAMP = (1_700_000_000_123_456_789).to_bytes(8, "big")

# Curve25519 points of small order (and non-canonical encodings of them): X25519 with any of
# them gives the all-zero output.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
]


def vector_id(vector: dict[str, Any]) -> str:
    index = VECTORS["vectors"].index(vector)
    return f"{vector['source'].split(':')[0]}-{index}"


def new_key() -> bytes:
    return os.urandom(32)


def handshake_pair(
    prologue: bytes = PROLOGUE,
) -> tuple[HandshakeIK, HandshakeIK, bytes, bytes]:
    """A fresh initiator and responder, plus the initiator's and responder's private keys."""
    init_key, resp_key = new_key(), new_key()
    initiator = HandshakeIK.initiator(init_key, public_key(resp_key), prologue)
    responder = HandshakeIK.responder(resp_key, prologue)
    return initiator, responder, init_key, resp_key


def flipped(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- published vectors ---------------------------------------------------------------------


def test_vectors_file_names_its_sources() -> None:
    sources = VECTORS["source"]
    assert sources
    for source in sources:
        assert {"repository", "path", "commit"} <= source.keys()
        assert len(source["commit"]) == 40
    names = {f"{source['repository']}:{source['path']}" for source in sources}
    assert {vector["source"] for vector in VECTORS["vectors"]} == names
    assert sum(source["vectors"] for source in sources) == len(VECTORS["vectors"]) == 7
    assert sum(len(vector["messages"]) for vector in VECTORS["vectors"]) == 32
    assert all(v["protocol_name"] == PROTOCOL_NAME.decode() for v in VECTORS["vectors"])


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=vector_id)
def test_vector(vector: dict[str, Any]) -> None:
    def h(field: str) -> bytes:
        return bytes.fromhex(vector[field])

    responder_public = public_key(h("resp_static"))
    if "init_remote_static" in vector:
        assert h("init_remote_static") == responder_public
    initiator = HandshakeIK.initiator(
        h("init_static"),
        responder_public,
        h("init_prologue"),
        ephemeral_private=h("init_ephemeral"),
    )
    responder = HandshakeIK.responder(
        h("resp_static"), h("resp_prologue"), ephemeral_private=h("resp_ephemeral")
    )
    messages = [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in vector["messages"]
    ]

    (payload1, message1), (payload2, message2) = messages[:2]
    assert initiator.write_message(payload1) == message1
    assert len(message1) == 32 + 48 + len(payload1) + 16
    assert responder.read_message(message1) == payload1
    assert responder.remote_static == public_key(h("init_static"))
    assert responder.write_message(payload2) == message2
    assert len(message2) == 32 + len(payload2) + 16
    assert initiator.read_message(message2) == payload2
    assert initiator.complete
    assert responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    if "handshake_hash" in vector:
        assert initiator.handshake_hash == h("handshake_hash")

    # Transport messages alternate, initiator first, each direction counting its own nonces.
    # split() gives (initiator->responder, responder->initiator) on both sides.
    ciphers = (initiator.split(), responder.split())
    counters = [0, 0]
    for index, (payload, ciphertext) in enumerate(messages[2:]):
        direction = index % 2
        nonce = counters[direction]
        counters[direction] += 1
        sender, receiver = ciphers[direction][direction], ciphers[1 - direction][direction]
        assert sender.encrypt(nonce, b"", payload) == ciphertext
        assert receiver.decrypt(nonce, b"", ciphertext) == payload


def test_public_key_rfc7748() -> None:
    # RFC 7748 §6.1, Alice.
    private = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert public_key(private) == bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )


# --- round trip ----------------------------------------------------------------------------


def test_round_trip_natpunch_sizes() -> None:
    initiator, responder, init_key, resp_key = handshake_pair()
    assert initiator.remote_static == public_key(resp_key)
    assert responder.remote_static is None
    assert not initiator.complete

    message1 = initiator.write_message(TIMESTAMP)
    assert len(message1) == 104  # natpunch-go's handshake init minus its 5-byte header
    assert responder.read_message(message1) == TIMESTAMP
    assert responder.remote_static == public_key(init_key)
    assert not responder.complete

    message2 = responder.write_message(b"")
    assert len(message2) == 48
    assert initiator.read_message(message2) == b""
    assert initiator.complete
    assert responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    assert len(initiator.handshake_hash) == 32

    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    request = public_key(init_key) + public_key(new_key())
    sealed = i_send.encrypt(0, b"", request)
    assert len(sealed) == 80
    assert r_recv.decrypt(0, b"", sealed) == request
    reply = bytes([198, 51, 100, 7, 0x9C, 0x40])
    sealed_reply = r_send.encrypt(5, b"", reply)
    assert i_recv.decrypt(5, b"", sealed_reply) == reply
    # The two directions have different keys.
    with pytest.raises(NoiseError):
        i_recv.decrypt(0, b"", sealed)
    with pytest.raises(NoiseError):
        r_recv.decrypt(5, b"", sealed_reply)


@pytest.mark.parametrize("size", [0, 1, 8, 100, 65535 - 96])
def test_message_sizes(size: int) -> None:
    initiator, responder, _, _ = handshake_pair()
    payload = os.urandom(size)
    message1 = initiator.write_message(payload)
    assert len(message1) == 32 + 48 + size + 16
    assert responder.read_message(message1) == payload
    reply = os.urandom(min(size, 65535 - 48))
    message2 = responder.write_message(reply)
    assert len(message2) == 32 + len(reply) + 16
    assert initiator.read_message(message2) == reply


def test_fresh_ephemeral_each_handshake() -> None:
    init_key, resp_key = new_key(), new_key()
    first = HandshakeIK.initiator(init_key, public_key(resp_key), PROLOGUE)
    second = HandshakeIK.initiator(init_key, public_key(resp_key), PROLOGUE)
    assert first.write_message(TIMESTAMP)[:32] != second.write_message(TIMESTAMP)[:32]


def test_noise_error_is_a_wgpunch_error() -> None:
    assert issubclass(NoiseError, WgpunchError)


# --- failures ------------------------------------------------------------------------------


def test_wrong_responder_key() -> None:
    init_key, resp_key = new_key(), new_key()
    initiator = HandshakeIK.initiator(init_key, public_key(new_key()), PROLOGUE)
    responder = HandshakeIK.responder(resp_key, PROLOGUE)
    with pytest.raises(NoiseError):
        responder.read_message(initiator.write_message(TIMESTAMP))
    assert responder.remote_static is None


def test_prologue_mismatch() -> None:
    init_key, resp_key = new_key(), new_key()
    initiator = HandshakeIK.initiator(init_key, public_key(resp_key), PROLOGUE)
    responder = HandshakeIK.responder(resp_key, b"natpunch-go is the best :(")
    with pytest.raises(NoiseError):
        responder.read_message(initiator.write_message(TIMESTAMP))


def test_every_flipped_byte_of_message1_is_rejected() -> None:
    initiator, _, _, resp_key = handshake_pair()
    message1 = initiator.write_message(TIMESTAMP)
    for index in range(len(message1)):
        responder = HandshakeIK.responder(resp_key, PROLOGUE)
        with pytest.raises(NoiseError):
            responder.read_message(flipped(message1, index))
    assert HandshakeIK.responder(resp_key, PROLOGUE).read_message(message1) == TIMESTAMP


def test_every_flipped_byte_of_message2_is_rejected_and_changes_nothing() -> None:
    initiator, responder, _, _ = handshake_pair()
    responder.read_message(initiator.write_message(TIMESTAMP))
    message2 = responder.write_message(b"")
    for index in range(len(message2)):
        with pytest.raises(NoiseError):
            initiator.read_message(flipped(message2, index))
        assert not initiator.complete
    # A failed read leaves the handshake as it was: the genuine reply still completes it.
    assert initiator.read_message(message2) == b""
    assert initiator.handshake_hash == responder.handshake_hash


def test_failed_read_leaves_responder_unchanged() -> None:
    initiator, responder, init_key, _ = handshake_pair()
    message1 = initiator.write_message(TIMESTAMP)
    with pytest.raises(NoiseError):
        responder.read_message(flipped(message1, 90))
    assert responder.remote_static is None
    assert responder.read_message(message1) == TIMESTAMP
    assert responder.remote_static == public_key(init_key)


def test_truncated_and_extended_messages() -> None:
    initiator, _, _, resp_key = handshake_pair()
    message1 = initiator.write_message(TIMESTAMP)
    bad1 = [message1[:n] for n in range(len(message1))]
    bad1 += [message1 + b"\x00", message1 + os.urandom(40), message1 + bytes(65536)]
    for message in bad1:
        with pytest.raises(NoiseError):
            HandshakeIK.responder(resp_key, PROLOGUE).read_message(message)

    responder = HandshakeIK.responder(resp_key, PROLOGUE)
    responder.read_message(message1)
    message2 = responder.write_message(b"")
    bad2 = [message2[:n] for n in range(len(message2))] + [message2 + b"\x00", message2 * 2]
    for message in bad2:
        with pytest.raises(NoiseError):
            initiator.read_message(message)
    assert initiator.read_message(message2) == b""


def test_out_of_turn_calls() -> None:
    initiator, responder, _, _ = handshake_pair()
    with pytest.raises(NoiseError):
        initiator.read_message(bytes(48))
    with pytest.raises(NoiseError):
        responder.write_message(b"")
    for handshake in (initiator, responder):
        with pytest.raises(NoiseError):
            handshake.split()
        with pytest.raises(NoiseError):
            _ = handshake.handshake_hash

    message1 = initiator.write_message(TIMESTAMP)
    with pytest.raises(NoiseError):
        initiator.write_message(TIMESTAMP)
    responder.read_message(message1)
    with pytest.raises(NoiseError):
        responder.read_message(message1)
    message2 = responder.write_message(b"")
    with pytest.raises(NoiseError):
        responder.write_message(b"")
    initiator.read_message(message2)
    with pytest.raises(NoiseError):
        initiator.read_message(message2)
    for handshake in (initiator, responder):
        assert handshake.complete
        with pytest.raises(NoiseError):
            handshake.write_message(b"")
        with pytest.raises(NoiseError):
            handshake.read_message(message1)


@pytest.mark.parametrize("point", LOW_ORDER, ids=lambda p: p.hex()[:8])
def test_low_order_keys_are_rejected(point: bytes) -> None:
    # A low-order ephemeral in message 1: es gives all zeros.
    initiator, _, _, resp_key = handshake_pair()
    message1 = initiator.write_message(TIMESTAMP)
    responder = HandshakeIK.responder(resp_key, PROLOGUE)
    with pytest.raises(NoiseError, match="low-order"):
        responder.read_message(point + message1[32:])
    # A low-order ephemeral in message 2.
    responder.read_message(message1)
    message2 = responder.write_message(b"")
    with pytest.raises(NoiseError, match="low-order"):
        initiator.read_message(point + message2[32:])
    # An initiator told a low-order responder key fails to write, and stays unwritten.
    hopeless = HandshakeIK.initiator(new_key(), point, PROLOGUE)
    for _ in range(2):
        with pytest.raises(NoiseError, match="low-order"):
            hopeless.write_message(TIMESTAMP)


def test_bad_key_lengths() -> None:
    with pytest.raises(NoiseError):
        HandshakeIK.initiator(bytes(31), public_key(new_key()), PROLOGUE)
    with pytest.raises(NoiseError):
        HandshakeIK.initiator(new_key(), bytes(33), PROLOGUE)
    with pytest.raises(NoiseError):
        HandshakeIK.responder(new_key(), PROLOGUE, ephemeral_private=bytes(16))
    with pytest.raises(NoiseError):
        public_key(b"")
    with pytest.raises(NoiseError):
        CipherState(bytes(16))


def test_oversized_payload_is_refused() -> None:
    initiator, responder, _, _ = handshake_pair()
    with pytest.raises(NoiseError):
        initiator.write_message(bytes(65535 - 96 + 1))
    responder.read_message(initiator.write_message(b""))
    with pytest.raises(NoiseError):
        responder.write_message(bytes(65535 - 48 + 1))
    assert not responder.complete


# --- CipherState ---------------------------------------------------------------------------


def test_cipher_nonce_encoding_and_failures() -> None:
    key = new_key()
    cipher = CipherState(key)
    sealed = cipher.encrypt(7, b"ad", b"hello")
    assert len(sealed) == 5 + 16
    assert CipherState(key).decrypt(7, b"ad", sealed) == b"hello"
    for nonce in (6, 8, 7 << 32, 7 << 56):
        with pytest.raises(NoiseError):
            cipher.decrypt(nonce, b"ad", sealed)
    with pytest.raises(NoiseError):
        cipher.decrypt(7, b"", sealed)
    with pytest.raises(NoiseError):
        CipherState(new_key()).decrypt(7, b"ad", sealed)
    for length in range(16):
        with pytest.raises(NoiseError):
            cipher.decrypt(7, b"ad", sealed[:length])


@pytest.mark.parametrize("nonce", [-1, 2**64 - 1, 2**64, 2**80])
def test_cipher_nonce_range(nonce: int) -> None:
    cipher = CipherState(new_key())
    with pytest.raises(NoiseError):
        cipher.encrypt(nonce, b"", b"x")
    with pytest.raises(NoiseError):
        cipher.decrypt(nonce, b"", bytes(17))


def test_cipher_largest_nonce() -> None:
    cipher = CipherState(new_key())
    sealed = cipher.encrypt(2**64 - 2, b"", b"last")
    assert cipher.decrypt(2**64 - 2, b"", sealed) == b"last"


# --- ReplayWindow --------------------------------------------------------------------------


def test_replay_in_order_and_duplicates() -> None:
    window = ReplayWindow()
    for counter in range(3000):
        assert window.accept(counter)
        assert not window.accept(counter)


def test_replay_counter_zero() -> None:
    window = ReplayWindow()
    assert window.accept(0)
    assert not window.accept(0)
    late = ReplayWindow()
    assert late.accept(10)
    assert late.accept(0)
    assert not late.accept(0)


def test_replay_out_of_order_within_window() -> None:
    window = ReplayWindow(size=64)
    assert window.accept(100)
    for counter in (99, 37, 80, 101, 60):
        assert window.accept(counter), counter
    for counter in (99, 37, 80, 101, 60, 100):
        assert not window.accept(counter), counter
    # The window reaches exactly size-1 below the highest counter (101).
    assert not window.accept(101 - 64)
    assert window.accept(101 - 63)


def test_replay_too_old_after_big_jump() -> None:
    window = ReplayWindow(size=1024)
    for counter in range(10):
        assert window.accept(counter)
    assert window.accept(1_000_000)
    assert not window.accept(9)
    assert not window.accept(1_000_000 - 1024)
    assert window.accept(1_000_000 - 1023)
    assert window.accept(999_999)
    assert not window.accept(999_999)
    # A jump by less than the window keeps what was seen.
    assert window.accept(1_000_500)
    assert not window.accept(999_999)
    assert window.accept(1_000_001)


def test_replay_near_two_to_the_64() -> None:
    window = ReplayWindow()
    top = 2**64 - 1
    assert window.accept(5)
    assert window.accept(top - 1)
    assert window.accept(top)
    assert not window.accept(top)
    assert not window.accept(top - 1)
    assert window.accept(top - 1023)
    assert not window.accept(top - 1024)
    assert not window.accept(5)
    assert not window.accept(2**64)
    assert not window.accept(-1)


def test_replay_window_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size=0)


@given(
    size=st.integers(min_value=1, max_value=70),
    counters=st.lists(st.integers(min_value=-2, max_value=300), max_size=200),
)
def test_replay_matches_a_set_model(size: int, counters: list[int]) -> None:
    window = ReplayWindow(size)
    seen: set[int] = set()
    for counter in counters:
        top = max(seen, default=0)
        expected = counter >= 0 and counter not in seen and counter > top - size
        assert window.accept(counter) == expected, (counter, top)
        if expected:
            seen.add(counter)


# --- robustness ----------------------------------------------------------------------------

RESP_KEY = bytes(range(32))
INIT_KEY = bytes(range(32, 64))


def started_initiator() -> tuple[HandshakeIK, bytes]:
    initiator = HandshakeIK.initiator(INIT_KEY, public_key(RESP_KEY), PROLOGUE)
    return initiator, initiator.write_message(TIMESTAMP)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=96, max_size=120)))
def test_responder_random_messages_only_raise_noise_error(message: bytes) -> None:
    with pytest.raises(NoiseError):
        HandshakeIK.responder(RESP_KEY, PROLOGUE).read_message(message)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=200), st.binary(min_size=48, max_size=64)))
def test_initiator_random_replies_only_raise_noise_error(message: bytes) -> None:
    initiator, _ = started_initiator()
    with pytest.raises(NoiseError):
        initiator.read_message(message)


@settings(max_examples=300)
@given(st.data())
def test_mutated_message1_only_raises_noise_error(data: st.DataObject) -> None:
    _, message1 = started_initiator()
    index = data.draw(st.integers(min_value=0, max_value=len(message1) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    tail = data.draw(st.binary(max_size=4))
    mutated = message1[:index] + bytes([message1[index] ^ mask]) + message1[index + 1 :] + tail
    with pytest.raises(NoiseError):
        HandshakeIK.responder(RESP_KEY, PROLOGUE).read_message(mutated)


@given(nonce=st.integers(min_value=-5, max_value=2**64 + 5), ciphertext=st.binary(max_size=64))
def test_cipher_random_input_only_raises_noise_error(nonce: int, ciphertext: bytes) -> None:
    with pytest.raises(NoiseError):
        CipherState(RESP_KEY).decrypt(nonce, b"", ciphertext)
