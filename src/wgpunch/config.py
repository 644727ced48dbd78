"""Every daemon's options from one loader: flags, `WGPUNCH_<KEY>` environment variables and a
TOML file, checked against a declarative schema per command (DESIGN §2).

A flag wins over the environment, which wins over the file, which wins over the schema's
default. Every value is checked against its key's kind and bounds wherever it came from; a
mistake is a `ConfigError` that names the key and its origin (`--poll-interval`, `environment
WGPUNCH_POLL_INTERVAL`, `config /etc/wgpunch/registry.toml: key 'poll_interval'`).

This module checks types, bounds and presence only. Addresses, zones and keys are parsed by
the daemons' own parsers (Endpoint.parse, parse_listen, Zone.parse, Key.parse), which the
command modules call on the typed result; `Loaded.origin` tells them where a value came from.
It imports neither registry/ nor node/, which must not import each other through it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from .errors import ConfigError, WgpunchError
from .natpunch.limits import Limits
from .natpunch.wire import LEGACY_PORT, RENDEZVOUS_PORT
from .protocol import API_PORT
from .protocol.probewire import PORT

NATPROBE_PORT = PORT  # the registry's NAT probe port (docs/api.md)

log = logging.getLogger(__name__)

ENV_PREFIX = "WGPUNCH_"
T = TypeVar("T")
R = TypeVar("R")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class _Mismatch(Exception):
    """A value is not of its key's kind; the message says what it must be."""


# -- kinds: what a value may be in TOML, and how environment text becomes one ---------------


@dataclass(frozen=True, slots=True)
class Kind:
    """`toml` checks and converts a TOML value, `text` an environment variable's text, `flag`
    what argparse gave; `toml` and `text` raise `_Mismatch`."""

    what: str  # for messages and --help: "text", "a whole number", ...
    toml: Callable[[Any], Any]
    text: Callable[[str], Any]
    flag: Callable[[Any], Any] = lambda value: tuple(value) if isinstance(value, list) else value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Mismatch("must be text")
    return value


def _whole(value: Any) -> int:
    # bool is an int subclass; `keepalive = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Mismatch("must be a whole number")
    return value


def _whole_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Mismatch("must be a whole number") from None


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Mismatch("must be a number of seconds")
    return float(value)


def _seconds_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Mismatch("must be a number of seconds") from None


def _port_or_address(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Mismatch("must be a port or an address")
    return value


def _switch(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Mismatch("must be true or false")
    return value


def _switch_text(text: str) -> bool:
    if text.lower() not in _TRUE + _FALSE:
        raise _Mismatch("must be true or false")
    return text.lower() in _TRUE


TEXT = Kind("text", _text, str)
SWITCH = Kind("true or false", _switch, _switch_text)
WHOLE = Kind("a whole number", _whole, _whole_text)
SECONDS = Kind("a number of seconds", _seconds, _seconds_text)
# Relative to the config file when it comes from one (the loader sees the Path and joins).
PATH = Kind("a file name", lambda value: Path(_text(value)), Path, Path)
PORT_OR_ADDRESS = Kind("a port or an address", _port_or_address, str)


def one_or_list(item: Kind, what: str, items: str) -> Kind:
    """One value or a TOML list of them; comma-separated in the environment."""

    def toml(value: Any) -> tuple[Any, ...]:
        try:
            return tuple(item.toml(v) for v in (value if isinstance(value, list) else [value]))
        except _Mismatch:
            raise _Mismatch(f"must list {items}" if isinstance(value, list)
                            else f"must be {what}") from None

    def text(value: str) -> tuple[Any, ...]:
        return tuple(item.text(part.strip()) for part in value.split(",") if part.strip())

    return Kind(what, toml, text)


def switch_or(inner: Kind, on: Any) -> Kind:
    """true (= `on`), false (= off, None) or a value of `inner`."""
    what = f"true, false or {inner.what}"

    def toml(value: Any) -> Any:
        if isinstance(value, bool):
            return on if value else None
        try:
            return inner.toml(value)
        except _Mismatch:
            raise _Mismatch(f"must be {what}") from None

    def text(value: str) -> Any:
        if value.lower() in _TRUE + _FALSE:
            return on if value.lower() in _TRUE else None
        return inner.text(value)

    return Kind(what, toml, text)


ADDRESSES = one_or_list(TEXT, "an address or a list of addresses", "addresses as text")


# -- options and schemas ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounds:
    low: float
    high: float = math.inf
    open_low: bool = False  # `low` itself is out

    def holds(self, value: float) -> bool:  # False for NaN
        return (self.low < value if self.open_low else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        low = f"more than {self.low:g}" if self.open_low else f"at least {self.low:g}"
        if self.high == math.inf:
            return low
        return f"{low}, at most {self.high:g}" if self.open_low else \
            f"in {self.low:g}-{self.high:g}"

    @property
    def problem(self) -> str:
        closed = self.high != math.inf and not self.open_low
        return f"is not {self}" if closed else f"must be {self}"


@dataclass(frozen=True, slots=True)
class Option:
    key: str  # TOML key and argparse dest; the flag and the variable are derived from it
    kind: Kind
    help: str
    example: str  # a TOML value, for --help
    default: Any = None
    bounds: Bounds | None = None
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """What every command's typed options share: where each value came from."""

    origins: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def origin(self, key: str) -> str:
        return self.origins.get(key, "the default")

    def parsed(self, key: str, parse: Callable[[T], R], value: T) -> R:
        """`parse(value)` (a daemon's own parser of addresses, zones, keys), its error
        saying where the value of `key` came from."""
        try:
            return parse(value)
        except WgpunchError as exc:
            raise ConfigError(f"{exc} (from {self.origin(key)})") from None


C = TypeVar("C", bound=Loaded)


@dataclass(frozen=True, slots=True)
class Schema(Generic[C]):
    command: str  # the message prefix as well
    options: tuple[Option, ...]
    settings: type[C]

    def __post_init__(self) -> None:
        # The typed result and the schema are written apart; they must not drift apart.
        fields = {f.name for f in dataclasses.fields(self.settings)} - {"origins"}
        if fields != {option.key for option in self.options}:
            raise TypeError(f"config: {self.command} schema and {self.settings.__name__} "
                            f"differ: {sorted(fields ^ {o.key for o in self.options})}")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(option.key for option in self.options)

    def option(self, key: str) -> Option:
        return next(option for option in self.options if option.key == key)


# -- the loader -------------------------------------------------------------------------------


def read_file(command: str, path: Path) -> dict[str, Any]:
    import tomllib  # here: a daemon started without a file never needs it (bench/startup.py)

    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{command}: cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{command}: config {path} is not valid TOML: {exc}") from None


def load(schema: Schema[C], flags: Mapping[str, Any], *, config: Path | str | None = None,
         environ: Mapping[str, str] | None = None) -> C:
    """The options of `schema.command`: `flags` (argparse's, None = not given) over
    `environ` (default os.environ) over the TOML file `config` over the defaults."""
    environ = os.environ if environ is None else environ
    layer = schema.command
    path = None if config is None else Path(config)
    file = {} if path is None else read_file(layer, path)
    unknown = sorted(set(file) - set(schema.keys))
    if unknown:
        import difflib  # only for a mistake

        close = difflib.get_close_matches(unknown[0], schema.keys, n=1)
        raise ConfigError(f"{layer}: config {path}: unknown key {unknown[0]!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; known: {', '.join(schema.keys)}")
    _warn_unknown_variables(environ)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for option in schema.options:
        given = flags.get(option.key)
        if given is not None:
            origin, value = option.flag, option.kind.flag(given)
        # Set but empty counts as unset, so that `Environment=WGPUNCH_ZONE=` in a unit file
        # takes a value away instead of failing.
        elif environ.get(option.env):
            origin = f"environment {option.env}"
            value = _convert(layer, origin, option.kind.text, environ[option.env])
        elif option.key in file:
            assert path is not None
            origin = f"config {path}: key {option.key!r}"
            value = _convert(layer, origin, option.kind.toml, file[option.key])
            if isinstance(value, Path) and not value.is_absolute():
                value = path.parent / value
        else:
            origin, value = "the default", option.default
        if value is None and option.required:
            raise ConfigError(f"{layer}: no {option.key}: give {option.flag}, {option.env} "
                              f"or {option.key!r} in the config file")
        if value is not None and option.bounds and not option.bounds.holds(value):
            raise ConfigError(f"{layer}: {origin} {value!r} {option.bounds.problem}")
        values[option.key] = value
        origins[option.key] = origin
    return schema.settings(**values, origins=MappingProxyType(origins))


def _convert(layer: str, origin: str, convert: Callable[[Any], Any], value: Any) -> Any:
    try:
        return convert(value)
    except _Mismatch as exc:
        raise ConfigError(f"{layer}: {origin} {exc}, got {value!r}") from None


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    # One environment serves every command, so another command's key is no mistake here;
    # a name no command knows is probably a typo, and silently ignoring it would hide that.
    known = {option.env for schema in SCHEMAS for option in schema.options}
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        log.warning("config: environment variable %s is no option of any command; ignored",
                    name)


def epilog(schema: Schema[Any]) -> str:
    """The --help text listing the schema's keys, flags and variables."""
    lines = [
        "configuration: every option below can also be given as an environment variable or",
        "in a TOML file (--config FILE). A flag wins over the environment, which wins over",
        "the file. Paths in the file are relative to the file; in the environment, lists",
        "are comma-separated and switches are true or false.",
    ]
    for option in schema.options:
        left = f"  {option.key} = {option.example}"
        if len(left) > 41:  # a long example gets its own line
            lines, left = [*lines, left], ""
        lines.append(f"{left:<42} {option.flag}, {option.env}")
        notes = [option.help] + (["required"] if option.required else [])
        if option.bounds:
            notes.append(str(option.bounds))
        if option.default not in (None, ()):
            default = option.default
            notes.append(f"default {default:g}" if isinstance(default, float)
                         else f"default {default}")
        lines.append(textwrap.fill("; ".join(notes), 92, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))
    return "\n".join(lines) + "\n"


# -- the token file ---------------------------------------------------------------------------


def read_token(path: Path, layer: str = "config") -> str:
    """A bearer token: the file's text without surrounding whitespace. The token is never
    put in a message."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{layer}: cannot read token file {str(path)!r}: {reason}") from None
    token = text.strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"{layer}: token file {str(path)!r} must hold one token "
                          "(printable, no spaces)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: token file %s is readable by other users (mode %o; chmod 600 it)",
                    layer, path, stat.S_IMODE(mode))
    return token


# -- the schemas ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig(Loaded):
    interface: str
    listen: tuple[str, ...]  # empty: the interface's own addresses
    token_file: Path | None
    poll_interval: float
    dns: tuple[str | int, ...]  # empty: no DNS-SD server
    zone: str | None
    dns_self: tuple[str, ...] | None  # None: no `self` record
    dns_allow: tuple[str, ...]  # networks answered besides the peers' tunnel addresses
    relay: str | None  # a port range; None: no relay
    relay_address: str | None  # None: nodes use the registry's endpoint address
    relay_userspace: bool  # never the kernel fast path
    relay_remote: tuple[str, ...]  # relays on other hosts: IP[:PORT] of their control APIs
    relay_secret_file: Path | None  # shared with every remote relay
    natprobe_port: int  # 0: no NAT probe port
    natprobe_alt_port: int | None  # None: natprobe_port + 1; 0: none
    natprobe_alt_address: str | None
    metrics_listen: str | None  # None: no metrics


# Our choice: 500 slots of 2 ports, below Linux's ephemeral ports (32768-60999), so that no
# outgoing socket of the registry host ever holds one.
DEFAULT_RELAY_PORTS = "31000-31999"
# A relay's control API (registry/relaycontrol.py): beside the registry's API (51821), the
# rendezvous server (51822) and the NAT probe (51823, 51824).
RELAY_CONTROL_PORT = 51825

REGISTRY = Schema("registry", (
    Option("interface", TEXT, "the WireGuard interface whose peers are the nodes", '"wg0"',
           required=True),
    Option("listen", ADDRESSES, f"where the API listens (port {API_PORT} if none); "
           "default: IF's addresses", f'["10.99.0.254:{API_PORT}"]', default=()),
    Option("token_file", PATH, "require the bearer token in this file",
           '"/etc/wgpunch/token"'),
    # Below 10 ms the reads cost more than they tell; above a minute the registry is no help
    # in getting peers connected quickly.
    Option("poll_interval", SECONDS, "how often to read IF's peers while they do not change "
           "(seconds; four times as often for 5 s after a change)", "0.2", default=0.2,
           bounds=Bounds(0.01, 60.0)),
    Option("dns", one_or_list(PORT_OR_ADDRESS, "a port, an address or a list of them",
                              "ports or addresses"),
           "serve DNS-SD on PORT (IF's addresses) or ADDR:PORT; a list for several",
           "5353", default=()),
    Option("zone", TEXT, "the DNS-SD zone", '"mesh.internal."'),
    Option("dns_self", switch_or(one_or_list(TEXT, "a list of texts", "texts"), on=()),
           "publish the registry itself (true, or [IP:PORT] [CIDR ...])",
           '["192.0.2.1:51820"]'),
    Option("dns_allow", one_or_list(TEXT, "a network or a list of networks", "networks"),
           "also answer DNS-SD queries from these networks (default: peers' tunnel "
           "addresses only)", '["192.0.2.0/24"]', default=()),
    Option("relay", switch_or(TEXT, on=DEFAULT_RELAY_PORTS),
           f"relay WireGuard for pairs that cannot reach each other, on UDP ports FIRST-LAST "
           f"(true: {DEFAULT_RELAY_PORTS})", f'"{DEFAULT_RELAY_PORTS}"'),
    Option("relay_address", TEXT, "the relay's public IP handed to nodes (default: the "
           "registry's endpoint as each node has it)", '"192.0.2.1"'),
    Option("relay_userspace", SWITCH, "forward relayed datagrams in the relay process, never "
           "through nftables", "false", default=False),
    Option("relay_remote", ADDRESSES, "relays on other hosts (`wgpunch relay --control`): "
           f"IP or IP:PORT of each one's control API (port {RELAY_CONTROL_PORT} if none); "
           "nodes relayed there send to that IP", '["192.0.2.7"]', default=()),
    Option("relay_secret_file", PATH, "the secret shared with the remote relays (one "
           "word, at least 32 characters)", '"relay.secret"'),
    Option("natprobe_port", WHOLE, "UDP port of the NAT probe on every address (0: off)",
           str(NATPROBE_PORT), default=NATPROBE_PORT, bounds=Bounds(0, 65535)),
    Option("natprobe_alt_port", WHOLE, "the NAT probe's second port, for filtering "
           "(default: natprobe_port + 1; 0: none)", str(NATPROBE_PORT + 1),
           bounds=Bounds(0, 65535)),
    Option("natprobe_alt_address", TEXT, "a second public address of this host, for the NAT "
           "probe's filtering test", '"192.0.2.66"'),
    Option("metrics_listen", TEXT, "serve Prometheus metrics at http://ADDR:PORT/metrics "
           "(default: off)", '"127.0.0.1:9587"'),
), RegistryConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig(Loaded):
    interface: str | None  # None: every WireGuard interface (node/fleet.py)
    registry: tuple[str, ...]  # several: each interface follows those it has as peers
    api: str | None
    token_file: Path | None
    keepalive: int
    opener_ttl: int | None  # None: measured (node/punch.py)
    dns_sd: str | None
    zone: str | None
    interval: float
    natpunch: str | None
    natpunch_server_key: str | None
    natpunch_legacy: str | None
    mesh: bool
    mesh_exclude: tuple[str, ...]
    natprobe_port: int  # 0: do not measure the NAT
    metrics_listen: str | None  # None: no metrics
    portmap: bool


NODE = Schema("node", (
    Option("interface", TEXT, "the WireGuard interface to steer (default: every one that has "
           "the registry's peer)", '"wg0"'),
    Option("registry", one_or_list(TEXT, "a key or a list of keys", "keys as text"),
           "the registry's public key (a peer of IF); a list: each interface follows those "
           "it has (several at once: each of them)",
           '"Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="', default=()),
    Option("api", TEXT, f"the registry API's URL (default: its tunnel address, port {API_PORT})",
           f'"http://10.99.0.254:{API_PORT}"'),
    Option("token_file", PATH, "bearer token for the registry", '"/etc/wgpunch/token"'),
    Option("keepalive", WHOLE, "persistent keepalive (seconds) set on peers that have none", "25",
           default=25, bounds=Bounds(1, 65535)),
    Option("opener_ttl", WHOLE, "IP TTL of the NAT-opening datagram (default: measured)", "3",
           bounds=Bounds(1, 255)),
    Option("dns_sd", TEXT, "follow this wgsd-compatible DNS-SD server (ADDR:PORT) instead",
           '"10.99.0.254:5353"'),
    Option("zone", TEXT, "the DNS-SD zone", '"mesh.internal."'),
    Option("interval", SECONDS, "with dns_sd or natpunch: seconds between polls", "5", default=5.0,
           bounds=Bounds(0.1, 3600.0)),
    Option("natpunch", TEXT, f"follow this natpunch server (port {RENDEZVOUS_PORT} if none)",
           '"rendezvous.example"'),
    Option("natpunch_server_key", TEXT, "the natpunch server's public key",
           '"Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="'),
    Option("natpunch_legacy", TEXT, f"follow this wireguard-tools server (port {LEGACY_PORT} "
           "if none)", '"rendezvous.example"'),
    Option("mesh", SWITCH, "add the registry's peers to IF and remove those it drops (only "
           "peers the mesh added)", "true", default=False),
    Option("mesh_exclude", one_or_list(TEXT, "a key or a list of keys", "keys as text"),
           "with mesh: never add these peers", '["Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="]',
           default=()),
    Option("natprobe_port", WHOLE, "the registry's NAT probe port (UDP, at its public "
           "address; 0: do not measure the NAT)", str(NATPROBE_PORT), default=NATPROBE_PORT,
           bounds=Bounds(0, 65535)),
    Option("metrics_listen", TEXT, "serve Prometheus metrics at http://ADDR:PORT/metrics "
           "(default: off)", '"127.0.0.1:9588"'),
    Option("portmap", SWITCH, "map the listen port on our NAT (PCP, NAT-PMP, UPnP-IGD)",
           "true", default=True),
), NodeConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class RendezvousConfig(Loaded):
    listen: tuple[str, ...]  # empty: [::] (or 0.0.0.0 where IPv6 is off)
    key: Path
    allow: Path | None
    legacy: str | None  # None: the legacy protocol is off
    peer_ttl: float
    max_peers: int


DEFAULT_LEGACY = f"0.0.0.0:{LEGACY_PORT}"
_LIMITS = Limits()

RENDEZVOUS = Schema("rendezvous", (
    Option("listen", ADDRESSES, f"where to serve natpunch-go's protocol (port "
           f"{RENDEZVOUS_PORT} if none)", f'["[::]:{RENDEZVOUS_PORT}"]', default=()),
    Option("key", PATH, "the server's private key file, made when missing", '"rendezvous.key"',
           default=Path("/var/lib/wgpunch/rendezvous.key")),
    Option("allow", PATH, "only these public keys (one per line) may register",
           '"allowed-keys"'),
    Option("legacy", switch_or(TEXT, on=DEFAULT_LEGACY), "also serve the UNAUTHENTICATED "
           f"wireguard-tools protocol (true: {DEFAULT_LEGACY})", "false"),
    Option("peer_ttl", SECONDS, "forget a node not heard from for this long", "600",
           default=_LIMITS.peer_ttl_s, bounds=Bounds(0, open_low=True)),
    Option("max_peers", WHOLE, "the most nodes remembered per protocol", "65536",
           default=_LIMITS.peers_max, bounds=Bounds(1)),
), RendezvousConfig)

@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig(Loaded):
    ports: str
    address: str | None
    userspace: bool
    control: str | None  # None: no control API, no slots
    secret_file: Path | None


RELAY = Schema("relay", (
    Option("ports", TEXT, "the UDP ports to relay on, FIRST-LAST, two per pair",
           f'"{DEFAULT_RELAY_PORTS}"', default=DEFAULT_RELAY_PORTS),
    Option("address", TEXT, "the relay's public IP, for the kernel path's source address "
           "(default: the route's)", '"192.0.2.1"'),
    Option("userspace", SWITCH, "forward in this process only, never through nftables",
           "false", default=False),
    Option("control", TEXT, "serve the control API a registry allocates slots through on "
           f"ADDR or ADDR:PORT (port {RELAY_CONTROL_PORT} if none); without it, no slots",
           '"192.0.2.7"'),
    Option("secret_file", PATH, "the secret shared with the registry (one word, at least 32 "
           "characters; the registry's relay_secret_file)", '"relay.secret"'),
), RelayConfig)

SCHEMAS: tuple[Schema[Any], ...] = (REGISTRY, NODE, RENDEZVOUS, RELAY)
