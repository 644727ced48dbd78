"""Fuzzing the NAT probe's datagrams (protocol/probewire.py; docs/fuzzing.md): anything the
registry's probe port receives is answered with no more bytes than it has, or refused with
one MalformedPacket; anything the node reads as a reply is one or MalformedPacket. Seeds: the
golden datagrams of test_protocol_probewire.py."""

from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import FUZZ, fuzz_input
from test_protocol_probewire import REPLY_BYTES, REQUEST, TXID
from test_registry_natprobe import FULL, NODE
from wgpunch.errors import MalformedPacket
from wgpunch.protocol.probewire import Ask, Request, parse_reply, parse_request
from wgpunch.registry.natprobe import answers

SEEDS = [REQUEST, Request(TXID, Ask.ALT_PORT).encode(),
         Request(TXID, Ask.ALT_PORT | Ask.ALT_ADDRESS).encode(), REPLY_BYTES]
DATAGRAMS = st.one_of(fuzz_input(SEEDS, max_size=260), st.binary(max_size=200))


@FUZZ
@given(DATAGRAMS)
def test_any_datagram_is_answered_with_no_more_bytes_or_refused(raw):
    """What the registry's probe port does with it (registry/natprobe.py `answers`, with a
    second port and a second address to answer from): never more bytes than it got."""
    try:
        replies = answers(raw, NODE, FULL)
    except MalformedPacket:
        event("MalformedPacket")
        return
    event(f"{len(replies)} replies")
    assert parse_request(raw).txid == parse_reply(replies[0].data).txid
    assert sum(len(answer.data) for answer in replies) <= len(raw)  # never an amplifier


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
