"""Keep the WireGuard listen port mapped on the NAT in front of us (DESIGN.md §3, candidate
"mapped"): ask the default gateway by PCP, then NAT-PMP, then UPnP-IGD; renew at half the
lifetime; map again when the gateway or the external address changes; delete the mapping on
a clean exit. `keep_mapped` is the task; `map_once`/`unmap` are its steps, also for tests.

The external port asked for is the listen port itself (a gateway grants another when that
one is taken; the mapping says which). What the gateway grants is reported to the registry
as `mapped_endpoint` (protocol/report.py), through `on_change`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ...errors import MalformedPacket, PortMapError
from ...wg.model import Endpoint
from . import natpmp, pcp, upnp
from .gateway import default_gateway
from .transport import ExchangeTimings, exchange

log = logging.getLogger("wgpunch.node.portmap")

# External addresses that no peer outside can reach: a gateway behind another NAT (a home
# router behind a carrier NAT, RFC 6598; a router behind another router) maps a port on an
# address of that NAT's inside, which is worth nothing to peers. Listed, not
# `is_private`: Python counts the documentation ranges (the lab's public addresses) too.
UNREACHABLE = tuple(ipaddress.ip_network(net) for net in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16",
))


@dataclass(frozen=True, slots=True)
class PortmapTimings:
    # Lifetime asked for: RFC 6886 §3.3 recommends 7200 s; renewals come at half of what is
    # granted (§3.3, RFC 6887 §11.2.1), so a lost renewal leaves time for the next.
    lifetime_s: int = 7200
    # Never renew sooner than this, whatever a gateway grants (a 1 s lease must not make us
    # ask every half second).
    min_renew_s: float = 1.0
    # How often the gateway (routing table) is looked at between renewals: a new network
    # (roaming, DHCP) is mapped again within this long.
    gateway_check_s: float = 10.0
    # After every method failed: ask again this long later, doubled per failure up to
    # retry_max_s (a NAT without port mapping is asked about once an hour).
    retry_first_s: float = 30.0
    retry_max_s: float = 3600.0
    # A deletion on exit waits at most this long: a stopping node must not hang on a gateway
    # that went away.
    unmap_s: float = 2.0
    exchange: ExchangeTimings = field(default_factory=ExchangeTimings)


@dataclass(frozen=True, slots=True)
class Mapping:
    method: str  # "pcp" | "nat-pmp" | "upnp"
    gateway: ipaddress.IPv4Address
    internal_port: int
    external: Endpoint
    lifetime_s: int  # as granted; 0: until deleted (UPnP)
    nonce: bytes = b""  # PCP: names the mapping for renewal and deletion

    def renew_in(self, t: PortmapTimings) -> float:
        lifetime = self.lifetime_s or t.lifetime_s
        return max(lifetime / 2, t.min_renew_s)


async def _pcp(gateway: ipaddress.IPv4Address, port: int, previous: Mapping | None,
               lifetime_s: int, t: PortmapTimings) -> Mapping:
    nonce = previous.nonce if previous is not None and previous.method == "pcp" else \
        os.urandom(pcp.NONCE_BYTES)
    want = previous.external.port if previous is not None else port
    reply = await exchange(
        gateway, lambda ours: pcp.map_request(ours, nonce, port, want, lifetime_s),
        lambda data: pcp.parse_map(data, nonce, port), t.exchange, what="PCP")
    return Mapping("pcp", gateway, port, Endpoint(reply.external_ip, reply.external_port),
                   reply.lifetime_s, nonce)


async def _natpmp(gateway: ipaddress.IPv4Address, port: int, previous: Mapping | None,
                  lifetime_s: int, t: PortmapTimings) -> Mapping:
    want = previous.external.port if previous is not None else port
    address = await exchange(gateway, lambda _: natpmp.address_request(),
                             natpmp.parse_address, t.exchange, what="NAT-PMP")
    reply = await exchange(gateway, lambda _: natpmp.map_request(port, want, lifetime_s),
                           lambda data: natpmp.parse_map(data, port), t.exchange,
                           what="NAT-PMP")
    return Mapping("nat-pmp", gateway, port, Endpoint(address.address, reply.external_port),
                   reply.lifetime_s)


async def _upnp(gateway: ipaddress.IPv4Address, port: int, previous: Mapping | None,
                lifetime_s: int, t: PortmapTimings) -> Mapping:
    want = previous.external.port if previous is not None else port
    got = await upnp.map_port(gateway, port, want, lifetime_s)
    return Mapping("upnp", gateway, port, Endpoint(got.external_ip, got.external_port),
                   got.lease_s)


METHODS = {"pcp": _pcp, "nat-pmp": _natpmp, "upnp": _upnp}


def reachable(external: Endpoint) -> bool:
    return not any(external.ip in net for net in UNREACHABLE)


async def map_once(gateway: ipaddress.IPv4Address, port: int, t: PortmapTimings, *,
                   previous: Mapping | None = None,
                   methods: tuple[str, ...] = tuple(METHODS)) -> Mapping:
    """Map UDP `port` on `gateway` by the first method that works (the previous mapping's
    first, so a renewal keeps its method and nonce). PortMapError when none does, or when
    the mapping is on an address peers cannot reach (UNREACHABLE: the gateway is behind
    another NAT); that mapping is deleted again."""
    order = list(methods)
    if previous is not None and previous.method in order:
        order.remove(previous.method)
        order.insert(0, previous.method)
    failures = []
    for method in order:
        try:
            mapping = await METHODS[method](gateway, port, previous, t.lifetime_s, t)
        except PortMapError as error:
            failures.append(str(error))
            continue
        if reachable(mapping.external):
            return mapping
        with contextlib.suppress(PortMapError, MalformedPacket):
            await unmap(mapping, t)
        raise PortMapError(f"port mapping on {gateway}: {method} mapped {mapping.external}, "
                           "an address behind another NAT, which peers cannot reach")
    raise PortMapError(f"port mapping on {gateway}: " + "; ".join(failures))


async def unmap(mapping: Mapping, t: PortmapTimings) -> None:
    """Delete `mapping` (RFC 6886 §3.4, RFC 6887 §15: lifetime 0)."""
    gw, port = mapping.gateway, mapping.internal_port
    if mapping.method == "pcp":
        nonce = mapping.nonce
        await exchange(gw, lambda ours: pcp.map_request(ours, nonce, port, 0, 0),
                       lambda data: pcp.parse_map(data, nonce, port), t.exchange, what="PCP")
    elif mapping.method == "nat-pmp":
        await exchange(gw, lambda _: natpmp.map_request(port, 0, 0),
                       lambda data: natpmp.parse_map(data, port), t.exchange, what="NAT-PMP")
    else:
        await upnp.unmap_port(gw, mapping.external.port)


Mapper = Callable[..., Awaitable[Mapping]]  # map_once's signature
Unmapper = Callable[[Mapping, PortmapTimings], Awaitable[None]]


async def keep_mapped(port: int, on_change: Callable[[Mapping | None], Awaitable[None] | None],
                      t: PortmapTimings,
                      gateway: Callable[[], ipaddress.IPv4Address | None] = default_gateway,
                      *, mapper: Mapper = map_once, unmapper: Unmapper = unmap) -> None:
    """Run until cancelled: keep `port` mapped, calling `on_change` with each new mapping
    (None: none any more); on cancellation, delete the mapping (at most t.unmap_s). A
    renewal that fails keeps the mapping while its lease lasts and is tried again at half
    of what is left (RFC 6886 §3.3), so one lost exchange does not withdraw it."""
    loop = asyncio.get_running_loop()
    current: Mapping | None = None
    expires_at = 0.0  # of `current`, loop time; lifetime 0 (UPnP "until deleted"): never
    retry = t.retry_first_s
    warned = False

    async def tell(mapping: Mapping | None) -> None:
        nonlocal current
        if mapping != current:
            current = mapping
            result = on_change(mapping)
            if result is not None:
                await result

    try:
        while True:
            gw = gateway()
            wait = t.gateway_check_s
            if gw is None:
                await tell(None)
            else:
                previous = current if current is not None and current.gateway == gw else None
                try:
                    mapping = await mapper(gw, port, t, previous=previous)
                except (PortMapError, MalformedPacket) as error:
                    left = expires_at - loop.time()
                    if previous is not None and (not previous.lifetime_s or left > 0):
                        log.debug("renewing the port mapping failed: %s", error)
                        wait = max(left / 2, t.min_renew_s) if previous.lifetime_s else retry
                    else:
                        (log.info if not warned else log.debug)("no port mapping: %s", error)
                        warned = True
                        await tell(None)
                        wait, retry = retry, min(retry * 2, t.retry_max_s)
                else:
                    if mapping.external != (current.external if current else None):
                        log.info("port %d mapped by %s on %s: %s (lifetime %d s)", port,
                                 mapping.method, gw, mapping.external, mapping.lifetime_s,
                                 extra={"event": "port_mapped", "method": mapping.method,
                                        "endpoint": str(mapping.external)})
                    await tell(mapping)
                    expires_at = loop.time() + mapping.lifetime_s
                    wait, retry, warned = mapping.renew_in(t), t.retry_first_s, False
            await _wait_unless_moved(gw, wait, t, gateway)
    finally:
        if current is not None:
            with contextlib.suppress(PortMapError, MalformedPacket, TimeoutError):
                async with asyncio.timeout(t.unmap_s):
                    await unmapper(current, t)
                log.info("port mapping %s deleted", current.external,
                         extra={"event": "port_unmapped", "endpoint": str(current.external)})


async def _wait_unless_moved(gw: ipaddress.IPv4Address | None, wait_s: float, t: PortmapTimings,
                             gateway: Callable[[], ipaddress.IPv4Address | None]) -> None:
    """Sleep `wait_s`, but return early when the default gateway changes."""
    loop = asyncio.get_running_loop()
    until = loop.time() + wait_s
    while (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, t.gateway_check_s))
        if gateway() != gw:
            return
