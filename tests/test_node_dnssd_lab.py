"""A node following DNS-SD instead of the HTTP API (`wgpunch node --dns-sd`), against the
registry's wgsd-compatible server, in the `easy` lab: the pair goes direct, and `--once`
does one pass for cron."""

from __future__ import annotations

import asyncio

import pytest

from wgpunch.keys import generate_keypair
from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import python_module

pytestmark = pytest.mark.lab

DNS_PORT = 5353
ZONE = "mesh.internal."
REGISTRY_ARGS = ["--dns", str(DNS_PORT), "--zone", ZONE]
DNS_SD = ["--dns-sd", f"10.99.0.254:{DNS_PORT}", "--zone", ZONE]
DIRECT_DEADLINE_S = 15.0  # each side polls every second here and tries on its own


def test_nodes_following_dns_sd_go_direct(lab_prefix):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix) as lab, \
            Agents(lab, registry_args=REGISTRY_ARGS,
                   node_args=[*DNS_SD, "--interval", "1"]) as agents:
        agents.start_registry()
        for host in ("a", "b"):  # no --registry: a wgsd server need not be a known peer
            agents.start_node(host, registry_key=False)
        (pair, took), = asyncio.run(evidence.wait_direct(
            lab, DIRECT_DEADLINE_S, check=agents.check_alive)).values()
        assert took is not None, f"not direct: {pair}"
        following = {e["msg"] for e in agents.events("a") if e["event"] == "registry_connected"}
        assert following == {f"dns-sd 10.99.0.254:{DNS_PORT} zone {ZONE}: polling every 1 s"}
        print(f"dns-sd: direct after {took:.2f} s")


def test_once_sets_endpoints_and_says_how_it_went(lab_prefix):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix) as lab, \
            Agents(lab, registry_args=REGISTRY_ARGS) as agents:
        agents.start_registry()
        # A peer the registry has never heard of: no record, which is not a failure.
        stranger = generate_keypair()[1].base64()
        lab.ns("a").run(["wg", "set", lab.host("a").ifname, "peer", stranger,
                         "allowed-ips", "10.99.9.9/32"])
        codes = {}
        for host in ("a", "b"):
            argv, env = python_module("wgpunch.cli", "node", "--interface",
                                      lab.host(host).ifname, *DNS_SD, "--once")
            codes[host] = lab.ns(host).run(argv, env=env, check=False).returncode
        assert codes == {"a": 0, "b": 0}
        (pair, took), = asyncio.run(evidence.wait_direct(lab, 5.0)).values()
        assert took is not None, f"not direct after both --once passes: {pair}"
        # Nobody answers at this address: every lookup fails, and --once says so.
        argv, env = python_module("wgpunch.cli", "node", "--interface", lab.host("a").ifname,
                                  "--dns-sd", "10.99.0.254:5354", "--zone", ZONE, "--once")
        failed = lab.ns("a").run(argv, env=env, check=False)
        assert failed.returncode == 1 and "no answer" in failed.stderr
