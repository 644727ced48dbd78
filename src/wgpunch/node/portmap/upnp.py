"""UPnP-IGD port mapping through miniupnpc (the maintained C client, MiniUPnP project),
loaded only when a node falls back to it: NAT-PMP and PCP are tried first, and the import
must not slow every start-up. Its calls block (SSDP discovery waits `DISCOVER_MS`, SOAP is
HTTP), so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Any

from ...errors import PortMapError

DISCOVER_MS = 200  # SSDP answers on a LAN come within milliseconds; miniupnpc's default 2 s
DESCRIPTION = "wgpunch"


@dataclass(frozen=True, slots=True)
class UpnpMapping:
    external_ip: ipaddress.IPv4Address
    external_port: int
    lease_s: int  # 0: the gateway keeps it until deleted


def _client(gateway: ipaddress.IPv4Address) -> Any:
    try:
        import miniupnpc
    except ImportError:
        raise PortMapError("UPnP: the miniupnpc package is not installed") from None
    client = miniupnpc.UPnP()
    client.discoverdelay = DISCOVER_MS
    try:
        found = client.discover()
    except Exception as error:  # miniupnpc raises bare Exception for every failure
        if str(error) != "Success":  # its way of saying that nothing answered
            raise PortMapError(f"UPnP: {error}") from None
        found = 0
    if found < 1:
        raise PortMapError("UPnP: no device answered discovery")
    try:
        client.selectigd()
    except Exception as error:
        raise PortMapError(f"UPnP: {error}") from None
    if not str(client.lanaddr) or ipaddress.IPv4Address(client.lanaddr) == gateway:
        raise PortMapError("UPnP: the gateway's IGD gave no LAN address for us")
    return client


def _map(gateway: ipaddress.IPv4Address, internal_port: int, external_port: int,
         lease_s: int) -> UpnpMapping:
    client = _client(gateway)
    try:
        external = ipaddress.IPv4Address(client.externalipaddress())
        # secure_mode routers (and IGDv2) accept mappings to our own address only.
        client.addportmapping(external_port, "UDP", client.lanaddr, internal_port,
                              DESCRIPTION, "", lease_s)
        found = client.getspecificportmapping(external_port, "UDP")
    except (Exception, ValueError) as error:
        raise PortMapError(f"UPnP: {error}") from None
    if not found or found[0] != client.lanaddr or found[1] != internal_port:
        raise PortMapError(f"UPnP: port {external_port} is mapped to {found!r}, not to us")
    # (host, internal port, description, enabled, remaining lease)
    return UpnpMapping(external, external_port, int(found[4]) if len(found) > 4 else lease_s)


def _unmap(gateway: ipaddress.IPv4Address, external_port: int) -> None:
    client = _client(gateway)
    try:
        client.deleteportmapping(external_port, "UDP")
    except Exception as error:
        raise PortMapError(f"UPnP: {error}") from None


async def map_port(gateway: ipaddress.IPv4Address, internal_port: int, external_port: int,
                   lease_s: int) -> UpnpMapping:
    return await asyncio.to_thread(_map, gateway, internal_port, external_port, lease_s)


async def unmap_port(gateway: ipaddress.IPv4Address, external_port: int) -> None:
    await asyncio.to_thread(_unmap, gateway, external_port)
