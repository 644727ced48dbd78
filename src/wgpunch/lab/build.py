"""Commands that turn a plan into namespaces, links, addresses, routes and NAT rules.

Each namespace is configured by one `ip -n NS -batch -` process, parents first: a parent
creates the veth pair toward each child with the child's end moved straight into the child's
namespace (`link add X type veth peer name Y netns CHILD`), so no interface ever exists in
the root namespace. Generating the command lists is pure (`topology_batches`); `apply_*` run
them.
"""

from __future__ import annotations

from .ipv6 import firewall6
from .nat import ruleset
from .netns import Namespace
from .topology import Node, Plan

# Per-namespace sysctls, set before any interface exists (`default` applies to new ones).
# IPv6 is off where a scenario gives a namespace no IPv6 address: link-local chatter (DAD,
# router solicitations, MLD) would only clutter captures, and a host without IPv6 must not
# have it. Where it is on, no address does duplicate address detection: nothing else claims
# them, and while a link-local address is tentative, neighbour discovery waits (measured: the
# first pings across the lab took 0.6-0.8 s, or were lost, with it).
SYSCTL_ALL = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
SYSCTL_V6 = ("net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
             "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
SYSCTL_ROUTER = ("net.ipv4.ip_forward=1",)
SYSCTL_ROUTER_V6 = ("net.ipv6.conf.all.forwarding=1",)
# A NAT's LAN is a bridge; with br_netfilter (built into this kernel) bridged LAN traffic would
# also cross the IP hooks and the NAT rules. A home router's switch does not do that.
SYSCTL_BRIDGE = ("net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-arptables=0")


def sysctls(node: Node, plan: Plan) -> list[str]:
    v6 = node.address6 is not None or (
        node.role == "core" and any(child.address6 for child in plan.children(node.name)))
    values = list(SYSCTL_V6 if v6 else SYSCTL_ALL)
    if node.forwards:
        values += SYSCTL_ROUTER
    if node.forwards and v6:
        values += SYSCTL_ROUTER_V6
    if node.role == "nat":
        values += SYSCTL_BRIDGE
    return values


def topology_batches(plan: Plan) -> list[tuple[str, list[str]]]:
    """(namespace, ip batch commands) in the order they must run."""
    batches: list[tuple[str, list[str]]] = []
    for node in plan.nodes:
        commands: list[str] = []
        if node.uplink:
            commands += [f"address add {node.address} dev {node.uplink}",
                         f"link set {node.uplink} up",
                         f"route add default via {node.gateway}"]
        if node.uplink and node.address6:
            commands += [f"address add {node.address6} dev {node.uplink}",
                         f"route add ::/0 via {node.gateway6}"]
        children = plan.children(node.name)
        if node.role == "nat" and children:
            commands += [f"link add {plan.bridge()} type bridge",
                         f"address add {node.lan} dev {plan.bridge()}",
                         f"link set {plan.bridge()} up"]
            if node.lan6:
                commands.append(f"address add {node.lan6} dev {plan.bridge()}")
        wires = []
        for child in children:
            port = plan.ifname_toward(child.name)
            if child.impairment.active:
                wire = plan.wire_ns(child)
                commands.append(
                    f"link add {port} type veth peer name {plan.prefix}_up netns {wire}")
                wires.append((wire, [
                    f"link set {plan.prefix}_up up",
                    f"link add {plan.prefix}_down type veth peer name "
                    f"{plan.ifname_toward(node.name)} netns {child.ns}",
                    f"link set {plan.prefix}_down up",
                ]))
            else:
                commands.append(f"link add {port} type veth peer name "
                                f"{plan.ifname_toward(node.name)} netns {child.ns}")
            if node.role == "nat":
                commands.append(f"link set {port} master {plan.bridge()}")
            elif child.gateway is not None:  # the core: one /30 per child
                assert child.address is not None
                commands.append(f"address add {child.gateway}/{child.address.network.prefixlen} "
                                f"dev {port}")
                if child.address6 is not None:  # and one /64
                    commands.append(f"address add {child.gateway6}/64 dev {port}")
            commands.append(f"link set {port} up")
        batches.append((node.ns, commands))
        batches += wires
    # Last: a route's gateway must be on a link that has its carrier (both ends up).
    core = plan.node("core")
    batches.append((core.ns, [f"route add {child.lan6.network} via {child.address6.ip}"
                              for child in plan.children("core")
                              if child.lan6 is not None and child.address6 is not None]))
    return batches


def wire_namespaces(plan: Plan) -> list[tuple[Node, str]]:
    return [(node, plan.wire_ns(node)) for node in plan.nodes if node.impairment.active]


def apply_topology(plan: Plan) -> None:
    spaces = [Namespace(node.ns) for node in plan.nodes]
    spaces += [Namespace(wire) for _, wire in wire_namespaces(plan)]
    for ns in spaces:
        ns.add()
    for node in plan.nodes:
        Namespace(node.ns).run(["sysctl", "-qw", *sysctls(node, plan)])
    for _, wire in wire_namespaces(plan):
        Namespace(wire).run(["sysctl", "-qw", *SYSCTL_ALL])
    for name, commands in topology_batches(plan):
        Namespace(name).ip_batch(commands)
    for node in plan.nodes:
        if node.role == "nat":
            script = ruleset(node.kind or "", plan.nat_interfaces(node), hairpin=node.hairpin,
                             portmap=node.portmap, udp_timeout_s=node.udp_timeout_s)
            Namespace(node.ns).run(["nft", "-f", "-"], input=script)
        firewall = None if node.ipv6 is None else firewall6(
            node.ipv6, f"{plan.prefix}_fw6", plan.bridge())
        if firewall is not None:
            Namespace(node.ns).run(["nft", "-f", "-"], input=firewall)
