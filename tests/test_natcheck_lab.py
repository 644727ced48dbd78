"""NAT behaviour known, not guessed (issue 13), in the lab with real processes: `wgpunch
netcheck` names every lab NAT kind as src/wgpunch/lab/nat.py builds it, the node agents
measure and report the same, and the cells that were direct only by key-order luck
(full-cone x symmetric, eim-addr x symmetric) go direct in both key orders, `wg` the judge.

One lab for all of it: a host per kind, two more hosts each behind full-cone, eim-addr and
symmetric NATs whose keys are handed out so that every such cell occurs with the cone side's
key both below and above the symmetric side's, and one behind a symmetric NAT whose router
runs miniupnpd (netcheck finds NAT-PMP, PCP and UPnP-IGD there, and nothing elsewhere). The
registry has a second public address, so filtering is told exactly (--natprobe-alt-address).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from labstatus import device_status
from test_protocol_roles import KINDS
from wgpunch.keys import generate_keypair
from wgpunch.lab import catalog, evidence
from wgpunch.lab import lab as lab_module
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import python_module, wait_for
from wgpunch.lab.scenario import Host, Nat, Scenario
from wgpunch.lab.topology import REGISTRY_NET

pytestmark = pytest.mark.lab

SECOND_ADDRESS = "192.0.2.66"  # outside REGISTRY_NET, routed to the registry by the core
HOSTS = {"u1": "public", "e1": "eim", "p1": "eim-port", "c1": "collision",
         "f1": "eim-full-cone", "f2": "eim-full-cone", "r1": "eim-addr", "r2": "eim-addr",
         "s1": "symmetric", "s2": "symmetric"}
# Key order among the agents' hosts, lowest first: f1 and r1 below s1, f2 and r2 above s2.
KEY_ORDER = ("s2", "f1", "r1", "s1", "f2", "r2")
CELLS = (("f1", "s1"), ("f2", "s2"), ("r1", "s1"), ("r2", "s2"))
DIRECT_S = 20.0


def ordered_keys(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab's key generator, handing out real keys so that KEY_ORDER holds."""
    names = [node.name for node in lab.plan.wireguard_hosts]
    pairs = sorted((generate_keypair() for _ in names), key=lambda pair: pair[1].raw)
    ranked = [*KEY_ORDER, *(n for n in names if n not in KEY_ORDER)]
    by_name = dict(zip(ranked, pairs, strict=True))
    handed = iter([by_name[name] for name in names])
    monkeypatch.setattr(lab_module, "generate_keypair", lambda: next(handed))


def netcheck(lab: Lab, host: str) -> dict:
    registry = lab.host("registry").public_key
    assert registry is not None
    argv, env = python_module("wgpunch.cli", "netcheck", "--json", "--interface",
                              lab.host(host).ifname or "", "--registry", registry.base64())
    return json.loads(lab.ns(host).run(argv, env=env, timeout=30).stdout)


def test_netcheck_names_every_kind_and_the_symmetric_cells_go_direct_in_both_key_orders(
        lab_prefix, monkeypatch):
    sites = (*(catalog.site(h, kind) for h, kind in HOSTS.items()),
             Nat("nm1", "symmetric", (Host("m1"),), portmap=True))  # miniupnpd on the router
    scenario = Scenario("natcheck", sites, description="a host per NAT kind, two more per "
                        "cone and symmetric, one behind a symmetric NAT with port mapping")
    lab = Lab(scenario, prefix=lab_prefix)
    ordered_keys(lab, monkeypatch)
    with lab, Agents(lab, registry_args=["--natprobe-alt-address", SECOND_ADDRESS]) as agents:
        lab.ns("registry").run(["ip", "address", "add", f"{SECOND_ADDRESS}/32", "dev", "lo"])
        lab.ns("core").run(["ip", "route", "add", f"{SECOND_ADDRESS}/32", "via",
                            str(REGISTRY_NET[2])])
        agents.start_registry()
        agents.start_nodes(KEY_ORDER)
        keys = {h: lab.host(h).public_key for h in KEY_ORDER}
        for cone, symmetric in CELLS:
            assert keys[cone] is not None and keys[symmetric] is not None
        assert keys["f1"].raw < keys["s1"].raw and keys["s2"].raw < keys["f2"].raw

        # Both cells in both key orders, `wg` the judge.
        start = time.monotonic()
        while True:
            agents.check_alive()
            found = {(p.a.host, p.b.host): p
                     for p in evidence.pairs(lab, asyncio.run(evidence.read_devices(lab)))}
            cells = {cell: found.get(cell) or found[cell[::-1]] for cell in CELLS}
            if all(pair.direct for pair in cells.values()):
                break
            assert time.monotonic() - start < DIRECT_S, {
                cell: pair for cell, pair in cells.items() if not pair.direct}
            time.sleep(0.1)  # poll interval, bounded by the deadline above

        # What the agents measured and reported (their log's nat_measured event).
        for host in KEY_ORDER:
            measured = wait_for(
                lambda h=host: [e for e in agents.events(h) if e.get("event") == "nat_measured"],
                timeout=5, what=f"{host}'s NAT measurement")
            want = KINDS[HOSTS[host]].to_json()
            assert {k: measured[-1][k] for k in want} == want, (host, measured)

        # status: each node's NAT, and why symmetric x symmetric cannot go direct.
        s2 = lab.host("s2").public_key
        assert s2 is not None

        def s1_on_s2() -> dict | None:
            device = device_status(lab, "s1")
            [peer] = [p for p in device["peers"] if p["public_key"] == s2.base64()]
            return (device, peer) if peer["nat"] is not None else None

        device, peer = wait_for(s1_on_s2, timeout=5, what="s1's status to show s2's NAT")
        assert device["agent"]["nat"] == KINDS["symmetric"].to_json()
        assert peer["nat"] == KINDS["symmetric"].to_json()
        assert peer["needs_relay"] == "both NATs map per destination: needs a relay", peer

        # netcheck, from every host.
        for host, kind in HOSTS.items():
            got = netcheck(lab, host)
            want = KINDS[kind]
            assert (got["mapping"], got["filtering"], got["port_preserved"]) == (
                want.mapping, want.filtering, want.port_preserved), (host, kind, got)
            assert got["public_endpoint"] is not None, got
            assert got["ipv6"] == {"global_address": False, "registry_over_ipv6": None}
            assert not any(got["port_mapping"][p] for p in ("nat_pmp", "pcp", "upnp_igd"))
            if kind != "public":  # the lab's NATs do not hairpin unless asked to
                assert got["hairpin"] is False, got
            assert got["meaning"], got

        # Behind a router that runs miniupnpd: all three port-mapping protocols answer.
        got = netcheck(lab, "m1")
        assert got["mapping"] == "address-and-port-dependent", got
        assert got["port_mapping"] == {"gateway": str(lab.plan.node("nm1").lan.ip),
                                       "nat_pmp": True, "pcp": True, "upnp_igd": True}, got
        assert any("port mapping" in line for line in got["meaning"]), got
