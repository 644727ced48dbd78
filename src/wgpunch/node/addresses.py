"""This host's own addresses, with their on-link networks: the node reports the addresses
to the registry, so that peers behind the same NAT try the LAN path (DESIGN.md §3,
candidate 1), and checks a peer's reported address against the networks
(node/candidates.py). Its global IPv6 addresses among them are also its IPv6 endpoints
(`ipv6_endpoints`), which peers with IPv6 try directly.

Left out: the WireGuard interface, loopback, tunnel interfaces (another WireGuard or tun
device, sit, GRE, ip6tnl: an address there reaches us only through that tunnel), and IPv6
addresses the kernel would not send from or that rotate (tentative, failed duplicate
detection, deprecated, temporary: RFC 4941 privacy addresses change every day or so, a
stable address of the same prefix stays).

Read with one rtnetlink dump (RTM_GETADDR) on a plain socket: pyroute2 did the same but took
a third of a second to import, on the path to the node's first report and punch request
(bench/startup.py)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..protocol.report import MAX_IPV6_ENDPOINTS, globally_routed6
from ..wg.model import Endpoint, IPInterface

MAX_ADDRESSES = 32  # the registry's limit on a report (docs/api.md)

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h, linux/if_arp.h
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_TEMPORARY, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x01, 0x08, 0x20, 0x40
UNUSABLE_V6 = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
RT_SCOPE_UNIVERSE = 0
# ARPHRD_TUNNEL, _TUNNEL6, _SIT, _IPGRE, _IP6GRE, _NONE (tun, WireGuard)
TUNNEL_TYPES = frozenset({768, 769, 776, 778, 823, 65534})
NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
IFINFOMSG = struct.Struct("=BxHiII")  # family, link type, interface index, flags, change mask
RTATTR = struct.Struct("=HH")  # length, type

T = TypeVar("T")


def local_addresses(exclude_ifname: str) -> list[IPInterface]:
    """Global-scope addresses of every interface but the WireGuard one (whose tunnel address
    is no way to reach us) and those the module doc leaves out, each with its prefix.
    Blocking: call it in a thread."""
    try:
        exclude = socket.if_nametoindex(exclude_ifname)
    except OSError:
        exclude = -1
    tunnels = {index for index, kind in _dump(RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0),
                                              RTM_NEWLINK, _link) if kind in TUNNEL_TYPES}
    found: list[IPInterface] = []
    for index, scope, flags, interface in _dump(RTM_GETADDR, IFADDRMSG.pack(0, 0, 0, 0, 0),
                                                RTM_NEWADDR, _address):
        if (index == exclude or index in tunnels or scope != RT_SCOPE_UNIVERSE
                or interface.ip.is_loopback or (interface.version == 6 and flags & UNUSABLE_V6)):
            continue
        if interface.ip not in {i.ip for i in found}:
            found.append(interface)
    return found[:MAX_ADDRESSES]


def ipv6_endpoints(interfaces: Sequence[IPInterface], listen_port: int
                   ) -> tuple[Endpoint, ...]:
    """Our listen port on each of our global IPv6 addresses (`local_addresses`), which a peer
    with IPv6 reaches without any NAT: not link-local, not unique local (fc00::/7, which
    reaches no other site), nor a 6to4 or Teredo address (protocol/report.py)."""
    found = [Endpoint(i.ip, listen_port) for i in interfaces
             if isinstance(i.ip, ipaddress.IPv6Address) and globally_routed6(i.ip)]
    return tuple(found[:MAX_IPV6_ENDPOINTS])


def _dump(request_type: int, body: bytes, answer_type: int,
          parse: Callable[[bytes], T | None]) -> list[T]:
    """Every `answer_type` message of one rtnetlink dump in this network namespace, parsed."""
    request = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), request_type,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
    found: list[T] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.sendto(request, (0, 0))
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + NLMSG_HDR.size <= len(data):
                length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
                if length < NLMSG_HDR.size or offset + length > len(data):
                    raise OSError("rtnetlink: truncated message")
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + NLMSG_HDR.size)
                    if code:
                        raise OSError(-code, "rtnetlink: address dump failed")
                elif kind == answer_type:
                    item = parse(data[offset + NLMSG_HDR.size:offset + length])
                    if item is not None:
                        found.append(item)
                offset += (length + 3) & ~3


def _link(body: bytes) -> tuple[int, int]:
    """(interface index, link type) of an RTM_NEWLINK message."""
    _family, kind, index, _flags, _change = IFINFOMSG.unpack_from(body)
    return index, kind


def _address(body: bytes) -> tuple[int, int, int, IPInterface] | None:
    """(interface index, scope, flags, address) of an RTM_NEWADDR message."""
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(body)
    attrs = _attributes(body, IFADDRMSG.size)
    # IFA_FLAGS, when present, holds all 32 bits of the flags (the header only the low 8).
    if len(attrs.get(IFA_FLAGS, b"")) == 4:
        (flags,) = struct.unpack("=I", attrs[IFA_FLAGS])
    # IFA_LOCAL is our own address; IFA_ADDRESS is the far end's on a point-to-point link.
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if family not in (socket.AF_INET, socket.AF_INET6) or raw is None:
        return None
    try:
        ip = ipaddress.ip_address(raw)
        return index, scope, flags, ipaddress.ip_interface(f"{ip}/{prefixlen}")
    except ValueError:
        return None


def _attributes(body: bytes, offset: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + RTATTR.size <= len(body):
        length, kind = RTATTR.unpack_from(body, offset)
        if length < RTATTR.size:
            break
        attrs[kind] = body[offset + RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    return attrs
