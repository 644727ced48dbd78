"""Dual-stack pairs go direct over IPv6, through the stateful firewalls of both home routers,
and a pair where one side has no IPv6 stays on IPv4: real registry and node processes in the
lab (scenarios `dual-fw`, `dual-open`, `dual-one`), `wg` as the judge."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from labstatus import peer_status
from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import python_module, wait_for

pytestmark = pytest.mark.lab

DEADLINE_S = 10.0


def wg_endpoint(lab: Lab, host: str, peer: str) -> str:
    """The peer's endpoint as `wg show IF endpoints` prints it in `host`."""
    ifname, key = lab.host(host).ifname, lab.host(peer).public_key
    assert ifname is not None and key is not None
    out = lab.exec(host, ["wg", "show", ifname, "endpoints"]).stdout
    [endpoint] = [line.split("\t")[1] for line in out.splitlines()
                  if line.split("\t")[0] == key.base64()]
    return endpoint


def connect(lab: Lab, agents: Agents) -> evidence.Pair:
    agents.start_registry()
    agents.start_nodes()
    [(pair, took)] = asyncio.run(evidence.wait_direct(
        lab, DEADLINE_S, check=agents.check_alive)).values()
    assert took is not None, pair
    return pair


@pytest.mark.parametrize("scenario", ["dual-fw", "dual-open", "dual-symmetric"])
def test_a_dual_stack_pair_goes_direct_over_ipv6(lab_prefix, scenario):
    """In dual-fw each router's firewall drops what nobody inside asked for, so the initiation
    gets in only after the other side's opener from its WireGuard port went out. In
    dual-symmetric both IPv4 NATs map per destination (a relay there), and IPv6 goes around
    them: no relay asked for, none shown as needed."""
    with Lab(catalog.resolve(scenario), prefix=lab_prefix) as lab, Agents(lab) as agents:
        a, b = lab.host("a"), lab.host("b")
        assert a.public_ip6 is not None and b.public_ip6 is not None
        pair = connect(lab, agents)
        assert pair.ipv6, pair
        for host, peer in (("a", b), ("b", a)):
            shown = wg_endpoint(lab, host, peer.name)
            assert shown == f"[{peer.public_ip6}]:{peer.listen_port}", (host, shown)
            lab.exec(host, ["ping", "-c", "1", "-W", "2", str(peer.tunnel_ip)])
            # The agent publishes on its next pass after the handshake: poll, not one read.
            status = wait_for(lambda h=host, p=peer.name: (s := peer_status(lab, h, p))["path"]
                              == "direct" and s, timeout=5, what=f"{host}'s status")
            assert status["endpoint"] == shown and status["needs_relay"] is None, status
            argv, env = python_module("wgpunch.cli", "status", "--interface",
                                      str(lab.host(host).ifname))
            table = lab.ns(host).run(argv, env=env).stdout
            assert "direct (IPv6) for" in table and shown in table, table


@pytest.mark.parametrize("scenario", ["dual-one", "dual-blocked"])
def test_a_pair_without_ipv6_on_both_sides_goes_over_ipv4(lab_prefix, scenario):
    """dual-one: b has no IPv6. dual-blocked: b's router lets no UDP in over IPv6, so the
    first attempt (IPv6) gets no handshake, and the next goes to the IPv4 endpoints."""
    with Lab(catalog.resolve(scenario), prefix=lab_prefix) as lab, Agents(lab) as agents:
        if scenario == "dual-one":
            assert lab.host("a").public_ip6 is not None and lab.host("b").public_ip6 is None
        pair = connect(lab, agents)
        assert not pair.ipv6, pair
        for host, peer in (("a", "b"), ("b", "a")):
            shown = wg_endpoint(lab, host, peer)
            assert ipaddress.ip_address(shown.rpartition(":")[0]).version == 4, (host, shown)
            lab.exec(host, ["ping", "-c", "1", "-W", "2", str(lab.host(peer).tunnel_ip)])


def test_the_demo_table_says_where_an_ipv6_endpoint_leads():
    from wgpunch.demo import PairResult, render

    text = render([PairResult("a", "b", True, "direct", 0.1, "[2001:db8:2::a]:51820",
                              "198.51.100.2:51820", "198.51.100.6", "198.51.100.2", 1.0, 0.5)])
    assert "[2001:db8:2::a]:51820 (b's IPv6, no NAT)" in text
    assert "198.51.100.2:51820 (a's NAT: 198.51.100.2)" in text
