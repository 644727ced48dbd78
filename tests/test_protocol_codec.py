"""registry/wire.py both ways: what the registry encodes, the node's client decodes back to
the same records and events; anything else is one MalformedMessage."""

import ipaddress
import json

import pytest

from wgpunch.errors import MalformedMessage
from wgpunch.keys import Key
from wgpunch.protocol import (
    Heartbeat,
    NatBehaviour,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    RemovedEvent,
    Reported,
    Snapshot,
    heartbeat_json,
    item_from_json,
    item_json,
)
from wgpunch.wg.model import Endpoint

K1, K2 = Key(bytes([1]) * 32), Key(bytes([2]) * 32)
REPORTED = Reported(51820, (ipaddress.ip_address("192.168.1.10"),
                            ipaddress.ip_address("2001:db8::10")), "0.1.0")
RECORD = PeerRecord(K1, (ipaddress.ip_network("10.99.0.1/32"),),
                    Endpoint.parse("198.51.100.2:51820"), 1795000000.25, REPORTED, 7)
BARE = PeerRecord(K2, (), None, None, None, 3)
MEASURED = PeerRecord(K2, (), Endpoint.parse("203.0.113.9:40001"), None, Reported(
    51820, (), "0.1.0", nat=NatBehaviour("address-and-port-dependent",
                                         "address-and-port-dependent", False)), 4)
MAPPED = PeerRecord(K2, (), Endpoint.parse("198.51.100.6:31000"), None,
                    Reported(51820, (), "0.1.0", Endpoint.parse("198.51.100.6:51820")), 4)
DUAL = PeerRecord(K2, (), Endpoint.parse("198.51.100.6:51820"), None,
                  Reported(51820, (), "0.1.0", ipv6=(Endpoint.parse("[2001:db8:1::a]:51820"),)),
                  5)


@pytest.mark.parametrize("item", [
    Snapshot("ab12", 9, (RECORD, BARE)),
    PeerEvent(8, RECORD),
    PeerEvent(4, BARE),
    PeerEvent(5, MEASURED),
    PeerEvent(6, MAPPED),
    PeerEvent(7, DUAL),
    RemovedEvent(9, K2),
    PunchEvent(9, K2, Endpoint.parse("[2001:db8::2]:4500"), True),
    RelayEvent(9, K1, 31000, None),
    RelayEvent(9, K1, 65535, ipaddress.ip_address("2001:db8::1")),
])
def test_round_trip_through_json_text(item):
    assert item_from_json(json.loads(json.dumps(item_json(item)))) == item


def test_a_null_nat_is_not_reported():
    line = item_json(PeerEvent(8, RECORD))
    assert "nat" not in line["peer"]["reported"]  # absent, as from a registry before it
    line["peer"]["reported"]["nat"] = None
    assert item_from_json(line) == PeerEvent(8, RECORD)


def test_heartbeat_round_trip():
    assert item_from_json(heartbeat_json(5)) == Heartbeat(5)


def test_a_mapping_is_in_the_peer_object_only_when_there_is_one():
    assert item_json(PeerEvent(5, MAPPED))["peer"]["reported"]["mapped_endpoint"] == \
        "198.51.100.6:51820"
    assert "mapped_endpoint" not in item_json(PeerEvent(8, RECORD))["peer"]["reported"]
    bad = item_json(PeerEvent(5, MAPPED))
    bad["peer"]["reported"]["mapped_endpoint"] = "198.51.100.6"
    with pytest.raises(MalformedMessage, match="mapped_endpoint"):
        item_from_json(bad)


def test_ipv6_endpoints_are_in_the_peer_object_only_when_there_are_some():
    assert item_json(PeerEvent(7, DUAL))["peer"]["reported"]["ipv6_endpoints"] == [
        "[2001:db8:1::a]:51820"]
    assert "ipv6_endpoints" not in item_json(PeerEvent(8, RECORD))["peer"]["reported"]


def test_opened_is_on_the_punch_line_only_when_true():
    endpoint = Endpoint.parse("203.0.113.2:4000")
    plain, opened = PunchEvent(3, K1, endpoint, True), PunchEvent(3, K1, endpoint, True, True)
    assert "opened" not in item_json(plain)  # what an older node reads as one more punch
    assert item_json(opened)["opened"] is True
    assert item_from_json(item_json(opened)) == opened
    assert item_from_json(item_json(plain)) == plain
    with pytest.raises(MalformedMessage, match="opened"):
        item_from_json({**item_json(plain), "opened": "yes"})


@pytest.mark.parametrize(("obj", "message"), [
    ({"type": "peer"}, "malformed"),
    ({"type": "gossip", "revision": 1}, "unknown watch event type 'gossip'"),
    ({"type": "removed", "revision": 1, "public_key": "short"}, "malformed"),
    ({"type": "punch", "revision": 1, "peer": K1.base64(), "endpoint": "nowhere",
      "initiator": True}, "malformed"),
    ({"type": "relay", "revision": 1, "peer": K1.base64(), "port": 0, "address": None},
     "port: 0 is not in 1-65535"),
    ({"type": "relay", "revision": 1, "peer": K1.base64(), "port": True, "address": None},
     "port: expected int"),
    ({"type": "relay", "revision": 1, "peer": K1.base64(), "port": 9, "address": "x"},
     "malformed relay"),
    ([], "malformed"),
    ({"type": "peer", "revision": 1, "peer": {**item_json(PeerEvent(1, RECORD))["peer"],
                                             "reported": {"listen_port": 0,
                                                          "local_addresses": [],
                                                          "version": ""}}}, "listen_port"),
    ({"type": "peer", "revision": 1, "peer": {**item_json(PeerEvent(1, RECORD))["peer"],
                                             "reported": {**REPORTED.to_json(),
                                                          "nat": {"mapping": "cone"}}}},
     "nat"),
])
def test_malformed_items_are_one_error(obj, message):
    with pytest.raises(MalformedMessage, match=message):
        item_from_json(obj)
