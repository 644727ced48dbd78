"""Fuzzing the NAT-PMP and PCP answer parsers (node/portmap/natpmp.py, pcp.py) with
arbitrary bytes and mutated golden answers (docs/fuzzing.md): an answer is a value, a
`MalformedPacket` (skipped by the exchange) or a `PortMapError` (a refusal). Nothing else,
and a value always describes the mapping asked for. The seeds are test_node_portmap.py's."""

from __future__ import annotations

from hypothesis import event, given

from fuzzing import FUZZ, fuzz_input
from test_node_portmap import ADDRESS_ANSWER, MAP_ANSWER, NONCE, PCP_ANSWER
from wgpunch.errors import MalformedPacket, PortMapError
from wgpunch.node.portmap import natpmp, pcp

SEEDS = [MAP_ANSWER, ADDRESS_ANSWER, PCP_ANSWER, PCP_ANSWER + bytes.fromhex("01000004") + bytes(4),
         MAP_ANSWER[:2] + b"\x00\x03" + MAP_ANSWER[4:8]]


@FUZZ
@given(fuzz_input(SEEDS, max_size=128))
def test_any_natpmp_answer_is_a_reply_or_an_error(data):
    for parse in (natpmp.parse_address, lambda d: natpmp.parse_map(d, 51820)):
        try:
            reply = parse(data)
            event("reply")
        except MalformedPacket:
            event("MalformedPacket")
            continue
        except PortMapError:
            event("PortMapError")
            continue
        if isinstance(reply, natpmp.MapReply):
            assert reply.internal_port == 51820


@FUZZ
@given(fuzz_input(SEEDS, max_size=1200))
def test_any_pcp_answer_is_a_reply_or_an_error(data):
    try:
        reply = pcp.parse_map(data, NONCE, 51820)
        event("reply")
    except MalformedPacket:
        event("MalformedPacket")
        return
    except PortMapError:
        event("PortMapError")
        return
    assert reply.external_port or not reply.lifetime_s
