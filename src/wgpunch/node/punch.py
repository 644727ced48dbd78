"""NAT openers: a UDP packet from the WireGuard port, sent around WireGuard.

To let the peer's initiation in, our NAT needs a mapping from our WireGuard port toward the
peer's public endpoint. WireGuard creates one only by sending an initiation of its own, and two
initiations that both arrive cancel each other out (node/decide.py). So the side that is not
the initiator opens its NAT with an empty UDP datagram instead: same 5-tuple as WireGuard's
own packets, so the NAT maps it exactly as it will map them, and nothing that WireGuard
would answer. WireGuard owns the port, so the datagram is built by hand and sent on a raw
socket (IP_HDRINCL), as in the wireguard-tools NAT hole-punching example. It needs
CAP_NET_RAW; without it `send_opener` says False and the agent falls back to a handshake.

IPv4 only, for now: an IPv6 opener needs a raw IPv6 UDP socket with IPV6_CHECKSUM, which
works (natpunch/rawudp.py says how) but is not built; IPv6 peers get the fallback.
"""

from __future__ import annotations

import logging
import socket

# The datagram helpers live with the natpunch raw-UDP channel, which sends the same way.
from ..natpunch.rawudp import source_address, udp_datagram
from ..wg.device import Endpoint

log = logging.getLogger(__name__)

DEFAULT_TTL = 64


def can_send_raw() -> bool:
    """Whether this process may open raw IPv4 sockets (CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError:
        return False
    return True


def send_opener(listen_port: int, dst: Endpoint, ttl: int = DEFAULT_TTL) -> bool:
    """Send one empty datagram from our WireGuard port to `dst`. False when impossible."""
    if dst.ip.version != 4:
        return False
    try:
        src = source_address(dst)
        packet = udp_datagram(src, listen_port, str(dst.ip), dst.port, b"", ttl)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(packet, (str(dst.ip), 0))
    except PermissionError:
        log.debug("no CAP_NET_RAW: cannot open NAT toward %s with a raw datagram", dst)
        return False
    except OSError as error:
        log.debug("NAT opener toward %s failed: %s", dst, error)
        return False
    return True
