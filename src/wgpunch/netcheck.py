"""`wgpunch netcheck`: what this host's network does to WireGuard, measured with the
registry's help (its NAT probe port, docs/api.md), like `tailscale netcheck`: the public
endpoint, how the NAT maps and filters (node/natprobe.py), port preservation, hairpinning and
port-mapping protocols (node/lanprobe.py), IPv6, and what that means for peers.

It reads the node's options (config/node.py: `--config` takes the node's file, WGPUNCH_*
variables apply), needs the registry mode (`--registry`), and changes nothing: it sends
probes from the WireGuard port on a raw socket beside WireGuard, which a running node agent
also does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import Any

from . import config
from .commands import help_of
from .config.node import NODE, NodeConfig
from .errors import ApiError, ConfigError
from .keys import Key
from .ports import NATPROBE_PORT
from .protocol import NatBehaviour
from .wg.model import Endpoint

OBSERVED_WAIT_S = 3.0  # the registry reads its device every 0.2 s by default


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "netcheck",
        help=help_of("netcheck"),
        description=(
            "Measure what this host's network does to WireGuard, with the help of the\n"
            "registry of interface IF (its NAT probe port): public endpoint, NAT mapping and\n"
            "filtering, port preservation, hairpinning, UPnP-IGD/NAT-PMP/PCP on the LAN,\n"
            "IPv6, and what it means for reaching peers. Reads the node's options (its\n"
            "--config file and WGPUNCH_* variables); changes nothing. Needs CAP_NET_RAW."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--interface", "-i", metavar="IF",
                        help="the WireGuard interface (as for `wgpunch node`)")
    parser.add_argument("--registry", metavar="PUBKEY", action="append",
                        help="the registry's public key (repeat for several: the one that is a "
                        "peer of IF helps)")
    parser.add_argument("--api", metavar="URL", help="the registry API's URL (default: its "
                        "tunnel address)")
    parser.add_argument("--token-file", metavar="FILE", help="bearer token for the registry")
    parser.add_argument("--natprobe-port", type=int, metavar="PORT",
                        help=f"the registry's NAT probe port (default {NATPROBE_PORT})")
    parser.add_argument("--config", metavar="FILE", help="the node's TOML file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class Report:
    interface: str
    probe_port: Endpoint | None
    public_endpoint: Endpoint | None  # as the probe port saw our WireGuard port
    wg_observed: Endpoint | None  # as the registry's WireGuard interface saw it
    nat: NatBehaviour
    hairpin: bool | None
    gateway: str | None
    nat_pmp: bool
    pcp: bool
    upnp_igd: bool
    ipv6_global: bool
    registry_over_ipv6: bool | None  # None: the registry's endpoint is IPv4, not tried

    def to_json(self) -> dict[str, Any]:
        return {
            "interface": self.interface,
            "probe_port": None if self.probe_port is None else str(self.probe_port),
            "public_endpoint": (None if self.public_endpoint is None
                                else str(self.public_endpoint)),
            "wg_observed": None if self.wg_observed is None else str(self.wg_observed),
            **self.nat.to_json(),
            "hairpin": self.hairpin,
            "port_mapping": {"gateway": self.gateway, "nat_pmp": self.nat_pmp,
                             "pcp": self.pcp, "upnp_igd": self.upnp_igd},
            "ipv6": {"global_address": self.ipv6_global,
                     "registry_over_ipv6": self.registry_over_ipv6},
            "meaning": meaning(self),
        }


def meaning(r: Report) -> list[str]:
    """What the measurement means for reaching peers, in words (protocol/roles.py's rules)."""
    nat = r.nat
    lines: list[str] = []
    if nat.mapping == "unknown":
        lines.append("NAT behaviour unknown: the registry's probe port did not answer (is "
                     "UDP to it allowed? does this process have CAP_NET_RAW?)")
    elif nat.mapping == "none":
        lines.append("no NAT: peers reach this host at its own address; it lets peers "
                     "behind NATs initiate")
    elif nat.endpoint_dependent:
        lines.append("your NAT maps per destination (symmetric): peers cannot predict your "
                     "port, so this host initiates toward them")
        lines.append("peers behind symmetric or port-filtering NATs will need the relay; "
                     "peers behind full-cone or address-filtering NATs and public hosts can "
                     "be reached directly")
    else:
        lines.append("your NAT maps endpoint-independently: peers can reach your public "
                     "endpoint once you have sent toward them")
        if nat.filters_per_port:
            lines.append("it filters per port: peers behind symmetric NATs will need the "
                         "relay")
        else:
            lines.append("peers behind any NAT, symmetric ones included, can reach you "
                         "directly")
    if nat.mapping not in ("none", "unknown") and r.hairpin is False:
        lines.append("no hairpinning: peers behind this same NAT need their LAN address")
    if r.nat_pmp or r.pcp or r.upnp_igd:
        lines.append("the gateway offers port mapping: a mapped port would make this host "
                     "reachable like a full cone")
    if r.ipv6_global:
        lines.append("this host has a global IPv6 address: peers with IPv6 may reach it "
                     "without NAT")
    return lines


def render(r: Report) -> str:
    def yes(value: bool | None, unknown: str = "unknown") -> str:
        return unknown if value is None else ("yes" if value else "no")

    mapping = [name for name, on in (("NAT-PMP", r.nat_pmp), ("PCP", r.pcp),
                                     ("UPnP-IGD", r.upnp_igd)) if on]
    rows = [
        ("interface", r.interface),
        ("probe port", str(r.probe_port or "none (the registry peer has no endpoint)")),
        ("public endpoint", str(r.public_endpoint or "unknown")),
        ("registry's WireGuard sees", str(r.wg_observed or "unknown")),
        ("mapping", r.nat.mapping),
        ("filtering", r.nat.filtering),
        ("port preserved", yes(r.nat.port_preserved)),
        ("hairpin", yes(r.hairpin, "unknown" if r.nat.mapping != "none" else "no NAT")),
        ("port mapping", ", ".join(mapping) or
         f"none answered (gateway {r.gateway or 'none'})"),
        ("IPv6", ("global address" if r.ipv6_global else "no global address")
         + {None: "", True: ", registry reached over IPv6",
            False: ", registry not reached over IPv6"}[r.registry_over_ipv6]),
    ]
    width = max(len(name) for name, _ in rows)
    text = [f"{name + ':':<{width + 1}} {value}" for name, value in rows]
    return "\n".join(text + [""] + [f"- {line}" for line in meaning(r)])


async def check(options: NodeConfig) -> Report:
    from .node import lanprobe
    from .node.addresses import local_addresses
    from .node.client import RegistryClient
    from .node.natprobe import RawChannel, measure, own_addresses
    from .node.source import registry_api_url
    from .wg import open_device

    if not options.interface:
        raise ConfigError("netcheck: give --interface IF (or WGPUNCH_INTERFACE, or "
                          "'interface' in the node's config file)")
    if not options.registry:
        raise ConfigError("netcheck: give --registry PUBKEY (or WGPUNCH_REGISTRY, or "
                          "'registry' in the node's config file): the registry helps measure")
    keys = [options.parsed("registry", lambda t: Key.parse(t, what="registry key"), text)
            for text in options.registry]
    device = open_device(options.interface)
    try:
        state = await device.state()
    finally:
        await device.close()
    # With several registries, the one this interface has as a peer (as `node` picks it).
    registry = next((k for k in keys if state.peer(k) is not None), keys[0])
    peer = state.peer(registry)
    api = options.api or registry_api_url(state, registry)
    if state.public_key is None:
        raise ConfigError(f"netcheck: {state.name} has no private key configured")
    interfaces = await asyncio.to_thread(local_addresses, state.name)
    own = own_addresses(i.ip for i in interfaces)
    server = None
    if peer is not None and peer.endpoint is not None and options.natprobe_port:
        server = Endpoint(peer.endpoint.ip, options.natprobe_port)
    token = None if options.token_file is None else config.read_token(options.token_file,
                                                                       "netcheck")
    client = RegistryClient(api, token=token)
    try:
        wg_observed = await _observed(client, state.public_key)
    finally:
        await client.close()
    if server is None:
        measured = None
    else:
        measured = await measure(RawChannel(), state.listen_port, server, wg_observed, own)
    hairpin = None if server is None else await asyncio.to_thread(lanprobe.hairpin, server)
    ports = await asyncio.to_thread(lanprobe.port_mapping)
    ipv6 = any(i.ip.version == 6 and i.ip.is_global for i in interfaces)
    over_v6 = None
    if server is not None and server.ip.version == 6:
        over_v6 = await asyncio.to_thread(lanprobe.reaches, server)
    return Report(
        state.name, server, None if measured is None else measured.seen, wg_observed,
        NatBehaviour("unknown", "unknown", None) if measured is None else measured.behaviour,
        hairpin, ports.gateway, ports.nat_pmp, ports.pcp, ports.upnp_igd, ipv6, over_v6)


async def _observed(client: Any, me: Key) -> Endpoint | None:
    """Our endpoint as the registry observes it; the API request itself makes the tunnel
    handshake if it was idle, and the registry sees the endpoint on its next device read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OBSERVED_WAIT_S
    while True:
        try:
            snapshot = await client.peers()
        except ApiError as error:
            raise ApiError(f"netcheck: the registry did not answer: {error}") from None
        mine = next((p for p in snapshot.peers if p.public_key == me), None)
        if (mine is not None and mine.endpoint is not None) or loop.time() > deadline:
            return None if mine is None else mine.endpoint
        await asyncio.sleep(0.1)  # the registry's next device read


def run(args: argparse.Namespace) -> int:
    options = config.load(NODE, vars(args), config=args.config)
    report = asyncio.run(check(options))
    print(json.dumps(report.to_json(), indent=1) if args.json else render(report))
    return 0
