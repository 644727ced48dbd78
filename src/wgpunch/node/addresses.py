"""This host's own addresses, which the node reports to the registry so that peers
behind the same NAT can later try the LAN path (DESIGN.md §3, candidate 1)."""

from __future__ import annotations

import ipaddress
import socket

from ..wg.device import IPAddress

MAX_ADDRESSES = 32  # the registry's limit on a report (docs/api.md)


def local_addresses(exclude_ifname: str) -> list[IPAddress]:
    """Global-scope addresses of every interface but the WireGuard one (whose tunnel address
    is no way to reach us) and loopback. Blocking: call it in a thread."""
    from pyroute2 import IPRoute  # here: a third of a second to import, only nodes need it

    try:
        exclude = socket.if_nametoindex(exclude_ifname)
    except OSError:
        exclude = -1
    found: list[IPAddress] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            if msg["index"] == exclude or msg["scope"] != 0:  # 0: RT_SCOPE_UNIVERSE
                continue
            address = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if not address.is_loopback and address not in found:
                found.append(address)
    return found[:MAX_ADDRESSES]
