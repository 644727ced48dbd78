"""Kicks from the registry: a datagram through the tunnel saying which revision our watch
stream should have delivered (protocol/kickwire.py; the registry's side is registry/kick.py,
which says why). The registry sends one when the endpoint it observes for us moves: our NAT
mapped us anew, and what the stream sent before that may sit in TCP's retransmission
back-off. If the stream has not delivered that revision `wait_s` after the kick, the agent
opens a new one from its last revision (RegistryView.relink), as it does when the tunnel to
the registry answers again after it was dead (registrylink.py).

Only datagrams that came in through our WireGuard interface (the socket is bound to it) from
the registry peer's tunnel addresses count; anything else is dropped. A kick can do no more
than make the agent watch anew, once per revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

from ..errors import MalformedPacket
from ..protocol.kickwire import Kick, parse_kick
from ..wg.model import IPNetwork
from .view import RegistryView

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module

# After a kick, the stream gets this long to deliver the revision itself: the registry sends
# the kick as it queues the change, and a stream that works delivers it within a round trip.
# Our choice: longer than a round trip on most paths, short against the 2 s recovery goal.
WAIT_S = 0.1


def behind(view: RegistryView, kick: Kick) -> bool:
    """Whether our stream has not delivered what `kick` says it should have."""
    return view.epoch != kick.epoch or view.revision is None or view.revision < kick.revision


class _Kicks(asyncio.DatagramProtocol):
    def __init__(self, on_kick: Callable[[Kick], None],
                 registry: Sequence[IPNetwork]) -> None:
        self._on_kick = on_kick
        self._registry = registry

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            source = ipaddress.ip_address(str(addr[0]))
            if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
                source = source.ipv4_mapped
            if not any(source in net for net in self._registry):
                return
            kick = parse_kick(data)
        except (MalformedPacket, ValueError):
            return
        self._on_kick(kick)


def open_socket(ifname: str, port: int) -> socket.socket | None:
    """A UDP socket on `port` that only hears what arrives through `ifname`; None where that
    cannot be had (no CAP_NET_RAW for the binding to the interface, the port taken)."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            continue
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.bind((address, port))
            sock.setblocking(False)
            return sock
        except OSError as error:
            sock.close()
            log.debug("kicks from the registry: UDP port %d on %s: %s", port, ifname, error)
    return None


async def follow_kicks(sock: socket.socket, view: RegistryView,
                       registry: Sequence[IPNetwork], wait_s: float = WAIT_S) -> None:
    """Take the registry's kicks on `sock` (open_socket), forever; `registry`: its tunnel
    networks (the registry peer's allowed IPs)."""
    pending: set[asyncio.Task[None]] = set()
    last: Kick | None = None

    async def check(kick: Kick) -> None:
        await asyncio.sleep(wait_s)
        if behind(view, kick):
            log.info("registry kick: the watch stream has not delivered revision %d; "
                     "watching anew", kick.revision, extra={"event": "registry_kicked"})
            view.relink.set()

    def on_kick(kick: Kick) -> None:
        nonlocal last
        if kick == last or not behind(view, kick):
            return  # a repeat, or the stream already delivered it
        last = kick
        task = asyncio.create_task(check(kick))
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Kicks(on_kick, registry), sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        await asyncio.Future()  # until cancelled
    finally:
        transport.close()
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
