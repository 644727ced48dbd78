"""Port mapping against the real miniupnpd in a lab NAT router (lab/portmap.py): the node's
client maps, forwards, renews and deletes by PCP, NAT-PMP and UPnP-IGD; it says why when a
gateway cannot map; a router with port mapping still behaves as its NAT kind; and what a
mapped side's own early packet does to the flow through its mapping (portmap/rule.py).
Then the real agents: a symmetric NAT with port mapping goes direct with the kinds that
otherwise need a relay, judged by `wg` (wgpunch.lab.evidence, through the demo)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import unique_prefix
from wgpunch.demo import run_demo
from wgpunch.errors import LabError
from wgpunch.lab import catalog, natcheck
from wgpunch.lab.agents import Agents
from wgpunch.lab.catalog import PORTMAP_SUFFIX
from wgpunch.lab.nat import NAT_KINDS
from wgpunch.lab.netns import holds_for, python_module, read_line, wait_for
from wgpunch.lab.scenario import Host, Nat, Scenario

pytestmark = pytest.mark.lab

CLIENT = str(Path(__file__).with_name("portmap_client.py"))
QUIET_S = 1.0  # a datagram that passes arrives within milliseconds on an unimpaired lab


def scenario() -> Scenario:
    """natcheck's outside hosts, a symmetric and an eim-addr NAT with port mapping, and an
    eim NAT without it."""
    sites: list[Host | Nat] = [Host(name, wireguard=False) for name in natcheck.OUTSIDE]
    sites += [Nat("nm", "symmetric", (Host("s", wireguard=False), Host("s2", wireguard=False)),
                  portmap=True),
              Nat("na", "eim-addr", (Host("t", wireguard=False),), portmap=True),
              Nat("nn", "eim", (Host("h", wireguard=False),))]
    return Scenario("portmap", tuple(sites))


@pytest.fixture(scope="module")
def lab(make_module_lab):
    return make_module_lab(scenario())


def client(lab, host: str, *args: str) -> Any:
    argv, env = _client_argv(*args)
    return json.loads(lab.ns(host).run(argv, env=env, timeout=60).stdout.splitlines()[-1])


def _client_argv(*args: str) -> tuple[list[str], dict[str, str]]:
    _, env = python_module("wgpunch")  # the environment that finds this wgpunch
    return [sys.executable, CLIENT, *args], env


def forwards(lab, nat: str) -> str:
    """miniupnpd's DNAT rules in router `nat`."""
    return lab.exec(nat, ["nft", "list", "chain", "inet", f"{lab.prefix}_upnp",
                          "prerouting_miniupnpd"]).stdout


def public(lab, node: str) -> str:
    address = lab.plan.node(node).address
    assert address is not None
    return str(address.ip)


@pytest.mark.parametrize("method", ["pcp", "nat-pmp", "upnp"])
def test_each_method_maps_forwards_and_deletes(lab, method):
    port = {"pcp": 41001, "nat-pmp": 41002, "upnp": 41003}[method]
    s = str(lab.plan.node("s").address.ip)
    mapping = client(lab, "s", "map", method, str(port), "60")
    assert mapping["method"] == method, mapping
    external = mapping["external"]
    assert external.rpartition(":")[0] == public(lab, "nm")
    assert f"dnat ip to {s}:{port}" in forwards(lab, "nm")
    with natcheck.ProbeProcess(lab.ns("s"), "--port", str(port), "--lifetime", "10") as inside:
        inside.wait(lambda e: e["event"] == "bound", timeout=5)
        natcheck.probe_once(lab.ns("o3"), 5000, f"{external}=through-the-mapping")
        got = inside.wait(lambda e: e["event"] == "recv", timeout=5)
    assert got == {"event": "recv", "from": f"{public(lab, 'o3')}:5000",
                   "text": "through-the-mapping"}
    assert client(lab, "s", "unmap", json.dumps(mapping)) == {"deleted": True}
    assert f"{s}:{port}" not in forwards(lab, "nm")


def test_a_lease_is_renewed_while_kept_and_deleted_on_exit(lab):
    s = str(lab.plan.node("s").address.ip)
    # A 3 s lease not renewed: miniupnpd drops it once it runs out.
    client(lab, "s", "map", "pcp", "41010", "3")
    wait_for(lambda: f"{s}:41010" not in forwards(lab, "nm"), timeout=10,
             what="the unrenewed lease to run out")
    argv, env = _client_argv("keep", "41011", "3")
    keeper = lab.ns("s").popen(argv, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = json.loads(read_line(keeper, timeout=10, what="the keeper"))["mapping"]
        assert first["method"] == "pcp" and first["lifetime_s"] == 3, first
        # Renewed at half the lifetime, so it outlives three lifetimes. miniupnpd renews by
        # replacing its rule, so the rule may be missing for an instant, never for longer.
        def mapped() -> bool:
            try:
                return wait_for(lambda: f"{s}:41011" in forwards(lab, "nm"), timeout=0.5,
                                what="the rule")
            except LabError:
                return False

        assert holds_for(mapped, duration=9.0)
        keeper.send_signal(signal.SIGTERM)
        assert json.loads(read_line(keeper, timeout=10, what="the keeper")) == {"stopped": True}
        assert keeper.wait(timeout=10) == 0
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
        if keeper.stdout:
            keeper.stdout.close()
    assert f"{s}:41011" not in forwards(lab, "nm")  # deleted on exit, not left to run out


def test_a_gateway_without_port_mapping_says_why_for_each_method(lab):
    got = client(lab, "h", "map", "any", "41020", "60")
    assert got["error"].startswith("port mapping on ")
    for part in ("PCP: ", "NAT-PMP: ", "UPnP: no device answered discovery"):
        assert part in got["error"], got


def test_a_port_another_host_holds(lab):
    """PCP and NAT-PMP grant another external port (the mapping says which); UPnP's
    AddPortMapping names the external port, so the router refuses it."""
    taken = client(lab, "s", "map", "pcp", "41040", "60")["external"]
    s2 = str(lab.plan.node("s2").address.ip)
    for method in ("pcp", "nat-pmp"):
        got = client(lab, "s2", "map", method, "41040", "60")
        assert got["external"] != taken and got["internal_port"] == 41040, got
        assert f"{s2}:41040" in forwards(lab, "nm")
        client(lab, "s2", "unmap", json.dumps(got))
    got = client(lab, "s2", "map", "upnp", "41040", "60")
    assert got == {"error": "port mapping on "
                            f"{lab.plan.node('nm').lan.ip}: UPnP: ConflictInMappingEntry"}


@pytest.mark.parametrize(("nat", "host"), [("nm", "s"), ("na", "t")])
def test_a_router_with_port_mapping_is_still_its_kind(lab, nat, host):
    """The forward rule that lets miniupnpd's DNATs in lets nothing else in: eim-addr keeps
    its address-dependent filtering (the lab's own DNATs are marked apart)."""
    probes = natcheck.reflectors(lab)
    try:
        behaviour = natcheck.measure_kind(lab, nat, host)
    finally:
        for probe in probes:
            probe.close()
    claim = NAT_KINDS[behaviour.kind]
    assert (behaviour.mapping, behaviour.port, behaviour.filtering) == (
        claim.mapping, claim.port, claim.filtering), behaviour


def test_an_early_packet_from_the_mapped_side_moves_the_peers_port(lab):
    """Why the mapped side sends nothing first (portmap/rule.py), measured: o3 sends to s's
    mapping. Without an earlier packet of s toward o3 it arrives from o3's own port; after
    one, its flow's reply direction clashes with s's flow, and the kernel gives it another
    source port, so s sees o3 at a port o3 never used (the answer still leaves from the
    mapping)."""
    o3 = public(lab, "o3")
    results = {}
    for port, o3_port, early in ((41030, 5030, False), (41031, 5031, True)):
        external = client(lab, "s", "map", "pcp", str(port), "60")["external"]
        sends = ["--send", f"{o3}:{o3_port}=early"] if early else []
        with natcheck.ProbeProcess(lab.ns("s"), "--port", str(port), "--echo", *sends,
                                   "--lifetime", "10") as inside:
            ready = "sent" if early else "bound"
            inside.wait(lambda e, ready=ready: e["event"] == ready, timeout=5)
            with natcheck.ProbeProcess(lab.ns("o3"), "--port", str(o3_port), "--send",
                                       f"{external}=hello", "--lifetime", "5") as outside:
                seen = inside.wait(lambda e: e["event"] == "recv", timeout=5)["from"]
                answer = outside.wait(lambda e: e["event"] == "recv", timeout=5)["from"]
        results[early] = (seen, answer, external)
    seen, answer, external = results[False]
    assert (seen, answer) == (f"{o3}:5030", external), results
    seen, answer, external = results[True]
    assert seen.startswith(f"{o3}:") and seen != f"{o3}:5031", results
    assert answer == external, results


# -- the real agents -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["eim", "eim-port", "collision", "symmetric"])
def test_symmetric_with_port_mapping_goes_direct_with_every_kind(kind):
    """The cells that need a relay without port mapping (lab/matrix.py), direct through the
    mapping: the other side's device points at the mapped endpoint."""
    mapped_kind = "symmetric" + PORTMAP_SUFFIX
    [pair] = run_demo(f"matrix-{kind}-{mapped_kind}", 30.0, prefix=unique_prefix())
    assert pair.path == "direct", pair
    assert pair.a_endpoint_for_b == f"{pair.b_public_ip}:51820", pair  # b's mapping
    assert pair.ping_ms is not None, pair


def test_the_node_reports_its_mapping_and_deletes_it_when_stopped(make_lab):
    """`wgpunch node` as a user runs it: the registry's record of a carries the mapping,
    the pair goes direct through it, and SIGTERM deletes it from the router."""
    lab = make_lab(catalog.resolve("symmetric-upnp"))
    a = str(lab.plan.node("a").address.ip)
    with Agents(lab) as agents:
        agents.start_registry()
        agents.start_nodes()
        mapped = wait_for(lambda: next((e for e in agents.events("a")
                                        if e["event"] == "port_mapped"), None),
                          timeout=10, what="a's port mapping")
        assert mapped["endpoint"] == f"{public(lab, 'na')}:51820", mapped
        assert mapped["method"] == "pcp", mapped
        assert f"dnat ip to {a}:51820" in forwards(lab, "na")
        # The registry passes it on: b's view of a (asked from b, through the tunnel).
        key = lab.host("a").public_key.base64()

        def reported() -> Any:
            ask = ("import json, urllib.request; print(json.dumps(json.load(urllib.request."
                   f"urlopen('http://{lab.host('registry').tunnel_ip}:51821/v1/peers'))))")
            peers = json.loads(lab.exec("b", [sys.executable, "-c", ask]).stdout)["peers"]
            record = next(p for p in peers if p["public_key"] == key)
            return (record["reported"] or {}).get("mapped_endpoint")

        assert wait_for(reported, timeout=10, what="a's mapping at the registry") == \
            mapped["endpoint"]
        assert agents.stop("a") == 0
    assert f"{a}:51820" not in forwards(lab, "na")
