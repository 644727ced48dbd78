"""Two registries in the lab (`two-registries`; DESIGN.md §11), with the real processes: `wg`
is the judge of every path, `wgpunch status --json` of every registry's health.

a (eim) and b (eim-port) follow both registries, c (eim) only `registry2`. All three pairs go
direct. `registry` is killed (-9): the pairs stay direct, a and b show it unreachable with the
reason and `registry2` following. b's NAT then forgets every mapping (it rebinds to a new
outside port, as in tests/test_rebinding.py): a and c find b's new port through `registry2`
alone. `registry` comes back as after a reboot of its host (its device anew, from its config file):
a and b follow it again without a restart, it has their reports again, and its records without
an endpoint never replace registry2's.

A pair that needs a relay (a behind `symmetric`, b behind `eim`), both registries relaying:
the registry whose slot it uses is killed (-9). Its relay's kernel path outlives it, so each
agent holds a slot of the other registry but stays where the old one still answers; when the
NATs forget the flows through it, the pair moves to the other registry's relay.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from labstatus import device_status
from wgpunch.errors import LabError
from wgpunch.lab import catalog, evidence, state
from wgpunch.lab.agents import Agents
from wgpunch.lab.catalog import site
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for
from wgpunch.lab.scenario import Scenario
from wgpunch.protocol import API_PORT
from wgpunch.wg.model import Endpoint
from wgpunch.wg.uapi import UapiDevice

pytestmark = pytest.mark.lab

DIRECT_DEADLINE_S = 15.0  # three pairs, five processes starting on two cores
# A registry killed: its stream breaks at once (its socket closes with it), a reconnect is
# refused; the agent's status file follows within a tick.
HEALTH_DEADLINE_S = 10.0
# b speaks to registry2 every second (its heartbeat); a's agent then needs a probe timeout
# (1 s) to move the session (tests/test_rebinding.py, which allows 30 s).
REBIND_DEADLINE_S = 30.0
BOTH = ("a", "b")


def registries(lab: Lab, host: str) -> dict[str, dict[str, Any]]:
    """`host`'s status of each registry it follows, by registry host name."""
    names = {lab.host(r).public_key.base64(): r for r in ("registry", "registry2")}
    agent = device_status(lab, host)["agent"]
    return {} if agent is None else {names[r["public_key"]]: r for r in agent["registries"]}


def health(lab: Lab, host: str) -> dict[str, str]:
    return {name: r["state"] for name, r in registries(lab, host).items()}


def registry_sees(lab: Lab, registry: str, host: str) -> Endpoint | None:
    peer = asyncio.run(UapiDevice(lab.host(registry).ifname).state()).peer(
        lab.host(host).public_key)
    return None if peer is None else peer.endpoint


def reports_at(lab: Lab, registry: str, asker: str) -> dict[str, bool]:
    """Whether `registry`'s API holds each peer's report, as `asker` reads it (through the
    tunnel, where the API listens)."""
    ask = ("import json, urllib.request; print(json.dumps(json.load(urllib.request.urlopen("
           f"'http://{lab.host(registry).tunnel_ip}:{API_PORT}/v1/peers', timeout=2))))")
    out = lab.exec(asker, [sys.executable, "-c", ask], check=False)
    if out.returncode != 0:
        return {}
    names = {lab.host(h).public_key.base64(): h for h in ("a", "b", "c")}
    return {names[p["public_key"]]: p["reported"] is not None
            for p in json.loads(out.stdout)["peers"] if p["public_key"] in names}


def log_lines(agents: Agents, host: str) -> list[str]:
    return agents.logs[host].read_text().splitlines()


def all_direct(lab: Lab, agents: Agents, accept: Any = None,
               deadline_s: float = DIRECT_DEADLINE_S) -> dict[tuple[str, str], float]:
    result = asyncio.run(evidence.wait_direct(lab, deadline_s, check=agents.check_alive,
                                              accept=accept))
    assert all(took is not None for _, took in result.values()), result
    return {pair: took for pair, (_, took) in result.items() if took is not None}


def test_two_registries_one_lost_and_back(lab_prefix):
    with Lab(catalog.resolve("two-registries"), prefix=lab_prefix) as lab, \
            Agents(lab) as agents:
        agents.start_registries()
        agents.start_nodes()
        took = all_direct(lab, agents)
        print(f"direct: {took}")
        for host in BOTH:
            wait_for(lambda h=host: health(lab, h) == {"registry": "following",
                                                      "registry2": "following"},
                     timeout=HEALTH_DEADLINE_S, what=f"{host} to follow both registries")
        # c follows one registry: its one link, as with any single registry.
        assert device_status(lab, "c")["agent"]["registry"]["state"] == "following"
        nodes = {host: agents.procs[host].pid for host in agents.nodes}
        before = {(p.a.host, p.b.host): (p.a.endpoint, p.b.endpoint)
                  for p in evidence.pairs(lab, asyncio.run(evidence.read_devices(lab)))}

        agents.stop("registry", signal.SIGKILL)
        killed = time.monotonic()

        def registry_seen_gone() -> bool:
            # Every pair stays on the path it had all along.
            now = {(p.a.host, p.b.host): (p.a.endpoint, p.b.endpoint, p.direct)
                   for p in evidence.pairs(lab, asyncio.run(evidence.read_devices(lab)))}
            assert {k: v[:2] for k, v in now.items()} == before and all(
                v[2] for v in now.values()), now
            return all(health(lab, h) == {"registry": "unreachable",
                                          "registry2": "following"} for h in BOTH)

        wait_for(registry_seen_gone, timeout=HEALTH_DEADLINE_S, interval=0.1,
                 what="a and b to show registry unreachable")
        print(f"registry killed: seen unreachable after {time.monotonic() - killed:.2f} s")
        for host in BOTH:
            gone = registries(lab, host)["registry"]
            assert gone["error"], gone  # the reason it is unreachable
            assert registries(lab, host)["registry2"]["error"] is None
        lab.exec("a", ["ping", "-c1", "-W2", str(lab.host("b").tunnel_ip)])

        old = before[("a", "b")][0]
        assert old is not None
        start = time.monotonic()
        lab.forget_mappings(lab.host("b").nat_chain[0])
        new = wait_for(lambda: (seen := registry_sees(lab, "registry2", "b")) != old and seen,
                       timeout=REBIND_DEADLINE_S, what="registry2 to see b's new port")
        assert new.ip == old.ip and new.port != old.port
        took = all_direct(lab, agents, accept=lambda p: all(
            s.endpoint == new for s in (p.a, p.b) if s.peer == "b"),
            deadline_s=REBIND_DEADLINE_S)
        print(f"rebind through registry2 alone: {old} -> {new}, direct again after "
              f"{time.monotonic() - start:.2f} s ({took})")

        # It comes back as after a reboot of its host: its device from its config file, with
        # no endpoint until each node handshakes with it again.
        reset = ["wg", "setconf", lab.host("registry").ifname,
                 str(state.state_dir(lab.prefix) / "registry.conf")]
        lab.exec("registry", reset)
        mark = {host: len(agents.events(host)) for host in agents.nodes}
        agents.start_registry("registry")
        back = time.monotonic()
        for host in BOTH:
            wait_for(lambda h=host: health(lab, h) == {"registry": "following",
                                                      "registry2": "following"},
                     timeout=HEALTH_DEADLINE_S, what=f"{host} to follow registry again")
        print(f"registry back: followed after {time.monotonic() - back:.2f} s")
        # It lost every report with its process: each node that follows it reports again.
        wait_for(lambda: reports_at(lab, "registry", "a") == {"a": True, "b": True},
                 timeout=HEALTH_DEADLINE_S, what="a's and b's reports at the new registry")
        # Its device is set up anew under it once more (the restart above may race the
        # nodes' handshakes; this one does not: it observes the lost endpoints within 0.2 s,
        # a node notices its dead session only after a second). A registry that has not
        # observed a peer says nothing of where it is: no agent took its record without an
        # endpoint over registry2's (merge.py).
        lab.exec("registry", reset)
        wait_for(lambda: all(registry_sees(lab, "registry", h) for h in BOTH),
                 timeout=HEALTH_DEADLINE_S, what="the registry to observe a and b again")
        for host in BOTH:
            changed = [e for e in agents.events(host)[mark[host]:]
                       if e["event"] == "endpoint_changed" and e["msg"].endswith("-> None")]
            lost = [e["msg"] for e in changed if "registry" not in e]
            assert not lost, (host, lost)
        agents.check_alive()
        assert {host: agents.procs[host].pid for host in agents.nodes} == nodes


def test_a_relayed_pair_moves_to_the_relay_of_the_registry_left(lab_prefix):
    scenario = Scenario("two-registries-relay", (site("a", "symmetric"), site("b", "eim")),
                        registries=2)
    with Lab(scenario, prefix=lab_prefix) as lab, \
            Agents(lab, registry_args=["--relay"]) as agents:
        for name in agents.registries:  # the relays' kernel path forwards
            lab.ns(name).run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        agents.start_registries()
        agents.start_nodes()
        (pair, took), = asyncio.run(evidence.wait_direct(
            lab, DIRECT_DEADLINE_S, check=agents.check_alive, relay_ok=True)).values()
        assert took is not None and pair.relayed, pair
        at = {str(lab.host(name).public_ip): name for name in agents.registries}
        first = at[str(pair.a.endpoint.ip)]
        [left] = [ip for ip, name in at.items() if name != first]

        marks = {h: len(log_lines(agents, h)) for h in ("a", "b")}
        agents.stop(first, signal.SIGKILL)
        start = time.monotonic()
        # Each agent gets a slot of the other registry. Where the old slot still answers (its
        # relay's kernel path outlives it) the session is left there (decide.py); where it
        # does not (killed before the kernel took the flows over) it moves at once.

        def holds_or_moved(host: str) -> bool:
            return any(("but the current path" in line and left in line)
                       or ("path probe unanswered" in line and f" to {left}:" in line)
                       for line in log_lines(agents, host)[marks[host]:])

        for host in ("a", "b"):
            try:
                wait_for(lambda h=host: holds_or_moved(h), timeout=HEALTH_DEADLINE_S,
                         what=f"{host} to hold a slot of {at[left]}")
            except LabError as error:
                since = {h: "\n".join(log_lines(agents, h)[marks[h]:]) for h in ("a", "b")}
                raise AssertionError(f"{error}\n{since}") from None
        held = time.monotonic() - start
        # Traffic, so that a silent path shows (else only at the next keepalive, up to 25 s).
        ping = lab.ns("a").popen(["ping", "-n", "-q", "-i", "0.2", str(lab.host("b").tunnel_ip)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for nat in ("na", "nb"):  # then the flows through the old relay go
                lab.flush_conntrack(nat)
            flushed = time.monotonic()
            (pair, took), = asyncio.run(evidence.wait_direct(
                lab, REBIND_DEADLINE_S, check=agents.check_alive, relay_ok=True,
                accept=lambda p: {str(p.a.endpoint.ip), str(p.b.endpoint.ip)} == {left}
            )).values()
        finally:
            ping.terminate()
            ping.wait(timeout=5)
        assert took is not None, f"not relayed by {at[left]}: {pair}"
        print(f"relayed by {first}; killed, both held a slot of {at[left]} after {held:.2f} s; "
              f"the old relay's flows gone, relayed by {at[left]} after "
              f"{time.monotonic() - flushed:.2f} s")
