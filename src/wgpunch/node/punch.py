"""NAT openers: a UDP packet from the WireGuard port, sent around WireGuard.

To let the peer's initiation in, our NAT needs a mapping from our WireGuard port toward the
peer's public endpoint. WireGuard creates one only by sending an initiation of its own, and two
initiations that both arrive cancel each other out (node/decide.py). So the side that is not
the initiator opens its NAT with an empty UDP datagram instead: same 5-tuple as WireGuard's
own packets, so the NAT maps it exactly as it will map them, and nothing that WireGuard
would answer. WireGuard owns the port, so the datagram is built by hand and sent on a raw
socket (IP_HDRINCL), as in the wireguard-tools NAT hole-punching example. It needs
CAP_NET_RAW; without it `send_opener` says False and the agent falls back to a handshake.

How far an opener should go: through our own NAT(s), and no further. On a router that keeps
state for unsolicited packets (DESIGN.md §3, the lab's `collision` kind) an opener that reaches
the peer's NAT leaves an unreplied entry there, and the peer's own packets toward us then get a
new outside port. `opener_hops` measures the distance once, traceroute-style: UDP datagrams
with TTL 1, 2, ... toward a public address (the registry's), until a router that answers "time
exceeded" from an address outside the ranges NATs use on their inside (RFC 1918, RFC 6598
shared space, link-local) is found: that router is past our last NAT, and a TTL that dies
there has passed every NAT of ours. The probes stop there, so none reaches the target.

Over IPv6 there is no NAT, but a home router's stateful firewall lets the peer's initiation in
only after a packet of ours toward it, so the non-initiator sends the same opener there: a
raw IPv6 UDP socket takes a hand-written UDP header (our WireGuard port as its source), and
the kernel builds the IPv6 header and fills in the UDP checksum (IPV6_CHECKSUM, RFC 3542;
natpunch/rawudp.py). Its hop limit is DEFAULT_TTL, not the measured distance: no NAT can
give the peer's packets a new port over IPv6, so an opener that reaches the peer's firewall
does no harm (it drops it), and the measured IPv4 distance says nothing about the IPv6 path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

# The datagram helpers live with the natpunch raw-UDP channel, which sends the same way.
from ..natpunch.rawudp import source_address, udp_datagram
from ..wg.model import Endpoint

log = logging.getLogger(__name__)

DEFAULT_TTL = 64  # without a measured distance: reaches everything (and the peer's NAT)
MAX_HOPS = 8  # NATs sit near the edge: a public router farther away than this is no help
HOP_WAIT_S = 0.25  # per hop: a router's time-exceeded comes back within a round trip to it
# An opener waits at most this long for the first measurement of its TTL, then goes with the
# default. Where routers answer (the lab) the measurement is done long before the first punch;
# where some hop is silent it can take seconds (HOP_WAIT_S per silent hop), and an opener held
# longer than the agent's first punch retry (0.5 s) costs more than it can save.
MEASURE_WAIT_S = 0.3
# An opener sent while the measurement is still under way (a busy machine: 14 agents starting
# on 2 cores) gets this TTL, not DEFAULT_TTL: one that dies too early costs a retry, one that
# goes too far may leave on a `collision` router the state that keeps the pair apart for as
# long as the peer retries. 2 passes one NAT (the common home router) and dies at the next
# router; behind a second NAT the first opener opens too little and a retry, with the
# measured TTL, opens the rest.
UNMEASURED_TTL = 2

# Where routers on the inside of NATs get their addresses: a router answering from one of these
# may be a NAT itself (home router LAN, carrier NAT inside), so the search goes on past it.
INSIDE_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"))

UDP_HEADER = 8  # RFC 768
UDP_CHECKSUM_OFFSET = 6  # of the checksum field in the UDP header

# linux/in.h and linux/errqueue.h; Python's socket module names neither.
IP_RECVERR = 11
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11


def can_send_raw() -> bool:
    """Whether this process may open raw IPv4 sockets (CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError:
        return False
    return True


def send_opener(listen_port: int, dst: Endpoint, ttl: int = DEFAULT_TTL,
                payload: bytes = b"") -> bool:
    """Send one datagram (empty: an opener) from our WireGuard port to `dst`, IPv4 or IPv6
    (`ttl` is the hop limit). False when impossible."""
    try:
        if dst.ip.version == 6:
            _send_udp6(listen_port, dst, ttl, payload)
            return True
        src = source_address(dst)
        packet = udp_datagram(src, listen_port, str(dst.ip), dst.port, payload, ttl)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(packet, (str(dst.ip), 0))
    except PermissionError:
        log.debug("no CAP_NET_RAW: cannot open NAT toward %s with a raw datagram", dst)
        return False
    except OSError as error:
        log.debug("NAT opener toward %s failed: %s", dst, error)
        return False
    return True


def _send_udp6(listen_port: int, dst: Endpoint, hops: int, payload: bytes) -> None:
    """Over IPv6: our UDP header and the payload; the kernel adds the IPv6 header and the
    UDP checksum."""
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, UDP_CHECKSUM_OFFSET)
        raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
        header = struct.pack("!HHHH", listen_port, dst.port, UDP_HEADER + len(payload), 0)
        raw.sendto(header + payload, (str(dst.ip), 0))


def inside_address(address: ipaddress.IPv4Address) -> bool:
    return any(address in net for net in INSIDE_NETS)


def opener_hops(target: ipaddress.IPv4Address, *, max_hops: int = MAX_HOPS,
                wait_s: float = HOP_WAIT_S) -> int | None:
    """The TTL that takes a datagram from here through our own NATs and lets it die at the
    first router past them, measured toward `target` (a public address; the datagrams never
    reach it). None: no such router answered within `max_hops` (a silent router, the target
    reached first, or no route); the caller keeps its default. Blocking: call it in a thread.

    Uses an ordinary UDP socket with IP_RECVERR: the kernel queues each ICMP error for the
    datagram that caused it, with the address of the router that sent it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
        try:
            sock.connect((str(target), 33434))  # traceroute's port; nobody should answer
        except OSError as error:
            log.debug("opener hops toward %s: %s", target, error)
            return None
        for ttl in range(1, max_hops + 1):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            with contextlib.suppress(OSError):  # an error queued earlier; read below
                sock.send(b"")
            answer = _icmp_error(sock, wait_s)
            if answer is None:
                continue  # a router that says nothing: perhaps the next one does
            icmp_type, offender = answer
            if icmp_type != ICMP_TIME_EXCEEDED or offender == target:
                return None  # at the target (or refused on the way) before any public router
            if not inside_address(offender):
                log.debug("opener hops toward %s: %d (router %s)", target, ttl, offender)
                return ttl
    return None


async def _hops_in_thread(toward: ipaddress.IPv4Address) -> int | None:
    return await asyncio.to_thread(opener_hops, toward)


def _icmp_error(sock: socket.socket, wait_s: float) -> tuple[int, ipaddress.IPv4Address] | None:
    """The next ICMP error queued on `sock` within `wait_s`: (ICMP type, sender)."""
    deadline = time.monotonic() + wait_s
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            return None
        try:
            _data, ancillary, _flags, _addr = sock.recvmsg(64, 512, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            continue
        for level, kind, data in ancillary:
            if level != socket.SOL_IP or kind != IP_RECVERR or len(data) < 24:
                continue
            # struct sock_extended_err, then the offender's sockaddr_in (SO_EE_OFFENDER)
            _errno, origin, icmp_type, _code = struct.unpack_from("=IBBB", data)
            if origin == SO_EE_ORIGIN_ICMP:
                return icmp_type, ipaddress.IPv4Address(data[20:24])
    return None


class OpenerTtl:
    """The TTL of our openers: the user's, or measured once toward the registry (`measure`,
    with `hops`: `opener_hops` in a thread unless given); UNMEASURED_TTL while that
    measurement is under way, DEFAULT_TTL when it found nothing or none was started."""

    def __init__(self, fixed: int | None = None,
                 hops: Callable[[ipaddress.IPv4Address],
                                Coroutine[Any, Any, int | None]] | None = None) -> None:
        self.fixed = fixed
        self._hops = hops or _hops_in_thread
        self._measuring: asyncio.Task[int | None] | None = None

    def measure(self, toward: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Start measuring in the background (IPv4 only; nothing to do with a fixed TTL)."""
        if self.fixed is not None or not isinstance(toward, ipaddress.IPv4Address):
            return
        self._measuring = asyncio.create_task(self._hops(toward))

        def measured(task: asyncio.Task[int | None]) -> None:
            hops = None if task.cancelled() or task.exception() else task.result()
            log.info("opener TTL %s, measured toward the registry %s",
                     f"{DEFAULT_TTL} (no public router answered)" if hops is None else hops,
                     toward, extra={"event": "opener_ttl", "ttl": hops})

        self._measuring.add_done_callback(measured)

    async def get(self, toward: Endpoint | None = None) -> int:
        """The TTL of an opener toward `toward`; toward an IPv6 endpoint, DEFAULT_TTL (the
        module doc says why)."""
        if toward is not None and toward.ip.version == 6:
            return DEFAULT_TTL
        if self.fixed is not None:
            return self.fixed
        if self._measuring is None:
            return DEFAULT_TTL
        try:
            async with asyncio.timeout(MEASURE_WAIT_S):  # not wait_for: see Agent
                hops = await asyncio.shield(self._measuring)
        except TimeoutError:
            return UNMEASURED_TTL
        except OSError:
            return DEFAULT_TTL
        return DEFAULT_TTL if hops is None else hops
