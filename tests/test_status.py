"""`wgpunch status` run as a user runs it: the CLI, inside a namespace with wireguard-go."""

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from wgpair import PORT, Side, wg_pair
from wgpunch.lab.netns import Namespace
from wgpunch.wg.model import Endpoint

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

WGPUNCH = [sys.executable, "-m", "wgpunch.cli"]


@pytest.fixture
def pair(tmp_path):
    with wg_pair(tmp_path) as sides:
        yield sides


def status(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run([*WGPUNCH, "status", *args], check=False)


def dump_peers(side: Side) -> dict[str, list[str]]:
    return {row[0]: row for row in side.wg_show_dump()[1:]}


def test_status_json_agrees_with_wg_show_dump(pair):
    a, b = pair
    asyncio.run(a.device.handshake_now(b.public, Endpoint.parse(f"{b.veth_ip}:{PORT}")))
    a.ns.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", b.tunnel_ip])  # a handshake + bytes

    before = dump_peers(a)
    done = status(a.ns, "--json")
    after = dump_peers(a)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["version"] == 1
    # Only this namespace's interface, although every wireguard-go socket shares one directory.
    assert [i["name"] for i in report["interfaces"]] == [a.ifname]
    device = report["interfaces"][0]
    device_row = a.wg_show_dump()[0]
    assert (device["public_key"], device["listen_port"], device["backend"]) == (
        device_row[1], int(device_row[2]), "uapi")
    assert device["fwmark"] == 0 and device_row[3] == "off"
    for peer in device["peers"]:
        first, last = before[peer["public_key"]], after[peer["public_key"]]
        assert peer["endpoint"] == (None if first[2] == "(none)" else first[2])
        assert ",".join(peer["allowed_ips"]) == first[3]
        assert peer["preshared_key"] is (first[1] != "(none)")
        assert peer["persistent_keepalive"] == (0 if first[7] == "off" else int(first[7]))
        # Counters and handshake may move between the reads: they must lie between the two.
        for field, column in (("latest_handshake", 4), ("rx_bytes", 5), ("tx_bytes", 6)):
            value = peer[field] or 0
            assert int(first[column]) <= value <= int(last[column]), field
    peer_b = next(p for p in device["peers"] if p["public_key"] == b.public.base64())
    assert peer_b["rx_bytes"] > 0 and peer_b["handshake_age_s"] is not None
    # No agent runs: the path comes from the device alone, with no time established.
    assert (peer_b["path"], peer_b["path_since"]) == ("direct", None)
    assert a.private.base64() not in done.stdout


def test_status_table(pair):
    a, b = pair
    done = status(a.ns)
    assert done.returncode == 0, done.stderr
    assert f"interface {a.ifname} (uapi)" in done.stdout
    assert b.public.base64() in done.stdout and "never" in done.stdout and "25s" in done.stdout
    assert "PATH" in done.stdout and " none " in done.stdout
    assert a.private.base64() not in done.stdout


def test_status_errors_are_one_line(pair):
    a, _ = pair
    done = status(a.ns, "--interface", "nosuchwg0")
    assert done.returncode == 1
    assert done.stderr.startswith("wgpunch: ") and "nosuchwg0" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_status_in_a_namespace_without_wireguard(pair):
    a, _ = pair
    empty = Namespace(a.ns.name + "e")
    empty.add()
    try:
        done = status(empty)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "no WireGuard interfaces in this network namespace"
        assert json.loads(status(empty, "--json").stdout) == {"version": 1, "interfaces": []}
    finally:
        empty.delete()


def test_status_says_why_without_an_agent(pair):
    a, _ = pair
    done = status(a.ns)
    assert done.returncode == 0, done.stderr
    assert "WHY" in done.stdout
    assert "never a handshake, and no endpoint (no wgpunch node agent" in done.stdout
    report = json.loads(status(a.ns, "--json").stdout)
    [peer] = report["interfaces"][0]["peers"]
    assert peer["reason"].startswith("never a handshake")


def test_a_missing_interface_is_named_with_the_ones_that_are_here(pair):
    """Not "the kernel has no WireGuard module": on a wireguard-go host that is true and
    beside the point."""
    a, _ = pair
    done = status(a.ns, "--interface", "wg0")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "wgpunch: no interface 'wg0' in this network namespace (no wireguard-go socket "
        f"/var/run/wireguard/wg0.sock, no kernel device); WireGuard interfaces here: {a.ifname}")
