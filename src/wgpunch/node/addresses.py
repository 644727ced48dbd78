"""This host's own addresses, with their on-link networks: the node reports the addresses
to the registry, so that peers behind the same NAT try the LAN path (DESIGN.md §3,
candidate 1), and checks a peer's reported address against the networks
(node/candidates.py)."""

from __future__ import annotations

import ipaddress
import socket

from ..wg.device import IPInterface

MAX_ADDRESSES = 32  # the registry's limit on a report (docs/api.md)


def local_addresses(exclude_ifname: str) -> list[IPInterface]:
    """Global-scope addresses of every interface but the WireGuard one (whose tunnel address
    is no way to reach us) and loopback, each with its prefix. Blocking: call it in a
    thread."""
    from pyroute2 import IPRoute  # here: a third of a second to import, only nodes need it

    try:
        exclude = socket.if_nametoindex(exclude_ifname)
    except OSError:
        exclude = -1
    found: list[IPInterface] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            if msg["index"] == exclude or msg["scope"] != 0:  # 0: RT_SCOPE_UNIVERSE
                continue
            interface = ipaddress.ip_interface(
                f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not interface.ip.is_loopback and interface.ip not in {i.ip for i in found}:
                found.append(interface)
    return found[:MAX_ADDRESSES]
