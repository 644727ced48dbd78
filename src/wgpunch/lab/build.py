"""Commands that turn a plan into namespaces, links, addresses, routes and NAT rules.

Each namespace is configured by one `ip -n NS -batch -` process, parents first: a parent
creates the veth pair toward each child with the child's end moved straight into the child's
namespace (`link add X type veth peer name Y netns CHILD`), so no interface ever exists in
the root namespace. Generating the command lists is pure (`topology_batches`); `apply_*` run
them.
"""

from __future__ import annotations

from .nat import ruleset
from .netns import Namespace
from .topology import Node, Plan

# Per-namespace sysctls, set before any interface exists (`default` applies to new ones).
# IPv6 is off: the lab is IPv4, and link-local chatter (DAD, router solicitations, MLD) would
# only clutter captures.
SYSCTL_ALL = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
SYSCTL_ROUTER = ("net.ipv4.ip_forward=1",)
# A NAT's LAN is a bridge; with br_netfilter (built into this kernel) bridged LAN traffic would
# also cross the IP hooks and the NAT rules. A home router's switch does not do that.
SYSCTL_BRIDGE = ("net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-arptables=0")


def sysctls(node: Node) -> list[str]:
    values = list(SYSCTL_ALL)
    if node.forwards:
        values += SYSCTL_ROUTER
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
        children = plan.children(node.name)
        if node.role == "nat" and children:
            commands += [f"link add {plan.bridge()} type bridge",
                         f"address add {node.lan} dev {plan.bridge()}",
                         f"link set {plan.bridge()} up"]
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
            commands.append(f"link set {port} up")
        batches.append((node.ns, commands))
        batches += wires
    return batches


def wire_namespaces(plan: Plan) -> list[tuple[Node, str]]:
    return [(node, plan.wire_ns(node)) for node in plan.nodes if node.impairment.active]


def apply_topology(plan: Plan) -> None:
    spaces = [Namespace(node.ns) for node in plan.nodes]
    spaces += [Namespace(wire) for _, wire in wire_namespaces(plan)]
    for ns in spaces:
        ns.add()
    for node in plan.nodes:
        Namespace(node.ns).run(["sysctl", "-qw", *sysctls(node)])
    for _, wire in wire_namespaces(plan):
        Namespace(wire).run(["sysctl", "-qw", *SYSCTL_ALL])
    for name, commands in topology_batches(plan):
        Namespace(name).ip_batch(commands)
    for node in plan.nodes:
        if node.role == "nat":
            script = ruleset(node.kind or "", plan.nat_interfaces(node), hairpin=node.hairpin,
                             portmap=node.portmap, udp_timeout_s=node.udp_timeout_s)
            Namespace(node.ns).run(["nft", "-f", "-"], input=script)
