"""`status` and NAT behaviour, in process (the lab test test_natcheck_lab.py reads the real
agent's): each node's NAT shown, and a pair that cannot go direct says why."""

import ipaddress

from test_protocol_roles import KINDS
from wgpunch.keys import Key
from wgpunch.node import pathfile
from wgpunch.node.pathfile import PeerPath
from wgpunch.status import peer_json, render_table
from wgpunch.wg.model import Endpoint, PeerState

PEER = PeerState(Key(bytes([7]) * 32), None, (ipaddress.ip_network("10.99.0.2/32"),), None,
                 0, 0, 25, False)
SYMMETRIC, CONE = KINDS["symmetric"].to_json(), KINDS["eim-full-cone"].to_json()


def agent(nat, mapped=False):
    return PeerPath("none", 1795000000.0, "no handshake with 198.51.100.2:40000 yet", None, nat,
                    mapped)


def test_a_pair_that_needs_a_relay_says_why():
    got = peer_json(PEER, 1795000010.0, agent(SYMMETRIC), own_nat=SYMMETRIC)
    assert got["needs_relay"] == got["reason"] == "both NATs map per destination: needs a relay"
    assert got["nat"] == SYMMETRIC


def test_a_pair_that_can_go_direct_keeps_the_agents_reason():
    got = peer_json(PEER, 1795000010.0, agent(CONE), own_nat=SYMMETRIC)
    assert got["needs_relay"] is None
    assert got["reason"] == "no handshake with 198.51.100.2:40000 yet"


def test_a_port_mapping_on_either_side_needs_no_relay():
    for theirs, ours in ((True, False), (False, True)):
        got = peer_json(PEER, 1795000010.0, agent(SYMMETRIC, mapped=theirs), own_nat=SYMMETRIC,
                        own_mapped=ours)
        assert got["needs_relay"] is None
        assert got["reason"] == "no handshake with 198.51.100.2:40000 yet"


def test_the_agents_file_carries_both_mappings(tmp_path):
    pathfile.write("wgx0", {"k": agent(SYMMETRIC, mapped=True)}, tmp_path, nat=SYMMETRIC,
                   mapped=True)
    published = pathfile.read_published("wgx0", tmp_path)
    assert published is not None and published.mapped and published.peers["k"].mapped
    pathfile.write("wgx0", {"k": agent(SYMMETRIC)}, tmp_path, nat=SYMMETRIC)
    published = pathfile.read_published("wgx0", tmp_path)
    assert published is not None and not published.mapped
    assert not published.peers["k"].mapped


def test_unknown_or_unreadable_nat_changes_nothing():
    for own, peer in ((None, SYMMETRIC), (SYMMETRIC, None),
                      (SYMMETRIC, {"mapping": "from a later version"})):
        got = peer_json(PEER, 1795000010.0, agent(peer), own_nat=own)
        assert got["needs_relay"] is None and got["reason"].startswith("no handshake")


def test_the_table_shows_the_agents_nat():
    device = {"name": "wg0", "backend": "uapi", "public_key": "k", "listen_port": 51820,
              "agent": {"registry": None, "nat": SYMMETRIC},
              "peers": [peer_json(PEER, 1795000010.0, agent(SYMMETRIC), own_nat=SYMMETRIC)]}
    text = render_table([device], 1795000010.0)
    assert "NAT: NAT maps per destination (symmetric), port changed, filtering " \
        "address-and-port-dependent" in text
    assert "both NATs map per destination: needs a relay" in text


def test_a_pair_direct_over_ipv6_needs_no_relay_and_the_table_says_ipv6():
    """Both IPv4 NATs map per destination, but the pair went around them over IPv6."""
    live = PeerState(PEER.public_key, Endpoint.parse("[2001:db8:2::a]:51820"),
                     PEER.allowed_ips, 1795000009.0, 100, 100, 25, False)
    direct = PeerPath("direct", 1795000005.0, "live session", None, SYMMETRIC)
    got = peer_json(live, 1795000010.0, direct, own_nat=SYMMETRIC)
    assert got["needs_relay"] is None and got["reason"] == "live session"
    assert got["endpoint"] == "[2001:db8:2::a]:51820"
    device = {"name": "wg0", "backend": "uapi", "public_key": "k", "listen_port": 51820,
              "agent": None, "peers": [got]}
    assert "direct (IPv6) for 5s" in render_table([device], 1795000010.0)
