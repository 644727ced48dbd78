"""This host's own addresses, with their on-link networks: the node reports the addresses
to the registry, so that peers behind the same NAT try the LAN path (DESIGN.md §3,
candidate 1), and checks a peer's reported address against the networks
(node/candidates.py).

Read with one rtnetlink dump (RTM_GETADDR) on a plain socket: pyroute2 did the same but took
a third of a second to import, on the path to the node's first report and punch request
(bench/startup.py)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from ..wg.device import IPInterface

MAX_ADDRESSES = 32  # the registry's limit on a report (docs/api.md)

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWADDR, RTM_GETADDR = 20, 22
IFA_ADDRESS, IFA_LOCAL = 1, 2
RT_SCOPE_UNIVERSE = 0
NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
RTATTR = struct.Struct("=HH")  # length, type


def local_addresses(exclude_ifname: str) -> list[IPInterface]:
    """Global-scope addresses of every interface but the WireGuard one (whose tunnel address
    is no way to reach us) and loopback, each with its prefix. Blocking: call it in a
    thread."""
    try:
        exclude = socket.if_nametoindex(exclude_ifname)
    except OSError:
        exclude = -1
    found: list[IPInterface] = []
    for index, scope, interface in _dump():
        if index == exclude or scope != RT_SCOPE_UNIVERSE or interface.ip.is_loopback:
            continue
        if interface.ip not in {i.ip for i in found}:
            found.append(interface)
    return found[:MAX_ADDRESSES]


def _dump() -> list[tuple[int, int, IPInterface]]:
    """(interface index, scope, address) of every address in this network namespace."""
    request = NLMSG_HDR.pack(NLMSG_HDR.size + IFADDRMSG.size, RTM_GETADDR,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + IFADDRMSG.pack(0, 0, 0, 0, 0)
    found: list[tuple[int, int, IPInterface]] = []
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
                elif kind == RTM_NEWADDR:
                    address = _address(data[offset + NLMSG_HDR.size:offset + length])
                    if address is not None:
                        found.append(address)
                offset += (length + 3) & ~3


def _address(body: bytes) -> tuple[int, int, IPInterface] | None:
    family, prefixlen, _flags, scope, index = IFADDRMSG.unpack_from(body)
    attrs: dict[int, bytes] = {}
    offset = IFADDRMSG.size
    while offset + RTATTR.size <= len(body):
        length, kind = RTATTR.unpack_from(body, offset)
        if length < RTATTR.size:
            break
        attrs[kind] = body[offset + RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    # IFA_LOCAL is our own address; IFA_ADDRESS is the far end's on a point-to-point link.
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if family not in (socket.AF_INET, socket.AF_INET6) or raw is None:
        return None
    try:
        ip = ipaddress.ip_address(raw)
        return index, scope, ipaddress.ip_interface(f"{ip}/{prefixlen}")
    except ValueError:
        return None
