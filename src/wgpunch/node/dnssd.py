"""Following a wgsd-style DNS-SD registry (a wgsd/CoreDNS server, or `wgpunch registry --dns`).

Per peer of the local device, one SRV query for `<BASE32 KEY>._wireguard._udp.<zone>` (as
wgsd-client sends it), read as wgsd answers it: the SRV's port, the A/AAAA record first in
the additional section, and the TXT record after it, whose `pub=` must name the key we asked
for (a cross-check wgsd-client skips). TC falls back to TCP. The results feed the same agent
as the HTTP API, as a snapshot per poll; a DNS registry cannot coordinate punches, so each
side then tries alone (node/decide.py still never touches a live session).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from ..errors import ApiError, NoRecord, WgpunchError
from ..keys import Key
from ..protocol import Event, PeerRecord, RelayEvent, Reported, Snapshot
from ..wg.device import Device
from ..wg.model import Endpoint
from .source import polled

log = logging.getLogger(__name__)

SERVICE = "_wireguard._udp"
EPOCH = "dns-sd"  # a DNS registry has no epoch: every poll is a full snapshot


# What an error answer means for a wgsd-compatible server, and what to do about it.
RCODE_MEANING = {
    dns.rcode.REFUSED: ": the server does not serve this zone (is --zone the one it answers?)",
    dns.rcode.SERVFAIL: (": the server could not answer (wgsd: CoreDNS cannot read its "
                         "WireGuard device without CAP_NET_ADMIN)"),
}


def query_name(key: Key, zone: dns.name.Name) -> dns.name.Name:
    # Uppercase, as wgsd-client asks; answers match case-insensitively.
    return dns.name.from_text(f"{key.base32().upper()}.{SERVICE}", origin=zone)


def parse_answer(key: Key, response: dns.message.Message) -> PeerRecord:
    """One peer's record from an SRV response, as wgsd lays it out."""
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        raise NoRecord
    if rcode != dns.rcode.NOERROR:
        raise ApiError(f"dns-sd: {key}: {dns.rcode.to_text(rcode)}"
                       + RCODE_MEANING.get(rcode, ""))
    if not response.answer:
        raise NoRecord
    srv = response.answer[0]
    if srv.rdtype != dns.rdatatype.SRV or not srv:
        raise ApiError(f"dns-sd: {key}: the first answer is not an SRV record")
    if not response.additional or response.additional[0].rdtype not in (
        dns.rdatatype.A, dns.rdatatype.AAAA
    ):
        raise ApiError(f"dns-sd: {key}: no A/AAAA record first in the additional section")
    address = ipaddress.ip_address(response.additional[0][0].address)
    allowed: tuple = ()
    for rrset in response.additional[1:]:
        if rrset.rdtype == dns.rdatatype.TXT and rrset:
            fields = dict(s.decode(errors="replace").partition("=")[::2]
                          for s in rrset[0].strings)
            if fields.get("pub") not in (None, key.base64()):
                raise ApiError(f"dns-sd: {key}: TXT names another key {fields['pub'][:44]!r}")
            allowed = tuple(ipaddress.ip_network(n) for n in fields.get("allowed", "").split(",")
                            if n)
    return PeerRecord(key, allowed, Endpoint(address, srv[0].port), None, None, 0)


class DnsSdSource:
    """The agent's view of a DNS-SD registry; the same shape as `RegistryClient`."""

    coordinates_punches = False

    def __init__(self, server: Endpoint, zone: str, device: Device, *,
                 interval_s: float = 5.0, timeout_s: float = 2.0) -> None:
        self.server = server
        self.zone = dns.name.from_text(zone)
        self.device = device
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failed: set[Key] = set()  # peers whose last lookup failed (for --once)

    @property
    def following(self) -> str:
        return f"dns-sd {self.server} zone {self.zone}: polling every {self.interval_s:g} s"

    async def lookup(self, key: Key) -> PeerRecord | None:
        query = dns.message.make_query(query_name(key, self.zone), dns.rdatatype.SRV)
        where, port = str(self.server.ip), self.server.port
        try:
            response = await dns.asyncquery.udp(query, where, self.timeout_s, port)
            if response.flags & dns.flags.TC:
                response = await dns.asyncquery.tcp(query, where, self.timeout_s, port)
            record = parse_answer(key, response)
        except NoRecord:
            self.failed.discard(key)
            return None
        except (dns.exception.DNSException, OSError, ValueError, WgpunchError) as error:
            # Once at WARNING per peer until it works again: every poll would repeat it.
            log.log(logging.DEBUG if key in self.failed else logging.WARNING,
                    "dns-sd lookup of %s failed: %s", key, error)
            self.failed.add(key)
            return None
        self.failed.discard(key)
        return record

    async def snapshot(self) -> Snapshot:
        state = await self.device.state()
        keys = [peer.public_key for peer in state.peers]
        found = await asyncio.gather(*(self.lookup(key) for key in keys))
        if keys and len(self.failed) == len(keys):
            raise ApiError(f"dns-sd: no answer from {self.server} for any peer")
        return Snapshot(EPOCH, 0, tuple(record for record in found if record is not None))

    def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]:
        return polled(self.interval_s, self.snapshot)

    async def relay(self, peer: Key) -> RelayEvent:
        raise ApiError("dns-sd: a DNS registry hands out no relay slots")

    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        raise ApiError("dns-sd: a DNS registry hands out no relay slots")

    async def punch(self, peer: Key) -> None:
        raise ApiError("dns-sd: a DNS registry cannot coordinate punches")

    async def opened(self, peer: Key) -> None:
        raise ApiError("dns-sd: a DNS registry cannot coordinate punches")

    def lookup_failed(self, peer: Key) -> bool:
        return peer in self.failed

    async def report_self(self, report: Reported) -> None:
        """A DNS registry takes no reports."""

    async def close(self) -> None:
        """Nothing held between queries."""
