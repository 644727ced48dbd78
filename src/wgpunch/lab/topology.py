"""From a scenario and a prefix to a plan: every namespace, interface name and address.

Pure: nothing here runs a command, so the plan can be checked without root.

Addresses (all of them exist only inside the lab's namespaces):
- core <-> registry: 192.0.2.0/30, core .1, registry .2 (TEST-NET-1); core <-> the n-th
  registry (`registryN`, from 2): the n-th /30 of TEST-NET-1, 192.0.2.<4n-4>/30, core
  .<4n-3>, registry .<4n-2>.
- core <-> top-level site k: a /30 from 198.51.100.0/24 (k < 64), then 203.0.113.0/24
  (k < 128): core .4k+1, site .4k+2. A site's address there is its public address.
- LAN of the n-th NAT (walk order, from 1): 192.168.n.0/24 for a home router (only hosts
  behind it), 100.64.n.0/24 (the CGNAT range, RFC 6598) when a NAT sits behind it. Router
  .1, the i-th node behind it .10+i.
- IPv6, only in a scenario that asks for it (sub-prefixes of the documentation prefix
  2001:db8::/32, RFC 3849; never NATed): core <-> registry 2001:db8:0:ffff::/64 (the n-th
  registry's 2001:db8:0:<ffff - (n-1)>::/64), core <-> top-level site k 2001:db8:0:k::/64
  (core ::1, site ::2), the LAN of the n-th NAT (one that routes IPv6, directly on the
  core) 2001:db8:n::/64 (router ::1, the i-th host ::a+i, as on IPv4), routed by the core
  to the router's uplink address.
- Tunnel: 10.99.0.0/24; the registry is 10.99.0.254 (the n-th 10.99.0.<255 - n>),
  WireGuard hosts 10.99.0.1, .2, ... in walk order. Every device listens on 51820, as an
  unconfigured install would.

Names: namespace `P-<node>`; in node X, the link toward neighbour Y is `P_<Y>` (the registry
is `reg` in interface names, `registryN` is `regN`), a NAT's LAN bridge is `P_lan`; the
WireGuard interface of host H is `P-<H>` (`P-reg`, `P-reg2`, ... for the registries), unique
machine-wide as wireguard-go's socket directory requires. An impaired link runs through a
namespace `P-<child>-wire` whose ends are `P_up` and `P_down` (see `wire.py`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from ..errors import LabError
from .nat import NatInterfaces
from .netns import IFNAME_MAX
from .scenario import NO_IMPAIRMENT, Host, Impairment, Nat, Scenario

IPv4 = ipaddress.IPv4Address
IPv4If = ipaddress.IPv4Interface
IPv6 = ipaddress.IPv6Address
IPv6If = ipaddress.IPv6Interface

TUNNEL_NET = ipaddress.IPv4Network("10.99.0.0/24")
REGISTRY_TUNNEL_IP = IPv4("10.99.0.254")
LISTEN_PORT = 51820
REGISTRIES_NET = ipaddress.IPv4Network("192.0.2.0/24")  # a /30 per registry
REGISTRY_NET = ipaddress.IPv4Network("192.0.2.0/30")  # the first registry's
PUBLIC_POOLS = (ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("203.0.113.0/24"))
SITES_MAX = 64 * len(PUBLIC_POOLS)
FIRST_CHILD = 10  # .10 is the first node behind a NAT; .1 is the router
LAB_NET6 = ipaddress.IPv6Network("2001:db8::/32")


def registry_net(n: int) -> ipaddress.IPv4Network:
    """Where the n-th registry (from 1) meets the core."""
    return list(REGISTRIES_NET.subnets(new_prefix=30))[n - 1]


def registry_net6(n: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"2001:db8:0:{0xffff - (n - 1):x}::/64")


def registry_tunnel_ip(n: int) -> IPv4:
    return REGISTRY_TUNNEL_IP - (n - 1)


def uplink_net6(k: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"2001:db8:0:{k:x}::/64")


def lan_net6(n: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"2001:db8:{n:x}::/64")


@dataclass(frozen=True)
class Node:
    """One namespace of the lab (core, registry, NAT router or host)."""

    name: str
    role: str  # "core" | "registry" | "nat" | "host"
    ns: str
    parent: str | None
    uplink: str | None  # interface toward the parent
    address: IPv4If | None  # on the uplink
    gateway: IPv4 | None  # default route
    impairment: Impairment = NO_IMPAIRMENT  # of the uplink
    # NAT routers
    kind: str | None = None
    hairpin: bool = False
    portmap: bool = False  # runs miniupnpd (portmap.py)
    udp_timeout_s: int | None = None  # None: the kind's (nat.py)
    lan: IPv4If | None = None  # the router's address on its LAN bridge
    # WireGuard hosts (and the registry)
    ifname: str | None = None
    tunnel_ip: IPv4 | None = None
    public_ip: IPv4 | None = None  # where the internet sees it: its own or the outer NAT's
    nat_chain: tuple[str, ...] = ()  # NAT routers in front of it, nearest first
    registries: tuple[str, ...] = ()  # WireGuard hosts: the registry hosts it peers with
    # IPv6 (None: none here): on the uplink, its default route, a router's LAN address and
    # what the router does with IPv6 (scenario.IPV6_POLICIES).
    address6: IPv6If | None = None
    gateway6: IPv6 | None = None
    lan6: IPv6If | None = None
    ipv6: str | None = None

    @property
    def forwards(self) -> bool:
        return self.role in ("core", "nat")

    @property
    def private_ip(self) -> IPv4 | None:
        return self.address.ip if self.address and self.nat_chain else None

    @property
    def public_ip6(self) -> IPv6 | None:
        """Where the internet reaches it over IPv6: its own address (no NAT on IPv6)."""
        return self.address6.ip if self.address6 else None


@dataclass(frozen=True)
class Plan:
    prefix: str
    scenario: Scenario
    nodes: tuple[Node, ...]  # parents before children

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"lab {self.prefix}: no node {name!r} "
                       f"(nodes: {', '.join(n.name for n in self.nodes)})")

    def children(self, name: str) -> list[Node]:
        return [node for node in self.nodes if node.parent == name]

    @property
    def wireguard_hosts(self) -> list[Node]:
        return [node for node in self.nodes if node.ifname]

    @property
    def registries(self) -> list[Node]:
        return [node for node in self.nodes if node.role == "registry"]

    def ifname_toward(self, name: str) -> str:
        return link_name(self.prefix, name)

    def bridge(self) -> str:
        return f"{self.prefix}_lan"

    def nat_interfaces(self, node: Node) -> NatInterfaces:
        assert node.role == "nat" and node.uplink and node.address and node.lan
        return NatInterfaces(table=f"{self.prefix}_nat", wan=node.uplink, wan_ip=node.address.ip,
                             lan=self.bridge(), lan_net=node.lan.network)

    def wire_ns(self, child: Node) -> str:
        return f"{child.ns}-wire"


def short(name: str) -> str:
    return "reg" + name.removeprefix("registry") if name.startswith("registry") else name


def link_name(prefix: str, neighbour: str) -> str:
    """The interface toward `neighbour`, in whichever namespace it lives."""
    return f"{prefix}_{short(neighbour)}"


def plan(scenario: Scenario, prefix: str) -> Plan:
    sites = scenario.sites
    if len(sites) > SITES_MAX:
        raise LabError(f"lab: at most {SITES_MAX} sites on the core, got {len(sites)}")
    ns = lambda name: f"{prefix}-{name}"  # noqa: E731 - a one-line naming rule
    tunnel_ips = iter(TUNNEL_NET.hosts())
    nodes: list[Node] = [Node("core", "core", ns("core"), None, None, None, None)]
    v6 = scenario.uses_ipv6
    for n, registry in enumerate(scenario.registry_names, start=1):
        core_side, registry_side = list(registry_net(n).hosts())
        net6 = registry_net6(n)
        nodes.append(Node(
            registry, "registry", ns(registry), "core", link_name(prefix, "core"),
            IPv4If(f"{registry_side}/30"), core_side, scenario.registry_link,
            ifname=f"{prefix}-{short(registry)}", tunnel_ip=registry_tunnel_ip(n),
            public_ip=registry_side, address6=IPv6If(f"{net6[2]}/64") if v6 else None,
            gateway6=net6[1] if v6 else None,
        ))
    registry_ips = {node.tunnel_ip for node in nodes}
    nat_numbers = iter(range(1, 256))

    def add(site: Host | Nat, parent: Node, address: IPv4If, gateway: IPv4,
            chain: tuple[Node, ...], v6: tuple[IPv6If, IPv6] | None) -> None:
        # chain[0] is the outermost NAT, whose public address is its own uplink address.
        public = chain[0].public_ip if chain else address.ip
        node = Node(site.name, "host", ns(site.name), parent.name, link_name(prefix, parent.name),
                    address, gateway, site.link, public_ip=public,
                    nat_chain=tuple(n.name for n in reversed(chain)),
                    address6=None if v6 is None else v6[0], gateway6=None if v6 is None else v6[1])
        if isinstance(site, Host):
            if site.wireguard:
                tunnel_ip = next(tunnel_ips, None)
                if tunnel_ip is None or tunnel_ip in registry_ips:
                    raise LabError(f"lab: too many WireGuard hosts for {TUNNEL_NET}")
                node = replace(node, ifname=f"{prefix}-{site.name}", tunnel_ip=tunnel_ip,
                               registries=site.registries or scenario.registry_names)
            nodes.append(node)
            return
        number = next(nat_numbers, None)
        if number is None:
            raise LabError("lab: at most 255 NAT routers")
        carrier = any(isinstance(child, Nat) for child in site.inside)
        lan_net = ipaddress.IPv4Network(f"{'100.64' if carrier else '192.168'}.{number}.0/24")
        if len(site.inside) > 254 - FIRST_CHILD:
            raise LabError(f"lab: NAT {site.name!r}: too many nodes behind it")
        lan6 = lan_net6(number) if site.ipv6 else None
        router = replace(node, role="nat", kind=site.kind, hairpin=site.hairpin,
                         portmap=site.portmap, udp_timeout_s=site.udp_timeout_s,
                         lan=IPv4If(f"{lan_net[1]}/24"),
                         lan6=None if lan6 is None else IPv6If(f"{lan6[1]}/64"), ipv6=site.ipv6)
        nodes.append(router)
        for i, child in enumerate(site.inside):
            add(child, router, IPv4If(f"{lan_net[FIRST_CHILD + i]}/24"), lan_net[1],
                (*chain, router),
                None if lan6 is None or isinstance(child, Nat)
                else (IPv6If(f"{lan6[FIRST_CHILD + i]}/64"), lan6[1]))

    for k, site in enumerate(sites):
        link = list(PUBLIC_POOLS[k // 64].subnets(new_prefix=30))[k % 64]
        core_ip, site_ip = list(link.hosts())
        link6 = uplink_net6(k)
        add(site, nodes[0], IPv4If(f"{site_ip}/30"), core_ip, (),
            (IPv6If(f"{link6[2]}/64"), link6[1]) if site.ipv6 else None)

    result = Plan(prefix, scenario, tuple(nodes))
    for node in result.nodes:
        for name in (node.uplink, node.ifname, result.bridge()):
            if name and len(name) > IFNAME_MAX:
                raise LabError(f"lab: interface name {name!r} is longer than {IFNAME_MAX}")
    return result
