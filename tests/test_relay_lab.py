"""Pairs that cannot go direct go through the registry's relay: real registry and node
processes in the lab, `ping` through the tunnel and `wg` as the judges, on the userspace and
the kernel path; a third node cannot use or disturb the pair's slot."""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
import sys
import time

import pytest

from labconntrack import flows_to_ports
from labstatus import peer_status
from wgpunch.lab import catalog
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for
from wgpunch.lab.scenario import Host, Scenario

pytestmark = pytest.mark.lab

DEADLINE_S = 15.0


def pings(lab: Lab, host: str, peer: str, count: int = 1, pattern: str = "00",
          lost: int = 0) -> bool:
    """Whether at least `count - lost` of `count` pings through the tunnel are answered."""
    out = lab.ns(host).run(["ping", "-c", str(count), "-i", "0.05", "-W", "1", "-p", pattern,
                            str(lab.host(peer).tunnel_ip)], check=False).stdout
    match = re.search(r"(\d+) received", out)
    return match is not None and int(match.group(1)) >= count - lost


def wait_relayed(lab: Lab, what: str = "a ping through the relay") -> None:
    """Poll pings from a to b until one is answered (on timeout, the failing `Agents` block
    prints the agents' events)."""
    wait_for(lambda: pings(lab, "a", "b"), timeout=DEADLINE_S, interval=0.2, what=what)


def relay_endpoint(lab: Lab, host: str) -> str:
    return str(peer_status(lab, host, "b" if host == "a" else "a")["endpoint"])


@pytest.mark.parametrize(("first", "second", "path"), [
    ("symmetric", "symmetric", "kernel"),
    ("symmetric", "symmetric", "userspace"),
    ("eim", "symmetric", "kernel"),
    ("eim-port", "symmetric", "userspace"),
])
def test_an_impossible_pair_is_relayed(lab_prefix, first, second, path):
    with Lab(catalog.matrix_pair(first, second), prefix=lab_prefix) as lab:
        registry = lab.ns("registry")
        if path == "kernel":
            registry.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        args = ["--relay", "31000-31099"] + (["--relay-userspace"] if path == "userspace"
                                            else [])
        with Agents(lab, registry_args=args) as agents:
            agents.start_registry()
            started = time.monotonic()
            agents.start_nodes()
            wait_relayed(lab)
            took = time.monotonic() - started
            for host, peer in (("a", "b"), ("b", "a")):
                shown = wait_for(lambda h=host, p=peer: (s := peer_status(lab, h, p))["path"]
                                 == "relay" and s, timeout=5, what=f"{host}'s status")
                assert shown["endpoint"].startswith(f"{lab.host('registry').public_ip}:31"), shown
                assert shown["reason"].startswith("relayed: "), shown
                assert shown["path_since"] is not None
            assert pings(lab, "a", "b", count=20, lost=1)
            kernel = [e for e in agents.events("registry") if e["event"] == "relay_kernel"]
            if path == "kernel":
                assert kernel and kernel[-1]["kernel"] is True, agents.log_tail("registry")
                rules = registry.run(["nft", "list", "table", "ip", "wgpunch_relay"]).stdout
                assert len(re.findall(r"dnat to", rules)) == 2, rules
            else:
                assert not kernel
            print(f"{first} x {second}, {path}: pinging through the relay "
                  f"{took:.2f} s after the nodes started")
            for host in ("a", "b"):
                [connected] = [e for e in agents.events(host) if e["event"] == "connected"]
                assert connected["path"] == "relay"
                print(f"{host}: relayed {connected['time_to_direct_s']:.3f} s after its "
                      "first attempt")
            # At once, as both NATs' reports rule direct out, not after punches that failed
            # (how fast: bench/time_to_direct.py --cells).
            asked = [e["msg"] for h in ("a", "b") for e in agents.events(h)
                     if e["event"] == "relay_request"]
            assert any("needs a relay" in msg for msg in asked), asked
            agents.stop("registry")
            assert "Traceback" not in agents.log_tail("registry", 1000)
        # The registry stopped: its table and conntrack entries went with it.
        assert registry.run(["nft", "list", "table", "ip", "wgpunch_relay"],
                            check=False).returncode != 0
        assert flows_to_ports(registry, range(31000, 31100)) == []


def test_a_relayed_pair_recovers_after_a_registry_restart(lab_prefix):
    """The registry (and its relay, kernel path) restarts: the slot is gone, the nodes see the
    new epoch, ask for a slot at once and ping again within a few seconds."""
    with Lab(catalog.matrix_pair("symmetric", "symmetric"), prefix=lab_prefix) as lab:
        lab.ns("registry").run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        with Agents(lab, registry_args=["--relay", "31000-31099"]) as agents:
            agents.start_registry()
            agents.start_nodes()
            wait_relayed(lab)
            assert agents.stop("registry") == 0
            assert not pings(lab, "a", "b")
            agents.start_registry()
            serving = time.monotonic()
            wait_relayed(lab, "a ping through the relay after the restart")
            took = time.monotonic() - serving
            print(f"relayed again {took:.2f} s after the registry served again")
            assert took < 5.0
            assert peer_status(lab, "a", "b")["path"] == "relay"


# Sends each shape to each port from one socket until the test closes its stdin (the pings
# are done) or, at the latest, its deadline passes; prints how many. A round every 1 ms at
# most: the wait for the stop paces it.
FLOOD = r"""
import select, socket, sys, time
relay, ports, seconds = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
shapes = [bytes([1, 0, 0, 0]) + bytes(144), bytes([4, 0, 0, 0]) + bytes(92), b"GET / x" * 20]
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for port in ports:
        for data in shapes:
            s.sendto(data, (relay, port))
            sent += 1
    if select.select([sys.stdin], [], [], 0.001)[0]:  # readable: at its end, stop
        break
print(sent)
"""
FLOOD_DEADLINE_S = 30.0  # a flood the test never stopped ends by itself


def test_a_third_node_cannot_use_or_disturb_a_slot(lab_prefix):
    """c (a third node, with its own public IP) and a's own NAT router (a's public IP, other
    ports) send to the pair's relay ports while a pings b: initiations, data, text, a flood.
    The pings arrive (a few may be lost: two flooders and the relay share 2 cores), the slot
    never moves, and the relay counts the strangers' datagrams as dropped. c's agent runs
    too, so that a and b reach it directly before the flood rather than punching an
    agentless peer (and asking for slots with it) all through it."""
    scenario = Scenario("relay-3", (catalog.site("a", "symmetric"),
                                    catalog.site("b", "symmetric"), catalog.site("c", "public")))
    with Lab(scenario, prefix=lab_prefix) as lab, \
            Agents(lab, registry_args=["--relay", "31000-31099"]) as agents:
        lab.ns("registry").run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        agents.start_registry()
        agents.start_nodes(["a", "b", "c"])
        wait_relayed(lab)
        ports = ",".join(relay_endpoint(lab, h).rsplit(":", 1)[1] for h in "ab")
        relay_ip = str(lab.host("registry").public_ip)
        flood_at = time.time()
        floods = [lab.ns(ns).popen([sys.executable, "-c", FLOOD, relay_ip, ports,
                                    str(FLOOD_DEADLINE_S)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                  for ns in ("c", "na")]
        try:
            out = lab.ns("a").run(["ping", "-c", "40", "-i", "0.05", "-W", "1",
                                   str(lab.host("b").tunnel_ip)], check=False).stdout
        finally:  # communicate() closes each one's stdin: it stops within a millisecond
            sent = [int(flood.communicate(timeout=10)[0]) for flood in floods]
        moved_to = relay_endpoint(lab, "a")
        agents.stop("registry")
        events = agents.events("registry")
        [stopped] = [e for e in events if e["event"] == "relay_stopped"]
        counts = stopped["counts"]
        # Everything that could explain lost pings, should any be: the relay's drops by
        # reason (kernel path included), its slot events, the agents' doings meanwhile.
        diagnosis = f"{out}\ncounts: {counts}\n" + "\n".join(
            f"{host}: {e['ts'] - flood_at:+.3f} {e['event']} {e['msg'][:160]}"
            for host in ("registry", "a", "b") for e in agents.events(host)
            if e["ts"] >= flood_at - 3 and e["event"] not in ("punch", "punch_retry"))
        received = re.search(r"(\d+) received", out)
        assert received is not None and int(received.group(1)) >= 36, diagnosis
        assert min(sent) > 1000, sent
        assert moved_to.startswith(relay_ip), diagnosis
        assert not [e for e in events if e["event"] == "relay_bound"
                    and "rebound" in e["msg"]], diagnosis
        # Each sender's datagrams are 1/3 text (dropped first, by shape), 2/3 WireGuard-shaped
        # (c's: another IP; a's router's: a's IP, another port); a few may be lost on the way.
        for verdict in ("not from the node's observed IP", "not shaped like a WireGuard "
                        "message", "from a new address while the bound one is active"):
            assert counts[verdict] > min(sent) / 4, counts
        # The strangers' datagrams are dropped before a side's packet-rate budget is taken
        # from (relayslots.py), so the pair's own never run over it, on either path.
        assert not [v for v in counts if v.startswith("over the slot's packet rate")], counts


def test_a_pair_is_relayed_through_a_relay_on_another_host(lab_prefix, tmp_path):
    """`wgpunch relay --control` on a host of its own, the registry told of it
    (--relay-remote) beside its own relay: a symmetric x symmetric pair gets its slot there
    (the least loaded relay that answers comes before the registry's own), pings through it
    on the kernel path, and both devices send to the relay host's address. The pair keeps
    that slot while the registry is down and after it restarted, and gets it back after a
    kill -9 and restart of the relay."""
    scenario = Scenario("relay-remote", (catalog.site("a", "symmetric"),
                                         catalog.site("b", "symmetric"),
                                         Host("r", wireguard=False)))
    secret = tmp_path / "relay.secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    with Lab(scenario, prefix=lab_prefix) as lab, Agents(lab, registry_args=[
            "--relay", "31000-31099", "--relay-remote", str(lab.host("r").public_ip),
            "--relay-secret-file", str(secret)]) as agents:
        relay_ip = str(lab.host("r").public_ip)
        lab.ns("r").run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        relay_args = ["--ports", "32000-32099", "--control", relay_ip, "--secret-file",
                      str(secret)]
        agents.start_relay("r", relay_args, control_port=51825)
        agents.start_registry()
        started = time.monotonic()
        agents.start_nodes(["a", "b"])
        wait_relayed(lab)
        print(f"pinging through the relay host {time.monotonic() - started:.2f} s after the "
              "nodes started")
        for host, peer in (("a", "b"), ("b", "a")):
            shown = wait_for(lambda h=host, p=peer: (s := peer_status(lab, h, p))["path"]
                             == "relay" and s, timeout=5, what=f"{host}'s status")
            assert shown["endpoint"].startswith(f"{relay_ip}:320"), shown
            ifname = lab.host(host).ifname
            assert ifname is not None
            endpoints = lab.ns(host).run(["wg", "show", ifname, "endpoints"]).stdout
            key = lab.host(peer).public_key
            assert key is not None
            assert f"{key.base64()}\t{relay_ip}:320" in endpoints, endpoints
        assert pings(lab, "a", "b", count=20, lost=1)
        wait_for(lambda: len(re.findall(r"dnat to", lab.ns("r").run(
            ["nft", "list", "table", "ip", "wgpunch_relay"], check=False).stdout)) == 2,
            timeout=5, what="the relay host's kernel path")
        assert not [e for e in agents.events("registry") if e["event"] == "relay_slot"], \
            "the registry's own relay made a slot"
        [placed] = [e for e in agents.events("registry") if e["event"] == "relay_placed"]
        assert relay_ip in placed["msg"]
        # The relay host forwards without the registry, and a restarted registry reads where
        # the pair is relayed from it before it serves: the pair keeps its slot throughout.
        assert agents.stop("registry") == 0
        assert pings(lab, "a", "b", count=10, lost=1)

        def logged(event: str) -> dict[str, int]:
            return {h: sum(e["event"] == event for e in agents.events(h)) for h in "ab"}

        connections, asks = logged("registry_connected"), logged("relay_request")
        agents.start_registry()
        wait_for(lambda: all(n > connections[h] for h, n in logged("registry_connected").items()),
                 timeout=10, what="both nodes to follow the restarted registry")
        assert pings(lab, "a", "b", count=20, lost=2)
        # Not asked for anew: the view keeps a slot the restarted registry still lists
        # (node/view.py).
        assert logged("relay_request") == asks
        assert len([e for e in agents.events("registry") if e["event"] == "relay_placed"]) == 1
        assert relay_endpoint(lab, "a").startswith(f"{relay_ip}:320")
        # kill -9 of the relay and a restart: its slots are gone, the sessions through them
        # stall, and each node asks for its slot again (node/relay.py), which the relay makes
        # anew; its kernel path holds the new slot's rules only.
        agents.stop("r", signal.SIGKILL)
        started = time.monotonic()
        agents.start_relay("r", relay_args, control_port=51825)
        wait_relayed(lab, "a ping through the restarted relay")
        print(f"pinging through the restarted relay {time.monotonic() - started:.2f} s after "
              "it started")
        assert any(e["event"] == "relay_silent" for h in "ab" for e in agents.events(h))
        wait_for(lambda: len(re.findall(r"dnat to", lab.ns("r").run(
            ["nft", "list", "table", "ip", "wgpunch_relay"], check=False).stdout)) == 2,
            timeout=5, what="the restarted relay's kernel path")
        agents.stop("r")
        assert "Traceback" not in agents.log_tail("r", 1000)
        assert lab.ns("r").run(["nft", "list", "table", "ip", "wgpunch_relay"],
                               check=False).returncode != 0
