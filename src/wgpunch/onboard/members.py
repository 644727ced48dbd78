"""The registry's members as its wg-quick config and its device hold them, and what an
invited node gets: a free tunnel address, a listen port hint and its own wg-quick config.
Pure: no file, no device."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from ..errors import ConfigError
from ..keys import Key
from ..wg.model import IPAddress, IPInterface, IPNetwork
from .wgquick import MARK, Section, WgQuickConfig, section

KEEPALIVE_S = 25  # wg(8)'s suggestion: keeps the node's NAT mapping toward the registry open
# Nodes get listen ports from here up, one per address, so that two nodes behind one NAT
# never ask for the same port (a NAT that cannot keep both would map one to a random port,
# and punching works better through one that keeps it). 13,000 ports: the span up to 64819.
LISTEN_BASE, LISTEN_SPAN = 51820, 13000
# NAME.conf must work with `wg-quick up ./NAME.conf`, which takes the interface name from
# the file name: at most 15 characters (IFNAMSIZ), of these.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")


def check_name(name: str, layer: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{layer}: name {name[:80]!r}: use 1-15 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit (NAME.conf is a wg-quick "
                          "interface name)")
    return name


def tunnel_interface(config: WgQuickConfig, layer: str) -> IPInterface:
    """The registry's own tunnel address and network: `[Interface]`'s first Address."""
    interface = config.interface
    for text in [] if interface is None else interface.values("Address"):
        try:
            return ipaddress.ip_interface(text)
        except ValueError:
            raise ConfigError(f"{layer}: Address {text!r} is not an address/prefix") from None
    raise ConfigError(f"{layer}: the config has no [Interface] Address (the registry's "
                      "tunnel address and network, e.g. 10.99.0.254/24)")


def member(config: WgQuickConfig, name: str) -> Section | None:
    return next((p for p in config.peers if p.mark("name") == name), None)


def members(config: WgQuickConfig) -> list[str]:
    return [name for p in config.peers if (name := p.mark("name")) is not None]


def used_networks(config: WgQuickConfig, device_networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Every peer's allowed IPs, in the file and on the running device (which may differ)."""
    used = list(device_networks)
    for peer in config.peers:
        for text in peer.values("AllowedIPs"):
            try:
                used.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                continue  # wg-quick would refuse the file; not ours to judge here
    return used


def pick_address(own: IPInterface, used: Iterable[IPNetwork], wanted: IPAddress | None,
                 layer: str) -> IPAddress:
    """`wanted`, checked, or the lowest free host address of the registry's network."""
    network = own.network
    taken = list(used)

    def free(address: IPAddress) -> bool:
        return address != own.ip and not any(address in net for net in taken)

    if wanted is not None:
        edges = (network.network_address, network.broadcast_address)
        if wanted not in network or (network.version == 4 and network.prefixlen < 31
                                     and wanted in edges):
            raise ConfigError(f"{layer}: address {wanted} is not a host address of the "
                              f"registry's network {network}")
        if not free(wanted):
            raise ConfigError(f"{layer}: address {wanted} is in use (the registry's own, or in "
                              "a peer's allowed IPs)")
        return wanted
    for address in network.hosts():
        if free(address):
            return address
    raise ConfigError(f"{layer}: the network {network} is full: every host address is the "
                      "registry's or a peer's; revoke a node or use a larger network")


def listen_port_hint(network: IPNetwork, address: IPAddress) -> int:
    offset = int(address) - int(network.network_address)
    return LISTEN_BASE + offset % LISTEN_SPAN


def member_section(name: str, public: Key, address: IPAddress) -> Section:
    """The block `invite` adds to the registry's config."""
    return section("Peer", f"{MARK} name = {name}", f"PublicKey = {public.base64()}",
                   f"AllowedIPs = {ipaddress.ip_network(address)}")


def node_config(name: str, private: Key, address: IPAddress, own: IPInterface,
                registry: Key, endpoint: str) -> str:
    """The invited node's wg-quick config. It holds the node's private key: written 0600."""
    network = own.network
    return "\n".join([
        f"# {name}: a wgpunch node (`wgpunch invite {name}` on the registry host).",
        f"# Start: wg-quick up ./{name}.conf && wgpunch node --mesh",
        f"# (the registry, found as the peer serving its API, is {registry.base64()})",
        "[Interface]",
        f"PrivateKey = {private.base64()}",
        f"Address = {address}/{network.prefixlen}",
        f"ListenPort = {listen_port_hint(network, address)}",
        "",
        "[Peer]",
        "# the registry: the other nodes are added by `wgpunch node --mesh`",
        f"PublicKey = {registry.base64()}",
        f"AllowedIPs = {ipaddress.ip_network(own.ip)}",
        f"Endpoint = {endpoint}",
        f"PersistentKeepalive = {KEEPALIVE_S}",
        "",
    ])


def registry_config(own: IPInterface, listen_port: int, key_file: str, endpoint: str) -> str:
    """`init registry`'s wg-quick config; the private key stays in its own file."""
    return "\n".join([
        "# A wgpunch registry (`wgpunch init registry`). Nodes are added by `wgpunch invite`.",
        "[Interface]",
        f"{MARK} endpoint = {endpoint}",
        f"Address = {own}",
        f"ListenPort = {listen_port}",
        f"PostUp = wg set %i private-key {key_file}",
        "",
    ])
