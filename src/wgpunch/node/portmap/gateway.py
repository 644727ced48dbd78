"""The default IPv4 gateway, from the kernel's routing table (/proc/net/route): the router a
port mapping is asked of (RFC 6886 §3, RFC 6887 §8.1: the client's default router).

/proc/net/route has one line per route: interface, destination, gateway, flags, ..., metric,
mask, with addresses as 8 hex digits in host byte order. The default route is destination
and mask 0 with the RTF_GATEWAY flag; of several, the lowest metric wins, as in routing.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

ROUTES = Path("/proc/net/route")
RTF_UP = 0x1
RTF_GATEWAY = 0x2


def _address(hex_text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(socket.ntohl(struct.unpack("!I", bytes.fromhex(hex_text))[0]))


def parse_routes(text: str) -> ipaddress.IPv4Address | None:
    """The default gateway in /proc/net/route text; None without a default route. Lines that
    do not parse are skipped (the kernel writes none; a future column must not stop us)."""
    best: tuple[int, ipaddress.IPv4Address] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, flags = fields[1], fields[2], int(fields[3], 16)
            metric, mask = int(fields[6]), fields[7]
            if int(destination, 16) or int(mask, 16):
                continue
            if flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY:
                continue
            address = _address(gateway)
        except ValueError:
            continue
        if best is None or metric < best[0]:
            best = (metric, address)
    return None if best is None else best[1]


def default_gateway(routes: Path = ROUTES) -> ipaddress.IPv4Address | None:
    try:
        return parse_routes(routes.read_text())
    except OSError:
        return None
