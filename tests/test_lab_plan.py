"""The lab's pure parts: scenarios, TOML, the catalog, the plan, WireGuard configs, the CLI
parser. No root needed."""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wgpunch.cli import build_parser
from wgpunch.errors import LabError
from wgpunch.keys import generate_keypair
from wgpunch.lab import catalog, scenario, state
from wgpunch.lab.nat import NAT_KINDS, NatInterfaces, ruleset
from wgpunch.lab.netns import IFNAME_MAX
from wgpunch.lab.probe import parse_target
from wgpunch.lab.scenario import Host, Nat, Scenario
from wgpunch.lab.topology import plan
from wgpunch.lab.wgconf import device_config

ROOT = Path(__file__).resolve().parents[1]


def toml_example(text: str) -> str:
    """The indented TOML block of a docstring or the fenced one of a Markdown file."""
    fenced = re.search(r"```toml\n(.*?)```", text, re.S)
    if fenced:
        return fenced.group(1)
    block = text[text.index('name = "two-homes"'):].split("\n\n")
    lines = []
    for para in block:
        if not para.startswith("    ") and lines:
            break
        lines.append(para)
    return textwrap.dedent("    " + "\n\n".join(lines))


# -- scenarios and TOML ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["docstring", "docs"])
def test_documented_toml_example_loads(tmp_path, source):
    text = scenario.__doc__ if source == "docstring" else (ROOT / "docs/lab.md").read_text()
    path = tmp_path / "two-homes.toml"
    path.write_text(toml_example(text))
    loaded = catalog.resolve(str(path))
    lab = plan(loaded, "t1")
    assert loaded.name == "two-homes"
    assert {n.name for n in lab.nodes if n.role == "host"} >= {"a", "b", "c", "d"}
    assert lab.node("d").nat_chain[-1] == "cgn"


@pytest.mark.parametrize(("table", "message"), [
    ({"site": [{"host": "a", "nat": "eim"}]}, "exactly one of"),
    ({"site": [{"nat": "eim"}]}, "nothing behind it"),
    ({"site": [{"nat": "cone", "hosts": ["a"]}]}, "unknown NAT kind 'cone'"),
    ({"site": [{"host": "a"}, {"host": "a"}]}, "used twice"),
    ({"site": [{"host": "core"}]}, "bad name 'core'"),
    ({"site": [{"host": "toolong1"}]}, "bad name 'toolong1'"),
    ({"site": [{"host": "a", "hosts": ["b"]}]}, "cannot have"),
    ({"site": [{"host": "a", "colour": "red"}]}, "unknown site key"),
    ({"site": [{"host": "a", "link": {"delay": 5}}]}, "takes delay_ms"),
    ({"site": [{"host": "a", "link": {"loss_pct": 101}}]}, "loss_pct must be"),
    ({"sites": []}, "unknown key"),
    ({"site": []}, "no sites"),
    ({"site": [{"host": "a", "portmap": True}]}, "cannot have"),
    ({"site": [{"nat": "eim", "inside": [{"nat": "symmetric", "portmap": True,
                                          "hosts": ["a"]}]}]}, "directly on the core"),
    ({"site": [{"nat": "eim", "ipv6": "nat66", "hosts": ["a"]}]}, "ipv6 must be one of"),
    ({"site": [{"nat": "eim", "ipv6": True, "hosts": ["a"]}]}, "ipv6 takes 'open' or"),
    ({"site": [{"host": "a", "ipv6": "open"}]}, "ipv6 takes true or false"),
    ({"site": [{"nat": "eim", "inside": [{"nat": "eim", "ipv6": "open",
                                          "hosts": ["a"]}]}]}, "IPv6 needs a NAT directly"),
    ({"site": [{"nat": "eim", "inside": [{"host": "a", "ipv6": True}]}]},
     "IPv6 comes from the NAT"),
    ({"registries": 0, "site": [{"host": "a"}]}, "registries must be a whole number in 1-9"),
    ({"registries": 10, "site": [{"host": "a"}]}, "registries must be"),
    ({"registries": "2", "site": [{"host": "a"}]}, "registries must be"),
    ({"site": [{"host": "a", "registries": ["registry2"]}]},
     r"host 'a': registries takes a non-empty list of registry \(each once"),
    ({"registries": 2, "site": [{"host": "a", "registries": []}]}, "non-empty list"),
    ({"registries": 2, "site": [{"host": "a", "registries": "registry2"}]},
     "takes a list of registry host names"),
    ({"registries": 2, "site": [{"host": "a", "wireguard": False,
                                 "registries": ["registry"]}]}, "a WireGuard host's"),
    ({"registries": 2, "site": [{"nat": "eim", "registries": ["registry"], "hosts": ["a"]}]},
     "NAT 'nat1' cannot have registries"),
    ({"registries": 2, "site": [{"host": "a", "registries": ["registry", "registry"]}]},
     "each once"),
    ({"site": [{"host": "reg2"}]}, "bad name 'reg2'"),
])
def test_bad_scenarios_are_refused_with_the_reason(table, message):
    with pytest.raises(LabError, match=message):
        scenario.from_dict(table, default_name="bad")


def test_nat_names_default_in_file_order():
    loaded = scenario.from_dict({"site": [
        {"nat": "eim", "hosts": ["a"]},
        {"nat": "eim-port", "inside": [{"nat": "eim", "hosts": ["b"]}]},
    ]}, default_name="x")
    assert [node.name for node, _ in loaded.walk()] == ["nat1", "a", "nat2", "nat3", "b"]


def test_port_mapping_is_a_flag_of_a_nat_and_of_its_plan():
    loaded = scenario.from_dict({"site": [{"nat": "symmetric", "name": "nm", "portmap": True,
                                           "hosts": ["a"]},
                                          {"nat": "eim", "hosts": ["b"]}]}, default_name="x")
    lab = plan(loaded, "t1")
    assert (lab.node("nm").portmap, lab.node("nat1").portmap) == (True, False)
    [pair] = [n for n, _ in catalog.resolve("matrix-eim-symmetric+upnp").walk() if n.name == "nb"]
    assert isinstance(pair, Nat) and (pair.kind, pair.portmap) == ("symmetric", True)
    assert catalog.resolve("symmetric-upnp").sites[0].portmap


# -- the catalog -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [*catalog.NAMED, "mixed-2", "mixed-60", "matrix-eim-port-symmetric"])
def test_every_named_scenario_plans_with_the_longest_prefix(name):
    lab = plan(catalog.resolve(name), "p2345678")
    names = [n for node in lab.nodes for n in (node.uplink, node.ifname) if n]
    assert all(len(n) <= IFNAME_MAX for n in names)


def test_matrix_pairs_cover_every_pair_of_kinds_once():
    # The lettered kinds: `eim-short` is `eim` with a shorter idle timeout, nothing a punch
    # sees; it is named where kinds are taken (matrix-K1-K2), not in the grid.
    kinds = list(catalog.KIND_LETTERS)
    pairs = {scenario.name for scenario in catalog.matrix_pairs()}
    assert pairs == {f"matrix-{x}-{y}"
                     for x, y in itertools.combinations_with_replacement(kinds, 2)}
    # Dashes inside kind names do not confuse the name parser.
    pair = catalog.resolve("matrix-eim-full-cone-eim-port")
    assert [node.kind for node, _ in pair.walk() if isinstance(node, Nat)] == [
        "eim-full-cone", "eim-port"]


def test_double_nat_takes_any_home_kind_inside_any_carrier():
    lab = catalog.resolve("double-eim-full-cone-symmetric")
    nats = [(node.name, node.kind, parent.name if parent else None)
            for node, parent in lab.walk() if isinstance(node, Nat)]
    assert nats == [("cgn", "symmetric", None), ("na", "eim-full-cone", "cgn"),
                    ("nc", "eim-full-cone", "cgn"), ("nb", "eim", None)]
    assert catalog.resolve("double-nat") == catalog.double("eim", "eim-port",
                                                          name="double-nat")


def test_two_lans_share_a_nat_that_does_not_hairpin():
    [office] = [node for node, parent in catalog.resolve("two-lans").walk()
                if isinstance(node, Nat) and parent is None and node.name == "office"]
    assert not office.hairpin
    assert [n.name for n, _ in Scenario("x", (office,)).walk() if isinstance(n, Host)] == [
        "a", "c"]


def test_the_big_matrix_has_two_hosts_per_kind():
    kinds = {}
    for node, parent in catalog.matrix().walk():
        if isinstance(node, Host):
            kind = parent.kind if parent else "public"
            kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == dict.fromkeys(catalog.KIND_LETTERS, 2)
    assert set(catalog.KIND_LETTERS) == {"public", *NAT_KINDS} - {"eim-short"}
    assert catalog.resolve("matrix-eim-short-eim").name == "matrix-eim-short-eim"


@pytest.mark.parametrize("spec", ["mixed-1", "mixed-61", "matrix-eim", "nope", "matrix-eim-x",
                                  "double-public-eim", "double-eim", "matrix-eim-public+upnp",
                                  "double-eim+upnp-eim"])
def test_unknown_scenarios_are_refused(spec):
    with pytest.raises(LabError):
        catalog.resolve(spec)


# -- the plan ----------------------------------------------------------------------------------


def test_easy_plan_addresses_and_names():
    lab = plan(catalog.resolve("easy"), "t1")
    registry, a, na = lab.node("registry"), lab.node("a"), lab.node("na")
    assert (registry.ns, registry.ifname, str(registry.address), str(registry.tunnel_ip)) == (
        "t1-registry", "t1-reg", "192.0.2.2/30", "10.99.0.254")
    assert (a.ns, a.ifname, str(a.address), str(a.gateway), str(a.tunnel_ip)) == (
        "t1-a", "t1-a", "192.168.1.10/24", "192.168.1.1", "10.99.0.1")
    assert (str(a.public_ip), str(a.private_ip), a.nat_chain) == (
        "198.51.100.2", "192.168.1.10", ("na",))
    assert (na.uplink, str(na.address), str(na.lan)) == ("t1_core", "198.51.100.2/30",
                                                         "192.168.1.1/24")
    assert lab.node("b").public_ip == ipaddress.IPv4Address("198.51.100.6")


def test_double_nat_plan_uses_the_cgnat_range_inside_the_carrier():
    lab = plan(catalog.resolve("double-nat"), "t1")
    assert str(lab.node("cgn").lan) == "100.64.1.1/24"
    assert str(lab.node("na").address) == "100.64.1.10/24"
    assert lab.node("a").nat_chain == ("na", "cgn")
    assert lab.node("a").public_ip == lab.node("c").public_ip == lab.node("cgn").address.ip


def test_two_registries_plan_a_public_and_a_tunnel_address_each():
    lab = plan(catalog.resolve("two-registries"), "t1")
    first, second = lab.registries
    assert (first.name, first.ifname, str(first.address), str(first.tunnel_ip)) == (
        "registry", "t1-reg", "192.0.2.2/30", "10.99.0.254")
    assert (second.name, second.ifname, str(second.address), str(second.gateway),
            str(second.tunnel_ip), second.uplink) == (
        "registry2", "t1-reg2", "192.0.2.6/30", "192.0.2.5", "10.99.0.253", "t1_core")
    assert lab.ifname_toward("registry2") == "t1_reg2"
    assert [lab.node(h).registries for h in "abc"] == [
        ("registry", "registry2"), ("registry", "registry2"), ("registry2",)]
    assert plan(catalog.resolve("easy"), "t1").node("a").registries == ("registry",)


def test_each_node_has_its_registries_and_each_registry_its_nodes():
    lab = plan(catalog.resolve("two-registries"), "t1")
    keys = {node.name: generate_keypair() for node in lab.wireguard_hosts}
    public = {name: pair[1] for name, pair in keys.items()}

    def peers(name: str) -> dict[str, str]:
        text = device_config(lab, lab.node(name), keys[name][0], public)
        return {b.split("\n")[1].removeprefix("# "): b for b in text.split("\n\n")[1:]}

    assert set(peers("a")) == {"b", "c", "registry", "registry2"}
    assert peers("a")["registry2"].endswith(
        "AllowedIPs = 10.99.0.253/32\nEndpoint = 192.0.2.6:51820\nPersistentKeepalive = 25\n")
    assert set(peers("c")) == {"a", "b", "registry2"}  # a and b are its peers all the same
    assert set(peers("registry")) == {"a", "b"}  # not c, and not registry2: no shared state
    assert set(peers("registry2")) == {"a", "b", "c"}


def test_dual_stack_plan_routes_one_ipv6_prefix_per_router_and_no_further():
    from wgpunch.lab.build import sysctls, topology_batches

    lab = plan(catalog.resolve("dual-one"), "t1")
    a, na, nb, b = (lab.node(n) for n in ("a", "na", "nb", "b"))
    assert (str(a.address6), str(a.gateway6)) == ("2001:db8:1::a/64", "2001:db8:1::1")
    assert (str(na.address6), str(na.lan6), na.ipv6) == ("2001:db8::2/64", "2001:db8:1::1/64",
                                                          "firewall")
    assert str(lab.node("registry").public_ip6) == "2001:db8:0:ffff::2"
    assert b.public_ip6 is None and nb.address6 is None and nb.ipv6 is None
    # IPv6 is on only where a node has an address (and on the core that routes them).
    assert "net.ipv6.conf.all.disable_ipv6=1" in sysctls(b, lab)
    assert "net.ipv6.conf.all.disable_ipv6=0" in sysctls(a, lab)
    assert "net.ipv6.conf.all.forwarding=1" in sysctls(lab.node("core"), lab)
    # The core's only IPv6 routes are the routers' LANs: no default route, nothing outside.
    core = [c for ns, batch in topology_batches(lab) if ns == "t1-core" for c in batch]
    assert [c for c in core if c.startswith("route")] == ["route add 2001:db8:1::/64 via "
                                                         "2001:db8::2"]
    assert catalog.resolve("easy").uses_ipv6 is False
    assert all(node.address6 is None for node in plan(catalog.resolve("easy"), "t1").nodes)


def test_the_ipv6_firewall_drops_what_nobody_inside_asked_for():
    from wgpunch.lab.ipv6 import firewall6

    script = firewall6("firewall", "t1_fw6", "t1_lan")
    assert script is not None and "table ip6 t1_fw6" in script and "policy drop;" in script
    assert "ct state established,related accept" in script
    assert 'iifname "t1_lan" accept' in script
    assert firewall6("open", "t1_fw6", "t1_lan") is None
    assert 'iifname != "t1_lan" meta l4proto udp drop' in (
        firewall6("blocked", "t1_fw6", "t1_lan") or "")


def test_every_address_is_inside_the_lab_ranges():
    allowed = [ipaddress.ip_network(n) for n in (
        "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10",
        "192.168.0.0/16", "10.0.0.0/8")]
    for name in [*catalog.NAMED, "mixed-60"]:
        for node in plan(catalog.resolve(name), "t1").nodes:
            for address in (node.address, node.lan):
                if address is not None:
                    assert any(address.ip in net for net in allowed), (name, node)
            for address6 in (node.address6, node.lan6):
                if address6 is not None:
                    assert address6.ip in ipaddress.ip_network("2001:db8::/32"), (name, node)


@pytest.mark.parametrize("prefix", ["", "1ab", "Ab", "a-b", "abcdefghi", "a_b"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(LabError, match="bad prefix"):
        state.check_prefix(prefix)


# -- WireGuard configs -------------------------------------------------------------------------


def test_configs_are_what_a_user_would_write():
    lab = plan(catalog.resolve("easy"), "t1")
    keys = {node.name: generate_keypair() for node in lab.wireguard_hosts}
    public = {name: pair[1] for name, pair in keys.items()}
    a = device_config(lab, lab.node("a"), keys["a"][0], public)
    peers = {block.split("\n")[1].removeprefix("# "): block for block in a.split("\n\n")[1:]}
    assert "ListenPort = 51820" in a and f"PrivateKey = {keys['a'][0].base64()}" in a
    assert peers["registry"].endswith(
        "AllowedIPs = 10.99.0.254/32\nEndpoint = 192.0.2.2:51820\nPersistentKeepalive = 25\n")
    assert peers["b"].endswith(f"PublicKey = {public['b'].base64()}\nAllowedIPs = 10.99.0.2/32")
    registry = device_config(lab, lab.node("registry"), keys["registry"][0], public)
    assert "Endpoint" not in registry and "PersistentKeepalive" not in registry
    assert registry.count("[Peer]") == 2


# -- small tools and the CLI -------------------------------------------------------------------


def test_probe_targets_parse():
    assert parse_target("198.51.100.2:3478") == (("198.51.100.2", 3478), "probe")
    assert parse_target("198.51.100.2:3478=hello") == (("198.51.100.2", 3478), "hello")


def test_cli_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lab", "up", "--help"])
    text = capsys.readouterr().out
    for option in ("SCENARIO", "--prefix", "--json", "easy", "mixed-N", ".toml"):
        assert option in text


@pytest.mark.parametrize("argv", [["up", "easy"], ["down", "--prefix", "x1"],
                                  ["exec", "x1", "a", "--", "true"]])
def test_cli_refuses_without_root(argv):
    # Drop to an unprivileged effective uid after start-up (every module loaded: main()
    # imports the subcommand's lazily, and this Python's files are root's), so this also runs
    # as root.
    code = ("import os, sys; from wgpunch.cli import build_parser, main; build_parser()\n"
            "os.geteuid() == 0 and os.seteuid(65534)\n"
            f"sys.exit(main(['lab', *{argv!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=60,
                          check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("wgpunch: lab: network namespaces") and "need root" in done.stderr


def test_a_scenario_validates_before_anything_runs():
    with pytest.raises(LabError, match="used twice"):
        Scenario("x", (Host("a"), Nat("n", "eim", (Host("a"),))))


def test_a_nat_takes_an_idle_udp_timeout():
    table = {"site": [{"nat": "eim", "name": "home", "udp_timeout_s": 8, "hosts": ["a"]}]}
    [nat] = scenario.from_dict(table, default_name="t").sites
    assert isinstance(nat, Nat) and nat.udp_timeout_s == 8
    for bad in (0, 601, 2.5, "8", True):
        with pytest.raises(LabError, match="udp_timeout_s must be a whole number in 1-600"):
            Nat("home", "eim", (Host("a"),), udp_timeout_s=bad)
    with pytest.raises(LabError, match="cannot have"):
        scenario.from_dict({"site": [{"host": "a", "udp_timeout_s": 8}]}, default_name="t")


def test_the_idle_timeout_is_a_ct_timeout_object_of_the_routers_own_table():
    where = NatInterfaces("p_nat", "wan", ipaddress.IPv4Address("198.51.100.2"), "lan",
                          ipaddress.IPv4Network("192.168.1.0/24"))
    policy = "policy = { unreplied : 20, replied : 20 }"
    assert policy in ruleset("eim-short", where, hairpin=False)
    assert policy.replace("20", "8") in ruleset("eim-short", where, hairpin=False,
                                                udp_timeout_s=8)
    assert policy.replace("20", "8") in ruleset("eim", where, hairpin=False, udp_timeout_s=8)
    assert "ct timeout" not in ruleset("eim", where, hairpin=False)
