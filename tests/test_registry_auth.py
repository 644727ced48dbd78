"""Who is calling: source address → the one peer whose allowed IPs hold it; bearer tokens."""

import ipaddress
from dataclasses import dataclass

import pytest

from wgpunch.keys import Key
from wgpunch.registry.auth import bearer_matches, identify, source_ip

K1, K2, K3 = (Key(bytes([n]) * 32) for n in (1, 2, 3))


@dataclass(frozen=True)
class Row:
    public_key: Key
    allowed_ips: tuple


def row(key: Key, *nets: str) -> Row:
    return Row(key, tuple(ipaddress.ip_network(n) for n in nets))


TABLE = [
    row(K1, "10.99.0.1/32", "fd99::1/128"),
    row(K2, "10.99.1.0/24"),
    row(K3, "10.99.1.7/32", "192.168.50.0/24"),  # overlaps K2's /24 on purpose
]


@pytest.mark.parametrize(("intent", "ip", "want"), [
    ("a /32 names its peer", "10.99.0.1", K1),
    ("an IPv6 /128 names its peer", "fd99::1", K1),
    ("an address inside a /24", "10.99.1.5", K2),
    ("a /32 inside another peer's /24: two peers claim it, refused", "10.99.1.7", None),
    ("nobody's address", "10.99.2.1", None),
    ("IPv6 nobody has", "fd99::2", None),
    ("an IPv4 address is never inside an IPv6 prefix", "0.0.0.1", None),
])
def test_identify(intent, ip, want):
    assert identify(ipaddress.ip_address(ip), TABLE) == want, intent


def test_identify_on_an_empty_table_and_a_catch_all_peer():
    assert identify(ipaddress.ip_address("10.0.0.1"), []) is None
    catch_all = [row(K1, "0.0.0.0/0"), row(K2, "10.0.0.2/32")]
    assert identify(ipaddress.ip_address("10.0.0.9"), catch_all) == K1
    assert identify(ipaddress.ip_address("10.0.0.2"), catch_all) is None


@pytest.mark.parametrize(("remote", "want"), [
    ("10.99.0.1", "10.99.0.1"),
    ("fd99::1", "fd99::1"),
    ("::ffff:10.99.0.1", "10.99.0.1"),  # a dual-stack socket reports IPv4 callers like this
    ("fe80::1%wg0", "fe80::1"),
    ("", None),
    (None, None),
    ("not-an-ip", None),
])
def test_source_ip(remote, want):
    got = source_ip(remote)
    assert (None if got is None else str(got)) == want


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer s3cret", True),
    ("bearer s3cret", True),
    ("Bearer s3cret ", True),
    ("Bearer s3cre", False),
    ("Bearer s3cret2", False),
    ("Basic s3cret", False),
    ("s3cret", False),
    ("", False),
    (None, False),
])
def test_bearer_matches(header, ok):
    assert bearer_matches(header, "s3cret") is ok
