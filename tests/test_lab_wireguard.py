"""WireGuard across the lab's NATs: the registry's view, and punching by hand.

The device layer drives the devices through their UAPI sockets, which are filesystem objects
reachable from here whatever namespace the device lives in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re

import pytest

from wgpunch.lab import catalog
from wgpunch.lab.lab import Lab, LabHost
from wgpunch.lab.netns import holds_for, wait_for

pytestmark = pytest.mark.lab

REGISTRY_SEES_S = 2.0  # the bound: endpoints visible within 2 s of lab up
COLLISION_WATCH_S = 8.0
KEEPALIVE_S = 25  # longer than one WireGuard retry (REKEY_TIMEOUT 5 s)


def registry_endpoints(lab: Lab) -> dict[str, str]:
    """Peer public key (base64) -> endpoint, parsed from `wg show IF dump` on the registry."""
    registry = lab.host("registry")
    dump = lab.exec("registry", ["wg", "show", registry.ifname, "dump"]).stdout
    peers = [line.split("\t") for line in dump.splitlines()[1:]]
    return {fields[0]: fields[2] for fields in peers if fields[2] != "(none)"}


def wait_registry_sees(lab: Lab, names: list[str]) -> dict[str, str]:
    keys = {lab.host(name).public_key.base64(): name for name in names}

    def all_seen() -> dict[str, str] | None:
        endpoints = registry_endpoints(lab)
        return endpoints if set(keys) <= set(endpoints) else None

    seen = wait_for(all_seen, timeout=REGISTRY_SEES_S, what="the registry's endpoints")
    return {keys[key]: endpoint for key, endpoint in seen.items() if key in keys}


def device_state(host: LabHost):
    from wgpunch.wg.uapi import UapiDevice

    return asyncio.run(UapiDevice(host.ifname).state())


def handshake_now(*moves: tuple[LabHost, LabHost, str]) -> None:
    """Each (host, peer, target): host points peer at target and initiates, all at once.

    With persistent keepalive, as across NATs it must be: re-adding a peer whose keepalive
    is 0 sends nothing until there is traffic (wireguard-go sends the keepalive that starts
    the handshake only when keepalive goes from 0 to non-zero).
    """
    from wgpunch.wg.model import Endpoint
    from wgpunch.wg.uapi import UapiDevice

    async def all_at_once() -> None:
        await asyncio.gather(*(
            UapiDevice(host.ifname).handshake_now(
                peer.public_key, Endpoint.parse(target), persistent_keepalive=KEEPALIVE_S)
            for host, peer, target in moves
        ))

    asyncio.run(all_at_once())


def handshaked(one: LabHost, two: LabHost) -> bool:
    peer = device_state(one).peer(two.public_key)
    return peer is not None and peer.latest_handshake is not None


def test_easy_registry_sees_public_endpoints_then_direct_punch_works(make_lab):
    lab = make_lab(catalog.resolve("easy"))
    a, b = lab.host("a"), lab.host("b")
    seen = wait_registry_sees(lab, ["a", "b"])
    # Post-NAT: each NAT's public address, and `eim` kept WireGuard's port.
    assert seen == {"a": f"{a.public_ip}:51820", "b": f"{b.public_ip}:51820"}
    assert a.private_ip != a.public_ip

    # a first: its initiation opens a's NAT and dies at b's; then b's gets through a's and
    # is answered. Both at the very same moment can cross, and crossed initiations cancel
    # each other out until WireGuard's 5 s retry (README, "Measured").
    handshake_now((a, b, seen["b"]))
    a_router = a.nat_chain[0]
    wait_for(lambda: "dport=51820" in lab.exec(a_router, [
        "conntrack", "-L", "-p", "udp", "-s", str(a.private_ip), "-d", str(b.public_ip)],
        check=False).stdout, timeout=3, what="a's initiation through a's NAT")
    handshake_now((b, a, seen["a"]))
    wait_for(lambda: handshaked(a, b) and handshaked(b, a), timeout=3,
             what="a direct handshake between a and b")
    ping = lambda: lab.exec("a", ["ping", "-c1", "-W1", str(b.tunnel_ip)],  # noqa: E731
                            check=False).returncode == 0
    wait_for(ping, timeout=5, interval=0.1, what="a ping from a to b through the tunnel")
    # Direct: a's device talks to b's NAT, not to the registry.
    assert str(device_state(a).peer(b.public_key).endpoint) == seen["b"]


def test_collision_naive_simultaneous_open_fails(make_lab):
    """Two `collision` routers: the first side's packet reaches the other router, which
    answers it with ICMP and keeps conntrack state for it; the second side's outbound flow to
    the same endpoints then collides with that state and gets a new outside port, so
    neither side ever sees the other's packets from the endpoint it expects.

    "Simultaneous" as a punch makes it, where one side's packet is at the other router before
    that router's host sends: a sends, b sends once a's packet has left state on b's router.
    (If both left within one one-way delay of each other, both routers would already map
    their hosts' flows, the two initiations would cross, and WireGuard's 5 s retry would
    connect them.)"""
    lab = make_lab(catalog.resolve("collision"))
    a, b = lab.host("a"), lab.host("b")
    seen = wait_registry_sees(lab, ["a", "b"])
    assert seen == {"a": f"{a.public_ip}:51820", "b": f"{b.public_ip}:51820"}

    handshake_now((a, b, seen["b"]))
    b_router = b.nat_chain[0]
    wait_for(lambda: "dport=51820" in lab.exec(b_router, [
        "conntrack", "-L", "-p", "udp", "-s", str(a.public_ip), "--sport", "51820",
        "-d", str(b.public_ip)], check=False).stdout, timeout=3,
        what="a's unsolicited packet leaving state on b's router")
    handshake_now((b, a, seen["a"]))
    assert holds_for(lambda: not handshaked(a, b) and not handshaked(b, a),
                     duration=COLLISION_WATCH_S)

    # The state that did it: one router mapped its host's WireGuard flow toward the other
    # NAT's public endpoint to a port other than 51820.
    moved = {}
    for host, peer in ((a, b), (b, a)):
        router = host.nat_chain[0]
        out = lab.exec(router, ["conntrack", "-L", "-p", "udp", "-s", str(host.private_ip),
                                "--sport", "51820", "-d", str(peer.public_ip),
                                "--dport", "51820"], check=False).stdout
        replies = re.findall(r"dport=(\d+)", out)  # original, then reply direction
        if len(replies) >= 2 and replies[1] != "51820":
            moved[host.name] = int(replies[1])
    assert moved, "expected one router to have moved its host's mapping off 51820"


def test_double_nat_registry_sees_the_carrier_address(make_lab):
    lab = make_lab(catalog.resolve("double-nat"))
    seen = wait_registry_sees(lab, ["a", "b", "c"])
    cgn_public = lab.host("a").public_ip
    assert lab.host("c").public_ip == cgn_public
    a_ip, a_port = seen["a"].rsplit(":", 1)
    c_ip, c_port = seen["c"].rsplit(":", 1)
    assert a_ip == c_ip == str(cgn_public)
    assert a_port != c_port and 20000 <= int(a_port) <= 29999  # the CGN is `eim-port`
    assert lab.host("a").nat_chain == ("na", "cgn")
    assert ipaddress.ip_address(lab.plan.node("na").address.ip) in ipaddress.ip_network(
        "100.64.0.0/10")


def test_symmetric_maps_wireguard_to_a_random_port(make_lab):
    lab = make_lab(catalog.resolve("symmetric"))
    seen = wait_registry_sees(lab, ["a", "b"])
    assert seen["a"].startswith(f"{lab.host('a').public_ip}:")
    assert not seen["a"].endswith(":51820")
    assert seen["b"] == f"{lab.host('b').public_ip}:51820"


def test_same_nat_hosts_reach_each_other_on_the_lan(make_lab):
    """Behind one NAT without hairpinning, the LAN addresses work (DESIGN.md §3, local).

    One side initiates: on a path where both initiations arrive, each side drops its own
    handshake to answer the other's and rejects the other's response, so a simultaneous
    handshake-now waits out one REKEY_TIMEOUT (measured here: 5.06 s).
    """
    lab = make_lab(catalog.resolve("same-nat"))
    a, b = lab.host("a"), lab.host("b")
    seen = wait_registry_sees(lab, ["a", "b"])
    assert seen["a"].split(":")[0] == seen["b"].split(":")[0] == str(a.public_ip)
    handshake_now((a, b, f"{b.private_ip}:51820"))
    wait_for(lambda: handshaked(a, b) and handshaked(b, a), timeout=3,
             what="a handshake over the LAN")


def test_hairpin_lets_hosts_behind_one_nat_use_public_endpoints(make_lab):
    lab = make_lab(catalog.resolve("hairpin"))
    a, b = lab.host("a"), lab.host("b")
    seen = wait_registry_sees(lab, ["a", "b"])
    assert seen["a"] != seen["b"]  # one of them lost 51820 to the other
    handshake_now((a, b, seen["b"]))
    wait_for(lambda: handshaked(a, b) and handshaked(b, a), timeout=3,
             what="a handshake through the hairpinning NAT")
    # b saw a's packets come from a's public mapping, as RFC 4787 REQ-9 asks.
    assert str(device_state(b).peer(a.public_key).endpoint) == seen["a"]
