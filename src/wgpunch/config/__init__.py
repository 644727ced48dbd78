"""Every daemon's options from one loader: flags, `WGPUNCH_<KEY>` environment variables and a
TOML file, checked against a declarative schema per command (DESIGN §2).

A flag wins over the environment, which wins over the file, which wins over the schema's
default. Every value is checked against its key's kind and bounds wherever it came from; a
mistake is a `ConfigError` that names the key and its origin (`--poll-interval`, `environment
WGPUNCH_POLL_INTERVAL`, `config /etc/wgpunch/registry.toml: key 'poll_interval'`).

This module is the loader and the kinds of values; each command's schema lives in a module of
its own (node.py; registry.py for the registry and the relay; rendezvous.py), so that a
daemon loads only its own (bench/startup.py). It checks types, bounds and presence only.
Addresses, zones and keys are parsed by the daemons' own parsers (Endpoint.parse,
parse_listen, Zone.parse, Key.parse), which the command modules call on the typed result;
`Loaded.origin` tells them where a value came from. Neither this package nor its schemas
import registry/ or node/, which must not import each other through it.
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

from ..errors import ConfigError, WgpunchError

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
    _warn_unknown_variables(environ, schema)
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


def _warn_unknown_variables(environ: Mapping[str, str], schema: Schema[Any]) -> None:
    # One environment serves every command, so another command's key is no mistake here;
    # a name no command knows is probably a typo, and silently ignoring it would hide that.
    own = {option.env for option in schema.options}
    others = [n for n in environ if n.startswith(ENV_PREFIX) and n not in own]
    if not others:
        return
    known = {option.env for every in schemas() for option in every.options}
    for name in sorted(n for n in others if n not in known):
        log.warning("config: environment variable %s is no option of any command; ignored",
                    name)


def schemas() -> tuple[Schema[Any], ...]:
    """Every command's schema (the man page, the examples, telling another command's
    variable from a typo)."""
    # Here, not at import: a daemon loads only its own schema's module (bench/startup.py).
    from .node import NODE
    from .registry import REGISTRY, RELAY
    from .rendezvous import RENDEZVOUS

    return (REGISTRY, NODE, RENDEZVOUS, RELAY)


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
