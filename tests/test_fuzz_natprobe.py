"""Fuzzing the NAT probe's datagrams (protocol/probewire.py; docs/fuzzing.md): anything the
registry's probe port receives is a request or one MalformedPacket, and so is anything the
node reads as a reply; a request is never answered with more bytes than it has. Seeds: the
golden datagrams of test_protocol_probewire.py."""

from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import FUZZ, fuzz_input
from test_protocol_probewire import REPLY_BYTES, REQUEST, TXID
from wgpunch.errors import MalformedPacket
from wgpunch.protocol.probewire import SIZE, Ask, Request, parse_reply, parse_request

SEEDS = [REQUEST, Request(TXID, Ask.ALT_PORT).encode(),
         Request(TXID, Ask.ALT_PORT | Ask.ALT_ADDRESS).encode(), REPLY_BYTES]
DATAGRAMS = st.one_of(fuzz_input(SEEDS, max_size=260), st.binary(max_size=200))


@FUZZ
@given(DATAGRAMS)
def test_any_datagram_is_a_request_or_malformed(raw):
    try:
        request = parse_request(raw)
    except MalformedPacket:
        event("MalformedPacket")
        return
    event("request")
    replies = 1 + bin(int(request.ask)).count("1")
    assert replies * SIZE <= len(raw)  # never an amplifier


@FUZZ
@given(DATAGRAMS)
def test_any_datagram_is_a_reply_or_malformed(raw):
    try:
        reply = parse_reply(raw)
    except MalformedPacket:
        event("MalformedPacket")
        return
    event("reply")
    assert reply.encode() == raw  # a reply has exactly one encoding
