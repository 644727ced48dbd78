"""Scenarios: what a lab contains, as frozen dataclasses, and the TOML form of the same.

A scenario is a list of *sites* hanging off the core router. A site is a `Host` with a public
address, or a `Nat` router with hosts and/or further NATs behind it (double NAT, CGNAT). The
registry (host `registry`) and the core router (`core`) are always there; the registry is
every WireGuard host's peer. A scenario may ask for more registries (`registries = N`): hosts
`registry2`, ... `registryN`, each on the core with a public address of its own, each every
WireGuard host's peer too unless a host names the ones it has (`registries` of a host), as
several registries a node follows are (DESIGN.md §11). Each node's `link` is the impairment
of its link to its parent.

Names are 1-6 lowercase letters/digits, starting with a letter (they end up in interface
names of at most 15 characters together with the prefix); `registry`, `reg`, `reg2`-`reg9`,
`core` and `lan` are reserved.

TOML schema (`wgpunch lab up ./my.toml`; every key but the site kinds is optional):

    name = "two-homes"            # default: the file name without .toml
    description = "free text"
    registry = { delay_ms = 5 }   # impairment of the registry's link (of each registry's)
    registries = 2                # registry hosts: `registry`, `registry2`, ... (1-9;
                                  # default 1)

    [[site]]                      # a host with a public address
    host = "a"
    wireguard = true              # false: a plain outside host (probes, no WireGuard)
    link = { delay_ms = 20, jitter_ms = 5, loss_pct = 1.0 }
    registries = ["registry2"]    # the registries it has as peers (and that have it);
                                  # default: every one

    [[site]]                      # a NAT router with hosts behind it
    nat = "eim"                   # kind: see wgpunch.lab.nat.NAT_KINDS
    name = "home"                 # default: nat1, nat2, ... in file order
    hairpin = false
    portmap = false               # true: the router runs miniupnpd (NAT-PMP, PCP, UPnP-IGD);
                                  # only for a NAT directly on the core (lab/portmap.py)
    udp_timeout_s = 20            # idle UDP mappings expire after this (default: the kind's,
                                  # else Linux's; lab/nat.py)
    hosts = ["b", "c"]            # hosts on its LAN (shorthand for [[site.inside]] host = ...)

    [[site]]
    nat = "eim"
    ipv6 = "firewall"             # the router routes IPv6 to its LAN (no NAT): "open",
                                  # "firewall" (drops unsolicited inbound) or "blocked" (no
                                  # UDP in at all); hosts behind it get a global IPv6
                                  # address. Only on a NAT on the core.
    hosts = ["e"]

    [[site]]
    host = "f"
    ipv6 = true                   # a host on the core: a global IPv6 address beside its IPv4

    [[site]]
    nat = "eim-port"              # a carrier NAT ...
    name = "cgn"
    [[site.inside]]               # ... with a home NAT behind it; same keys as a site
    nat = "eim"
    hosts = ["d"]

Impairment (`link`, `registry`): one-way `delay_ms` and uniform `jitter_ms` (both directions
each get them, so the round trip grows by twice the delay) and `loss_pct` per direction.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LabError
from .nat import check_kind, check_udp_timeout

NAME_RE = re.compile(r"[a-z][a-z0-9]{0,5}")
IPV6_POLICIES = ("open", "firewall", "blocked")  # what a NAT router does with IPv6 (lab/ipv6.py)
REGISTRIES_MAX = 9  # one digit in `registryN` and its interface names
RESERVED = frozenset({"registry", "reg", "core", "lan",
                      *(f"reg{n}" for n in range(2, REGISTRIES_MAX + 1))})


def registry_name(n: int) -> str:
    """The n-th registry host (from 1): `registry`, then `registry2`, ..."""
    return "registry" if n == 1 else f"registry{n}"


@dataclass(frozen=True)
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        for what, value, high in (("delay_ms", self.delay_ms, 10_000),
                                  ("jitter_ms", self.jitter_ms, 10_000),
                                  ("loss_pct", self.loss_pct, 100)):
            if not isinstance(value, int | float) or not 0 <= value <= high:
                raise LabError(f"lab: link {what} must be a number in 0-{high}, got {value!r}")

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)


NO_IMPAIRMENT = Impairment()


@dataclass(frozen=True)
class Host:
    name: str
    link: Impairment = NO_IMPAIRMENT
    wireguard: bool = True
    ipv6: bool = False  # a global IPv6 address too; on the core only (behind a NAT: Nat.ipv6)
    registries: tuple[str, ...] | None = None  # the registry hosts it peers with; None: all


@dataclass(frozen=True)
class Nat:
    name: str
    kind: str
    inside: tuple[Host | Nat, ...]
    hairpin: bool = False
    link: Impairment = NO_IMPAIRMENT
    portmap: bool = False  # runs miniupnpd (lab/portmap.py)
    udp_timeout_s: int | None = None  # None: the kind's (lab/nat.py)
    # IPv6 routed (never NATed) to the hosts behind it, through a policy of IPV6_POLICIES;
    # None: no IPv6 here.
    ipv6: str | None = None

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_udp_timeout(self.udp_timeout_s)
        if self.ipv6 is not None and self.ipv6 not in IPV6_POLICIES:
            raise LabError(f"lab: NAT {self.name!r}: ipv6 must be one of "
                           f"{', '.join(IPV6_POLICIES)}, got {self.ipv6!r}")
        if not self.inside:
            raise LabError(f"lab: NAT {self.name!r} has nothing behind it")
        for child in self.inside:
            if isinstance(child, Nat) and child.portmap:
                raise LabError(f"lab: NAT {child.name!r}: port mapping needs a NAT directly "
                               "on the core (miniupnpd's STUN check sees the NAT in front)")
            if isinstance(child, Nat) and child.ipv6 is not None:
                raise LabError(f"lab: NAT {child.name!r}: IPv6 needs a NAT directly on the "
                               "core (the lab routes one /64 per router there)")
            if isinstance(child, Host) and child.ipv6:
                raise LabError(f"lab: host {child.name!r}: behind a NAT, IPv6 comes from the "
                               f"NAT (ipv6 = {' or '.join(map(repr, IPV6_POLICIES))} on "
                               f"{self.name!r})")


Site = Host | Nat


@dataclass(frozen=True)
class Scenario:
    name: str
    sites: tuple[Site, ...]
    registry_link: Impairment = NO_IMPAIRMENT
    description: str = field(default="", compare=False)
    registries: int = 1  # registry hosts: registry_name(1 ... registries)

    def __post_init__(self) -> None:
        if not self.sites:
            raise LabError(f"lab: scenario {self.name!r} has no sites")
        if (not isinstance(self.registries, int) or isinstance(self.registries, bool)
                or not 1 <= self.registries <= REGISTRIES_MAX):
            raise LabError(f"lab: scenario {self.name!r}: registries must be a whole number in "
                           f"1-{REGISTRIES_MAX}, got {self.registries!r}")
        seen: set[str] = set()
        for node, _parent in self.walk():
            if not NAME_RE.fullmatch(node.name) or node.name in RESERVED:
                raise LabError(
                    f"lab: scenario {self.name!r}: bad name {node.name!r} (1-6 lowercase "
                    "letters/digits, starting with a letter; not registry, reg, reg2-reg9, "
                    "core or lan)"
                )
            if node.name in seen:
                raise LabError(f"lab: scenario {self.name!r}: name {node.name!r} used twice")
            seen.add(node.name)
            if isinstance(node, Host) and node.registries is not None:
                self._check_registries(node)

    def _check_registries(self, host: Host) -> None:
        assert host.registries is not None
        unknown = [name for name in host.registries if name not in self.registry_names]
        if (unknown or not host.registries or not host.wireguard
                or len(set(host.registries)) != len(host.registries)):
            raise LabError(
                f"lab: scenario {self.name!r}: host {host.name!r}: registries takes a "
                f"non-empty list of {', '.join(self.registry_names)} (each once; a WireGuard "
                f"host's), got {list(host.registries)!r}")

    @property
    def registry_names(self) -> tuple[str, ...]:
        return tuple(registry_name(n) for n in range(1, self.registries + 1))

    @property
    def uses_ipv6(self) -> bool:
        return any(site.ipv6 for site in self.sites)

    def walk(self) -> Iterator[tuple[Site, Nat | None]]:
        """Every node with the NAT it sits behind (None: on the core), parents first."""

        def down(node: Site, parent: Nat | None) -> Iterator[tuple[Site, Nat | None]]:
            yield node, parent
            if isinstance(node, Nat):
                for child in node.inside:
                    yield from down(child, node)

        for site in self.sites:
            yield from down(site, None)


# -- TOML ---------------------------------------------------------------------------------------

_SITE_KEYS = {"host", "wireguard", "nat", "name", "hairpin", "portmap", "hosts", "inside",
              "link", "udp_timeout_s", "ipv6", "registries"}


def load_toml(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise LabError(f"lab: cannot read scenario {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LabError(f"lab: scenario {str(path)!r}: {exc}") from None
    return from_dict(data, default_name=path.stem)


def from_dict(data: dict[str, Any], *, default_name: str) -> Scenario:
    unknown = set(data) - {"name", "description", "registry", "registries", "site"}
    if unknown:
        raise LabError(f"lab: scenario: unknown key(s) {', '.join(sorted(unknown))}")
    counter = iter(range(1, 10_000))
    sites = data.get("site", [])
    if not isinstance(sites, list):
        raise LabError("lab: scenario: `site` must be an array of tables ([[site]])")
    return Scenario(
        name=str(data.get("name", default_name)),
        description=str(data.get("description", "")),
        registry_link=_impairment(data.get("registry", {}), "registry"),
        sites=tuple(_site(site, counter) for site in sites),
        registries=data.get("registries", 1),
    )


def _site(table: Any, counter: Iterator[int]) -> Site:
    if not isinstance(table, dict):
        raise LabError(f"lab: scenario: a site must be a table, got {table!r}")
    unknown = set(table) - _SITE_KEYS
    if unknown:
        raise LabError(f"lab: scenario: unknown site key(s) {', '.join(sorted(unknown))}")
    link = _impairment(table.get("link", {}), "link")
    if ("host" in table) == ("nat" in table):
        raise LabError(f"lab: scenario: a site has exactly one of `host` or `nat`: {table!r}")
    if "host" in table:
        extra = set(table) & {"nat", "name", "hairpin", "portmap", "hosts", "inside",
                              "udp_timeout_s"}
        if extra:
            raise LabError(f"lab: scenario: host {table['host']!r} cannot have {sorted(extra)}")
        return Host(str(table["host"]), link, bool(table.get("wireguard", True)),
                    _ipv6_flag(table), _registries(table))
    name = str(table["name"]) if "name" in table else f"nat{next(counter)}"
    if "registries" in table:
        raise LabError(f"lab: scenario: NAT {name!r} cannot have registries (its hosts can)")
    hosts = tuple(Host(str(h)) for h in table.get("hosts", []))
    inside = tuple(_site(child, counter) for child in table.get("inside", []))
    ipv6 = table.get("ipv6")
    if ipv6 is not None and not isinstance(ipv6, str):
        raise LabError(f"lab: scenario: NAT {name!r}: ipv6 takes "
                       f"{' or '.join(map(repr, IPV6_POLICIES))}, got {ipv6!r}")
    return Nat(name, str(table["nat"]), hosts + inside, bool(table.get("hairpin", False)), link,
               bool(table.get("portmap", False)), table.get("udp_timeout_s"), ipv6)


def _ipv6_flag(table: dict[str, Any]) -> bool:
    value = table.get("ipv6", False)
    if not isinstance(value, bool):
        raise LabError(f"lab: scenario: host {table['host']!r}: ipv6 takes true or false, "
                       f"got {value!r}")
    return value


def _registries(table: dict[str, Any]) -> tuple[str, ...] | None:
    value = table.get("registries")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise LabError(f"lab: scenario: host {table['host']!r}: registries takes a list of "
                       f"registry host names, got {value!r}")
    return tuple(value)


def _impairment(table: Any, what: str) -> Impairment:
    if not isinstance(table, dict) or set(table) - {"delay_ms", "jitter_ms", "loss_pct"}:
        raise LabError(
            f"lab: scenario: `{what}` takes delay_ms, jitter_ms, loss_pct; got {table!r}"
        )
    return Impairment(**table)
