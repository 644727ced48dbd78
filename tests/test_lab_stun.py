"""The lab's STUN binding responder (lab/stun.py), which miniupnpd's start-up check asks:
a binding request gets XOR-MAPPED-ADDRESS of its source (RFC 5389 §15.2), anything else
nothing. In-process, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpunch.lab.stun import answer

TRANSACTION = bytes(range(12))
# miniupnpd's request (upnpstun.c fill_request): a binding request with CHANGE-REQUEST.
REQUEST = bytes.fromhex("0001 0008 2112a442") + TRANSACTION + bytes.fromhex("0003 0004 00000000")


def test_a_binding_request_gets_the_xor_mapped_address_of_its_source():
    got = answer(REQUEST, ("198.51.100.2", 40000))
    # 40000 ^ 0x2112 = 0xbd52; 198.51.100.2 (c6336402) ^ 2112a442 = e721c040
    assert got == (bytes.fromhex("0101 000c 2112a442") + TRANSACTION
                   + bytes.fromhex("0020 0008 0001 bd52 e721c040"))


@pytest.mark.parametrize(("intent", "datagram"), [
    ("empty", b""),
    ("a header cut short", REQUEST[:19]),
    ("a response, not a request", b"\x01\x01" + REQUEST[2:]),
    ("an RFC 3489 request without the magic cookie", REQUEST[:4] + bytes(4) + REQUEST[8:]),
    ("a length that is not the datagram's", REQUEST[:2] + b"\x00\x0c" + REQUEST[4:]),
    ("a length not a multiple of 4", REQUEST[:2] + b"\x00\x07" + REQUEST[4:-1]),
])
def test_anything_else_gets_no_answer(intent, datagram):
    assert answer(datagram, ("198.51.100.2", 40000)) is None, intent


@given(st.binary(max_size=64), st.integers(1, 65535))
def test_any_datagram_is_answered_or_dropped(data, port):
    got = answer(data, ("203.0.113.9", port))
    if got is not None:
        kind, length = struct.unpack_from("!HH", got)
        assert (kind, length, len(got)) == (0x0101, 12, 32)
