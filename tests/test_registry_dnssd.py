"""DNS-SD: the answers (dnssd.py), their fitting into a message (dnswire.py) and the server
(dnsserver.py), against shared/reference/wgsd.md.

Expected records are written out by hand from the rules in wgsd.md (owner names, types,
fields, order, sections), never taken from the server's output. Names are compared as text,
so case matters: owners must come back lowercased and questions as asked.
"""

import asyncio
import ipaddress
import random
import time

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ports import free_ports
from wgpunch.keys import Key
from wgpunch.registry.dnssd import InstanceCache, Zone, answer
from wgpunch.registry.dnsserver import DnsServer, Instance, SelfConfig
from wgpunch.registry.dnswire import TCP_MAX, size_limit, to_wire
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg.device import Endpoint, PeerState

Z = "example.com."
SOA = f"{Z} 60 IN SOA ns1.{Z} postmaster.{Z} 1 86400 7200 3600000 60"

# wgsd_test.go's fixture (wgsd.md §5.1): key = 32 zero bytes with byte 0 set; labels and
# base64 copied from the reference, not computed here.
B32 = {
    "peer1": "aeaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa====",
    "peer2": "aiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa====",
    "peer3": "amaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa====",
    "self": "mmaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa====",
}
B64 = {
    "peer1": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "peer2": "AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "self": "YwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
}
KEY = {name: Key(bytes([first]) + bytes(31))
       for name, first in (("peer1", 1), ("peer2", 2), ("peer3", 3), ("self", 99))}


def N(who: str, zone: str = Z) -> str:
    return f"{B32[who]}._wireguard._udp.{zone}"


def TXT(who: str, allowed: str) -> str:
    return f'"txtvers=1" "pub={B64[who]}" "allowed={allowed}"'


def net(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


def peer(key: Key, endpoint: str | None, *allowed: str) -> PeerState:
    return PeerState(key, None if endpoint is None else Endpoint.parse(endpoint), net(*allowed),
                     None, 0, 0, 25, False)


def table(*peers: PeerState) -> RegistryState:
    state = RegistryState(epoch="e")
    state.observe(peers)
    return state


FIXTURE = table(peer(KEY["peer1"], "1.1.1.1:1", "10.0.0.1/32", "10.0.0.2/32"),
                peer(KEY["peer2"], "[::2]:2", "10.0.0.3/32", "10.0.0.4/32"),
                peer(KEY["peer3"], None, "10.0.0.5/32", "10.0.0.6/32"))
SELF = Instance(KEY["self"], Endpoint.parse("127.0.0.1:51820"),
                net("10.0.0.99/32", "10.0.0.100/32"))
ZONE = Zone.parse(Z)


def query(name: str, rdtype: str, *, edns: int = -1, payload: int = 1232,
          rdclass: str = "IN", **kwargs) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, rdclass, use_edns=edns, payload=payload,
                                  **kwargs)


CACHE = InstanceCache()  # shared by every test, as a server shares one across queries


def respond(q: dns.message.Message, state: RegistryState = FIXTURE, me=SELF, *,
            tcp: bool = False) -> dns.message.Message | None:
    """The pure answer, rendered as the server would and parsed back; the same bytes with
    the server's cache of record sets, asked twice (built, then reused)."""
    limit = size_limit(q, tcp=tcp)
    response = answer(q, ZONE, state, lambda: me, limit=limit)
    for _ in range(2):
        cached = answer(q, ZONE, state, lambda: me, limit=limit, cache=CACHE)
        assert (None if cached is None else to_wire(cached, limit)) == (
            None if response is None else to_wire(response, limit))
    if response is None:
        return None
    return dns.message.from_wire(to_wire(response, limit))


def records(section: list) -> list[str]:
    """One line per record, in wire order, names as sent (case kept)."""
    return [f"{rrset.name.to_text()} {rrset.ttl} {dns.rdataclass.to_text(rrset.rdclass)} "
            f"{dns.rdatatype.to_text(rrset.rdtype)} {rdata.to_text()}"
            for rrset in section for rdata in rrset]


def check(r: dns.message.Message, rcode: str, answer_: list[str], ns: list[str] = (),
          extra: list[str] = (), *, aa: bool = True) -> None:
    assert dns.rcode.to_text(r.rcode()) == rcode
    assert bool(r.flags & dns.flags.AA) == aa
    assert not r.flags & dns.flags.TC
    assert (records(r.answer), records(r.authority), records(r.additional)) == (
        answer_, list(ns), list(extra))


# -- wgsd's own test vectors (wgsd.md §5.1) ---------------------------------------------------

WGSD_ROWS = [
    # (row, qname, qtype, rcode, answer, authority, additional)
    (1, f"_wireguard._udp.{Z}", "PTR", "NOERROR",
     [f"_wireguard._udp.{Z} 0 IN PTR {N(w)}" for w in ("peer1", "peer2", "self")], [], []),
    (2, N("self"), "SRV", "NOERROR", [f"{N('self')} 0 IN SRV 0 0 51820 {N('self')}"], [],
     [f"{N('self')} 0 IN A 127.0.0.1",
      f"{N('self')} 0 IN TXT {TXT('self', '10.0.0.99/32,10.0.0.100/32')}"]),
    (3, N("peer1"), "SRV", "NOERROR", [f"{N('peer1')} 0 IN SRV 0 0 1 {N('peer1')}"], [],
     [f"{N('peer1')} 0 IN A 1.1.1.1",
      f"{N('peer1')} 0 IN TXT {TXT('peer1', '10.0.0.1/32,10.0.0.2/32')}"]),
    (4, N("peer2"), "SRV", "NOERROR", [f"{N('peer2')} 0 IN SRV 0 0 2 {N('peer2')}"], [],
     [f"{N('peer2')} 0 IN AAAA ::2",
      f"{N('peer2')} 0 IN TXT {TXT('peer2', '10.0.0.3/32,10.0.0.4/32')}"]),
    (5, N("self"), "A", "NOERROR", [f"{N('self')} 0 IN A 127.0.0.1"], [], []),
    (6, N("peer1"), "A", "NOERROR", [f"{N('peer1')} 0 IN A 1.1.1.1"], [], []),
    (7, N("peer2"), "AAAA", "NOERROR", [f"{N('peer2')} 0 IN AAAA ::2"], [], []),
    (8, N("self"), "TXT", "NOERROR",
     [f"{N('self')} 0 IN TXT {TXT('self', '10.0.0.99/32,10.0.0.100/32')}"], [], []),
    (9, N("peer1"), "TXT", "NOERROR",
     [f"{N('peer1')} 0 IN TXT {TXT('peer1', '10.0.0.1/32,10.0.0.2/32')}"], [], []),
    (10, N("peer2"), "TXT", "NOERROR",
     [f"{N('peer2')} 0 IN TXT {TXT('peer2', '10.0.0.3/32,10.0.0.4/32')}"], [], []),
    (11, f"nxdomain.{Z}", "AAAA", "NXDOMAIN", [], [SOA], []),
    # Row 12 is SERVFAIL in wgsd's unit test only because its next handler fails; outside
    # the zone the registry answers REFUSED (DESIGN.md §5, wgsd.md §1.7), tested below.
    (13, N("peer3"), "SRV", "NXDOMAIN", [], [SOA], []),
    (14, N("peer3"), "A", "NXDOMAIN", [], [SOA], []),
    (15, N("peer3"), "AAAA", "NXDOMAIN", [], [SOA], []),
    (16, N("peer3"), "TXT", "NXDOMAIN", [], [SOA], []),
]


@pytest.mark.parametrize(("row", "qname", "qtype", "rcode", "an", "ns", "ar"), WGSD_ROWS,
                         ids=[f"row{r[0]}-{r[2]}" for r in WGSD_ROWS])
def test_wgsd_test_vectors(row, qname, qtype, rcode, an, ns, ar):
    q = query(qname, qtype)
    r = respond(q)
    check(r, rcode, an, ns, ar)
    assert r.id == q.id and r.flags & dns.flags.QR and not r.flags & dns.flags.RA
    assert records(r.question) == records(q.question)


# -- every other rule -------------------------------------------------------------------------

UPPER = N("peer1").upper()  # what wgsd-client sends (wgsd.md §2)
ROWS = [
    # intent, qname, qtype, rcode, answer, authority, additional
    ("uppercase key and zone: owner and target lowercased", UPPER, "SRV", "NOERROR",
     [f"{N('peer1')} 0 IN SRV 0 0 1 {N('peer1')}"], [],
     [f"{N('peer1')} 0 IN A 1.1.1.1",
      f"{N('peer1')} 0 IN TXT {TXT('peer1', '10.0.0.1/32,10.0.0.2/32')}"]),
    ("mixed-case listing name: owner lowercased", "_WireGuard._UDP.Example.COM.", "PTR",
     "NOERROR", [f"_wireguard._udp.{Z} 0 IN PTR {N(w)}" for w in ("peer1", "peer2", "self")],
     [], []),
    ("A on an IPv6 endpoint answers AAAA", N("peer2"), "A", "NOERROR",
     [f"{N('peer2')} 0 IN AAAA ::2"], [], []),
    ("AAAA on an IPv4 endpoint answers A", N("peer1"), "AAAA", "NOERROR",
     [f"{N('peer1')} 0 IN A 1.1.1.1"], [], []),
    ("uppercase TXT", N("self").upper(), "TXT", "NOERROR",
     [f"{N('self')} 0 IN TXT {TXT('self', '10.0.0.99/32,10.0.0.100/32')}"], [], []),
    ("MX on a peer", N("peer1"), "MX", "NXDOMAIN", [], [SOA], []),
    ("ANY on a peer", N("peer1"), "ANY", "NXDOMAIN", [], [SOA], []),
    ("PTR on a peer", N("peer1"), "PTR", "NXDOMAIN", [], [SOA], []),
    ("CNAME on a peer", N("peer1"), "CNAME", "NXDOMAIN", [], [SOA], []),
    ("SOA at the apex (wgsd has none)", Z, "SOA", "NXDOMAIN", [], [SOA], []),
    ("NS at the apex", Z, "NS", "NXDOMAIN", [], [SOA], []),
    ("listing name with SRV", f"_wireguard._udp.{Z}", "SRV", "NXDOMAIN", [], [SOA], []),
    ("listing name with TXT", f"_wireguard._udp.{Z}", "TXT", "NXDOMAIN", [], [SOA], []),
    ("_udp alone", f"_udp.{Z}", "PTR", "NXDOMAIN", [], [SOA], []),
    ("a name below an instance", f"x.{N('peer1')}", "SRV", "NXDOMAIN", [], [SOA], []),
    ("wildcard label", f"*._wireguard._udp.{Z}", "SRV", "NXDOMAIN", [], [SOA], []),
    ("73-character name of another shape (wgsd quirk not kept)",
     f"{B32['peer1']}.foo.bar.baz.qux.{Z}", "SRV", "NXDOMAIN", [], [SOA], []),
    ("key of no peer", f"{'a' * 52}====._wireguard._udp.{Z}", "SRV", "NXDOMAIN", [], [SOA], []),
    ("base32 with non-zero padding bits", f"{'a' * 51}b====._wireguard._udp.{Z}", "SRV",
     "NXDOMAIN", [], [SOA], []),
    ("56 characters that are not base32", f"{'1' * 56}._wireguard._udp.{Z}", "SRV",
     "NXDOMAIN", [], [SOA], []),
    ("key label without padding", f"{B32['peer1'][:52]}._wireguard._udp.{Z}", "SRV",
     "NXDOMAIN", [], [SOA], []),
    ("peer without endpoint, uppercase", N("peer3").upper(), "SRV", "NXDOMAIN", [], [SOA], []),
]


@pytest.mark.parametrize(("intent", "qname", "qtype", "rcode", "an", "ns", "ar"), ROWS,
                         ids=[r[0] for r in ROWS])
def test_rules(intent, qname, qtype, rcode, an, ns, ar):
    q = query(qname, qtype)
    r = respond(q)
    check(r, rcode, an, ns, ar)
    assert r.question[0].name.to_text() == qname  # echoed as asked


def test_cached_record_sets_follow_the_table():
    """The server's cache of record sets serves a peer's new endpoint and allowed IPs as soon
    as the table has them, and drops the sets of peers that left."""
    state = table(peer(KEY["peer1"], "1.1.1.1:1", "10.0.0.1/32"))
    cache = InstanceCache()

    def srv() -> dns.message.Message:
        q = query(N("peer1").upper(), "SRV")
        return dns.message.from_wire(to_wire(answer(q, ZONE, state, lambda: None, cache=cache),
                                             TCP_MAX))

    check(srv(), "NOERROR", [f"{N('peer1')} 0 IN SRV 0 0 1 {N('peer1')}"], [],
          [f"{N('peer1')} 0 IN A 1.1.1.1", f"{N('peer1')} 0 IN TXT {TXT('peer1', '10.0.0.1/32')}"])
    state.observe([peer(KEY["peer1"], "[2001:db8::7]:7", "10.0.0.1/32")])
    check(srv(), "NOERROR", [f"{N('peer1')} 0 IN SRV 0 0 7 {N('peer1')}"], [],
          [f"{N('peer1')} 0 IN AAAA 2001:db8::7",
           f"{N('peer1')} 0 IN TXT {TXT('peer1', '10.0.0.1/32')}"])
    state.observe([peer(KEY["peer1"], "[2001:db8::7]:7", "10.0.0.9/32", "10.0.0.8/32")])
    check(srv(), "NOERROR", [f"{N('peer1')} 0 IN SRV 0 0 7 {N('peer1')}"], [],
          [f"{N('peer1')} 0 IN AAAA 2001:db8::7",
           f"{N('peer1')} 0 IN TXT {TXT('peer1', '10.0.0.8/32,10.0.0.9/32')}"])
    state.observe([peer(KEY["peer1"], None, "10.0.0.1/32")])
    check(srv(), "NXDOMAIN", [], [SOA], [])

    many = [peer(Key(bytes([i]) * 32), f"192.0.2.{i}:{i}", f"10.1.0.{i}/32")
            for i in range(1, 101)]
    state.observe(many)
    for p in many:
        answer(query(ZONE.instance(p.public_key).to_text(), "TXT"), ZONE, state, lambda: None,
               cache=cache)
    newcomer = peer(KEY["peer2"], "192.0.2.200:200", "10.1.1.1/32")
    state.observe([*many[:2], newcomer])
    for p in [*many[:2], newcomer]:  # building the newcomer's lets the 98 departed peers go
        answer(query(ZONE.instance(p.public_key).to_text(), "SRV"), ZONE, state, lambda: None,
               cache=cache)
    assert len(cache) == 3


@pytest.mark.parametrize(("intent", "qname", "rdclass"), [
    ("a sibling zone", "x.notexample.com.", "IN"),
    ("the parent", "com.", "IN"),
    ("the root", ".", "IN"),
    ("a suffix that is not a label boundary", "xexample.com.", "IN"),
    ("class CH in the zone", N("peer1"), "CH"),
    ("class ANY in the zone", N("peer1"), "ANY"),
])
def test_refused_without_aa(intent, qname, rdclass):
    r = respond(query(qname, "SRV", rdclass=rdclass))
    check(r, "REFUSED", [], aa=False)


def test_flags_id_and_edns_are_echoed():
    q = query(N("peer1"), "SRV", edns=0, payload=4096, want_dnssec=True)
    q.flags |= dns.flags.CD
    q.flags &= ~dns.flags.RD
    r = respond(q)
    assert r.id == q.id
    assert r.flags & (dns.flags.QR | dns.flags.AA | dns.flags.CD) == (
        dns.flags.QR | dns.flags.AA | dns.flags.CD)
    assert not r.flags & (dns.flags.RD | dns.flags.RA)
    # CoreDNS SizeAndDo: OPT version 0, the query's size and DO bit, after A and TXT.
    assert (r.edns, r.payload, bool(r.ednsflags & dns.flags.DO)) == (0, 4096, True)
    assert [dns.rdatatype.to_text(s.rdtype) for s in r.additional] == ["A", "TXT"]
    refused = respond(query("example.org.", "A", edns=0, payload=1400))
    assert (refused.edns, refused.payload) == (0, 1400)
    plain = respond(query(N("peer1"), "SRV"))
    assert plain.edns == -1


def test_edns_version_other_than_0_is_badvers():
    r = respond(query(N("peer1"), "SRV", edns=1))
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and not r.answer
    assert not r.flags & dns.flags.AA


def test_request_rules_of_the_framework():
    """miekg/dns's defaults around the plugin: responses are ignored, other opcodes are not
    implemented, exactly one question is required."""
    response = query(N("peer1"), "SRV")
    response.flags |= dns.flags.QR
    assert respond(response) is None
    notify = query(Z, "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert respond(notify).rcode() == dns.rcode.NOTIMP
    assert respond(notify).opcode() == dns.opcode.NOTIFY
    empty = query(N("peer1"), "SRV", edns=0)
    empty.question = []
    r = respond(empty)
    assert r.rcode() == dns.rcode.FORMERR and r.edns == -1 and not r.question
    two = query(N("peer1"), "SRV")
    two.question.append(query(N("peer2"), "SRV").question[0])
    r = respond(two)
    assert r.rcode() == dns.rcode.FORMERR and len(r.question) == 1


def test_no_endpoints_is_an_empty_listing_without_soa():
    state = table(peer(KEY["peer3"], None, "10.0.0.5/32"))
    check(respond(query(f"_wireguard._udp.{Z}", "PTR"), state, None), "NOERROR", [])


def test_self_off_and_self_without_an_endpoint():
    listing = [f"_wireguard._udp.{Z} 0 IN PTR {N(w)}" for w in ("peer1", "peer2")]
    for me in (None, Instance(KEY["self"], None, ())):
        check(respond(query(f"_wireguard._udp.{Z}", "PTR"), me=me), "NOERROR", listing)
        check(respond(query(N("self"), "SRV"), me=me), "NXDOMAIN", [], [SOA])


def test_peers_are_found_before_self_and_self_is_asked_only_when_needed():
    asked = []

    def me():
        asked.append(1)
        return SELF

    for qname, qtype in ((N("peer1"), "SRV"), (f"nx.{Z}", "A"), ("example.org.", "A")):
        answer(query(qname, qtype), ZONE, FIXTURE, me)
    assert not asked
    answer(query(N("self"), "SRV"), ZONE, FIXTURE, me)
    assert asked


def test_txt_edge_cases():
    mapped, no_ips = Key(bytes([5]) * 32), Key(bytes([6]) * 32)
    many = [f"10.{i}.{j}.0/24" for i in range(10) for j in range(10)]
    crowded = Key(bytes([7]) * 32)
    state = table(peer(mapped, "[::ffff:192.0.2.7]:7", "10.9.0.1/32"),
                  peer(no_ips, "[2001:db8::6]:6"), peer(crowded, "192.0.2.8:8", *many))
    name = f"{mapped.base32()}._wireguard._udp.{Z}"
    # An IPv4-mapped endpoint is IPv4 (Go's To4() != nil): A, not AAAA.
    check(respond(query(name, "AAAA"), state), "NOERROR", [f"{name} 0 IN A 192.0.2.7"])
    name = f"{no_ips.base32()}._wireguard._udp.{Z}"
    pub = f"pub={no_ips.base64()}"
    check(respond(query(name, "TXT"), state), "NOERROR",
          [f'{name} 0 IN TXT "txtvers=1" "{pub}" "allowed="'])
    name = f"{crowded.base32()}._wireguard._udp.{Z}"
    [txt] = respond(query(name, "TXT"), state, tcp=True).answer[0]
    allowed = txt.strings[2]
    assert len(allowed) <= 255 and allowed.startswith(b"allowed=10.0.0.0/24,10.0.1.0/24,")
    kept = allowed.removeprefix(b"allowed=").decode().split(",")
    assert kept == many[:len(kept)] and len(kept) == 247 // 12  # whole CIDRs, in order


def test_zone_is_lowercased_and_checked():
    assert Zone.parse("Example.COM").name.to_text() == Z
    zone = Zone.parse("Mesh.Internal")
    r = answer(query("_wireguard._udp.mesh.internal.", "PTR"), zone, FIXTURE, lambda: None)
    assert records(r.answer)[0].endswith(f"PTR {N('peer1', 'mesh.internal.')}")


# -- fitting into a message (dnswire.py) ------------------------------------------------------


def many_peers(count: int) -> tuple[RegistryState, list[str]]:
    """`count` peers with endpoints; their listing targets in key order."""
    keys = sorted((Key(i.to_bytes(2, "big") + bytes(30)) for i in range(1, count + 1)),
                  key=lambda k: k.raw)
    state = table(*(peer(k, f"192.0.2.{i % 250 + 1}:{1000 + i}", f"10.1.{i // 250}.{i % 250}/32")
                    for i, k in enumerate(keys)))
    return state, [f"{k.base32()}._wireguard._udp.{Z}" for k in keys]


def test_truncation_keeps_whole_records_in_order_and_sets_tc():
    state, targets = many_peers(40)
    listing = f"_wireguard._udp.{Z}"
    for q, limit in ((query(listing, "PTR"), 512), (query(listing, "PTR", edns=0), 1232)):
        wire = to_wire(answer(q, ZONE, state, lambda: None, limit=limit), limit)
        r = dns.message.from_wire(wire)
        assert len(wire) <= limit and r.flags & dns.flags.TC
        got = [rd.target.to_text() for rd in r.answer[0]]
        assert got == targets[:len(got)]
        # wgsd.md §1.7: about 6 fit in 512 bytes, about 16 in 1232
        assert len(got) == (limit - 12 - 33 - (11 if q.edns >= 0 else 0)) // 71
        assert r.edns == q.edns  # OPT kept, last
    r = respond(query(listing, "PTR"), state, None, tcp=True)
    assert not r.flags & dns.flags.TC
    assert [rd.target.to_text() for rd in r.answer[0]] == targets


def test_tcp_limit_truncates_a_huge_listing():
    state, targets = many_peers(2000)
    r = respond(query(f"_wireguard._udp.{Z}", "PTR"), state, None, tcp=True)
    got = [rd.target.to_text() for rd in r.answer[0]]
    assert r.flags & dns.flags.TC and got == targets[:len(got)] and 900 < len(got) < 1000


def test_srv_fits_in_512_without_edns():
    r = respond(query(UPPER, "SRV"))
    assert not r.flags & dns.flags.TC and len(r.additional) == 2


# -- the server on real sockets ---------------------------------------------------------------


async def udp_ask(port: int, wire: bytes, wait_s: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(wire)
        async with asyncio.timeout(wait_s):
            return await got
    finally:
        transport.close()


async def tcp_ask(port: int, *wires: bytes) -> list[bytes]:
    """Several queries over one connection (RFC 7766 pipelining), answers in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for wire in wires:
            writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        answers = []
        async with asyncio.timeout(5):
            for _ in wires:
                size = int.from_bytes(await reader.readexactly(2), "big")
                answers.append(await reader.readexactly(size))
        return answers
    finally:
        writer.close()


@pytest.fixture
async def server():
    state, _ = many_peers(40)
    state.observe_device(KEY["self"], 51820)
    srv = DnsServer(ZONE, state, self_config=SelfConfig.parse(["198.51.100.1:51820"]),
                    timings=Timings(dns_tcp_idle_s=0.5))
    await srv.start([("127.0.0.1", 0)])
    yield srv
    await srv.close()


def port_of(srv: DnsServer) -> int:
    return srv.addresses[0][1]


async def test_udp_and_tcp_answers(server):
    port = port_of(server)
    listing = query(f"_wireguard._udp.{Z}", "PTR", edns=0)
    r = dns.message.from_wire(await udp_ask(port, listing.to_wire()))
    assert r.flags & dns.flags.TC and len(r.answer[0]) == 16  # dig retries over TCP
    srv_q = query(N("self").upper(), "SRV")
    full, srv_r = [dns.message.from_wire(w)
                   for w in await tcp_ask(port, listing.to_wire(), srv_q.to_wire())]
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 41  # 40 peers + self
    assert records(full.answer)[-1].endswith(N("self"))
    assert records(srv_r.answer) == [f"{N('self')} 0 IN SRV 0 0 51820 {N('self')}"]
    assert records(srv_r.additional)[0] == f"{N('self')} 0 IN A 198.51.100.1"
    assert server.counts["malformed"] == server.counts["errors"] == 0


async def test_tcp_connection_ends_on_garbage_and_when_idle(server):
    port = port_of(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00\x05hello")
    async with asyncio.timeout(2):
        assert await reader.read() == b""  # closed without an answer
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00")  # half a length prefix, then nothing
    started = time.monotonic()
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    assert 0.4 < time.monotonic() - started < 2.5  # dns_tcp_idle_s = 0.5
    writer.close()
    assert server.counts["malformed"] == 1


async def test_tcp_connections_are_bounded():
    srv = DnsServer(ZONE, FIXTURE, self_config=None, tcp_clients_max=2)
    await srv.start([("127.0.0.1", 0)])
    port, streams = port_of(srv), []
    try:
        wire = query(N("peer1"), "SRV").to_wire()
        for _ in range(2):  # an answer on each: both are the server's clients then
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            streams.append(writer)
            writer.write(len(wire).to_bytes(2, "big") + wire)
            async with asyncio.timeout(2):
                await reader.readexactly(int.from_bytes(await reader.readexactly(2), "big"))
        assert srv.connections == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        streams.append(writer)
        async with asyncio.timeout(2):
            assert await reader.read() == b""  # the third is closed at once
        assert srv.counts["tcp_refused"] == 1
    finally:
        for writer in streams:
            writer.close()
        await srv.close()
    assert srv.connections == 0


def mutate(wire: bytes, rng: random.Random) -> bytes:
    data = bytearray(wire)
    for _ in range(rng.randint(1, 6)):
        action = rng.random()
        if action < 0.5 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif action < 0.7 and data:
            del data[rng.randrange(len(data)):]
        elif action < 0.85:
            data[rng.randrange(len(data) + 1):0] = rng.randbytes(rng.randint(1, 8))
        else:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = b"\xc0" + bytes([rng.randrange(256)])  # compression pointers
    return bytes(data)


async def test_fuzz_never_stops_the_server(server):
    """Random bytes and mutated valid queries (seeded, 4000 packets) at the real UDP socket:
    no internal error, and a valid query is answered between batches and after."""
    port = port_of(server)
    rng = random.Random(20240601)
    seeds = [query(n, t, edns=e).to_wire() for n, t, e in (
        (N("peer1"), "SRV", -1), (f"_wireguard._udp.{Z}", "PTR", 0), (N("self"), "TXT", 0),
        (Z, "SOA", -1), ("example.org.", "A", 0))]
    probe = query(N("self"), "SRV").to_wire()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port))
    try:
        for batch in range(20):
            for _ in range(200):
                if rng.random() < 0.3:
                    transport.sendto(rng.randbytes(rng.randint(0, 600)))
                else:
                    transport.sendto(mutate(rng.choice(seeds), rng))
            r = dns.message.from_wire(await udp_ask(port, probe, wait_s=5))
            assert r.answer, f"no answer after batch {batch}"
    finally:
        transport.close()
    assert server.counts["errors"] == 0
    assert server.counts["malformed"] > 500  # most mutations do not parse
    # The server read most of them; a full receive buffer may have made the kernel drop some.
    assert server.counts["queries"] > 3000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_handle_any_bytes(wire):
    srv = DnsServer(ZONE, FIXTURE, self_config=SelfConfig.parse(["198.51.100.1:51820"]))
    reply = srv.handle(wire, "127.0.0.1", tcp=False)
    if reply is not None:
        assert len(reply) <= 512 or len(reply) <= size_limit(dns.message.from_wire(wire),
                                                               tcp=False)
        dns.message.from_wire(reply)
    assert srv.counts["errors"] == 0


# -- the `self` record ------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "endpoint", "allowed"), [
    ([], None, []),
    (["192.0.2.1:51820"], "192.0.2.1:51820", []),
    (["[2001:db8::1]:51820", "10.0.0.254/24", "fd00::1/64"], "[2001:db8::1]:51820",
     ["10.0.0.0/24", "fd00::/64"]),  # host bits cleared, as Go's net.ParseCIDR
    (["10.0.0.254/32"], None, ["10.0.0.254/32"]),
])
def test_self_options(args, endpoint, allowed):
    got = SelfConfig.parse(args)
    assert (None if got.endpoint is None else str(got.endpoint)) == endpoint
    assert [str(n) for n in got.allowed_ips] == allowed


@pytest.mark.parametrize(("args", "match"), [
    (["hostname:51820"], "self endpoint"),
    (["192.0.2.1:0"], "self endpoint"),
    (["192.0.2.1:51820", "1.1.11/32"], "allowed IP"),
    (["192.0.2.1:51820", "10.0.0.1"], "allowed IP"),
    (["192.0.2.1:51820", "192.0.2.2:51820"], "allowed IP"),
])
def test_self_options_refused(args, match):
    from wgpunch.errors import ConfigError
    with pytest.raises(ConfigError, match=match):
        SelfConfig.parse(args)


def test_self_without_endpoint_is_the_route_source_toward_the_node():
    """No explicit endpoint: the local address of the route toward the querying node's
    observed endpoint (here loopback toward 127.0.0.1) and the device's listen port; never
    a tunnel address, and nothing before the device was read."""
    state = table(peer(KEY["peer1"], "127.0.0.1:1", "10.0.0.1/32"))
    srv = DnsServer(ZONE, state, self_config=SelfConfig.parse([]))
    q = query(N("self"), "SRV").to_wire()
    r = dns.message.from_wire(srv.handle(q, "10.0.0.1", tcp=False))
    assert r.rcode() == dns.rcode.NXDOMAIN  # no device read yet: no key, no record
    state.observe_device(KEY["self"], 51820)
    r = dns.message.from_wire(srv.handle(q, "10.0.0.1", tcp=False))
    assert records(r.answer) == [f"{N('self')} 0 IN SRV 0 0 51820 {N('self')}"]
    assert records(r.additional)[0] == f"{N('self')} 0 IN A 127.0.0.1"
    tunnel = DnsServer(ZONE, state, self_config=SelfConfig.parse([]),
                       tunnel_ips=[ipaddress.ip_address("127.0.0.1")])
    r = dns.message.from_wire(tunnel.handle(q, "10.0.0.1", tcp=False))
    assert r.rcode() == dns.rcode.NXDOMAIN


# -- a flood does not slow the API ------------------------------------------------------------

# Sends to 127.0.0.1:argv[1] for argv[2] seconds, as fast as a blocking socket allows and
# never reading, the query argv[3] (hex) and 13 zero bytes (garbage), alternately. Prints
# "flooding" when it starts and the number of packets sent at the end.
FLOOD = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
query, junk = bytes.fromhex(sys.argv[3]), b"\x00" * 13
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, end = 0, time.monotonic() + seconds
print("flooding", flush=True)
while time.monotonic() < end:
    for packet in (query, junk) * 50:
        try:
            sock.sendto(packet, ("127.0.0.1", port))
            sent += 1
        except OSError:
            pass
print(sent)
"""


def healthz_latencies(port: int, count: int) -> list[float]:
    import http.client

    found = []
    for _ in range(count):
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        found.append(time.monotonic() - started)
    return sorted(found)


def test_a_dns_flood_does_not_slow_the_api():
    import subprocess
    import sys
    from pathlib import Path

    import wgpunch
    from wgpunch.lab.netns import read_line

    src = str(Path(wgpunch.__file__).resolve().parents[1])

    api, dns_port = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wgpunch.cli", "registry", "-i", "nosuchwg0", "--listen",
         f"127.0.0.1:{api}", "--dns", f"127.0.0.1:{dns_port}", "--zone", "mesh.internal"],
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    floods = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                healthz_latencies(api, 1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (
                    proc.stderr.read() if proc.poll() is not None else "no API in 10 s")
                time.sleep(0.05)  # poll interval, bounded by the deadline above
        quiet = healthz_latencies(api, 50)
        wire = query(f"{'a' * 52}====._wireguard._udp.mesh.internal.", "SRV").to_wire()
        floods = [subprocess.Popen([sys.executable, "-c", FLOOD, str(dns_port), "3",
                                    wire.hex()], stdout=subprocess.PIPE, text=True)
                  for _ in range(2)]
        for flood in floods:
            assert read_line(flood, timeout=10, what="the flood") == "flooding"
        busy = healthz_latencies(api, 50)
        sent = sum(int(f.communicate(timeout=10)[0]) for f in floods)
        proc.send_signal(2)
        _, stderr = proc.communicate(timeout=10)
    finally:
        for p in [proc, *floods]:
            if p.poll() is None:
                p.kill()
                p.wait()
    handled = int(stderr.split("DNS-SD stopped: queries ")[1].split(",")[0])
    p90 = lambda xs: xs[int(len(xs) * 0.9)]  # noqa: E731
    print(f"flood: {sent} packets sent, {handled} handled; /healthz p90 quiet "
          f"{p90(quiet) * 1e3:.1f} ms, under flood {p90(busy) * 1e3:.1f} ms")
    assert handled > 1000 and "dropped a malformed packet" in stderr
    assert stderr.count("dropped a malformed packet") == 1  # once per source per minute
    assert p90(busy) < max(0.05, 5 * p90(quiet))


# -- the lab: dig through the tunnel ----------------------------------------------------------

LAB_DNS_PORT = 5353
LAB_ZONE = "mesh.internal."


@pytest.mark.lab
def test_lab_dig_from_a_finds_b_through_the_tunnel(lab_prefix):
    """`easy` lab, real agents, `--dns PORT --dns-self` (no endpoint): from a's namespace,
    dig at the registry's tunnel address finds b's public endpoint as the registry sees it,
    lists both nodes and the registry, and serves the registry's public address as `self`."""
    from wgpunch.lab import catalog
    from wgpunch.lab.agents import Agents
    from wgpunch.lab.lab import Lab
    from wgpunch.lab.netns import wait_for
    from wgpunch.wg.uapi import UapiDevice

    args = ["--dns", str(LAB_DNS_PORT), "--zone", LAB_ZONE, "--dns-self"]
    with Lab(catalog.resolve("easy"), prefix=lab_prefix) as lab, \
            Agents(lab, registry_args=args) as agents:
        agents.start_registry()
        agents.start_nodes()
        registry = lab.host("registry")

        def observed():
            state = asyncio.run(UapiDevice(registry.ifname).state())
            found = {h: state.peer(lab.host(h).public_key).endpoint for h in ("a", "b")}
            return found if all(found.values()) else None

        seen = wait_for(observed, timeout=15, what="the registry to see a's and b's endpoints")
        assert seen["b"].ip == lab.host("b").public_ip  # b's NAT, not b itself

        def dig(*query: str) -> list[list[str]]:
            agents.check_alive()
            done = lab.exec("a", ["dig", f"@{registry.tunnel_ip}", "-p", str(LAB_DNS_PORT),
                                  "+time=1", "+tries=1", "+noall", "+answer", "+additional",
                                  *query], check=False)
            return [line.split() for line in done.stdout.splitlines()
                    if line.strip() and not line.startswith(";")]

        def name(host: str) -> str:
            return f"{lab.host(host).public_key.base32()}._wireguard._udp.{LAB_ZONE}"

        srv = wait_for(lambda: dig(name("b").upper(), "SRV"), timeout=10,
                       what="an SRV answer from the registry")
        assert srv[0] == [name("b"), "0", "IN", "SRV", "0", "0", str(seen["b"].port), name("b")]
        assert srv[1] == [name("b"), "0", "IN", "A", str(seen["b"].ip)]
        assert srv[2][:4] == [name("b"), "0", "IN", "TXT"]
        assert f'"allowed={lab.host("b").tunnel_ip}/32"' in srv[2]

        listing = [*sorted(("a", "b"), key=lambda h: lab.host(h).public_key.raw), "registry"]
        for transport in ("+notcp", "+tcp"):
            ptr = dig(transport, f"_wireguard._udp.{LAB_ZONE}", "PTR")
            assert [r[4] for r in ptr] == [name(h) for h in listing], ptr

        me = dig(name("registry"), "SRV")
        assert me[0][6] == "51820" and me[1][3:] == ["A", str(registry.public_ip)]
        print(f"dig from a: b = {srv[1][4]}:{srv[0][6]}, self = {me[1][4]}:{me[0][6]}, "
              f"listing of {len(ptr)}")
