"""Nodes that do not have the registry as a WireGuard peer find each other through
`wgpunch rendezvous` (natpunch), in the `easy` lab, in both protocols: the pair goes direct,
`--once` works for cron, and the capabilities the node needs are named when missing."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents, natpunch_flags
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import python_module, wait_for
from wgpunch.lab.state import remove_agent_files
from wgpunch.natpunch.wire import LEGACY_PORT

pytestmark = pytest.mark.lab

PORT = 51822
DIRECT_DEADLINE_S = 15.0  # each side polls every second here and tries on its own


def run_node(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess:
    argv, env = python_module("wgpunch.cli", "node", "--interface", lab.host(host).ifname,
                              *args)
    return lab.ns(host).run(argv, env=env, check=False)


@pytest.mark.parametrize("mode", ["noise", "legacy"])
def test_nodes_find_each_other_through_a_rendezvous_server(lab_prefix, tmp_path, mode):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix, registry_peer=False) as lab:
        args, flags = natpunch_flags(lab, mode, tmp_path / "rendezvous.key")
        with Agents(lab, node_args=[*flags, "--interval", "1"]) as agents:
            agents.start_rendezvous(args, port=PORT)
            for host in ("a", "b"):
                peers = lab.ns(host).run(["wg", "show", lab.host(host).ifname, "peers"]).stdout
                assert lab.host("registry").public_key.base64() not in peers
                agents.start_node(host, registry_key=False)
            (pair, took), = asyncio.run(evidence.wait_direct(
                lab, DIRECT_DEADLINE_S, check=agents.check_alive)).values()
            assert took is not None, f"not direct: {pair}"
            registered = {e["peer"] for e in agents.events("registry")
                          if e["event"] == "registered"}
            assert registered == {str(lab.host(h).public_key) for h in ("a", "b")}
            following = {e["msg"] for e in agents.events("a")
                         if e["event"] == "registry_connected"}
            server = f"{lab.host('registry').public_ip}:{PORT if mode == 'noise' else LEGACY_PORT}"
            assert following == {f"natpunch {server} ({mode}): polling every 1 s"}
            print(f"natpunch {mode}: direct after {took:.2f} s")


@pytest.mark.parametrize("mode", ["noise", "legacy"])
def test_once_for_cron(lab_prefix, tmp_path, mode):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix, registry_peer=False) as lab:
        args, flags = natpunch_flags(lab, mode, tmp_path / "rendezvous.key")
        flags.append("--once")
        with Agents(lab) as agents:
            agents.start_rendezvous(args, port=PORT)
            # a registers and finds nobody; b finds a and knocks (a's NAT drops it: a never
            # sent to b); a finds b, and its handshake passes b's NAT, opened by b's knock.
            codes = [run_node(lab, host, *flags).returncode for host in ("a", "b", "a")]
            assert codes == [0, 0, 0]
            (pair, took), = asyncio.run(evidence.wait_direct(lab, 5.0)).values()
            assert took is not None, f"not direct after the --once passes: {pair}"
        # The server is gone: every lookup fails, and --once says so.
        failed = run_node(lab, "a", *flags)
        assert failed.returncode == 1 and "no answer" in failed.stderr
        assert "Traceback" not in failed.stderr


def test_without_cap_net_raw_the_node_says_so(lab_prefix, tmp_path):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix, registry_peer=False) as lab:
        _, flags = natpunch_flags(lab, "noise", tmp_path / "rendezvous.key")
        argv, env = python_module("wgpunch.cli", "node", "--interface", lab.host("a").ifname,
                                  *flags, "--once")
        # Root without CAP_NET_RAW: the device is reachable, a raw socket is not.
        done = lab.ns("a").run(["setpriv", "--bounding-set", "-net_raw", "--inh-caps",
                                "-net_raw", *argv], env=env, check=False)
        assert done.returncode == 1
        assert "CAP_NET_RAW" in done.stderr and "Traceback" not in done.stderr


def test_without_access_to_the_device_the_node_names_what_it_needs(tmp_path):
    # A UAPI socket the node may not open: owned by nobody, mode 000, and the node runs as
    # root without CAP_DAC_OVERRIDE, as an unprivileged user would meet a real device.
    name = "np" + secrets.token_hex(3)
    path = Path("/var/run/wireguard") / f"{name}.sock"
    path.parent.mkdir(exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen()
        os.chown(path, 65534, 65534)
        path.chmod(0)
        done = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
             "-dac_override,-dac_read_search", sys.executable, "-m", "wgpunch", "node",
             "--interface", name, "--natpunch-legacy", "127.0.0.1", "--once"],
            capture_output=True, text=True, timeout=30)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        remove_agent_files(name)  # the lock it took before it met the device
    assert done.returncode == 1
    assert "CAP_NET_ADMIN" in done.stderr and "Traceback" not in done.stderr, done.stderr


POISON = r"""
import socket, sys, time
key, server, until = bytes.fromhex(sys.argv[1]), sys.argv[2], time.monotonic() + 8
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind(("0.0.0.0", 40000))
    sock.settimeout(0.5)
    while time.monotonic() < until:  # one forged registration per answer from the server
        sock.sendto(key + bytes(32), (server, 49918))
        try:
            sock.recv(64)
        except TimeoutError:
            pass
"""

def test_a_forged_legacy_registration_never_moves_a_live_session(lab_prefix, tmp_path):
    """The legacy protocol lets anyone register any key: the registry host keeps claiming to
    be b (from port 40000). a's agent sees b's endpoint move, probes the path it has, finds
    it answers, and leaves it alone; the pair stays direct on b's real endpoint."""
    with Lab(catalog.resolve("easy"), prefix=lab_prefix, registry_peer=False) as lab:
        args, _ = natpunch_flags(lab, "legacy", tmp_path / "rendezvous.key")
        server = lab.host("registry").public_ip
        bogus = f"{server}:40000"
        with Agents(lab, node_args=["--natpunch-legacy", str(server), "--interval", "0.5"]
                    ) as agents:
            agents.start_rendezvous(args, port=PORT)
            for host in ("a", "b"):
                agents.start_node(host, registry_key=False)
            (pair, took), = asyncio.run(evidence.wait_direct(
                lab, DIRECT_DEADLINE_S, check=agents.check_alive)).values()
            assert took is not None, f"not direct: {pair}"
            real = pair.a.endpoint
            poisoner = lab.ns("registry").popen(
                [sys.executable, "-c", POISON, lab.host("b").public_key.raw.hex(), str(server)])
            try:
                def left_alone() -> bool:
                    agents.check_alive()
                    return any("left alone" in line and bogus in line
                               for line in agents.logs["a"].read_text().splitlines())

                wait_for(left_alone, timeout=7.0, what="a to probe and keep b's path")
                (after, _), = asyncio.run(evidence.wait_direct(lab, 1.0)).values()
            finally:
                poisoner.kill()
                poisoner.wait()
            assert after.a.endpoint == real and after.direct, after
            assert not [e for e in agents.events("a") if e["event"] == "repoint"]
