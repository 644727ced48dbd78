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
from wgpunch.wg.model import Endpoint

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


IPV6 = CandidateKind.IPV6
PEER6 = Endpoint.parse("[2001:db8:2::a]:51820")
OUR6 = ipaddress.ip_interface("2001:db8:1::a/64")


def dual(endpoints: tuple[Endpoint, ...] = (PEER6,), addresses: tuple[str, ...] = ()
         ) -> PeerRecord:
    reported = Reported(51820, tuple(ipaddress.ip_address(a) for a in addresses), "test",
                        ipv6=endpoints)
    return PeerRecord(PEER_KEY, (), OTHER_NAT, None, reported, 1)


@pytest.mark.parametrize(("intent", "peer", "local", "ipv6"), [
    ("both sides have a global IPv6 address: the peer's IPv6 endpoint is a candidate",
     dual(), (*OUR_LAN, OUR6), [PEER6]),
    ("we have no IPv6 of our own: nothing to send it from",
     dual(), OUR_LAN, []),
    ("a unique local or link-local address of ours reaches no other site",
     dual(), (*OUR_LAN, ipaddress.ip_interface("fd00::2/64"),
              ipaddress.ip_interface("fe80::2/64")), []),
    ("the peer reported no IPv6 endpoint (no IPv6, or a node from before them)",
     dual(()), (*OUR_LAN, OUR6), []),
])
def test_ipv6_candidates(intent, peer, local, ipv6):
    found = candidates_of(peer, record(ME_KEY, SHARED_NAT), local)
    assert [c.endpoint for c in found if c.kind is IPV6] == ipv6, intent
    assert found[-1] == c(PUBLIC, OTHER_NAT), intent  # IPv4 stays the fallback


def test_ipv6_is_tried_before_every_ipv4_path_but_the_lan():
    """No NAT over IPv6: whatever the two IPv4 NATs are, it goes direct; the LAN (same
    NAT, same subnet) still comes first, and a live path is kept, IPv4 or not."""
    assert choose([c(PUBLIC, NAT), c(MAPPED, UPNP), c(IPV6, PEER6)]) == c(IPV6, PEER6)
    assert choose([c(IPV6, PEER6), c(LAN, HOME)]) == c(LAN, HOME)
    assert choose([c(IPV6, PEER6), c(PUBLIC, NAT)], current=NAT) == c(PUBLIC, NAT)
    assert path_of(PEER6, [c(IPV6, PEER6), c(PUBLIC, NAT)]) is PathKind.DIRECT


def test_an_ipv6_address_on_our_own_network_is_one_candidate_the_lan_one():
    peer = PeerRecord(PEER_KEY, (), Endpoint.parse("198.51.100.7:2048"), None,
                      Reported(51820, (ipaddress.ip_address("2001:db8:1::b"),), "test",
                               ipv6=(Endpoint.parse("[2001:db8:1::b]:51820"),)), 1)
    found = candidates_of(peer, record(ME_KEY, SHARED_NAT), (OUR6,))
    assert [(x.kind, str(x.endpoint)) for x in found] == [
        (LAN, "[2001:db8:1::b]:51820"), (PUBLIC, "198.51.100.7:2048")]


def test_an_ipv6_endpoint_that_leads_nowhere_fails_over_to_ipv4():
    """A firewall that lets nothing in (or an IPv6 path broken on the way): after the retry
    delay the next attempt goes to the peer's IPv4 endpoint."""
    from wgpunch.node.decide import Memory, failover
    from wgpunch.node.timings import Timings

    candidates = [c(IPV6, PEER6), c(PUBLIC, NAT)]
    t = Timings()
    mem = Memory(attempts=1, attempt_at=100.0, attempt_endpoint=PEER6)
    assert failover(mem, candidates, live=False, now=100.1, t=t).failed == frozenset()
    later = failover(mem, candidates, live=False, now=100.0 + t.first_retry_s, t=t)
    assert later.failed == {PEER6}
    usable = [x for x in candidates if x.endpoint not in later.failed]
    assert choose(usable) == c(PUBLIC, NAT)
