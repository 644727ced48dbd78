"""The host's own addresses (node/addresses.py), read by rtnetlink in a throwaway namespace
whose addresses we chose: global ones of every interface but the excluded one, with their
prefixes; no link-local, no loopback; the same list `ip -j addr` shows."""

import ipaddress
import json
import sys

import pytest

from wgpair import unique_prefix
from wgpunch.lab.netns import Namespace, python_module

pytestmark = pytest.mark.lab

READ = ("import json, sys; from wgpunch.node.addresses import local_addresses; "
        "print(json.dumps([str(i) for i in local_addresses(sys.argv[1])]))")


def test_global_addresses_of_every_interface_but_the_excluded_one():
    prefix = unique_prefix("ad")
    ns = Namespace(f"{prefix}-n")
    lan, tunnel = f"{prefix}lan", f"{prefix}tun"
    try:
        ns.add()
        ns.ip_batch([f"link add {lan} type veth peer name {tunnel}",
                     f"link set {lan} up", f"link set {tunnel} up",
                     f"addr add 192.0.2.5/24 dev {lan}", f"addr add 198.18.7.1/15 dev {lan}",
                     f"addr add 2001:db8::5/64 dev {lan} nodad",
                     f"addr add 10.77.0.1/24 dev {tunnel}",  # the excluded (WireGuard) one
                     "addr add 127.0.0.9/8 dev lo"])
        _argv, env = python_module("wgpunch.node.addresses")
        got = json.loads(ns.run([sys.executable, "-c", READ, tunnel], env=env).stdout)
        shown = json.loads(ns.run(["ip", "-j", "addr", "show", "dev", lan]).stdout)
    finally:
        ns.delete()
    assert sorted(got) == ["192.0.2.5/24", "198.18.7.1/15", "2001:db8::5/64"]
    from_ip = [f"{a['local']}/{a['prefixlen']}" for link in shown for a in link["addr_info"]
               if a["scope"] == "global"]
    assert sorted(got) == sorted(from_ip)
    assert all(not ipaddress.ip_interface(i).ip.is_link_local for i in got)
