"""config/: one loader for flags, WGPUNCH_* variables and TOML files, checked against each
command's schema; the one read_token; the example configs in docs/examples. In-process, no
root, no sockets."""

import logging
import math
import tomllib
from pathlib import Path

import pytest

from wgpunch import config
from wgpunch.cli import build_parser
from wgpunch.config import read_token
from wgpunch.config.node import NODE
from wgpunch.config.registry import REGISTRY, RELAY
from wgpunch.config.rendezvous import DEFAULT_LEGACY, RENDEZVOUS, RendezvousConfig
from wgpunch.errors import ConfigError
from wgpunch.keys import Key
from wgpunch.natpunch import cli as rendezvous_cli
from wgpunch.node import cli as node_cli
from wgpunch.node import serve as node_serve
from wgpunch.registry import cli as registry_cli
from wgpunch.registry import relaycli
from wgpunch.wg.model import DeviceState, PeerState

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
KEY = "Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="  # 32 bytes of text: a well-formed key
NEEDS = {"registry": 'interface = "wg0"\n', "node": 'interface = "wg0"\n', "rendezvous": ""}

SCHEMAS = config.schemas()


@pytest.fixture(autouse=True)
def no_wgpunch_environment(monkeypatch):
    """The settings_from() functions read os.environ: the runner's must not leak in."""
    import os

    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)


def schema_of(command: str) -> config.Schema:
    return {schema.command: schema for schema in SCHEMAS}[command]


def flags(command: str, *argv: str) -> dict:
    return vars(build_parser().parse_args([command, *argv]))


def load(command: str, toml: str | None = None, *argv: str, env: dict | None = None,
         tmp: Path | None = None):
    path = None
    if toml is not None:
        assert tmp is not None
        path = tmp / f"{command}.toml"
        path.write_text(toml)
    return config.load(schema_of(command), flags(command, *argv), config=path,
                       environ=env or {})


# -- types ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "command", "toml", "match"), [
    ("text key given a number", "node", "interface = 5", "key 'interface' must be text, got 5"),
    ("text key given a table", "registry", "[interface]\nname = 'wg0'",
     "key 'interface' must be text"),
    ("a boolean is not a whole number", "node", "keepalive = true",
     "key 'keepalive' must be a whole number, got True"),
    ("a fraction is not a whole number", "node", "opener_ttl = 1.5",
     "key 'opener_ttl' must be a whole number, got 1.5"),
    ("a whole number as text is still text", "rendezvous", 'max_peers = "10"',
     "key 'max_peers' must be a whole number, got '10'"),
    ("a boolean is not seconds", "registry", "poll_interval = true", "must be a number of"),
    ("seconds as text", "node", 'interval = "5"', "key 'interval' must be a number of seconds"),
    ("path given a number", "registry", "token_file = 1", "key 'token_file' must be text"),
    ("address list given a number", "rendezvous", "listen = 5",
     "key 'listen' must be an address or a list of addresses, got 5"),
    ("address list holding a number", "registry", "listen = [5]",
     "key 'listen' must list addresses as text"),
    ("dns holding a boolean", "registry", "dns = [true]", "key 'dns' must list ports or"),
    ("dns_self given a number", "registry", "dns_self = 1",
     "key 'dns_self' must be true, false or a list of texts, got 1"),
    ("legacy given a number", "rendezvous", "legacy = 5",
     "key 'legacy' must be true, false or text, got 5"),
    ("a switch given text", "node", 'portmap = "no"', "key 'portmap' must be true or false"),
])
def test_wrong_types_name_the_key_and_the_file(tmp_path, intent, command, toml, match):
    needs = "" if "interface" in toml else NEEDS[command]
    with pytest.raises(ConfigError, match=match) as caught:
        load(command, needs + toml + "\n", tmp=tmp_path)
    assert str(caught.value).startswith(f"{command}: config {tmp_path / command}.toml: ")


def test_the_message_reads_as_the_design_says(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load("node", "interface = 5\n", tmp=tmp_path)
    assert str(caught.value) == (f"node: config {tmp_path}/node.toml: key 'interface' must be "
                                 "text, got 5")


@pytest.mark.parametrize(("intent", "command", "toml", "key", "want"), [
    ("a whole number of seconds is seconds", "registry", "poll_interval = 1", "poll_interval",
     1.0),
    ("one address for a list", "registry", 'listen = "10.0.0.1"', "listen", ("10.0.0.1",)),
    ("dns mixes ports and addresses", "registry", 'dns = [53, "10.0.0.1:53"]', "dns",
     (53, "10.0.0.1:53")),
    ("dns_self true: a self record, no arguments", "registry", "dns_self = true", "dns_self",
     ()),
    ("dns_self false: none", "registry", "dns_self = false", "dns_self", None),
    ("legacy true: the default address", "rendezvous", "legacy = true", "legacy",
     DEFAULT_LEGACY),
    ("legacy false: off", "rendezvous", "legacy = false", "legacy", None),
    ("an endless ttl is more than 0", "rendezvous", "peer_ttl = inf", "peer_ttl", math.inf),
])
def test_values_of_every_kind(tmp_path, intent, command, toml, key, want):
    assert getattr(load(command, NEEDS[command] + toml + "\n", tmp=tmp_path), key) == want


# -- bounds -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "command", "toml", "argv", "match"), [
    ("keepalive 0", "node", "keepalive = 0", [], "key 'keepalive' 0 is not in 1-65535"),
    ("keepalive above 16 bits", "node", "", ["--keepalive", "65536"],
     "--keepalive 65536 is not in 1-65535"),
    ("opener TTL above 255", "node", "opener_ttl = 256", [], "is not in 1-255"),
    ("interval below 0.1 s", "node", "interval = 0.05", [], "is not in 0.1-3600"),
    ("poll interval NaN", "registry", "poll_interval = nan", [], "nan is not in 0.01-60"),
    ("peer TTL 0", "rendezvous", "peer_ttl = 0", [], "0.0 must be more than 0"),
    ("peer TTL negative flag", "rendezvous", "", ["--peer-ttl", "-1"],
     "--peer-ttl -1.0 must be more than 0"),
    ("max peers 0", "rendezvous", "max_peers = 0", [], "key 'max_peers' 0 must be at least 1"),
])
def test_bounds(tmp_path, intent, command, toml, argv, match):
    with pytest.raises(ConfigError, match=match):
        load(command, NEEDS[command] + toml + "\n", *argv, tmp=tmp_path)


@pytest.mark.parametrize(("intent", "command", "toml", "key", "want"), [
    ("keepalive at its top", "node", "keepalive = 65535", "keepalive", 65535),
    ("opener TTL at its bottom", "node", "opener_ttl = 1", "opener_ttl", 1),
    ("poll interval at its bottom", "registry", "poll_interval = 0.01", "poll_interval", 0.01),
    ("max peers 1", "rendezvous", "max_peers = 1", "max_peers", 1),
])
def test_bounds_are_inclusive(tmp_path, intent, command, toml, key, want):
    assert getattr(load(command, NEEDS[command] + toml + "\n", tmp=tmp_path), key) == want


# -- unknown keys, files ----------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "command", "toml", "match"), [
    ("a key no command has", "registry", "port = 1", "unknown key 'port'; known: interface,"),
    ("a misspelt key gets a suggestion", "registry", "poll_intervall = 1",
     "unknown key 'poll_intervall' \\(did you mean 'poll_interval'\\?\\)"),
    ("another command's key", "node", "poll_interval = 1", "unknown key 'poll_interval'"),
    ("a flag that is no config key", "rendezvous", "print_key = true", "unknown key"),
    ("a section of known keys is still unknown", "node", "[node]\ninterface = 'wg0'",
     "unknown key 'node'"),
])
def test_unknown_keys(tmp_path, intent, command, toml, match):
    with pytest.raises(ConfigError, match=match) as caught:
        load(command, toml + "\n", tmp=tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^rendezvous: cannot read config .*nope.toml: No "):
        config.load(RENDEZVOUS, flags("rendezvous"), config=tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match=r"^node: config .* is not valid TOML"):
        load("node", "interface = ", tmp=tmp_path)


def test_required_key_missing_everywhere(tmp_path):
    with pytest.raises(ConfigError, match=r"^registry: no interface: give --interface, "
                       r"WGPUNCH_INTERFACE or 'interface' in the config file$"):
        load("registry", "", tmp=tmp_path)
    assert load("registry", "", env={"WGPUNCH_INTERFACE": "wg1"}, tmp=tmp_path).interface \
        == "wg1"


# -- the environment --------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "command", "env", "key", "want"), [
    ("seconds from text", "registry", {"WGPUNCH_POLL_INTERVAL": "0.5"}, "poll_interval", 0.5),
    ("a whole number from text", "node", {"WGPUNCH_KEEPALIVE": " 30 "}, "keepalive", 30),
    ("a list is comma-separated", "registry",
     {"WGPUNCH_LISTEN": "10.0.0.1:1, [fd00::1]:2,"}, "listen", ("10.0.0.1:1", "[fd00::1]:2")),
    ("dns ports stay text for the parser", "registry", {"WGPUNCH_DNS": "5353,10.0.0.1"},
     "dns", ("5353", "10.0.0.1")),
    ("dns_self true", "registry", {"WGPUNCH_DNS_SELF": "true"}, "dns_self", ()),
    ("dns_self false", "registry", {"WGPUNCH_DNS_SELF": "False"}, "dns_self", None),
    ("dns_self arguments", "registry", {"WGPUNCH_DNS_SELF": "192.0.2.1:51820,10.0.0.0/24"},
     "dns_self", ("192.0.2.1:51820", "10.0.0.0/24")),
    ("legacy yes", "rendezvous", {"WGPUNCH_LEGACY": "yes"}, "legacy", DEFAULT_LEGACY),
    ("legacy off", "rendezvous", {"WGPUNCH_LEGACY": "off"}, "legacy", None),
    ("legacy address", "rendezvous", {"WGPUNCH_LEGACY": "127.0.0.1:9"}, "legacy",
     "127.0.0.1:9"),
    ("a path stays relative to the working directory", "node",
     {"WGPUNCH_TOKEN_FILE": "token"}, "token_file", Path("token")),
    ("an empty variable counts as unset", "rendezvous", {"WGPUNCH_MAX_PEERS": ""},
     "max_peers", 65536),
])
def test_environment_values_are_converted(intent, command, env, key, want):
    base = {} if command == "rendezvous" else {"WGPUNCH_INTERFACE": "wg0"}
    assert getattr(load(command, env={**base, **env}), key) == want


@pytest.mark.parametrize(("intent", "env", "match"), [
    ("not a number", {"WGPUNCH_KEEPALIVE": "often"},
     "^node: environment WGPUNCH_KEEPALIVE must be a whole number, got 'often'$"),
    ("a fraction for a whole number", {"WGPUNCH_OPENER_TTL": "2.5"}, "whole number"),
    ("out of bounds", {"WGPUNCH_KEEPALIVE": "0"},
     "^node: environment WGPUNCH_KEEPALIVE 0 is not in 1-65535$"),
    ("not seconds", {"WGPUNCH_INTERVAL": "soon"}, "WGPUNCH_INTERVAL must be a number of"),
    ("NaN seconds", {"WGPUNCH_INTERVAL": "nan"}, "WGPUNCH_INTERVAL nan is not in"),
])
def test_environment_errors_name_the_variable(intent, env, match):
    with pytest.raises(ConfigError, match=match):
        load("node", env={"WGPUNCH_INTERFACE": "wg0", **env})


def test_variables_of_no_command_are_warned_about_and_others_ignored(caplog):
    env = {"WGPUNCH_INTERFACE": "wg0", "WGPUNCH_INTERFCE": "wg1", "WGPUNCH_MAX_PEERS": "x"}
    with caplog.at_level(logging.WARNING):
        got = load("node", env=env)  # max_peers is the rendezvous's: not the node's business
    assert got.interface == "wg0"
    assert "WGPUNCH_INTERFCE" in caplog.text and "WGPUNCH_MAX_PEERS" not in caplog.text


# -- precedence -------------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "flag", "env", "file", "want", "origin"), [
    ("default alone", None, None, None, 0.2, "the default"),
    ("file over default", None, None, "3", 3.0, "key 'poll_interval'"),
    ("environment over file", None, "2", "3", 2.0, "environment WGPUNCH_POLL_INTERVAL"),
    ("flag over environment and file", "1", "2", "3", 1.0, "--poll-interval"),
    ("flag over file", "1", None, "3", 1.0, "--poll-interval"),
    ("environment over default", None, "2", None, 2.0, "environment WGPUNCH_POLL_INTERVAL"),
])
def test_precedence_flag_environment_file_default(tmp_path, intent, flag, env, file, want,
                                                  origin):
    toml = 'interface = "wg0"\n' + ("" if file is None else f"poll_interval = {file}\n")
    argv = [] if flag is None else ["--poll-interval", flag]
    got = load("registry", toml, *argv, env={} if env is None else
               {"WGPUNCH_POLL_INTERVAL": env}, tmp=tmp_path)
    assert got.poll_interval == want
    assert origin in got.origin("poll_interval")


def test_a_bad_value_below_a_good_one_is_not_read(tmp_path):
    """Only the winning source is checked: a flag overrides a broken file value."""
    got = load("node", 'interface = "wg0"\nkeepalive = 0\n', "--keepalive", "9",
               env={"WGPUNCH_KEEPALIVE": "x"}, tmp=tmp_path)
    assert got.keepalive == 9


@pytest.mark.parametrize(("intent", "toml", "argv", "env", "want"), [
    ("port mapping is on by default", "", [], {}, True),
    ("--no-portmap switches it off", "", ["--no-portmap"], {}, False),
    ("so does the file", "portmap = false\n", [], {}, False),
    ("and the environment, over the file", "portmap = true\n", [], {"WGPUNCH_PORTMAP": "off"},
     False),
    ("--portmap wins over both", "portmap = false\n", ["--portmap"],
     {"WGPUNCH_PORTMAP": "no"}, True),
])
def test_the_portmap_switch(tmp_path, intent, toml, argv, env, want):
    got = load("node", NEEDS["node"] + toml, *argv, env=env, tmp=tmp_path)
    assert got.portmap is want, intent
    with pytest.raises(ConfigError, match="WGPUNCH_PORTMAP must be true or false"):
        load("node", NEEDS["node"], env={"WGPUNCH_PORTMAP": "maybe"}, tmp=tmp_path)


def test_the_environment_can_switch_off_what_the_file_switches_on(tmp_path):
    got = load("rendezvous", "legacy = true\n", env={"WGPUNCH_LEGACY": "false"}, tmp=tmp_path)
    assert got.legacy is None and got.origin("legacy") == "environment WGPUNCH_LEGACY"


# -- paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "command", "key", "value", "want"), [
    ("registry token next to the file", "registry", "token_file", "token", "conf/token"),
    ("node token in a subdirectory", "node", "token_file", "secret/token", "conf/secret/token"),
    ("rendezvous key up a directory", "rendezvous", "key", "../state/r.key",
     "conf/../state/r.key"),
    ("rendezvous allow-list", "rendezvous", "allow", "allowed", "conf/allowed"),
    ("an absolute path stays", "node", "token_file", "/etc/wgpunch/token",
     "/etc/wgpunch/token"),
])
def test_relative_paths_in_a_file_are_relative_to_it(tmp_path, intent, command, key, value,
                                                     want):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "c.toml"
    path.write_text(NEEDS[command] + f"{key} = {value!r}\n".replace("'", '"'))
    got = config.load(schema_of(command), flags(command), config=path, environ={})
    assert getattr(got, key) == (Path(want) if want.startswith("/") else tmp_path / want)


def test_a_relative_path_flag_stays_relative_to_the_working_directory(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('interface = "wg0"\ntoken_file = "a"\n')
    got = config.load(NODE, flags("node", "--token-file", "b"), config=path, environ={})
    assert got.token_file == Path("b")


def test_default_paths_are_not_moved(tmp_path):
    assert load("rendezvous", "", tmp=tmp_path).key == Path("/var/lib/wgpunch/rendezvous.key")


# -- read_token -------------------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "content", "want"), [
    ("surrounding whitespace goes", "  s3cret\n", "s3cret"),
    ("any printable ASCII", "a-b_c.d~e+f/g=", "a-b_c.d~e+f/g="),
])
def test_read_token(tmp_path, intent, content, want):
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(0o600)
    assert read_token(path) == want


@pytest.mark.parametrize(("intent", "content"), [
    ("empty file", ""),
    ("only a newline", "\n"),
    ("two words", "sekrit words"),
    ("a tab inside", "sekrit\twords"),
    ("a control character", "sekrit\x07"),
    ("two lines", "sekrit\nwords\n"),
])
def test_read_token_refuses(tmp_path, intent, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"^node: token file .* must hold one token") as caught:
        read_token(path, "node")
    assert "sekrit" not in str(caught.value)


def test_read_token_unreadable(tmp_path):
    with pytest.raises(ConfigError, match=r"^registry: cannot read token file .*: No such"):
        read_token(tmp_path / "missing", "registry")
    with pytest.raises(ConfigError, match=r"cannot read token file .*: Is a directory"):
        read_token(tmp_path)  # root reads any file; a directory is unreadable even for it
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_token(binary)


@pytest.mark.parametrize(("intent", "mode", "warned"), [
    ("owner only", 0o600, False),
    ("owner read-only", 0o400, False),
    ("group-readable", 0o640, True),
    ("world-readable", 0o644, True),
    ("group-writable", 0o620, True),
])
def test_read_token_warns_when_others_may_read_it(tmp_path, caplog, intent, mode, warned):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING):
        assert read_token(path, "node") == "s3cret"
    assert ("readable by other users" in caplog.text) is warned
    assert "s3cret" not in caplog.text


# -- the commands: settings_from, --help, the examples ----------------------------------------

@pytest.mark.parametrize(("intent", "toml", "argv", "match"), [
    ("two kinds", f'registry = "{KEY}"\n', ["--dns-sd", "10.0.0.1:53", "--zone", "m."],
     "got --registry and --dns-sd"),
    ("natpunch without its key", 'natpunch = "r.example"\n', [], "needs --natpunch-server"),
    ("a server key without natpunch", f'registry = "{KEY}"\nnatpunch_server_key = "{KEY}"\n',
     [], "goes with --natpunch"),
    ("dns_sd without a zone", 'dns_sd = "10.0.0.1:53"\n', [], "needs --zone"),
    ("a bad key says where it came from", 'registry = "short"\n', [],
     r"registry key .*length 5.* \(from config .*node.toml: key 'registry'\)"),
    ("a bad DNS-SD server from a flag", "", ["--dns-sd", "dns.example:53", "--zone", "m."],
     r"^node: DNS-SD server: .*'dns.example:53'.*\(from --dns-sd\)$"),
    ("mesh without the registry's API", 'dns_sd = "10.0.0.1:53"\nzone = "m."\nmesh = true\n',
     [], "--mesh goes with a registry"),
    ("mesh given a word", f'registry = "{KEY}"\nmesh = "yes"\n', [],
     "key 'mesh' must be true or false"),
    ("an exclusion without mesh", f'registry = "{KEY}"\n', ["--mesh-exclude", KEY],
     "--mesh-exclude goes with --mesh"),
    ("a bad excluded key says where it came from", f'registry = "{KEY}"\nmesh = true\n',
     ["--mesh-exclude", "short"], r"--mesh-exclude key .*length 5.* \(from --mesh-exclude\)"),
])
def test_node_settings_errors(tmp_path, intent, toml, argv, match):
    path = tmp_path / "node.toml"
    path.write_text('interface = "wg0"\n' + toml)
    with pytest.raises(ConfigError, match=match):
        node_cli.settings_from(build_parser().parse_args(["node", "--config", str(path),
                                                          *argv]))


def test_node_settings_from_environment(monkeypatch):
    monkeypatch.setenv("WGPUNCH_INTERFACE", "wg7")
    monkeypatch.setenv("WGPUNCH_DNS_SD", "[fd00::1]:5353")
    monkeypatch.setenv("WGPUNCH_ZONE", "mesh.internal.")
    got = node_cli.settings_from(build_parser().parse_args(["node", "--interval", "0.5"]))
    assert (got.interface, str(got.dns_sd), got.zone, got.interval_s, got.keepalive_s,
            got.registry) == ("wg7", "[fd00::1]:5353", "mesh.internal.", 0.5, 25, None)


def test_node_mesh_and_several_registries(tmp_path, monkeypatch):
    other = Key(bytes([9]) * 32)
    monkeypatch.setenv("WGPUNCH_MESH", "true")
    monkeypatch.setenv("WGPUNCH_MESH_EXCLUDE", f"{other.base64()}, {other.hex()}")
    got = node_cli.settings_from(build_parser().parse_args(
        ["node", "--registry", KEY, "--registry", other.base64()]))
    assert (got.interface, got.registry, got.registries, got.mesh, got.mesh_exclude) == (
        None, None, (Key.parse(KEY), other), True, frozenset({other}))
    one = node_cli.settings_from(build_parser().parse_args(["node", "--registry", KEY]))
    assert (one.registry, one.registries) == (Key.parse(KEY), (Key.parse(KEY),))
    with pytest.raises(ConfigError, match="--metrics-listen needs --interface IF"):
        node_cli.settings_from(build_parser().parse_args(
            ["node", "--registry", KEY, "--metrics-listen", "127.0.0.1:9588"]), environ={})


def test_which_registry_an_interface_follows():
    mine, other, stranger = (Key(bytes([n]) * 32) for n in (1, 2, 3))
    peers = (PeerState(mine, None, (), None, 0, 0, 0, False),
             PeerState(other, None, (), None, 0, 0, 0, False))
    assert node_serve.registries_of(DeviceState("wg0", None, 0, 0, peers[:1]),
                                  (stranger, mine)) == (mine,)
    with pytest.raises(ConfigError, match=r"^node: wg0 has none of the registries given"):
        node_serve.registries_of(DeviceState("wg0", None, 0, 0, peers[:1]), (stranger,))
    # Several: it follows each (node/registries.py), in the order given.
    assert node_serve.registries_of(DeviceState("wg0", None, 0, 0, peers),
                                  (other, stranger, mine)) == (other, mine)


def test_registry_parse_errors_say_where_the_value_came_from(tmp_path, monkeypatch):
    path = tmp_path / "registry.toml"
    path.write_text('interface = "wg0"\nlisten = ["x:1"]\n')
    with pytest.raises(ConfigError, match=r"listen address 'x:1'.*\(from config .*: key "
                       r"'listen'\)$"):
        registry_cli.settings_from(build_parser().parse_args(["registry", "--config",
                                                              str(path)]))
    monkeypatch.setenv("WGPUNCH_ZONE", "a..b")
    with pytest.raises(ConfigError, match=r"DNS zone 'a..b'.*\(from environment WGPUNCH_ZONE"):
        registry_cli.settings_from(build_parser().parse_args(["registry", "-i", "wg0",
                                                              "--dns", "53"]))


def test_rendezvous_settings(tmp_path):
    path = tmp_path / "rendezvous.toml"
    path.write_text('listen = ["127.0.0.1", "[::1]:9"]\nlegacy = true\nmax_peers = 5\n')
    got = rendezvous_cli.settings_from(load_file(RENDEZVOUS, path, "--peer-ttl", "7"))
    assert [str(e) for e in got.listen] == ["127.0.0.1:51822", "[::1]:9"]
    assert str(got.legacy) == "0.0.0.0:49918"
    assert (got.limits.peers_max, got.limits.peer_ttl_s) == (5, 7.0)
    path.write_text('legacy = "x:y"\n')
    with pytest.raises(ConfigError, match=r"^rendezvous: config .*: key 'legacy' 'x:y': "):
        rendezvous_cli.settings_from(load_file(RENDEZVOUS, path))


def load_file(schema: config.Schema, path: Path, *argv: str):
    return config.load(schema, flags(schema.command, *argv), config=path, environ={})


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.command)
def test_every_example_config_loads(schema):
    """docs/examples/COMMAND.toml through the real loader and the command's own parsers."""
    path = EXAMPLES / f"{schema.command}.toml"
    got = load_file(schema, path)
    with path.open("rb") as file:
        assert set(tomllib.load(file)) <= set(schema.keys)
    args = build_parser().parse_args([schema.command, "--config", str(path)])
    if schema is REGISTRY:
        settings = registry_cli.settings_from(args)
        assert settings.token_file == EXAMPLES / "token" and settings.dns is not None
    elif schema is NODE:
        assert node_cli.settings_from(args).registry is not None
    elif schema is RELAY:
        assert relaycli.settings_from(args).ports == range(31000, 32000)
    else:
        assert rendezvous_cli.settings_from(got).legacy is None


def test_every_example_file_is_a_schema():
    assert {path.stem for path in EXAMPLES.glob("*.toml")} == {s.command for s in SCHEMAS}


@pytest.mark.parametrize(("schema", "option"),
                         [(s, o) for s in SCHEMAS for o in s.options],
                         ids=lambda x: getattr(x, "command", None) or getattr(x, "key", ""))
def test_every_option_has_a_flag_and_a_valid_example(schema, option):
    assert option.key in flags(schema.command)  # argparse's dest is the key
    value = option.kind.toml(tomllib.loads(f"x = {option.example}")["x"])
    assert option.bounds is None or option.bounds.holds(value)
    if option.default is not None and option.bounds is not None:
        assert option.bounds.holds(option.default)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.command)
def test_help_lists_every_key_flag_and_variable(schema, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([schema.command, "--help"])
    out = capsys.readouterr().out
    for option in schema.options:
        assert f"  {option.key} = " in out and option.env in out and option.flag in out


def test_schema_and_settings_type_cannot_drift():
    with pytest.raises(TypeError, match="differ: \\['listen'\\]"):
        config.Schema("x", RENDEZVOUS.options[1:], RendezvousConfig)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.command)
def test_commented_out_example_lines_are_valid_too(schema):
    """`# key = value` lines in an example are alternatives a reader uncomments."""
    lines = (EXAMPLES / f"{schema.command}.toml").read_text().splitlines()
    commented = [line[2:] for line in lines
                 if line.startswith("# ") and line[2:].split(" = ")[0] in schema.keys]
    assert commented
    for line in commented:
        key, value = next(iter(tomllib.loads(line).items()))
        option = schema.option(key)
        got = option.kind.toml(value)
        assert option.bounds is None or option.bounds.holds(got), line
