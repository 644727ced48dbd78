"""node/addresses.py reads this host's addresses with its own rtnetlink dump: it must see
what `ip address` sees (read here, in this namespace; nothing is changed)."""

import ipaddress
import json
import subprocess

from wgpunch.node.addresses import MAX_ADDRESSES, local_addresses


def test_the_dump_matches_ip_address():
    shown = json.loads(subprocess.run(["ip", "-j", "address", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    expected = []
    for link in shown:
        if link["ifname"] == "lo":
            continue
        for info in link.get("addr_info", []):
            interface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            if info.get("scope") == "global" and interface not in expected:
                expected.append(interface)
    assert local_addresses("lo") == expected[:MAX_ADDRESSES]


def test_the_excluded_interface_is_left_out():
    everything = local_addresses("no-such-if0")
    assert all(not i.ip.is_loopback for i in everything)
    assert local_addresses("lo") == everything  # loopback's are never global anyway
