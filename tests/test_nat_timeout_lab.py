"""A NAT whose idle UDP mappings expire before WireGuard's 25 s keepalive, with the real
agents (issue 13; node/natidle.py).

`a` sits behind `eim-short` with its timeout cut to 8 s (the test's speed; the kind's own is
20 s), `b` behind `eim`. a's agent measures the timeout with the registry's probe port and
lowers the keepalive of its peer b below it. Then nobody sends anything of their own for
2.5 timeouts: a's NAT keeps the mapping toward b the whole time (its conntrack entry, polled),
and b's ping to a afterwards is answered, with no punch, stall or reconnection in between.
The control: nodes that do not measure (`--natprobe-port 0`, as against a registry without
a probe port) keep WireGuard's 25 s at most, and the mapping lapses within one keepalive.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from wgpunch.errors import LabError
from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for
from wgpunch.wg.model import Endpoint

pytestmark = pytest.mark.lab

TIMEOUT_S = 8
DIRECT_DEADLINE_S = 10.0
# The measurement starts 2 s after the agent and ends when the first later answer fails to
# come: the 10 s rung plus a second of lateness; counted from the pair going direct.
MEASURED_DEADLINE_S = 20.0
QUIET_S = 2.5 * TIMEOUT_S
PUNCHES = {"punch", "stall", "punch_retry", "disconnected", "repoint", "relay_request"}


def _mapping_held(lab: Lab, nat: str, inside: str, toward: Endpoint) -> bool:
    """Whether NAT router `nat` has a conntrack entry for `inside`'s WireGuard port toward
    `toward` (the mapping: Linux NAT keeps no other)."""
    out = lab.exec(nat, ["conntrack", "-L", "-p", "udp", "--orig-src", inside,
                         "--orig-dst", str(toward.ip), "--dport", str(toward.port)],
                   check=False).stdout
    return "sport=51820" in out


def _events(agents: Agents, hosts: list[str], names: set[str]) -> list[dict[str, object]]:
    return [e for host in hosts for e in agents.events(host) if e.get("event") in names]


def _go_direct(lab: Lab, agents: Agents) -> None:
    agents.start_registry()
    agents.start_nodes()
    (pair, took), = asyncio.run(
        evidence.wait_direct(lab, DIRECT_DEADLINE_S, check=agents.check_alive)).values()
    assert took is not None, f"no direct path: {pair}"


def test_without_the_measurement_the_mapping_lapses(lab_prefix):
    with Lab(catalog.short_timeout(TIMEOUT_S), prefix=lab_prefix) as lab, \
            Agents(lab, node_args=["--natprobe-port", "0"]) as agents:
        _go_direct(lab, agents)
        (pair, _), = asyncio.run(evidence.wait_direct(lab, 1.0)).values()
        assert pair.a.endpoint is not None
        a = lab.host("a")
        # a sends at most every 25 s (none at all if b initiated): the mapping goes within
        # the first keepalive's interval, and the 8 s after.
        wait_for(lambda: not _mapping_held(lab, "na", str(a.private_ip), pair.a.endpoint),
                 timeout=25 + TIMEOUT_S, what="a's NAT to forget its mapping toward b")
        assert not _events(agents, ["a"], {"nat_idle_measured", "keepalive_lowered"})


def test_the_agent_keeps_a_short_lived_mapping_open(lab_prefix):
    with Lab(catalog.short_timeout(TIMEOUT_S), prefix=lab_prefix) as lab, \
            Agents(lab) as agents:
        _go_direct(lab, agents)

        a, b = lab.host("a"), lab.host("b")
        try:
            wait_for(lambda: _events(agents, ["a"], {"keepalive_lowered"}),
                     timeout=MEASURED_DEADLINE_S, what="a's agent to lower b's keepalive")
        except LabError as error:
            raise AssertionError(f"{error}: {agents.log_tail('a', 4)}") from None
        [measured] = _events(agents, ["a"], {"nat_idle_measured"})
        assert measured["kept_s"] == 7 and measured["lost_s"] == 10, measured
        shown = lab.exec("a", ["wg", "show", a.ifname, "persistent-keepalive"]).stdout.split()
        keepalive = dict(zip(shown[::2], shown[1::2], strict=True))
        # The registry peer keeps its own (its heartbeats hold that mapping), and b's agent,
        # behind a NAT that keeps mappings, lowers nothing.
        assert keepalive == {b.public_key.base64(): "6",
                             lab.host("registry").public_key.base64(): "25"}, keepalive
        assert not _events(agents, ["b"], {"keepalive_lowered"})

        (pair, _), = asyncio.run(evidence.wait_direct(lab, 1.0)).values()
        toward_b = pair.a.endpoint
        assert toward_b is not None
        before = len(_events(agents, ["a", "b", "registry"], PUNCHES))
        start = time.monotonic()
        while time.monotonic() - start < QUIET_S:
            assert _mapping_held(lab, "na", str(a.private_ip), toward_b), (
                f"a's NAT dropped its mapping toward b {time.monotonic() - start:.1f} s into "
                "the quiet")
            time.sleep(0.5)  # a sampling interval, not synchronisation
        pinged = lab.exec("b", ["ping", "-c", "1", "-W", "1", str(a.tunnel_ip)], check=False)
        assert pinged.returncode == 0, pinged.stdout
        assert _events(agents, ["a", "b", "registry"], PUNCHES)[before:] == []
        (pair, _), = asyncio.run(evidence.wait_direct(lab, 1.0)).values()
        assert pair.direct and pair.a.endpoint == toward_b
