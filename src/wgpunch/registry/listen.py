"""Where the API listens: the registry's own tunnel addresses unless told otherwise.

Requests are identified by source address, which WireGuard proves only for packets that came
through the tunnel; listening on the interface's own addresses keeps the API inside it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from ..errors import ConfigError
from ..protocol import API_PORT
from ..wg.model import Endpoint, IPAddress

DNS_PORT = 53  # RFC 1035 §4.2; needs root or CAP_NET_BIND_SERVICE


def _address(text: str, default_port: int, what: str, forms: str) -> Endpoint:
    """`ADDR:PORT`, `[IPv6]:PORT`, or a bare address (with `default_port`)."""
    try:
        return Endpoint.parse(text, default_port)
    except ValueError:
        raise ConfigError(
            f"registry: {what} {text!r}: expected {forms}, "
            "with ADDR an IP address and PORT in 1-65535"
        ) from None


def parse_listen(text: str) -> Endpoint:
    """`ADDR:PORT`, `[IPv6]:PORT`, or a bare address (default port)."""
    return _address(text, API_PORT, "listen address", "ADDR:PORT, [IPv6]:PORT or ADDR")


def parse_dns_listen(text: str) -> Endpoint | int:
    """`PORT` alone (that port on every address of the interface, as the API's default),
    `ADDR` (port 53), `ADDR:PORT` or `[IPv6]:PORT`."""
    if text.isdigit():
        if not 1 <= int(text) <= 65535:
            raise ConfigError(f"registry: DNS port {text} is not in 1-65535")
        return int(text)
    return _address(text, DNS_PORT, "DNS address", "PORT, ADDR:PORT, [IPv6]:PORT or ADDR")


def is_wildcard(endpoint: Endpoint) -> bool:
    return endpoint.ip.is_unspecified


def _bindable(ip: IPAddress) -> bool:
    # A link-local IPv6 address needs a scope to bind; nodes use the configured addresses.
    return not (ip.version == 6 and ip.is_link_local)


def _message_ip(msg: Any) -> IPAddress:
    # IFA_LOCAL is the own address of a point-to-point address (`ip addr add A peer B`);
    # IPv6 and plain addresses have only IFA_ADDRESS.
    return ipaddress.ip_address(msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"))


def _addresses(ifname: str) -> list[IPAddress] | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            return None
        return [_message_ip(msg) for msg in ipr.get_addr(index=index[0])]


async def interface_addresses(ifname: str) -> list[IPAddress]:
    """The bindable IP addresses configured on `ifname`, in this network namespace."""
    try:
        # pyroute2's synchronous sockets run an event loop of their own: keep them off ours.
        found = await asyncio.to_thread(_addresses, ifname)
    except Exception as exc:  # pyroute2 raises its own types; translate them here
        raise ConfigError(f"registry: cannot read the addresses of {ifname!r}: {exc}") from None
    if found is None:
        raise ConfigError(f"registry: no interface {ifname!r} in this network namespace")
    return sorted({ip for ip in found if _bindable(ip)}, key=lambda ip: (ip.version, int(ip)))


async def default_listen(ifname: str, port: int = API_PORT) -> list[Endpoint]:
    addresses = await interface_addresses(ifname)
    if not addresses:
        raise ConfigError(
            f"registry: interface {ifname!r} has no IP address to listen on; give the "
            "registry's tunnel address to the interface, or --listen ADDR:PORT"
        )
    return [Endpoint(ip, port) for ip in addresses]
