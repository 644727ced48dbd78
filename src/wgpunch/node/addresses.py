"""This host's own addresses, with their on-link networks: the node reports the addresses
to the registry, so that peers behind the same NAT try the LAN path (DESIGN.md §3,
candidate 1), and checks a peer's reported address against the networks
(node/candidates.py).

Read with one rtnetlink dump (RTM_GETADDR, rtnetlink(7)) on a socket of our own, not through
pyroute2, whose import cost the agent ~9 MB of resident memory (bench/agent_footprint.py) for
this one question. Layout, all in host byte order, each part padded to 4 bytes:

    nlmsghdr   u32 length, u16 type, u16 flags, u32 sequence, u32 port id
    ifaddrmsg  u8 family, u8 prefix length, u8 flags, u8 scope, u32 interface index
    rtattr     u16 length, u16 type, value ... (IFA_ADDRESS: the address, 4 or 16 bytes)
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ..wg.device import IPInterface

MAX_ADDRESSES = 32  # the registry's limit on a report (docs/api.md)

RTM_GETADDR = 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFA_ADDRESS = 1
RT_SCOPE_UNIVERSE = 0
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg
_RTATTR = struct.Struct("=HH")


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
        if index == exclude or scope != RT_SCOPE_UNIVERSE:
            continue
        if not interface.ip.is_loopback and interface.ip not in {i.ip for i in found}:
            found.append(interface)
    return found[:MAX_ADDRESSES]


def _dump() -> list[tuple[int, int, IPInterface]]:
    """Every address of this network namespace: (interface index, scope, address/prefix)."""
    request = _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(_HEADER.pack(_HEADER.size + len(request), RTM_GETADDR,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        found: list[tuple[int, int, IPInterface]] = []
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, _seq, _port = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size or offset + length > len(data):
                    raise OSError(f"rtnetlink: truncated message of {length} bytes")
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
                    raise OSError(errno, f"rtnetlink: address dump refused ({errno})")
                body = data[offset + _HEADER.size:offset + length]
                address = _address(body)
                if address is not None:
                    found.append(address)
                offset += (length + 3) & ~3


def _address(body: bytes) -> tuple[int, int, IPInterface] | None:
    """One RTM_NEWADDR message's interface, scope and address (None: no IFA_ADDRESS)."""
    family, prefixlen, _flags, scope, index = _IFADDR.unpack_from(body)
    offset = _IFADDR.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        if kind == IFA_ADDRESS:
            raw = body[offset + _RTATTR.size:offset + length]
            if (family, len(raw)) in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
                ip = ipaddress.ip_address(raw)
                return index, scope, ipaddress.ip_interface(f"{ip}/{prefixlen}")
        offset += (length + 3) & ~3
    return None
