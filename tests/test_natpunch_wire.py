"""natpunch wire layouts, byte for byte (shared/reference/natpunch.md A and B, issue 7).

Every expected value is spelled out here from the reference's tables (`bytes.fromhex`,
concatenation, `int.to_bytes(..., "big")`), never taken from wire.py's own encoders.
Sizes of messages produced by a real exchange (109/53/93/31/25) are checked in
test_natpunch_server.py, against the running handler.
"""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_input, fuzz_settings
from wgpunch.errors import MalformedPacket
from wgpunch.keys import Key
from wgpunch.natpunch import wire
from wgpunch.natpunch.legacy import LegacyRendezvous
from wgpunch.natpunch.limits import Limits
from wgpunch.wg.model import Endpoint

A = Key(bytes(range(1, 33)))
B = Key(bytes(range(101, 133)))
ZERO = Key(bytes(32))


def ep(ip: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(ip), port)


# -- the constants the reference fixes ------------------------------------------------------

def test_reference_constants() -> None:
    assert wire.LEGACY_PORT == 49918
    assert wire.PROLOGUE == b"natpunch-go is the best :)"
    assert len(wire.PROLOGUE) == 26
    assert (wire.HANDSHAKE_INIT, wire.HANDSHAKE_RESP, wire.DATA) == (1, 2, 3)
    # natpunch.md B's table: the sizes a pcap of the Go programs shows.
    assert wire.HANDSHAKE_INIT_LEN == 109
    assert wire.HANDSHAKE_RESP_LEN == 53
    assert wire.REQUEST_LEN == 93
    assert wire.REPLY_MIN_LEN == 25
    assert wire.LEGACY_REQUEST_LEN == 64


# -- legacy (wireguard-tools contrib/nat-hole-punching) --------------------------------------

def test_legacy_request_is_my_key_then_their_key() -> None:
    expected = bytes(range(1, 33)) + bytes(range(101, 133))
    assert wire.legacy_request(A, B) == expected
    assert len(expected) == 64
    assert wire.parse_legacy_request(expected) == (A, B)


def test_legacy_request_longer_is_truncated_shorter_dropped() -> None:
    body = bytes(range(1, 33)) + bytes(range(101, 133))
    assert wire.parse_legacy_request(body + b"\xff" * 36) == (A, B)  # the C server's 64-byte buffer
    assert wire.parse_legacy_request(body + b"\x00") == (A, B)
    for size in (0, 1, 32, 63):
        with pytest.raises(MalformedPacket):
            wire.parse_legacy_request(body[:size])


def test_legacy_reply_layout() -> None:
    # ipv4[4] ‖ port[2], network order; 203.0.113.9:40003 -> cb 00 71 09 9c 43
    assert wire.legacy_reply(ep("203.0.113.9", 40003)) == bytes.fromhex("cb0071099c43")
    assert wire.parse_legacy_reply(bytes.fromhex("cb0071099c43")) == ep("203.0.113.9", 40003)
    assert wire.legacy_reply(None) == b""
    assert wire.parse_legacy_reply(b"") is None
    # IPv6 cannot be said in 6 bytes: answered as unknown.
    assert wire.legacy_reply(ep("2001:db8::1", 51820)) == b""
    for size in (1, 5, 7, 18):
        with pytest.raises(MalformedPacket):
            wire.parse_legacy_reply(bytes(size))
    # The reference's answer to an all-zero-key lookup (0.0.0.0:0) is not an endpoint.
    with pytest.raises(MalformedPacket):
        wire.parse_legacy_reply(bytes(6))


def test_legacy_server_golden_exchange() -> None:
    server = LegacyRendezvous(Limits())
    a_at, b_at = ep("198.51.100.3", 40003), ep("198.51.100.2", 40004)
    request_a = bytes(range(1, 33)) + bytes(range(101, 133))  # A asks for B
    request_b = bytes(range(101, 133)) + bytes(range(1, 33))  # B asks for A
    assert server.handle(request_a, a_at, 0.0) == b""  # B unknown: an empty datagram
    # 198.51.100.3 = c6 33 64 03, port 40003 = 9c 43
    assert server.handle(request_b, b_at, 1.0) == bytes.fromhex("c63364039c43")
    assert server.handle(request_a, a_at, 2.0) == bytes.fromhex("c63364029c44")
    # Longer: truncated to its first 64 bytes and served (the reference does so).
    assert server.handle(request_b + b"junk" * 10, b_at, 3.0) == bytes.fromhex("c63364039c43")
    for size in (0, 1, 63):
        with pytest.raises(MalformedPacket):
            server.handle(request_b[:size], b_at, 4.0)


def test_legacy_latest_source_wins() -> None:
    server = LegacyRendezvous(Limits())
    request_a = A.raw + B.raw
    server.handle(request_a, ep("198.51.100.3", 40003), 0.0)
    server.handle(request_a, ep("198.51.100.3", 40009), 1.0)  # NAT picked another port
    assert server.handle(B.raw + A.raw, ep("198.51.100.2", 1), 2.0) == bytes.fromhex(
        "c63364039c49"
    )


def test_legacy_zero_key_neither_stored_nor_found() -> None:
    server = LegacyRendezvous(Limits())
    # The reference answers a lookup of the all-zero key with six zero bytes (an empty slot).
    assert server.handle(A.raw + bytes(32), ep("198.51.100.3", 40003), 0.0) == b""
    assert server.handle(bytes(32) + A.raw, ep("198.51.100.9", 9), 1.0) != b""  # A is known
    assert len(server.peers) == 1  # the zero key was not stored as a sender
    assert ZERO not in server.peers
    assert server.handle(B.raw + bytes(32), ep("198.51.100.2", 2), 2.0) == b""


def test_legacy_ipv6_sender_is_answered_as_unknown() -> None:
    server = LegacyRendezvous(Limits())
    server.handle(A.raw + B.raw, ep("2001:db8::3", 40003), 0.0)
    assert server.handle(B.raw + A.raw, ep("198.51.100.2", 2), 1.0) == b""


def test_legacy_default_limits() -> None:
    # `LegacyRendezvous()` as its signature allows: the defaults of server.Limits.
    server = LegacyRendezvous()
    assert server.peers.capacity == Limits().peers_max
    assert server.handle(A.raw + B.raw, ep("198.51.100.3", 40003), 0.0) == b""


# -- natpunch-go -----------------------------------------------------------------------------

def test_handshake_init_layout() -> None:
    noise = bytes(range(104))
    data = bytes([0x01, 0xE4, 0x8D, 0x60, 0xF5]) + noise
    assert len(data) == 109
    assert wire.handshake_init(0xE48D60F5, noise) == data
    assert wire.parse_handshake_init(data) == (0xE48D60F5, noise)


def test_handshake_resp_layout() -> None:
    noise = bytes(range(48))
    data = bytes([0x02, 0xE4, 0x8D, 0x60, 0xF6]) + noise
    assert len(data) == 53
    assert wire.handshake_resp(0xE48D60F6, noise) == data
    assert wire.parse_handshake_resp(data) == (0xE48D60F6, noise)


def test_request_layout() -> None:
    sealed = bytes(range(80))
    data = (bytes([0x03]) + bytes.fromhex("00000102") + bytes.fromhex("0000000000000a0b")
            + sealed)
    assert len(data) == 93
    assert wire.request(0x102, 0xA0B, sealed) == data
    assert wire.parse_request(data) == (0x102, 0xA0B, sealed)


def test_reply_layout() -> None:
    for body_len in (0, 6, 18):
        sealed = bytes(range(body_len + 16))
        data = bytes([0x03]) + bytes.fromhex("8000000000000001") + sealed
        assert len(data) == 25 + body_len
        assert wire.reply(2**63 + 1, sealed) == data
        assert wire.parse_reply(data) == (2**63 + 1, sealed)


def test_timestamp_is_unixnano_big_endian() -> None:
    stamp = 1_700_000_000_123_456_789  # 0x17979cfe3d85cd15
    assert wire.timestamp(stamp) == bytes.fromhex("17979cfe3d85cd15")
    assert wire.parse_timestamp(bytes.fromhex("17979cfe3d85cd15")) == stamp
    for size in (0, 1, 7, 9):
        with pytest.raises(MalformedPacket):
            wire.parse_timestamp(bytes(size))


def test_address_bodies_ipv4_and_ipv6() -> None:
    assert wire.encode_address(ep("203.0.113.9", 40003)) == bytes.fromhex("cb0071099c43")
    v6 = bytes.fromhex("20010db8000000000000000000000001") + bytes.fromhex("ca6c")
    assert len(v6) == 18
    assert wire.encode_address(ep("2001:db8::1", 51820)) == v6
    assert wire.decode_address(v6) == ep("2001:db8::1", 51820)
    assert wire.encode_address(None) == b""
    assert wire.decode_address(b"") is None
    for bad in (bytes(1), bytes(5), bytes(7), bytes(17), bytes(19), bytes(4) + b"\x00\x00"):
        with pytest.raises(MalformedPacket):
            wire.decode_address(bad)


def test_lookup_body() -> None:
    assert wire.lookup_body(A, B) == bytes(range(1, 33)) + bytes(range(101, 133))
    assert wire.parse_lookup(bytes(range(1, 33)) + bytes(range(101, 133))) == (A, B)
    for size in (0, 63, 65):
        with pytest.raises(MalformedPacket):
            wire.parse_lookup(bytes(size))


@pytest.mark.parametrize(
    ("parse", "kind", "length"),
    [
        (wire.parse_handshake_init, 1, 109),
        (wire.parse_handshake_resp, 2, 53),
        (wire.parse_request, 3, 93),
    ],
)
def test_indexed_parsers_check_type_and_length(parse, kind: int, length: int) -> None:
    good = bytes([kind]) + bytes(length - 1)
    parse(good)
    for size in (0, 1, 4, 5, 12, 13, length - 1, length + 1):
        with pytest.raises(MalformedPacket):
            parse((bytes([kind]) + bytes(size))[:size])
    for other in (0, 1, 2, 3, 4, 255):
        if other != kind:
            with pytest.raises(MalformedPacket):
                parse(bytes([other]) + bytes(length - 1))


def test_reply_parser_checks_type_and_length() -> None:
    for size in (0, 1, 8, 9, 24, 26, 30, 32, 42, 44, 93):
        with pytest.raises(MalformedPacket):
            wire.parse_reply((b"\x03" + bytes(size))[:size])
    with pytest.raises(MalformedPacket):
        wire.parse_reply(b"\x02" + bytes(24))


PARSERS = (
    wire.parse_legacy_request, wire.parse_legacy_reply, wire.parse_handshake_init,
    wire.parse_handshake_resp, wire.parse_request, wire.parse_reply, wire.parse_timestamp,
    wire.parse_lookup, wire.decode_address,
)


# Every layout above, as the seeds of the fuzz test below.
WIRE_SEEDS = [
    bytes(range(1, 33)) + bytes(range(101, 133)),  # legacy request
    bytes(range(1, 33)) + bytes(range(101, 133)) + b"\xff" * 36,
    bytes.fromhex("cb0071099c43"), b"",  # legacy reply: found, not found
    bytes([0x01, 0xE4, 0x8D, 0x60, 0xF5]) + bytes(range(104)),  # handshake init
    bytes([0x02, 0xE4, 0x8D, 0x60, 0xF6]) + bytes(range(48)),  # handshake response
    bytes([0x03]) + bytes.fromhex("00000102") + bytes.fromhex("0000000000000a0b")
    + bytes(range(80)),  # request
    *(bytes([0x03]) + bytes.fromhex("8000000000000001") + bytes(range(n + 16))
      for n in (0, 6, 18)),  # replies
    bytes.fromhex("17979cfe3d85cd15"),  # timestamp
    bytes.fromhex("20010db8000000000000000000000001ca6c"),  # IPv6 address body
]


@fuzz_settings(3)
@given(fuzz_input(WIRE_SEEDS, max_size=140)
       | st.sampled_from([1, 2, 3]).flatmap(
           lambda kind: st.binary(max_size=120).map(lambda rest: bytes([kind]) + rest)))
def test_parsers_raise_only_malformed(data: bytes) -> None:
    """Both wire formats' parsers, and the legacy server, on arbitrary bytes and mutated
    golden messages: a value or MalformedPacket. (The Noise server's handler is fuzzed in
    test_natpunch_server.py, with real sessions.)"""
    for parse in PARSERS:
        with contextlib.suppress(MalformedPacket):
            parse(data)
    legacy = LegacyRendezvous(Limits())
    legacy.handle(A.raw + bytes(32), ep("198.51.100.3", 40003), 0.0)
    with contextlib.suppress(MalformedPacket):
        reply = legacy.handle(data, ep("198.51.100.9", 9), 1.0)
        assert reply == b"" or len(reply) == 6
