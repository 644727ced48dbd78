"""Onboarding and the managed mesh with the real processes (DESIGN §10), five nodes behind
mixed NATs: a behind a home router, b public, c behind a CGNAT-like NAT, d behind a Linux
router without input filtering, e behind a restricted cone. (No symmetric NAT: facing a
filtering NAT it needs the relay, which tests/test_relay_lab.py covers; every pair here is
punchable.)

Every node starts with nothing of the lab's: `wgpunch invite` on the registry host makes its
key and config (applied with `wg-quick strip` + `wg setconf`, as `wg-quick up` would), none
lists another node, and each runs `wgpunch node --mesh` without --interface (b also gives
--registry KEY; the others find the registry as the peer serving its API).
They must reach a full mesh, every pair direct as `wg` shows it; an agent restart must change
no peer; `revoke` must take a node off every device within seconds; and a user's own peer
with a preshared key must survive all of it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpunch.errors import LabError
from wgpunch.keys import Key, generate_keypair
from wgpunch.lab import catalog
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import holds_for, python_module, wait_for
from wgpunch.lab.scenario import Scenario
from wgpunch.node.mesh import MESH_DIR
from wgpunch.wg.model import DeviceState
from wgpunch.wg.uapi import UapiDevice

pytestmark = pytest.mark.lab

MESH_DEADLINE_S = 30.0  # every pair of five, typically within a few seconds
RECENT_S = 180.0  # a handshake within Reject-After-Time: the session carries data
RESTART_HOLD_S = 3.0  # how long a restarted agent must leave every peer as it was
REVOKE_DEADLINE_S = 10.0
USER_PEER_IP = "10.98.0.1/32"  # outside the mesh's network: no overlap
MIXED = Scenario("mesh", (catalog.site("a", "eim"), catalog.site("b", catalog.PUBLIC),
                          catalog.site("c", "eim-port"), catalog.site("d", "collision"),
                          catalog.site("e", "eim-addr")))


def state(ifname: str) -> DeviceState:
    return asyncio.run(UapiDevice(ifname).state())


def peers_config(lab: Lab, host: str) -> dict[str, list[str]]:
    """`wg show IF dump` per peer, configuration only: preshared key and allowed IPs."""
    ifname = lab.host(host).ifname
    assert ifname is not None
    rows = lab.exec(host, ["wg", "show", ifname, "dump"]).stdout.splitlines()[1:]
    return {row.split("\t")[0]: [row.split("\t")[1], row.split("\t")[3]] for row in rows}


def invite(lab: Lab, tmp: Path, conf: Path, host: str) -> Key:
    """`wgpunch invite HOST` on the registry host, its config applied on HOST; HOST's new key."""
    registry, node = lab.host("registry"), lab.host(host)
    out = tmp / f"{host}.conf"
    argv, env = python_module("wgpunch.cli", "invite", host, "--address", str(node.tunnel_ip),
                              "--interface", str(registry.ifname), "--config", str(conf),
                              "--out", str(out))
    lab.ns("registry").run(argv, env=env)
    stripped = lab.exec(host, ["wg-quick", "strip", str(out)]).stdout
    (tmp / f"{host}.stripped").write_text(stripped)
    lab.exec(host, ["wg", "setconf", str(node.ifname), str(tmp / f"{host}.stripped")])
    public = state(str(node.ifname)).public_key
    assert public is not None
    return public


def direct(lab: Lab, keys: dict[str, Key], now: float) -> list[str]:
    """The pairs (as "a->b") that are not yet direct in the devices' own view."""
    missing = []
    for host, key in keys.items():
        device = state(str(lab.host(host).ifname))
        for other, other_key in keys.items():
            peer = device.peer(other_key)
            age = None if peer is None else peer.handshake_age(now)
            ok = (peer is not None and peer.endpoint is not None and age is not None
                  and age < RECENT_S and str(peer.endpoint.ip) == str(lab.host(other).public_ip))
            if other != host and not ok:
                missing.append(f"{host}->{other}")
        assert key == device.public_key
    return missing


def events(agents: Agents, host: str, since: int = 0) -> list[str]:
    return [e["event"] for e in agents.events(host)[since:]]


@pytest.fixture
def mesh_state(lab_prefix: str) -> Iterator[None]:
    """The agents keep their managed sets in the default state directory: removed after."""
    try:
        yield
    finally:
        for path in MESH_DIR.glob(f"{lab_prefix}-*.mesh.json"):
            path.unlink(missing_ok=True)


def test_invited_nodes_reach_a_full_mesh_restart_changes_nothing_revoke_removes(
        lab_prefix, tmp_path, mesh_state):
    with Lab(MIXED, prefix=lab_prefix) as lab, Agents(
            lab, node_args=["--mesh"]) as agents:
        registry = lab.host("registry")
        assert registry.ifname is not None and registry.tunnel_ip is not None
        for peer in state(registry.ifname).peers:  # nothing of the lab's membership is left
            lab.exec("registry", ["wg", "set", registry.ifname, "peer",
                                  peer.public_key.base64(), "remove"])
        conf = tmp_path / "registry.conf"  # as `wgpunch init registry` writes it
        conf.write_text(f"[Interface]\n# wgpunch: endpoint = {registry.public_ip}:51820\n"
                        f"Address = {registry.tunnel_ip}/24\nListenPort = 51820\n")
        keys = {host: invite(lab, tmp_path, conf, host) for host in agents.nodes}
        for host in keys:
            assert len(state(str(lab.host(host).ifname)).peers) == 1  # the registry only

        user = generate_keypair()[1]  # a's own peer, with a preshared key
        (tmp_path / "psk").write_text(generate_keypair()[0].base64())
        lab.exec("a", ["wg", "set", str(lab.host("a").ifname), "peer", user.base64(),
                       "allowed-ips", USER_PEER_IP, "preshared-key", str(tmp_path / "psk")])
        user_row = peers_config(lab, "a")[user.base64()]

        agents.start_registry()
        started = time.monotonic()
        for host in keys:
            agents.start_node(host, interface=False, registry_key=host == "b")
        missing: list[str] = []

        def full_mesh() -> bool:
            agents.check_alive()
            missing[:] = direct(lab, keys, time.time())
            return not missing

        try:
            wait_for(full_mesh, timeout=MESH_DEADLINE_S, interval=0.1,
                     what="a full mesh, every pair direct")
        except LabError:
            raise AssertionError(f"not direct: {missing}; "
                                 + " || ".join(agents.log_tail(h, 8) for h in keys)) from None
        took = time.monotonic() - started
        for host in keys:
            assert "interface_found" in events(agents, host)
            assert ("registry_found" in events(agents, host)) is (host != "b")
            config = peers_config(lab, host)
            assert {k for k in config} >= {keys[o].base64() for o in keys if o != host}
            for other in keys:  # no preshared key was ever given a managed peer
                if other != host:
                    assert config[keys[other].base64()][0] == "(none)"
        assert peers_config(lab, "a")[user.base64()] == user_row

        # An agent restart adds, removes and changes nothing.
        before = {host: peers_config(lab, host) for host in keys}
        agents.stop("b", signal.SIGTERM)
        seen = len(agents.events("b"))
        agents.start_node("b", interface=False)
        wait_for(lambda: "registry_connected" in events(agents, "b", seen), timeout=10,
                 what="b's agent to follow the registry again")
        assert holds_for(lambda: {h: peers_config(lab, h) for h in keys} == before,
                         duration=RESTART_HOLD_S)
        assert not [e for e in events(agents, "b", seen) if e.startswith("mesh_")]

        # Revoke d: gone from every device; a's own peer untouched.
        argv, env = python_module("wgpunch.cli", "revoke", "d", "--interface", registry.ifname,
                                  "--config", str(conf))
        lab.ns("registry").run(argv, env=env)
        revoked_at = time.monotonic()
        wait_for(lambda: all(keys["d"].base64() not in peers_config(lab, h) for h in "abce"),
                 timeout=REVOKE_DEADLINE_S, interval=0.05, what="d removed from a, b, c and e")
        gone = time.monotonic() - revoked_at
        assert peers_config(lab, "a")[user.base64()] == user_row
        assert json.dumps(agents.events("a")).count("mesh_removed") == 1
        print(f"\nfull mesh of {len(keys)} invited nodes in {took:.2f} s after the agents "
              f"started; revoked node gone from every device {gone:.2f} s after revoke",
              file=sys.stderr)
