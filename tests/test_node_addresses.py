"""node/addresses.py reads this host's addresses with its own rtnetlink dump: it must see
what `ip address` sees (read here, in this namespace; nothing is changed), less what it
leaves out on purpose (checked in a namespace of its own)."""

import ipaddress
import json
import subprocess
import sys

import pytest

from wgpunch.lab.netns import Namespace, python_module
from wgpunch.node.addresses import MAX_ADDRESSES, ipv6_endpoints, local_addresses
from wgpunch.wg.model import Endpoint

TUNNEL_LINK_TYPES = {"none", "tunnel", "tunnel6", "sit", "gre", "ip6gre"}
UNUSABLE_FLAGS = ("temporary", "dadfailed", "deprecated", "tentative")


def test_the_dump_matches_ip_address():
    shown = json.loads(subprocess.run(["ip", "-j", "address", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    expected = []
    for link in shown:
        if link["ifname"] == "lo" or link.get("link_type") in TUNNEL_LINK_TYPES:
            continue
        for info in link.get("addr_info", []):
            interface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            unusable = info["family"] == "inet6" and any(info.get(f) for f in UNUSABLE_FLAGS)
            if info.get("scope") == "global" and not unusable and interface not in expected:
                expected.append(interface)
    assert local_addresses("lo") == expected[:MAX_ADDRESSES]


def test_the_excluded_interface_is_left_out():
    everything = local_addresses("no-such-if0")
    assert all(not i.ip.is_loopback for i in everything)
    assert local_addresses("lo") == everything  # loopback's are never global anyway


def test_ipv6_endpoints_are_the_global_unicast_addresses_with_our_port():
    interfaces = [ipaddress.ip_interface(text) for text in (
        "192.168.1.10/24", "2001:db8:1::a/64", "fd00::2/64", "fe80::1/64",
        "2002:c000:204::1/48", "2a00:1450::5/64")]
    assert ipv6_endpoints(interfaces, 51820) == (
        Endpoint.parse("[2001:db8:1::a]:51820"), Endpoint.parse("[2a00:1450::5]:51820"))


READ = """
from wgpunch.node.addresses import local_addresses
print(" ".join(str(i) for i in local_addresses("wg0")))
"""


@pytest.mark.lab
def test_tunnels_and_addresses_the_kernel_would_not_send_from_are_left_out(lab_prefix):
    """In a namespace of its own: a plain link's stable address counts; a tunnel's (a tun
    device, as a VPN client's), a deprecated and a tentative one do not."""
    ns = Namespace(f"{lab_prefix}-addr")
    try:
        ns.add()
        ns.ip_batch([
            "link add eth0 type veth peer name eth1", "link set eth0 up", "link set eth1 up",
            "address add 192.168.5.2/24 dev eth0",
            "address add 2001:db8:5::2/64 dev eth0 nodad",
            "address add 2001:db8:5::3/64 dev eth0 nodad preferred_lft 0",  # deprecated
            "address add 2001:db8:5::4/64 dev eth0",  # tentative: DAD takes a second or so
            "tuntap add dev tun0 mode tun", "link set tun0 up",
            "address add 2001:db8:6::2/64 dev tun0 nodad",
        ])
        _, env = python_module("wgpunch")
        found = ns.run([sys.executable, "-c", READ], env=env).stdout.split()
        assert found == ["192.168.5.2/24", "2001:db8:5::2/64"]
    finally:
        ns.delete()
