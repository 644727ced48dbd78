"""One request/answer exchange with a gateway's NAT-PMP/PCP port over UDP, retransmitted as
RFC 6886 §3.1 and RFC 6887 §8.1.1 ask (first after 250 ms, then each wait doubled), but
given up after a few tries: the node maps in the background and asks again later.

The socket is connected to the gateway's port, so the kernel drops datagrams from anyone
else; a datagram from there that does not parse as the answer is skipped (logged at DEBUG),
a refusal ends the exchange at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ...errors import MalformedPacket, PortMapError

log = logging.getLogger("wgpunch.node.portmap")

SERVER_PORT = 5351  # RFC 6886 §3, RFC 6887 §19.1
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExchangeTimings:
    first_wait_s: float = 0.25  # RFC 6886 §3.1 (PCP §8.1.1 starts at 3 s; NAT-PMP's is ours)
    tries: int = 4  # 0.25 + 0.5 + 1 + 2 = 3.75 s at most; RFC 6886 tries 9 times (64 s)


class _Receiver(asyncio.DatagramProtocol):
    """Answers in a queue; an error (ICMP port unreachable: nothing listens there) as None,
    so that a gateway without the service is known at once, not after every retry."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)
        self.error: OSError | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.error = exc if isinstance(exc, OSError) else OSError(str(exc))
        if not self.queue.full():
            self.queue.put_nowait(None)


async def exchange(gateway: ipaddress.IPv4Address,
                   request: Callable[[ipaddress.IPv4Address], bytes],
                   parse: Callable[[bytes], T], t: ExchangeTimings, *, what: str,
                   port: int = SERVER_PORT) -> T:
    """Send `request(our address)` to the gateway until `parse` accepts an answer."""
    loop = asyncio.get_running_loop()
    try:
        transport, receiver = await loop.create_datagram_endpoint(
            _Receiver, remote_addr=(str(gateway), port))
    except OSError as error:
        raise PortMapError(f"{what}: cannot reach {gateway}: {error.strerror}") from None
    try:
        ours = ipaddress.IPv4Address(transport.get_extra_info("sockname")[0])
        data = request(ours)
        wait = t.first_wait_s
        for _ in range(t.tries):
            transport.sendto(data)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):
                        answer = await receiver.queue.get()
                except TimeoutError:
                    break
                if answer is None:
                    why = receiver.error.strerror if receiver.error else None
                    raise PortMapError(f"{what}: {gateway} refuses: {why or 'unreachable'}")
                try:
                    return parse(answer)
                except MalformedPacket as error:
                    log.debug("%s: skipped an answer from %s: %s", what, gateway, error)
            wait *= 2
        raise PortMapError(f"{what}: no answer from {gateway}:{port}")
    finally:
        transport.close()
