"""The candidate ranking: one row per rule, each saying what it protects."""

import ipaddress

import pytest

from wgpunch.keys import Key
from wgpunch.node.candidates import (
    Candidate,
    CandidateKind,
    PathKind,
    better,
    candidates_of,
    choose,
    path_of,
)
from wgpunch.protocol import PeerRecord, Reported
from wgpunch.wg.device import Endpoint

LAN, PUBLIC, MAPPED, RELAY = (CandidateKind.LAN, CandidateKind.PUBLIC, CandidateKind.MAPPED,
                              CandidateKind.RELAY)
HOME = Endpoint.parse("192.168.1.20:51820")
NAT = Endpoint.parse("198.51.100.2:40000")
UPNP = Endpoint.parse("198.51.100.2:41000")
SLOT = Endpoint.parse("203.0.113.1:60001")


def c(kind: CandidateKind, endpoint: Endpoint, rtt_ms: float | None = None) -> Candidate:
    return Candidate(kind, endpoint, None if rtt_ms is None else rtt_ms / 1000)


@pytest.mark.parametrize(("intent", "a", "b", "expected"), [
    ("a direct path beats a relay, even a faster relay",
     c(PUBLIC, NAT, 80), c(RELAY, SLOT, 10), True),
    ("a relay never beats a direct path",
     c(RELAY, SLOT, 10), c(PUBLIC, NAT, 80), False),
    ("a clearly faster direct path wins",
     c(PUBLIC, NAT, 10), c(LAN, HOME, 20), True),
    ("within the margin a private address wins over a public one",
     c(LAN, HOME, 10.5), c(PUBLIC, NAT, 10), True),
    ("a marginally faster path is not worth a switch",
     c(MAPPED, UPNP, 9.5), c(PUBLIC, NAT, 10), False),
    ("nor is the marginally slower one: the path in use stays either way",
     c(PUBLIC, NAT, 10), c(MAPPED, UPNP, 9.5), False),
    ("unmeasured: private beats public",
     c(LAN, HOME), c(PUBLIC, NAT), True),
    ("unmeasured, same class: no reason to move",
     c(MAPPED, UPNP), c(PUBLIC, NAT), False),
])
def test_better(intent, a, b, expected):
    assert better(a, b) is expected, intent


@pytest.mark.parametrize(("intent", "candidates", "current", "expected"), [
    ("nothing to choose from", [], None, None),
    ("today's only kind: the registry's observed endpoint",
     [c(PUBLIC, NAT)], None, c(PUBLIC, NAT)),
    ("a peer on an unknown endpoint (WireGuard roamed) is steered to the candidate",
     [c(PUBLIC, NAT)], Endpoint.parse("198.51.100.2:1"), c(PUBLIC, NAT)),
    ("without a path in use the try order decides: LAN first",
     [c(RELAY, SLOT), c(PUBLIC, NAT), c(LAN, HOME)], None, c(LAN, HOME)),
    ("the path in use is kept against a marginal gain",
     [c(PUBLIC, NAT, 10), c(MAPPED, UPNP, 9.5)], NAT, c(PUBLIC, NAT, 10)),
    ("a relayed peer moves to a direct candidate as soon as there is one",
     [c(RELAY, SLOT, 5), c(PUBLIC, NAT, 50)], SLOT, c(PUBLIC, NAT, 50)),
    ("a mapping before the observed endpoint: it lets anyone in, whatever the peer's NAT",
     [c(PUBLIC, NAT), c(MAPPED, UPNP)], None, c(MAPPED, UPNP)),
    ("but after the LAN: same NAT, and most NATs do not hairpin",
     [c(MAPPED, UPNP), c(LAN, HOME)], None, c(LAN, HOME)),
])
def test_choose(intent, candidates, current, expected):
    assert choose(candidates, current) == expected, intent


def test_path_of_a_live_session_is_its_candidates_kind():
    candidates = [c(LAN, HOME), c(PUBLIC, NAT), c(MAPPED, UPNP), c(RELAY, SLOT)]
    assert [path_of(e, candidates) for e in (HOME, NAT, UPNP, SLOT)] == [
        PathKind.LAN, PathKind.DIRECT, PathKind.DIRECT, PathKind.RELAY]
    # WireGuard roamed to an address no candidate names: still the peer itself, direct.
    assert path_of(Endpoint.parse("198.51.100.9:9"), candidates) is PathKind.DIRECT


def test_the_registry_record_gives_its_observed_endpoint_as_the_public_candidate():
    record = PeerRecord(Key(bytes(32)), (), NAT, None, None, 1)
    assert candidates_of(record) == (c(PUBLIC, NAT),)
    assert candidates_of(PeerRecord(Key(bytes(32)), (), None, None, None, 1)) == ()


def test_a_reported_mapping_is_the_mapped_candidate():
    reported = Reported(51820, (), "0.1.0", UPNP)
    record = PeerRecord(Key(bytes(32)), (), NAT, None, reported, 1)
    assert candidates_of(record) == (c(MAPPED, UPNP), c(PUBLIC, NAT))
    # A mapping the registry also observes (a port-preserving NAT) is one candidate.
    same = PeerRecord(Key(bytes(32)), (), UPNP, None, reported, 1)
    assert candidates_of(same) == (c(MAPPED, UPNP),)


ME_KEY, PEER_KEY = Key(bytes([1]) * 32), Key(bytes([2]) * 32)
SHARED_NAT = Endpoint.parse("198.51.100.7:1024")
OTHER_NAT = Endpoint.parse("203.0.113.9:1024")
OUR_LAN = (ipaddress.ip_interface("10.1.0.2/24"),)


def record(key: Key, endpoint: Endpoint, addresses: tuple[str, ...] = ("10.1.0.3",),
           port: int = 51820) -> PeerRecord:
    reported = Reported(port, tuple(ipaddress.ip_address(a) for a in addresses), "test")
    return PeerRecord(key, (), endpoint, None, reported, 1)


@pytest.mark.parametrize(("intent", "peer", "mine", "local", "lan"), [
    ("same public address, the peer's address on our own network: its LAN address first",
     record(PEER_KEY, Endpoint.parse("198.51.100.7:2048")), record(ME_KEY, SHARED_NAT),
     OUR_LAN, ["10.1.0.3:51820"]),
    ("the LAN candidate has the peer's own listen port, not its NAT's",
     record(PEER_KEY, Endpoint.parse("198.51.100.7:2048"), port=4500),
     record(ME_KEY, SHARED_NAT), OUR_LAN, ["10.1.0.3:4500"]),
    ("another public address: a 10.1.0.3 there is someone else's LAN",
     record(PEER_KEY, OTHER_NAT), record(ME_KEY, SHARED_NAT), OUR_LAN, []),
    ("same public address (a carrier NAT), but not on our network: no LAN candidate",
     record(PEER_KEY, Endpoint.parse("198.51.100.7:2048"), ("192.168.7.3",)),
     record(ME_KEY, SHARED_NAT), OUR_LAN, []),
    ("our own address is never a candidate for the peer",
     record(PEER_KEY, Endpoint.parse("198.51.100.7:2048"), ("10.1.0.2",)),
     record(ME_KEY, SHARED_NAT), OUR_LAN, []),
    ("before our own record is known, nothing to compare with",
     record(PEER_KEY, SHARED_NAT), None, OUR_LAN, []),
])
def test_lan_candidates(intent, peer, mine, local, lan):
    found = candidates_of(peer, mine, local)
    assert [str(c.endpoint) for c in found if c.kind is LAN] == lan, intent
    assert found[-1] == c(PUBLIC, peer.endpoint), intent  # the observed endpoint, always
