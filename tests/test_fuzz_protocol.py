"""Fuzzing the JSON of the registry<->node protocol (docs/fuzzing.md): what a node reports
(`reported_from_json`, the body of PUT /v1/self, read by the registry) and what the registry
sends (`item_from_json` for a watch-stream line, `snapshot_from_json` for GET /v1/peers,
read by the node, through `parse_event` for the stream's bytes).

Each gives a value or its module's one error: `MalformedMessage` (node/client.py turns it,
and JSON it cannot decode, into `ApiError`). Seeds: the golden records and events of
test_protocol_codec.py and the golden body of test_registry_report.py, mutated as JSON
(values replaced by nasty ones, keys dropped or added) and as bytes.
test_registry_report.py already fuzzes `reported_from_json` with generated bodies.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import FUZZ, fuzz_input, mutated_json
from test_protocol_codec import BARE, MAPPED, MEASURED, RECORD
from test_registry_report import GOOD, NAT
from wgpunch.errors import ApiError, MalformedMessage
from wgpunch.keys import Key
from wgpunch.node.client import parse_event
from wgpunch.protocol import (
    Heartbeat,
    PeerEvent,
    PunchEvent,
    RemovedEvent,
    Reported,
    Snapshot,
    heartbeat_json,
    item_from_json,
    item_json,
    reported_from_json,
    snapshot_from_json,
)
from wgpunch.wg.model import Endpoint

EVENTS = [item_json(item) for item in (
    Snapshot("ab12", 9, (RECORD, BARE, MEASURED)), PeerEvent(8, RECORD), PeerEvent(4, BARE),
    PeerEvent(5, MAPPED),
    RemovedEvent(9, Key(bytes([2]) * 32)),
    PunchEvent(9, Key(bytes([2]) * 32), Endpoint.parse("[2001:db8::2]:4500"), True),
)] + [heartbeat_json(5)]
SNAPSHOT = {k: v for k, v in EVENTS[0].items() if k != "type"}  # the GET /v1/peers body
REPORTS = [GOOD, {**GOOD, "local_addresses": [], "version": ""},
           {**GOOD, "mapped_endpoint": "198.51.100.2:40000"}, {**GOOD, "nat": NAT}]


def encoded(values: list) -> list[bytes]:
    return [json.dumps(value).encode() for value in values]


# Nesting deeper than Python's recursion limit: the decoder itself gives up.
DEEP = st.integers(900, 5000).map(lambda n: b"[" * n + b"]" * n)
STREAM_LINES = st.one_of(fuzz_input(encoded(EVENTS), max_size=400),
                         mutated_json(EVENTS), mutated_json(EVENTS), DEEP)
REPORT_BODIES = st.one_of(fuzz_input(encoded(REPORTS), max_size=300), mutated_json(REPORTS),
                          mutated_json(REPORTS))
SNAPSHOT_BODIES = st.one_of(fuzz_input(encoded([SNAPSHOT]), max_size=900),
                            mutated_json([SNAPSHOT]), mutated_json([SNAPSHOT]))

@FUZZ
@given(REPORT_BODIES)
def test_any_report_body_is_a_report_or_malformed(raw):
    try:
        assert isinstance(reported_from_json(raw), Reported)
        event("report")
    except MalformedMessage:
        event("MalformedMessage")


@FUZZ
@given(STREAM_LINES)
def test_any_stream_line_is_an_event_or_malformed(raw):
    """The bytes of one watch-stream line, as the node reads them: parse_event gives an
    event or an ApiError; item_from_json, on whatever JSON decodes, an event or a
    MalformedMessage."""
    try:
        parse_event(raw)
        event("event")
    except ApiError:
        event("ApiError")
    obj = json_or_none(raw)
    if obj is not None:
        with contextlib.suppress(MalformedMessage):
            assert isinstance(item_from_json(obj), Snapshot | PeerEvent | RemovedEvent
                              | PunchEvent | Heartbeat)


@FUZZ
@given(SNAPSHOT_BODIES)
def test_any_peer_list_is_a_snapshot_or_malformed(raw):
    obj = json_or_none(raw)
    if obj is not None:
        with contextlib.suppress(MalformedMessage):
            assert isinstance(snapshot_from_json(obj), Snapshot)


def json_or_none(raw: bytes) -> object | None:
    """What the JSON decoder makes of `raw`; None when it is not JSON (parse_event's case)
    or is JSON null."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


@pytest.mark.parametrize("line", [
    b'{"type": "heartbeat", "revision": 1e999}',
    b'{"type": "heartbeat", "revision": Infinity}',
    b'{"type": "punch", "revision": 1, "peer": "' + Key(bytes([2]) * 32).base64().encode()
    + b'", "endpoint": 5, "initiator": true}',
    b"[" * 100_000 + b"]" * 100_000,
], ids=["revision 1e999", "revision Infinity", "endpoint a number", "nested 100,000 deep"])
def test_the_findings_are_malformed(line):
    """Found by fuzzing: each escaped as OverflowError, AttributeError or RecursionError;
    now a watch-stream line the node cannot read is an ApiError, like any other."""
    with pytest.raises(ApiError, match="registry: bad watch event"):
        parse_event(line)
