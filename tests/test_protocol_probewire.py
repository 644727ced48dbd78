"""protocol/probewire.py: the NAT probe's datagrams, golden bytes both ways, and every
malformed one is one MalformedPacket naming what is wrong."""

import ipaddress

import pytest

from wgpunch.errors import MalformedPacket
from wgpunch.protocol.probewire import (
    SIZE,
    Ask,
    Reply,
    Request,
    Via,
    parse_reply,
    parse_request,
    request_size,
)
from wgpunch.wg.model import Endpoint

TXID = bytes(range(16))
REQUEST = bytes.fromhex("57474e50 01 01 00 00") + TXID + bytes(40)
REPLY = Reply(TXID, Via.ALT_PORT, Endpoint.parse("198.51.100.2:40001"), 51823,
              ipaddress.ip_address("192.0.2.66"))
REPLY_BYTES = (b"WGNP" + bytes([1, 2, 1, 4]) + TXID + (40001).to_bytes(2, "big")
               + bytes([198, 51, 100, 2]) + bytes(12) + (51823).to_bytes(2, "big")
               + bytes([4, 0, 192, 0, 2, 66]) + bytes(12) + bytes(2))


def test_golden_request():
    assert Request(TXID).encode() == REQUEST
    assert parse_request(REQUEST) == Request(TXID)


def test_a_request_for_alternates_pays_for_their_replies():
    """The registry sends no more bytes than it received: one 64-byte reply per 64 bytes."""
    both = Ask.ALT_PORT | Ask.ALT_ADDRESS
    encoded = Request(TXID, both).encode()
    assert len(encoded) == request_size(both) == 3 * SIZE
    assert parse_request(encoded) == Request(TXID, both)
    assert len(Request(TXID, Ask.ALT_PORT).encode()) == 2 * SIZE


LATER = (bytes.fromhex("57474e50 01 01 04 14") + TXID + bytes(40)) + bytes(64)


def test_a_later_answer_is_asked_with_its_delay_and_paid_for():
    assert Request(TXID, Ask.LATER, 20).encode() == LATER
    assert parse_request(LATER) == Request(TXID, Ask.LATER, 20)
    both = Ask.LATER | Ask.ALT_PORT
    assert parse_request(Request(TXID, both, 60).encode()) == Request(TXID, both, 60)
    with pytest.raises(MalformedPacket, match="later 0 s with flags 4"):
        Request(TXID, Ask.LATER)


def test_golden_reply():
    assert len(REPLY_BYTES) == SIZE
    assert REPLY.encode() == REPLY_BYTES
    assert parse_reply(REPLY_BYTES) == REPLY


def test_replies_round_trip_with_ipv6_and_without_alternates():
    for reply in (Reply(TXID, Via.PROBE_PORT, Endpoint.parse("[2001:db8::5]:7"), None, None),
                  Reply(TXID, Via.ALT_ADDRESS, Endpoint.parse("10.0.0.1:65535"), 2,
                        ipaddress.ip_address("2001:db8::1"))):
        assert len(reply.encode()) == SIZE
        assert parse_reply(reply.encode()) == reply


def _set(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1:]


@pytest.mark.parametrize(("intent", "data", "match"), [
    ("empty", b"", "0 bytes, at least 64"),
    ("short", REQUEST[:63], "63 bytes"),
    ("long", REQUEST + b"\0", "is 64 bytes, not 65"),
    ("alternates asked without paying", _set(REQUEST, 6, 3), "is 192 bytes, not 64"),
    ("wrong magic", b"STUN" + REQUEST[4:], "magic"),
    ("a later version", _set(REQUEST, 4, 2), "version 2"),
    ("a reply where a request belongs", REPLY_BYTES, "type 2, expected 1"),
    ("unknown flag", _set(REQUEST, 6, 8), "unknown flags 0x8"),
    ("a later answer asked without paying", _set(_set(REQUEST, 6, 4), 7, 5),
     "is 128 bytes, not 64"),
    ("a delay without flag 4", _set(REQUEST, 7, 1), "later 1 s with flags 0"),
    ("flag 4 without a delay", _set(LATER, 7, 0), "later 0 s with flags 4"),
    ("flag 4 with a delay over the most", _set(LATER, 7, 61), "later 61 s"),
    ("padding set", _set(REQUEST, 63, 1), "nonzero padding"),
])
def test_malformed_requests(intent, data, match):
    with pytest.raises(MalformedPacket, match=match):
        parse_request(data)


@pytest.mark.parametrize(("intent", "data", "match"), [
    ("short", REPLY_BYTES[:40], "40 bytes"),
    ("long", REPLY_BYTES + bytes(64), "a reply is 64 bytes, not 128"),
    ("a request where a reply belongs", REQUEST, "type 1, expected 2"),
    ("unknown via", _set(REPLY_BYTES, 6, 4), "unknown via 4"),
    ("unknown family", _set(REPLY_BYTES, 7, 5), "unknown address family 5"),
    ("IPv4 with junk after it", _set(REPLY_BYTES, 41, 1), "nonzero padding"),
    ("observed port 0", REPLY_BYTES[:24] + bytes(2) + REPLY_BYTES[26:], "port 0"),
    ("second address without family", _set(REPLY_BYTES, 44, 0), "without a family"),
    ("reserved byte set", _set(REPLY_BYTES, 45, 1), "nonzero padding"),
    ("tail set", _set(REPLY_BYTES, 63, 1), "nonzero padding"),
])
def test_malformed_replies(intent, data, match):
    with pytest.raises(MalformedPacket, match=match):
        parse_reply(data)
