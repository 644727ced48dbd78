"""The `collision` scenario with the real processes: a and b behind Linux routers that keep
conntrack state for unsolicited packets (no input filter). A direct path there needs the
non-initiator's opener to pass its own NAT before the initiator's initiation arrives, and to
die before the initiator's NAT (DESIGN.md §3). Both with the default configuration: the
opener TTL is measured (node/punch.py), and the initiator leaves punch events alone until the
peer's agent has reported itself (node/decide.py).

Each test builds its own lab, torn down whatever happens; waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest

from wgpunch.keys import Key
from wgpunch.lab import catalog, evidence
from wgpunch.lab import lab as lab_module
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import python_module, wait_for
from wgpunch.protocol import initiator

pytestmark = pytest.mark.lab

DIRECT_DEADLINE_S = 10.0  # measured: ~0.5 s from the second node's start


def events(agents: Agents, host: str, event: str) -> list[dict[str, Any]]:
    return [entry for entry in agents.events(host) if entry["event"] == event]


def pair(lab: Lab) -> evidence.Pair:
    [only] = evidence.pairs(lab, asyncio.run(evidence.read_devices(lab)))
    return only


def roles(lab: Lab) -> tuple[str, str]:
    """(initiator, other), by the protocol's rule (both sides behind NATs)."""
    a, b = lab.host("a").public_key, lab.host("b").public_key
    return ("a", "b") if initiator(a, b) else ("b", "a")


@pytest.mark.parametrize("early_role", ["initiator", "other"])
def test_collision_pair_goes_direct_whichever_node_starts_first(lab_prefix, early_role):
    """The node that starts first punches alone (the other NAT would keep state for its
    initiation); once the other node starts, the pair goes direct on the NATs' preserved
    ports within 10 s. Before the fix, with the initiator first, it never did (the other
    side's packets left from a new outside port, 0 of 3 runs with the default TTL)."""
    with Lab(catalog.resolve("collision"), prefix=lab_prefix) as lab, Agents(lab) as agents:
        initiator, other = roles(lab)
        early, late = (initiator, other) if early_role == "initiator" else (other, initiator)
        agents.start_registry()
        agents.start_node(early)
        early_key = lab.host(early).public_key.base64()
        wait_for(lambda: [e for e in events(agents, "registry", "punch")
                          if e.get("peer") == early_key],
                 timeout=5, interval=0.02, what=f"{early}'s first punch request")
        started = time.monotonic()
        agents.start_node(late)

        def direct() -> bool:
            agents.check_alive()
            return pair(lab).direct

        wait_for(direct, timeout=DIRECT_DEADLINE_S, interval=0.02, what="a-b to go direct")
        took = time.monotonic() - started
        found = pair(lab)
        assert {found.a.endpoint.port, found.b.endpoint.port} == {51820}, found
        for host in ("a", "b"):
            [measured] = events(agents, host, "opener_ttl")
            assert measured["ttl"] == 2, measured  # passes its own NAT, dies at the core
        print(f"\n{early_role} ({early}) first: direct {took:.3f} s after {late} started")


@pytest.mark.parametrize("lower_key", ["public", "symmetric"])
def test_public_and_symmetric_go_direct_whichever_key_is_lower(lab_prefix, monkeypatch,
                                                                lower_key):
    """a has a public address, b sits behind a symmetric NAT: only b's own initiation makes a
    path (its NAT maps it to a new port, a answers and roams there), so b initiates whatever
    the keys say (registry/punch.py). Before, with a's key the lower, a initiated toward the
    NAT's mapping for the registry and the pair never went direct (mixed-4: 0 of 9 runs)."""
    generate = lab_module.generate_keypair
    pool: list[tuple[Key, Key]] = []

    def ordered_keypair() -> tuple[Key, Key]:
        # The lab makes the keys of registry, a, b in this order: a gets the lower public key
        # of the two when lower_key is "public".
        if not pool:
            pool.extend(sorted((generate() for _ in range(3)), key=lambda kp: kp[1].raw,
                               reverse=lower_key == "public"))
        return pool.pop()

    monkeypatch.setattr(lab_module, "generate_keypair", ordered_keypair)
    with (Lab(catalog.resolve("matrix-public-symmetric"), prefix=lab_prefix) as lab,
          Agents(lab) as agents):
        a, b = lab.host("a").public_key.raw, lab.host("b").public_key.raw
        assert (a < b) == (lower_key == "public")
        agents.start_registry()
        agents.start_nodes()

        def direct() -> bool:
            agents.check_alive()
            return pair(lab).direct

        wait_for(direct, timeout=DIRECT_DEADLINE_S, interval=0.02, what="a-b to go direct")
        found = pair(lab)
        assert found.b.endpoint is not None and found.b.endpoint.port == 51820, found


MEASURE = """
import ipaddress, sys
from wgpunch.node.punch import opener_hops
print(opener_hops(ipaddress.ip_address(sys.argv[1])))
"""


def test_opener_hops_counts_every_nat_of_our_own(make_lab):
    """In `double-nat`, a and c sit behind a home NAT behind a carrier NAT (whose inside is
    100.64.0.0/10): their openers need TTL 3; b behind one home NAT needs 2."""
    lab = make_lab(catalog.resolve("double-nat"))
    registry = str(lab.host("registry").public_ip)
    measured = {}
    for host in ("a", "b", "c"):
        _argv, env = python_module("wgpunch.node.punch")  # for its PYTHONPATH
        done = lab.ns(host).run([sys.executable, "-c", MEASURE, registry], env=env)
        measured[host] = done.stdout.strip()
    assert measured == {"a": "3", "b": "2", "c": "3"}
