"""What the network around a node offers besides its NAT's mapping, for `wgpunch netcheck`:
hairpinning, and which port-mapping protocols the gateway speaks (DESIGN.md §3, candidate
"mapped"). Each question is one short exchange with a deadline; no answer is an answer
("none answered").

- hairpin (RFC 4787 §6): an ordinary UDP socket learns its public mapping from the registry's
  probe port, then sends to that mapping; the NAT hairpins when the datagram comes back.
- NAT-PMP (RFC 6886) and PCP (RFC 6887) share UDP port 5351 on the default gateway: an
  external-address request (version 0) and an ANNOUNCE (version 2); a PCP-only gateway
  answers the first with "unsupported version", which still says it is there.
- UPnP IGD: an SSDP M-SEARCH for an InternetGatewayDevice on the LAN (UPnP Device
  Architecture 1.1 §1.3.2).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from ..errors import MalformedPacket
from ..protocol.probewire import TXID_SIZE, Request, parse_reply
from ..wg.model import Endpoint
from .portmap.gateway import default_gateway
from .portmap.natpmp import address_request

NATPMP_PORT = 5351  # RFC 6886 §3.1, and PCP's (RFC 6887 §19.1)
SSDP = ("239.255.255.250", 1900)
WAIT_S = 0.5  # per question: a gateway on the LAN answers within milliseconds; our choice


@dataclass(frozen=True, slots=True)
class PortMapping:
    gateway: str | None  # the default gateway asked (None: no IPv4 default route)
    nat_pmp: bool
    pcp: bool
    upnp_igd: bool

    @property
    def any(self) -> bool:
        return self.nat_pmp or self.pcp or self.upnp_igd


def _answers(sock: socket.socket, wait_s: float, source_ip: str | None = None, *,
             first: bool = False) -> list[bytes]:
    """Datagrams arriving on `sock` within `wait_s` (from `source_ip` only, when given; with
    `first`, only the first)."""
    got: list[bytes] = []
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        try:
            data, (ip, _port, *_rest) = sock.recvfrom(2048)
        except OSError:  # an ICMP error for what we sent: nobody there
            break
        if source_ip is None or ip == source_ip:
            got.append(data)
            if first:
                break
    return got


def pcp_announce(client: ipaddress.IPv4Address) -> bytes:
    """RFC 6887 §7.1 request header, opcode ANNOUNCE (0), lifetime 0, our address as an
    IPv4-mapped IPv6 address."""
    return struct.pack("!BBHI", 2, 0, 0, 0) + ipaddress.IPv6Address(
        b"\0" * 10 + b"\xff\xff" + client.packed).packed


def port_mapping(wait_s: float = WAIT_S) -> PortMapping:
    """Which port-mapping protocols answer on this host's LAN. Blocking: call it in a thread."""
    gateway = default_gateway()
    nat_pmp = pcp = False
    if gateway is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((str(gateway), NATPMP_PORT))
                client = ipaddress.IPv4Address(sock.getsockname()[0])
                sock.send(address_request())  # NAT-PMP (version 0)
                sock.send(pcp_announce(client))
                for data in _answers(sock, wait_s):
                    # A response has the R bit (128) in its opcode byte.
                    if len(data) >= 2 and data[1] & 0x80:
                        nat_pmp |= data[0] == 0
                        pcp |= data[0] == 2
            except OSError:
                pass  # no route, refused: nothing there
    return PortMapping(None if gateway is None else str(gateway), nat_pmp, pcp, _upnp(wait_s))


def _upnp(wait_s: float) -> bool:
    search = ("M-SEARCH * HTTP/1.1\r\n"
              f"HOST: {SSDP[0]}:{SSDP[1]}\r\n"
              'MAN: "ssdp:discover"\r\n'
              "MX: 1\r\n"
              "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n").encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)  # the LAN only
        try:
            sock.sendto(search, SSDP)
        except OSError:
            return False
        return any(data.startswith(b"HTTP/1.1 200") for data in _answers(sock, wait_s))


def _mapping(sock: socket.socket, server: Endpoint, wait_s: float) -> Endpoint | None:
    """The source the probe port `server` sees for `sock` (None: no answer)."""
    request = Request(os.urandom(TXID_SIZE))
    sock.sendto(request.encode(), (str(server.ip), server.port))
    for data in _answers(sock, wait_s, str(server.ip), first=True):
        try:
            reply = parse_reply(data)
        except MalformedPacket:
            continue
        if reply.txid == request.txid:
            return reply.observed
    return None


def _socket_for(server: Endpoint) -> socket.socket:
    return socket.socket(socket.AF_INET if server.ip.version == 4 else socket.AF_INET6,
                         socket.SOCK_DGRAM)


def reaches(server: Endpoint, wait_s: float = WAIT_S) -> bool:
    """Whether the probe port `server` answers an ordinary UDP socket: for IPv6, where the
    WireGuard port's raw probe (node/natprobe.py) is not built. Blocking: call it in a
    thread."""
    with _socket_for(server) as sock:
        try:
            return _mapping(sock, server, wait_s) is not None
        except OSError:
            return False


def hairpin(server: Endpoint, wait_s: float = WAIT_S) -> bool | None:
    """Whether our NAT hairpins: None when the probe port did not tell us our mapping.
    Blocking: call it in a thread."""
    with _socket_for(server) as sock:
        try:
            mapping = _mapping(sock, server, wait_s)
            if mapping is None:
                return None
            marker = os.urandom(16)
            sock.sendto(marker, (str(mapping.ip), mapping.port))
            return marker in _answers(sock, wait_s, first=True)
        except OSError:
            return None
