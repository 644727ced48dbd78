"""`PUT /v1/self` bodies and the other client input (queries, path keys): every malformed
input is one `MalformedMessage` naming what is wrong; nothing else escapes."""

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpunch.errors import MalformedMessage
from wgpunch.keys import Key
from wgpunch.protocol import FIELDS, NatBehaviour, Reported, reported_from_json
from wgpunch.registry.wire import path_key, watch_query

GOOD = {"listen_port": 51820, "local_addresses": ["192.168.1.2", "fd00::2"],
        "version": "0.1.0"}
NAT = {"mapping": "address-and-port-dependent", "filtering": "unknown", "port_preserved": False}


def body(**changes) -> bytes:
    obj = {**GOOD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def test_a_good_body():
    got = reported_from_json(body())
    assert got.listen_port == 51820 and [str(a) for a in got.local_addresses] == [
        "192.168.1.2", "fd00::2"]
    assert got.to_json() == GOOD  # without `nat`: what a node before it sends
    assert reported_from_json(body(local_addresses=[], version="")).local_addresses == ()


def test_a_body_with_the_nat_behaviour_and_one_from_an_older_node():
    got = reported_from_json(body(nat=NAT))
    assert got.nat == NatBehaviour("address-and-port-dependent", "unknown", False)
    assert got.to_json() == {**GOOD, "nat": NAT}
    assert reported_from_json(body(nat=None)).nat is None  # null: not measured
    assert reported_from_json(body()).nat is None  # a node from before the field


@pytest.mark.parametrize(("intent", "raw", "match"), [
    ("empty body", b"", "empty"),
    ("not UTF-8", b'{"version": "\xff"}', "not UTF-8"),
    ("not JSON", b"listen_port=1", "invalid JSON"),
    ("truncated JSON", body()[:-1], "invalid JSON"),
    ("trailing junk", body() + b"x", "invalid JSON"),
    ("a list, not an object", b"[]", "expected a JSON object, got a list"),
    ("a bare string", b'"x"', "expected a JSON object, got text"),
    ("null", b"null", "got null"),
    ("NaN", body().replace(b"51820", b"NaN"), "NaN is not valid JSON"),
    ("Infinity", body().replace(b"51820", b"Infinity"), "Infinity"),
    ("nested too deeply", b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    ("a key twice", b'{"version": "a", "version": "b"}', "appears twice"),
    ("unknown field", body(nat_type="easy"), "unknown field 'nat_type'"),
    ("nat as text", body(nat="easy"), "nat: expected an object"),
    ("nat with an unknown mapping", body(nat={**NAT, "mapping": "cone"}),
     "nat.mapping: 'cone' is not one of"),
    ("nat with an unknown filtering", body(nat={**NAT, "filtering": 3}),
     "nat.filtering: expected text"),
    ("nat missing a field", body(nat={"mapping": "none", "filtering": "unknown"}),
     "nat: missing field 'port_preserved'"),
    ("nat with an unknown field", body(nat={**NAT, "hairpin": True}),
     "nat: unknown field 'hairpin'"),
    ("nat port_preserved as text", body(nat={**NAT, "port_preserved": "yes"}),
     "nat.port_preserved: expected a boolean or null"),
    ("a field missing", body(version=...), "missing field 'version'"),
    ("port as text", body(listen_port="51820"), "listen_port: expected an integer, got text"),
    ("port as float", body(listen_port=51820.0), "got a number"),
    ("port as boolean", body(listen_port=True), "got a boolean"),
    ("port zero", body(listen_port=0), "not in 1-65535"),
    ("port too big", body(listen_port=65536), "not in 1-65535"),
    ("port huge", body(listen_port=10**40), "not in 1-65535"),
    ("port negative", body(listen_port=-1), "not in 1-65535"),
    ("addresses not a list", body(local_addresses="192.168.1.2"), "expected a list, got text"),
    ("addresses an object", body(local_addresses={}), "expected a list, got an object"),
    ("too many addresses", body(local_addresses=[f"192.168.0.{n}" for n in range(1, 34)]),
     "33 addresses, at most 32"),
    ("an address as a number", body(local_addresses=[3232235778]), "expected text"),
    ("an address as null", body(local_addresses=[None]), "got null"),
    ("a host name", body(local_addresses=["router.lan"]), "'router.lan' is not an IP"),
    ("a CIDR", body(local_addresses=["192.168.1.2/24"]), "is not an IP"),
    ("an address with a port", body(local_addresses=["192.168.1.2:51820"]), "is not an IP"),
    ("a scoped address", body(local_addresses=["fe80::1%eth0"]), "is not an IP"),
    ("a very long string", body(local_addresses=["1" * 3000]), "is not an IP"),
    ("unspecified", body(local_addresses=["0.0.0.0"]), "cannot be reached"),
    ("loopback", body(local_addresses=["127.0.0.1"]), "cannot be reached"),
    ("multicast", body(local_addresses=["ff02::1"]), "cannot be reached"),
    ("an address twice", body(local_addresses=["10.0.0.1", "10.0.0.1"]), "listed twice"),
    ("version not text", body(version=1), "version: expected text, got an integer"),
    ("version too long", body(version="v" * 65), "65 characters, at most 64"),
    ("version with a newline", body(version="0.1\nFAKE LOG LINE"), "printable ASCII"),
    ("version with an escape", body(version="\x1b[31m"), "printable ASCII"),
    ("version not ASCII", body(version="0.1-é"), "printable ASCII"),
])
def test_malformed_bodies(intent, raw, match):
    with pytest.raises(MalformedMessage, match=match):
        reported_from_json(raw)


def test_a_mapped_endpoint_is_optional_and_kept():
    got = reported_from_json(body(mapped_endpoint="198.51.100.2:40000"))
    assert str(got.mapped) == "198.51.100.2:40000"
    assert got.to_json() == {**GOOD, "mapped_endpoint": "198.51.100.2:40000"}
    assert str(reported_from_json(body(mapped_endpoint="[2001:db8::1]:1")).mapped) == \
        "[2001:db8::1]:1"
    for absent in (body(), body(mapped_endpoint=None)):
        assert reported_from_json(absent).mapped is None
        assert "mapped_endpoint" not in reported_from_json(absent).to_json()


@pytest.mark.parametrize(("intent", "value", "match"), [
    ("a number", 51820, "expected text, got an integer"),
    ("a list", ["198.51.100.2", 1], "expected text, got a list"),
    ("no port", "198.51.100.2", "is not IP:PORT"),
    ("port zero", "198.51.100.2:0", "is not IP:PORT"),
    ("port too big", "198.51.100.2:65536", "is not IP:PORT"),
    ("a host name", "router.lan:51820", "is not IP:PORT"),
    ("IPv6 without brackets", "2001:db8::1:51820", "is not IP:PORT"),
    ("a scoped address", "[fe80::1%eth0]:1", "is not IP:PORT"),
    ("very long", "1" * 3000 + ":1", "is not IP:PORT"),
    ("unspecified", "0.0.0.0:51820", "cannot be reached"),
    ("loopback", "127.0.0.1:51820", "cannot be reached"),
    ("multicast", "[ff02::1]:51820", "cannot be reached"),
])
def test_malformed_mapped_endpoints(intent, value, match):
    with pytest.raises(MalformedMessage, match=f"mapped_endpoint: .*{match}"):
        reported_from_json(body(mapped_endpoint=value))


def test_ipv6_endpoints_are_optional_and_kept():
    endpoints = ["[2001:db8:1::a]:51820", "[2a00:1450::5]:51820"]
    got = reported_from_json(body(ipv6_endpoints=endpoints))
    assert [str(e) for e in got.ipv6] == endpoints
    assert got.to_json() == {**GOOD, "ipv6_endpoints": endpoints}
    for absent in (body(), body(ipv6_endpoints=None), body(ipv6_endpoints=[])):
        assert reported_from_json(absent).ipv6 == ()
        assert "ipv6_endpoints" not in reported_from_json(absent).to_json()


@pytest.mark.parametrize(("intent", "value", "match"), [
    ("not a list", "[2001:db8::1]:1", "expected a list, got text"),
    ("a number in the list", [51820], "expected text, got an integer"),
    ("no brackets", ["2001:db8::1:51820"], "is not \\[IPv6\\]:PORT"),
    ("a scoped address", ["[fe80::1%eth0]:1"], "is not \\[IPv6\\]:PORT"),
    ("IPv4", ["198.51.100.2:51820"], "not a global unicast IPv6 address"),
    ("link-local", ["[fe80::1]:51820"], "not a global unicast IPv6 address"),
    ("unique local: reaches no other site", ["[fd00::2]:51820"], "not a global unicast"),
    ("6to4: a tunnel over IPv4", ["[2002:c000:204::1]:51820"], "not a global unicast"),
    ("Teredo", ["[2001:0:4136:e378::1]:51820"], "not a global unicast"),
    ("multicast", ["[ff0e::1]:51820"], "not a global unicast"),
    ("twice", ["[2001:db8::1]:1", "[2001:db8::1]:1"], "listed twice"),
    ("too many", [f"[2001:db8::{i}]:1" for i in range(1, 10)], "9 endpoints, at most 8"),
])
def test_malformed_ipv6_endpoints(intent, value, match):
    with pytest.raises(MalformedMessage, match=f"ipv6_endpoints: .*{match}"):
        reported_from_json(body(ipv6_endpoints=value))


def test_reported_checks_fields_when_built_in_code_too():
    with pytest.raises(MalformedMessage, match="not an IP address"):
        Reported(1, ("192.168.1.2",), "x")  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage, match="expected a list"):
        Reported(1, ["192.168.1.2"], "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("query", "want"), [
    ([], (None, None)),
    ([("since", "0")], (0, None)),
    ([("since", "42"), ("epoch", "00ff")], (42, "00ff")),
    ([("epoch", "abc")], (None, "abc")),
])
def test_watch_query(query, want):
    assert watch_query(query) == want


@pytest.mark.parametrize(("intent", "query", "match"), [
    ("negative since", [("since", "-1")], "not a revision"),
    ("since with a sign", [("since", "+1")], "not a revision"),
    ("since as a float", [("since", "1.0")], "not a revision"),
    ("since empty", [("since", "")], "not a revision"),
    ("since beyond 64 bits", [("since", "9" * 19)], "not a revision"),
    ("since with spaces", [("since", " 1")], "not a revision"),
    ("since given twice", [("since", "1"), ("since", "2")], "given twice"),
    ("epoch uppercase", [("epoch", "ABC")], "not lowercase hex"),
    ("epoch not hex", [("epoch", "xyz")], "not lowercase hex"),
    ("epoch too long", [("epoch", "a" * 65)], "not lowercase hex"),
    ("unknown parameter", [("peer", "x")], "unknown parameter 'peer'"),
])
def test_bad_watch_queries(intent, query, match):
    with pytest.raises(MalformedMessage, match=match):
        watch_query(query)


KEY = Key(bytes(range(32)))


@pytest.mark.parametrize("text", [KEY.base64(), KEY.hex(), KEY.base32(), KEY.base32().upper()])
def test_path_key_in_every_spelling(text):
    assert path_key(text) == KEY


@pytest.mark.parametrize("text", ["", "x", KEY.base64()[:-1], KEY.hex()[:-1] + "g",
                                  KEY.base64().replace("=", "A"), "%" * 44])
def test_bad_path_keys(text):
    with pytest.raises(MalformedMessage, match="peer key in path"):
        path_key(text)


# -- anything at all: a value or a MalformedMessage, never another exception ---------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
BODIES = st.one_of(
    st.binary(max_size=512),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={name: JSON for name in (*FIELDS, "mapped_endpoint",
                                                                "extra")}).map(
        lambda d: json.dumps(d).encode()),
    st.lists(st.text(max_size=50), max_size=40).map(
        lambda addrs: body(local_addresses=addrs)),
    st.text(max_size=60).map(lambda text: body(mapped_endpoint=text)),
)


@settings(max_examples=300, deadline=None)
@given(BODIES)
def test_any_body_is_a_report_or_a_bad_request(raw):
    with contextlib.suppress(MalformedMessage):
        assert isinstance(reported_from_json(raw), Reported)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["since", "epoch", "x"]), st.text(max_size=30)),
                max_size=3), st.text(max_size=80))
def test_any_query_or_path_is_a_value_or_a_bad_request(query, text):
    for parse, arg in ((watch_query, query), (path_key, text)):
        with contextlib.suppress(MalformedMessage):
            parse(arg)
