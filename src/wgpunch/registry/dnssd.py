"""wgsd-compatible DNS-SD answers: a pure function from a query to a response (DESIGN.md §5).

The behaviour is wgsd v0.3.1-v0.3.6 running in CoreDNS, as shared/reference/wgsd.md records
it (section numbers below are that file's). For zone Z and a key's label K (RFC 4648 base32
of the 32-byte key, `====` padding, 56 characters, matched case-insensitively):

    _wireguard._udp.Z    PTR   K._wireguard._udp.Z   one per instance with an endpoint
    K._wireguard._udp.Z  SRV   0 0 <port> K._wireguard._udp.Z
                               + additional: A or AAAA first, then TXT (wgsd-client reads
                                 Answer[0] and Extra[0])
    K._wireguard._udp.Z  A/AAAA/TXT  the endpoint's address (its family decides the type,
                               not the query) / "txtvers=1" "pub=<b64>" "allowed=<cidrs>"

Every answer is authoritative with TTL 0. Anything else in Z, and any instance without an
endpoint, is NXDOMAIN with Z's SOA (§1.6); a name outside Z is REFUSED (§1.7). Owner names
are the query name lowercased; PTR targets are lowercase (§1.2).

Deliberate differences from wgsd, each where wgsd is accidental:
- Only the exact name shapes above are served (§1.1 quirk: wgsd accepts any 73-character
  name whose first 56 characters match a key).
- A TXT `allowed=` string holds at most 255 octets (RFC 1035 <character-string>): CIDRs that
  do not fit are left out. wgsd fails to pack such an answer and sends nothing.
- The listing is in the registry's peer order (by key, as the API lists peers) and allowed
  IPs in the registry's (IPv4 first, by address); wgsd uses the device's order for both.

The request rules around the plugin (QR, opcode, question count, class, EDNS version) follow
CoreDNS v1.11.1 and miekg/dns v1.1.57, the framework wgsd runs in. Fitting the response into
a UDP or TCP message (truncation, TC) is dnswire.py's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

from ..errors import ConfigError, KeyFormatError, MalformedPacket
from ..keys import BASE32_LEN, Key
from ..wg.model import Endpoint, IPNetwork
from .dnswire import TCP_MAX

IN = dns.rdataclass.IN
SERVICE = (b"_wireguard", b"_udp")  # RFC 6763 service name, as wgsd serves it
TTL = 0  # §1.3: every record, so clients always see the current endpoint
TXT_VERSION = b"txtvers=1"  # §1.5, first string (RFC 6763 §6.7)
TXT_STRING_MAX = 255  # RFC 1035 §3.3: a <character-string> is at most 255 octets
# §1.6: the SOA of every negative answer, as wgsd writes it.
SOA_TTL, SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, SOA_MINIMUM = (
    60, 1, 86400, 7200, 3600000, 60)
# The smallest a PTR record of the listing can be on the wire: owner as a 2-byte pointer, 10
# bytes of type/class/TTL/length, the target's key label (1 + 56) and a pointer to the rest.
# No more than `limit // PTR_MIN_WIRE` records can fit, so no more are built.
PTR_MIN_WIRE = 2 + 10 + 1 + BASE32_LEN + 2


class Record(Protocol):
    """One service instance: a peer of the registry (state.PeerRecord fits) or `self`."""

    @property
    def public_key(self) -> Key: ...

    @property
    def endpoint(self) -> Endpoint | None: ...

    @property
    def allowed_ips(self) -> tuple[IPNetwork, ...]: ...


class PeerTable(Protocol):
    """The registry's peer table at one moment (state.RegistryState fits)."""

    @property
    def peers(self) -> Mapping[Key, Record]: ...

    def sorted_peers(self) -> Sequence[Record]: ...


SelfRecord = Callable[[], Record | None]  # the registry's own record, if served (wgsd `self`)


class Zone:
    """The configured zone, lowercased (§1.1 step 3: wgsd never matches a mixed-case zone),
    with the names and the SOA every answer reuses."""

    __slots__ = ("name", "service", "soa")

    def __init__(self, name: dns.name.Name) -> None:
        self.name = lowercase(name)
        self.service = dns.name.Name(SERVICE + self.name.labels)
        soa = SOA(IN, dns.rdatatype.SOA, dns.name.Name((b"ns1", *self.name.labels)),
                  dns.name.Name((b"postmaster", *self.name.labels)), SOA_SERIAL, SOA_REFRESH,
                  SOA_RETRY, SOA_EXPIRE, SOA_MINIMUM)
        self.soa = dns.rrset.from_rdata(self.name, SOA_TTL, soa)

    @classmethod
    def parse(cls, text: str) -> Zone:
        """`mesh.internal` or `mesh.internal.`; instance names under it must fit in 255
        octets (RFC 1035 §2.3.4), which leaves the zone 182."""
        try:
            name = dns.name.from_text(text.strip())
            if name == dns.name.root:
                raise ValueError("the root would claim every name; give the mesh's own zone")
            zone = cls(name)
            zone.instance(Key(bytes(32)))
        except (dns.exception.DNSException, ValueError) as exc:
            reason = str(exc).rstrip(".") or type(exc).__name__
            if isinstance(exc, dns.name.NameTooLong):
                reason = "too long for instance names (at most 182 octets)"
            raise ConfigError(f"registry: DNS zone {text!r}: {reason}") from None
        return zone

    def instance(self, key: Key) -> dns.name.Name:
        return dns.name.Name((key.base32().encode(), *self.service.labels))

    def __repr__(self) -> str:
        return f"Zone({self.name.to_text()!r})"


def lowercase(name: dns.name.Name) -> dns.name.Name:
    """ASCII-lowercased, as CoreDNS's `request.Name()` (bytes.lower touches only A-Z)."""
    return dns.name.Name([label.lower() for label in name.labels])


# -- the request ------------------------------------------------------------------------------


def parse_query(wire: bytes) -> dns.message.Message:
    """A DNS message as it came from the network. Raises `MalformedPacket` for anything
    dnspython cannot read (all its errors are `DNSException`s)."""
    try:
        return dns.message.from_wire(wire)
    except dns.exception.DNSException as exc:
        reason = (str(exc) or type(exc).__name__).splitlines()[0][:120]
        raise MalformedPacket(f"dns: {reason}") from None


class InstanceCache:
    """Each instance's record sets, built once per endpoint and allowed IPs.

    Building them (rdata objects, and the hashing by which a record set refuses duplicates)
    was a third of the CPU time of an SRV answer; a node asks for the same peers every poll.
    dnspython renders a record set without changing it, so responses can share them.
    """

    def __init__(self) -> None:
        self._built: dict[Key, tuple[Endpoint, tuple[IPNetwork, ...], _InstanceSets]] = {}

    def __len__(self) -> int:
        return len(self._built)

    def get(self, owner: dns.name.Name, record: Record, endpoint: Endpoint,
            table: PeerTable) -> _InstanceSets:
        key = record.public_key
        cached = self._built.get(key)
        if cached is not None and cached[0] == endpoint and cached[1] == record.allowed_ips \
                and cached[2].owner.labels == owner.labels:
            return cached[2]
        built = _InstanceSets(owner, record, endpoint)
        if len(self._built) > 2 * len(table.peers) + 64:  # removed peers' sets: let them go
            self._built = {k: v for k, v in self._built.items() if k in table.peers}
        self._built[key] = (endpoint, record.allowed_ips, built)
        return built


class _InstanceSets:
    __slots__ = ("host", "owner", "srv", "txt")

    def __init__(self, owner: dns.name.Name, record: Record, endpoint: Endpoint) -> None:
        self.owner = owner
        # §1.4: the SRV target is the instance name itself.
        self.srv = dns.rrset.from_rdata(
            owner, TTL, SRV(IN, dns.rdatatype.SRV, 0, 0, endpoint.port, owner))
        self.host = host_rrset(owner, endpoint)
        self.txt = txt_rrset(owner, record)


def answer(query: dns.message.Message, zone: Zone, table: PeerTable, me: SelfRecord, *,
           limit: int = TCP_MAX, cache: InstanceCache | None = None
           ) -> dns.message.Message | None:
    """The response to `query`, or None when it must not be answered (it is a response).

    `me` is asked only when the query concerns the registry's own record. `limit` is the
    size the response will be rendered into; it only bounds how many PTR records are built.
    A server passes one `cache` to every call.
    """
    if query.flags & dns.flags.QR:
        return None  # miekg MsgIgnore: never answer a response (no loops, no reflection)
    if query.opcode() != dns.opcode.QUERY:
        return _reply(query, dns.rcode.NOTIMP, edns=False)
    if len(query.question) != 1:
        return _reply(query, dns.rcode.FORMERR, edns=False)
    question = query.question[0]
    if question.rdclass != IN:
        return _reply(query, dns.rcode.REFUSED)
    if query.edns > 0:
        return _reply(query, dns.rcode.BADVERS)
    owner = lowercase(question.name)
    if not owner.is_subdomain(zone.name):
        return _reply(query, dns.rcode.REFUSED)
    labels = owner.relativize(zone.name).labels
    qtype = question.rdtype
    if labels == SERVICE and qtype == dns.rdatatype.PTR:
        return _listing(query, zone, owner, table, me, limit)
    if len(labels) == 3 and labels[1:] == SERVICE and qtype in _INSTANCE_TYPES:
        record = _find(labels[0], table, me)
        if record is not None and record.endpoint is not None:
            sets = (_InstanceSets(owner, record, record.endpoint) if cache is None
                    else cache.get(owner, record, record.endpoint, table))
            return _instance(query, sets, qtype)
    return _nxdomain(query, zone)


_INSTANCE_TYPES = frozenset({dns.rdatatype.SRV, dns.rdatatype.A, dns.rdatatype.AAAA,
                             dns.rdatatype.TXT})


def _find(label: bytes, table: PeerTable, me: SelfRecord) -> Record | None:
    """The instance whose key label is `label`, any case (§1.1 step 6); peers before self."""
    try:
        key = Key.from_base32(label.decode("ascii"))
    except (UnicodeDecodeError, KeyFormatError):
        return None
    found = table.peers.get(key)
    if found is not None:
        return found
    mine = me()
    return mine if mine is not None and mine.public_key == key else None


# -- answers ----------------------------------------------------------------------------------


def _listing(query: dns.message.Message, zone: Zone, owner: dns.name.Name, table: PeerTable,
             me: SelfRecord, limit: int) -> dns.message.Message:
    """§1.4 PTR: instances with an endpoint in the registry's order, self last; none at all
    is NOERROR with an empty answer (no SOA)."""
    room = limit // PTR_MIN_WIRE + 1  # one more than can fit, so truncation shows
    targets: list[PTR] = []
    for record in _with_endpoint(table.sorted_peers(), me):
        if len(targets) == room:
            break
        targets.append(PTR(IN, dns.rdatatype.PTR, zone.instance(record.public_key)))
    response = _reply(query, dns.rcode.NOERROR, aa=True)
    if targets:
        response.answer.append(dns.rrset.from_rdata_list(owner, TTL, targets))
    return response


def _with_endpoint(peers: Iterable[Record], me: SelfRecord) -> Iterable[Record]:
    for record in peers:
        if record.endpoint is not None:
            yield record
    mine = me()
    if mine is not None and mine.endpoint is not None:
        yield mine


def _instance(query: dns.message.Message, sets: _InstanceSets, qtype: int
              ) -> dns.message.Message:
    response = _reply(query, dns.rcode.NOERROR, aa=True)
    if qtype == dns.rdatatype.SRV:
        response.answer.append(sets.srv)
        response.additional.append(sets.host)  # §1.4: host record first, then TXT
        response.additional.append(sets.txt)
    elif qtype == dns.rdatatype.TXT:
        response.answer.append(sets.txt)
    else:  # A or AAAA: the endpoint's family decides (§1.4 quirk)
        response.answer.append(sets.host)
    return response


def host_rrset(owner: dns.name.Name, endpoint: Endpoint) -> dns.rrset.RRset:
    """A for IPv4, including IPv4-mapped IPv6 (Go's `To4() != nil`); AAAA otherwise."""
    ip = endpoint.ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        rdata: A | AAAA = A(IN, dns.rdatatype.A, str(ip))
    else:
        rdata = AAAA(IN, dns.rdatatype.AAAA, str(ip))
    return dns.rrset.from_rdata(owner, TTL, rdata)


def txt_rrset(owner: dns.name.Name, record: Record) -> dns.rrset.RRset:
    """§1.5: `txtvers=1`, `pub=<base64>`, `allowed=<cidr>,...` (may be empty after `=`)."""
    allowed = b"allowed="
    for i, net in enumerate(record.allowed_ips):
        more = (b"," if i else b"") + str(net).encode()
        if len(allowed) + len(more) > TXT_STRING_MAX:
            break  # the rest cannot be carried in one string (module docstring)
        allowed += more
    pub = b"pub=" + record.public_key.base64().encode()
    return dns.rrset.from_rdata(owner, TTL, TXT(IN, dns.rdatatype.TXT, [TXT_VERSION, pub,
                                                                        allowed]))


def servfail(query: dns.message.Message) -> dns.message.Message:
    """What CoreDNS sends when a plugin fails (§1.7): a bare SERVFAIL."""
    return _reply(query, dns.rcode.SERVFAIL)


def _nxdomain(query: dns.message.Message, zone: Zone) -> dns.message.Message:
    response = _reply(query, dns.rcode.NXDOMAIN, aa=True)
    response.authority.append(zone.soa)
    return response


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode, *, aa: bool = False,
           edns: bool = True) -> dns.message.Message:
    """miekg `SetReply`: same ID and opcode, RD and CD copied, the first question echoed in
    its original case, RA clear. With `edns`, CoreDNS's `SizeAndDo`: the query's OPT comes
    back as version 0 with the same size and DO bit, and no options."""
    response = dns.message.Message(id=query.id)
    response.flags = dns.flags.QR | (query.flags & (dns.flags.RD | dns.flags.CD))
    if aa:
        response.flags |= dns.flags.AA
    response.set_opcode(query.opcode())
    response.question = list(query.question[:1])
    if edns and query.edns >= 0:
        response.use_edns(0, query.ednsflags & dns.flags.DO, query.payload)
    response.set_rcode(rcode)
    return response


__all__ = [
    "PTR_MIN_WIRE", "InstanceCache", "PeerTable", "Record", "SelfRecord", "Zone", "answer",
    "host_rrset",
    "lowercase", "parse_query", "servfail", "txt_rrset",
]
