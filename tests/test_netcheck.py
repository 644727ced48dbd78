"""`wgpunch netcheck`'s pure parts: what a measurement means in words, its text and JSON, and
the LAN probes' formats (node/lanprobe.py). The lab test (test_natcheck_lab.py) runs the
command behind every NAT kind."""

import ipaddress

import pytest

from test_protocol_roles import KINDS
from wgpunch.netcheck import Report, meaning, render
from wgpunch.node.lanprobe import pcp_announce
from wgpunch.protocol import NatBehaviour
from wgpunch.wg.model import Endpoint


def report(kind: str, **changes) -> Report:
    fields = dict(interface="wg0", probe_port=Endpoint.parse("192.0.2.2:51823"),
                  public_endpoint=Endpoint.parse("198.51.100.2:51820"),
                  wg_observed=Endpoint.parse("198.51.100.2:51820"), nat=KINDS[kind],
                  hairpin=False, gateway="192.168.1.1", nat_pmp=False, pcp=False,
                  upnp_igd=False, ipv6_global=False, registry_over_ipv6=None)
    return Report(**{**fields, **changes})


@pytest.mark.parametrize(("kind", "says"), [
    ("symmetric", "peers behind symmetric or port-filtering NATs will need the relay"),
    ("eim", "it filters per port: peers behind symmetric NATs will need the relay"),
    ("eim-full-cone", "symmetric ones included, can reach you directly"),
    ("public", "no NAT"),
])
def test_meaning_names_who_needs_the_relay(kind, says):
    assert any(says in line for line in meaning(report(kind)))


def test_unknown_says_what_to_check():
    unknown = report("eim", nat=NatBehaviour("unknown", "unknown", None), hairpin=None)
    [line] = meaning(unknown)
    assert "probe port did not answer" in line and "CAP_NET_RAW" in line


def test_text_and_json():
    r = report("eim-port", nat_pmp=True, ipv6_global=True)
    text = render(r)
    assert "mapping:" in text and "endpoint-independent" in text
    assert "port preserved:" in text and "port mapping:" in text and "NAT-PMP" in text
    assert "hairpin:" in text and "no hairpinning" in text
    got = r.to_json()
    assert (got["mapping"], got["filtering"], got["port_preserved"]) == (
        "endpoint-independent", "address-and-port-dependent", False)
    assert got["port_mapping"] == {"gateway": "192.168.1.1", "nat_pmp": True, "pcp": False,
                                   "upnp_igd": False}
    assert got["ipv6"] == {"global_address": True, "registry_over_ipv6": None}
    assert got["public_endpoint"] == "198.51.100.2:51820" and got["meaning"] == meaning(r)


def test_pcp_announce_is_rfc_6887_s_request_header():
    packet = pcp_announce(ipaddress.IPv4Address("192.168.1.10"))
    assert len(packet) == 24  # §7.1: the request header alone
    assert packet[:8] == bytes([2, 0, 0, 0, 0, 0, 0, 0])  # version 2, ANNOUNCE, lifetime 0
    assert packet[8:] == bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 10])
