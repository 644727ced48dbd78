"""NATs that change under a working tunnel, with the real agents: the path recovers.

- `rebind`: b sits behind an `eim-port` NAT (CGNAT-like: a random outside port per inside
  endpoint) that loses every mapping and its conntrack state, as after a reboot. b's next
  packet leaves from a new outside port; a's packets to the old one go nowhere, b's new one is
  filtered by a's NAT. The registry sees b's new endpoint when b next sends to it (its
  heartbeat, within a second: node/registrylink.py) and kicks b (registry/kick.py), whose
  watch stream may have lost what the registry sent meanwhile; a's agent probes the live
  session, gets no answer and moves it there.
- `flush`: both home NATs of `easy` lose their conntrack state while a pings b. Each side's
  own packets map it again: heartbeats toward the registry, and an opener toward a peer with
  traffic with each heartbeat; failing those, a sends, hears nothing, probes and punches.

Each test prints the recovery time it measured (`-s`); the deadlines are generous bounds, the
figures are in bench/time_to_direct.py's output.
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import time

import pytest

from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for

pytestmark = pytest.mark.lab

DIRECT_DEADLINE_S = 10.0
# b speaks to the registry every second (its heartbeat), at the latest every 25 s (its
# keepalive); a's agent then needs a probe timeout (1 s) to move the session.
REBIND_DEADLINE_S = 30.0
FLUSH_DEADLINE_S = 20.0


def go_direct(lab: Lab, agents: Agents) -> evidence.Pair:
    agents.start_registry()
    agents.start_nodes()
    (pair, took), = asyncio.run(
        evidence.wait_direct(lab, DIRECT_DEADLINE_S, check=agents.check_alive)).values()
    assert took is not None, f"no direct path: {pair}"
    return pair


def test_a_rebound_nat_port_is_followed(lab_prefix):
    with Lab(catalog.resolve("matrix-eim-eim-port"), prefix=lab_prefix) as lab, \
            Agents(lab) as agents:
        old = go_direct(lab, agents).a.endpoint
        start, start_wall = time.monotonic(), time.time()
        lab.forget_mappings(lab.host("b").nat_chain[0])
        (pair, took), = asyncio.run(evidence.wait_direct(
            lab, REBIND_DEADLINE_S, check=agents.check_alive,
            accept=lambda p: p.a.endpoint != old and p.a.endpoint == p.a.registry_sees,
        )).values()
        assert took is not None, f"no recovery within {REBIND_DEADLINE_S} s: {pair}"
        print(f"rebind: {old} -> {pair.a.endpoint}, direct again after "
              f"{time.monotonic() - start:.2f} s")
        assert pair.a.endpoint.ip == old.ip and pair.a.endpoint.port != old.port
        moved = [e for e in agents.events("a") if e.get("event") == "repoint"]
        assert moved and moved[-1]["to"] == str(pair.a.endpoint)
        # The order of events: the registry sees b's new port, and only then does a move;
        # a kick (registry/kick.py) that made b watch anew came after the registry saw it.
        b_key = lab.host("b").public_key.base64()
        seen = [float(e["ts"]) for e in agents.events("registry")
                if e.get("event") == "peer_endpoint" and e.get("peer") == b_key
                and e.get("endpoint") == str(pair.a.endpoint)]
        assert seen and seen[0] <= float(moved[-1]["ts"])
        kicked = [float(e["ts"]) for e in agents.events("b")
                  if e.get("event") == "registry_kicked" and float(e["ts"]) >= start_wall]
        assert all(seen[0] <= t for t in kicked), (seen, kicked)


def test_a_flushed_nat_recovers_under_traffic(lab_prefix):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix) as lab, Agents(lab) as agents:
        go_direct(lab, agents)
        ping = lab.ns("a").popen(["ping", "-n", "-i", "0.2", "-W", "1",
                                  str(lab.host("b").tunnel_ip)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            def next_seq(timeout: float) -> int | None:
                ready, _, _ = select.select([ping.stdout], [], [], timeout)
                line = ping.stdout.readline() if ready else ""
                return int(line.split("icmp_seq=")[1].split()[0]) if "time=" in line else None

            last = wait_for(lambda: next_seq(1.0), timeout=5, what="ping replies")
            start = time.monotonic()
            for nat in ("na", "nb"):
                lab.flush_conntrack(nat)
            # Replies already under way may still come: recovery is the first after a gap.
            while (seq := next_seq(1.0)) is None or seq == last + 1:
                last = seq if seq is not None else last
                assert time.monotonic() - start < FLUSH_DEADLINE_S, "no recovery"
            took = time.monotonic() - start
            print(f"flush: {seq - last - 1} pings lost, answered again after {took:.2f} s")
        finally:
            ping.terminate()
            ping.wait(timeout=5)
