"""`Lab`: build a scenario, drive its hosts, tear it all down.

    with Lab(catalog.resolve("easy")) as lab:
        a = lab.host("a")
        lab.exec("a", ["ping", "-c1", str(lab.host("b").tunnel_ip)])

`with` always tears down (exception, KeyboardInterrupt included). `build()` alone leaves the
lab running for `wgpunch lab up`; a failed or interrupted `build()` removes what it built.
`state.remove(prefix)` removes a lab later, from any process.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import LabError
from ..keys import Key, generate_keypair
from . import portmap, state
from .build import apply_topology, wire_namespaces
from .nat import check_kind, ruleset
from .netns import Namespace, WireguardGo, python_module, read_line, require_root
from .scenario import Scenario
from .topology import LISTEN_PORT, TUNNEL_NET, Node, Plan, plan
from .wgconf import device_config

DAEMON_START_S = 10.0  # wireguard-go and wire processes: start-up takes ~0.1 s here


@dataclass(frozen=True)
class LabHost:
    """A host (or the registry) of a running lab."""

    name: str
    ns: Namespace
    ifname: str | None  # None: a plain host without WireGuard
    public_key: Key | None
    tunnel_ip: IPv4Address | None
    listen_port: int | None
    public_ip: IPv4Address  # where the internet sees it
    private_ip: IPv4Address | None  # its LAN address behind a NAT
    nat: str | None  # kind of the NAT right in front of it
    nat_chain: tuple[str, ...]  # names of the NAT routers in front, nearest first
    node: Node
    public_ip6: IPv6Address | None = None  # its global IPv6 address (never NATed); None: none


class Lab:
    def __init__(self, scenario: Scenario, *, prefix: str | None = None,
                 registry_peer: bool = True) -> None:
        self.prefix = state.check_prefix(prefix) if prefix else state.random_prefix()
        self.scenario = scenario
        self.registry_peer = registry_peer
        self.plan: Plan = plan(scenario, self.prefix)  # validates names before root is needed
        self.hosts: dict[str, LabHost] = {}
        self._daemons: list[WireguardGo] = []
        self._wires: list[subprocess.Popen] = []
        self._helpers: list[subprocess.Popen] = []  # STUN responder, miniupnpd
        self._dir: Path | None = None
        self._built = False

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def build(self) -> Lab:
        if self._built:
            raise LabError(f"lab {self.prefix}: already built")
        require_root()
        self._dir = state.claim(self.prefix)
        self._built = True
        try:
            # Named at once, so `lab list` can tell what a half-built or killed lab was.
            self._write_description({"prefix": self.prefix, "scenario": self.scenario.name})
            apply_topology(self.plan)
            self._start_wires()
            self._start_portmap()
            self._start_wireguard()
            self._write_description(self.describe())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove everything of this lab (idempotent)."""
        if not self._built:
            return
        for daemon in self._daemons:
            daemon.stop()
        for wire in self._wires + self._helpers:
            if wire.poll() is None:
                wire.terminate()
        state.remove(self.prefix)
        for wire in self._wires + self._helpers:  # reap them; their namespace is gone too
            if wire.stdout:
                wire.stdout.close()
            wire.wait(timeout=5)
        self._daemons, self._wires, self._helpers = [], [], []
        self._built = False

    # -- use -------------------------------------------------------------------------------

    def host(self, name: str) -> LabHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"lab {self.prefix}: no host {name!r} "
                           f"(hosts: {', '.join(self.hosts)})") from None

    def ns(self, name: str) -> Namespace:
        """The namespace of any node (host, NAT router, `core`, `registry`)."""
        return Namespace(self.plan.node(name).ns)

    def exec(self, name: str, argv: Sequence[str], *, check: bool = True,
             timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside a node's namespace and return its output."""
        return self.ns(name).run(argv, check=check, timeout=timeout)

    def flush_conntrack(self, nat: str) -> None:
        """NAT router `nat` forgets every flow, as after a reboot: nothing inbound passes
        until the inside sends again."""
        self.exec(nat, ["conntrack", "-F"])

    def forget_mappings(self, nat: str) -> None:
        """Like `flush_conntrack`, and the NAT's own mapping tables go too: an `eim-port`
        NAT then maps the next flow to a new random outside port (a NAT rebinding)."""
        # Nothing is forwarded while it forgets, as in a reboot. A packet passing between the
        # conntrack flush and the map flush would otherwise map a new flow through the old
        # entry, and the flow's next packet after the map flush would write it back: a host
        # sending every millisecond kept its outside port through 10 forgets of 10, every
        # 10 ms through 5 of 10. Issue 18: in 3 of ~150 runs of bench/time_to_direct.py
        # forget one side kept its port (its agent's NAT probes were under way), and the run
        # waited in vain for the new port it measures. The maps go and forwarding resumes in
        # one transaction, so the hold lasts no longer than the conntrack flush.
        table, hold = f"{self.prefix}_nat", f"{self.prefix}_hold"
        listed = self.exec(nat, ["nft", "list", "maps", "ip"]).stdout
        ours = next((block for block in listed.split("table ip ")[1:]
                     if block.startswith(f"{table} ")), "")
        flush = "".join(f"flush map ip {table} {name}\n" for name in ("outbound", "inbound")
                        if f"map {name} {{" in ours)
        self.ns(nat).run(["nft", "-f", "-"], input=(
            f"table ip {hold} {{ chain hold {{ type filter hook forward priority -300; "
            "policy drop; }; }\n"))
        try:
            self.flush_conntrack(nat)
        finally:
            self.ns(nat).run(["nft", "-f", "-"], input=f"{flush}delete table ip {hold}\n")

    def set_nat_kind(self, router: str, kind: str) -> None:
        """Make NAT router `router` one of `kind` in place, as a router applying a new NAT
        configuration does: its own nftables table is rewritten in one transaction (nothing
        else is touched, its port mapping service included), and it forgets the flows it
        translated (conntrack; its mapping maps go with the old table). Without that, every
        flow it already translates, WireGuard's own and each later packet of one, would keep
        the old kind's mapping for as long as it is used."""
        node = self.plan.node(router)
        if node.role != "nat":
            raise LabError(f"lab {self.prefix}: {router!r} is no NAT router")
        check_kind(kind)
        table = self.plan.nat_interfaces(node).table
        script = ruleset(kind, self.plan.nat_interfaces(node), hairpin=node.hairpin,
                         portmap=node.portmap, udp_timeout_s=node.udp_timeout_s)
        self.ns(router).run(["nft", "-f", "-"],
                            input=f"table ip {table} {{}}\ndelete table ip {table}\n{script}")
        self.flush_conntrack(router)
        self.hosts = {name: replace(host, nat=kind) if host.nat_chain[:1] == (router,) else host
                      for name, host in self.hosts.items()}

    def describe(self) -> dict[str, Any]:
        return describe(self.plan, self.hosts)

    # -- building --------------------------------------------------------------------------

    def _write_description(self, description: dict[str, Any]) -> None:
        assert self._dir is not None
        (self._dir / "lab.json").write_text(json.dumps(description, indent=2) + "\n")

    def _start_wires(self) -> None:
        for node, wire in wire_namespaces(self.plan):
            imp = node.impairment
            argv, env = python_module(
                "wgpunch.lab.wire", f"{self.prefix}_up", f"{self.prefix}_down",
                "--delay-ms", str(imp.delay_ms), "--jitter-ms", str(imp.jitter_ms),
                "--loss-pct", str(imp.loss_pct),
            )
            self._wires.append(Namespace(wire).popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, start_new_session=True,
            ))
        for proc, (node, _) in zip(self._wires, wire_namespaces(self.plan), strict=True):
            line = read_line(proc, timeout=DAEMON_START_S, what=f"the wire of {node.name}")
            if line != "ready":
                raise LabError(f"lab: the wire of {node.name} said {line!r}")

    def _start_portmap(self) -> None:
        """The STUN responder on the registry host, then miniupnpd in each NAT that maps."""
        routers = [node for node in self.plan.nodes if node.role == "nat" and node.portmap]
        if not routers:
            return
        assert self._dir is not None
        registry = self.plan.node("registry")
        assert registry.public_ip is not None
        argv, env = python_module("wgpunch.lab.stun", str(registry.public_ip),
                                  str(portmap.STUN_PORT))
        stun = Namespace(registry.ns).popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self._helpers.append(stun)
        line = read_line(stun, timeout=DAEMON_START_S, what="the STUN responder")
        if line != "ready":
            raise LabError(f"lab: the STUN responder said {line!r}")
        for router in routers:
            self._helpers.append(portmap.start(
                Namespace(router.ns), self.prefix, router.name,
                self.plan.nat_interfaces(router), registry.public_ip, self._dir))

    def _start_wireguard(self) -> None:
        assert self._dir is not None
        nodes = self.plan.wireguard_hosts
        keys = {node.name: generate_keypair() for node in nodes}
        public = {name: pair[1] for name, pair in keys.items()}
        for node in nodes:
            assert node.ifname
            daemon = WireguardGo(Namespace(node.ns), node.ifname,
                                 log=self._dir / f"{node.ifname}.log")
            self._daemons.append(daemon)
            daemon.launch()
        for daemon in self._daemons:
            daemon.wait_ready(DAEMON_START_S)
        # The registry first: a node's first handshake goes out as soon as its device is up,
        # and one the registry cannot answer yet is retried only 5 s later.
        for node in sorted(nodes, key=lambda n: n.role != "registry"):
            conf = self._dir / f"{node.name}.conf"
            conf.touch(mode=0o600)
            conf.write_text(device_config(self.plan, node, keys[node.name][0], public,
                                         registry_peer=self.registry_peer))
            ns = Namespace(node.ns)
            assert node.ifname
            ns.run(["wg", "setconf", node.ifname, str(conf)])
            ns.ip_batch([f"address add {node.tunnel_ip}/{TUNNEL_NET.prefixlen} dev {node.ifname}",
                         f"link set {node.ifname} up"])
        for node in self.plan.nodes:
            if node.role in ("host", "registry"):
                self.hosts[node.name] = _lab_host(self.plan, node, public.get(node.name))


def _lab_host(lab_plan: Plan, node: Node, key: Key | None) -> LabHost:
    return LabHost(
        name=node.name, ns=Namespace(node.ns), ifname=node.ifname, public_key=key,
        tunnel_ip=node.tunnel_ip, listen_port=LISTEN_PORT if node.ifname else None,
        public_ip=node.public_ip or IPv4Address(0), private_ip=node.private_ip,
        nat=lab_plan.node(node.nat_chain[0]).kind if node.nat_chain else None,
        nat_chain=node.nat_chain, node=node, public_ip6=node.public_ip6,
    )


def describe(lab_plan: Plan, hosts: dict[str, LabHost]) -> dict[str, Any]:
    """The lab as JSON-ready data (`wgpunch lab up --json`); no private keys."""

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    host_rows = []
    for host in hosts.values():
        host_rows.append({
            "name": host.name, "namespace": host.ns.name, "interface": host.ifname,
            "public_key": host.public_key.base64() if host.public_key else None,
            "tunnel_ip": text(host.tunnel_ip), "listen_port": host.listen_port,
            "public_ip": text(host.public_ip), "private_ip": text(host.private_ip),
            "nat": host.nat,
            "nat_chain": list(host.nat_chain),
            "public_ip6": text(host.public_ip6),
        })
    nat_rows = [{
        "name": node.name, "namespace": node.ns, "kind": node.kind, "hairpin": node.hairpin,
        "portmap": node.portmap, "udp_timeout_s": node.udp_timeout_s, "ipv6": node.ipv6,
        "public_ip": text(node.address.ip if node.address else None),
        "lan": text(node.lan.network if node.lan else None),
        "behind": node.parent if node.parent != "core" else None,
    } for node in lab_plan.nodes if node.role == "nat"]
    return {
        "prefix": lab_plan.prefix, "scenario": lab_plan.scenario.name,
        "description": lab_plan.scenario.description, "tunnel_net": str(TUNNEL_NET),
        "hosts": host_rows, "nats": nat_rows,
    }
