"""Hosts behind one NAT reach each other on their LAN (the `lan` candidate), with or without
hairpinning: real registry and node processes in the lab, `wg` as the judge."""

from __future__ import annotations

import asyncio

import pytest

from labstatus import peer_status
from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for

pytestmark = pytest.mark.lab

DEADLINE_S = 10.0


@pytest.mark.parametrize(("scenario", "paths"), [
    ("same-nat", ("lan",)),
    # A NAT that hairpins also carries the public path, which may win the race with the LAN
    # candidate (a live path is kept: decide.py); either is a direct path.
    ("hairpin", ("lan", "direct")),
])
def test_hosts_behind_one_nat_use_their_lan(lab_prefix, scenario, paths):
    """same-nat was never connected before (0 of 3 runs): the second host's port is remapped
    and the NAT does not hairpin. Both ends' devices hold the other's LAN address, and
    `status` says `lan`."""
    with Lab(catalog.resolve(scenario), prefix=lab_prefix) as lab, Agents(lab) as agents:
        agents.start_registry()
        agents.start_nodes()
        [(pair, took)] = asyncio.run(evidence.wait_direct(
            lab, DEADLINE_S, check=agents.check_alive, lan_ok=True)).values()
        assert took is not None and pair.path in paths, pair
        if pair.path == "lan":
            assert str(pair.a.endpoint.ip) == str(lab.host("b").private_ip), pair
        for host, peer in (("a", "b"), ("b", "a")):
            # The agent publishes on its next pass after the handshake: poll, not one read.
            shown = wait_for(lambda h=host, p=peer: (s := peer_status(lab, h, p))["path"]
                             == pair.path and s, timeout=5, what=f"{host}'s status")
            assert shown["path_since"] is not None, shown
