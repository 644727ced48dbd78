"""Path probes: one datagram into the tunnel, to make WireGuard send toward a peer now.

A probe goes to the peer's tunnel address through our WireGuard interface. WireGuard sends it
at once to the peer's current endpoint, with the current session's keys, and whatever comes
back (the peer kernel's ICMP port-unreachable for the discard port, or any other packet)
raises the peer's rx counter. The agent uses that to tell a live path from a dead one without
touching the session, and to send at once after moving a live session to a new endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import socket

from ..wg.model import IPAddress, IPNetwork

log = logging.getLogger(__name__)

DISCARD_PORT = 9  # RFC 863: nobody listens, so the peer's kernel answers, not an application


def tunnel_address(allowed_ips: tuple[IPNetwork, ...]) -> IPAddress | None:
    """An address that routes to this peer: its host route, else the first host of its net."""
    for net in sorted(allowed_ips, key=lambda n: (n.prefixlen != n.max_prefixlen, n.version)):
        if net.prefixlen == net.max_prefixlen:
            return net.network_address
        if net.num_addresses > 2 and net.prefixlen > 0:
            return net.network_address + 1
    return None


def send_probe(ifname: str, address: IPAddress) -> bool:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        # Pin the probe to the WireGuard interface, whatever other routes say; needs
        # CAP_NET_RAW, which the agent has as root. Without it, routing still usually works.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        try:
            sock.sendto(b"wgpunch path probe", (str(address), DISCARD_PORT))
        except OSError as error:
            log.debug("probe to %s via %s failed: %s", address, ifname, error)
            return False
    return True
