"""Named scenarios, and `resolve()`, which turns a CLI argument into a scenario.

- `easy`: `a` and `b`, each behind its own `eim` home router. Punching works.
- `same-nat`: `a` and `b` behind one `eim` router without hairpinning; they must use their
  LAN addresses (DESIGN.md §3, candidate "local").
- `hairpin`: the same with hairpinning on: the public endpoints work too.
- `symmetric`: `a` behind a `symmetric` NAT, `b` behind `eim`: direct punching fails
  (`b`'s NAT filters by port, `a`'s port is unpredictable); the relay is needed.
- `collision`: `a` and `b` behind `collision` routers: naive simultaneous open fails, a
  low-TTL opener first works (DESIGN.md §3).
- `double-nat`: `a` and `c` behind home routers (`eim`) behind one carrier NAT `cgn`
  (`eim-port`, hairpinning, as RFC 6888 asks of a CGN); `b` behind an `eim` router.
- `mixed-N` (N = 2-60): hosts `a`, `b`, ... each behind its own NAT `n<host>` whose kind cycles
  through `MIXED_CYCLE` (`public` = no NAT).
- `matrix`: one big lab covering every pair of kinds: two hosts per kind (`public` and each
  NAT kind), named `<letter><1|2>` (see `KIND_LETTERS`), each behind its own NAT `n<host>`.
  Every unordered pair of kinds, including a kind with itself, is then some pair of hosts.
- `matrix-K1-K2`: one small lab per pair of kinds, `a` behind K1 and `b` behind K2;
  `matrix_pairs()` lists them all.
- `double-HOME-CARRIER`: `double-nat` with any NAT kinds: `a` and `c` behind HOME routers
  behind one CARRIER NAT (hairpinning), `b` behind an `eim` router.
- `two-lans`: `a` and `c` on two LANs (their own `eim` routers) behind one `eim` NAT that
  does not hairpin: they share a public address but reach each other by no path through it.
- `symmetric-upnp`: `a` behind a `symmetric` NAT that offers port mapping (miniupnpd:
  NAT-PMP, PCP, UPnP-IGD), `b` behind `eim`: `b` goes direct to `a`'s mapped port.
- `short-timeout`: `a` behind an `eim-short` NAT (idle UDP mappings expire after 20 s, below
  WireGuard's 25 s keepalive), `b` behind `eim`: the agent must keep `a`'s mapping alive.
- `dual-open`, `dual-fw`: dual stack: `a` and `b` behind their own `eim` routers for IPv4,
  each with a global IPv6 address its router routes without NAT, `open` or behind a
  stateful `firewall` that drops unsolicited inbound (lab/ipv6.py). They go direct over IPv6.
- `dual-one`: `a` as in `dual-fw`, `b` with IPv4 only: the pair stays on IPv4.
- `dual-blocked`: both with IPv6, but `b`'s router lets no UDP in over it: every attempt
  over IPv6 fails, and the pair falls back to IPv4.
- `dual-symmetric`: as `dual-fw`, but both routers are `symmetric` NATs for IPv4 (a pair
  that needs a relay there): direct over IPv6.
- `two-registries`: two registry hosts (`registry`, `registry2`; DESIGN.md §11); `a` behind
  `eim` and `b` behind `eim-port` (a NAT that rebinds to a new port once it forgets) have
  both as peers, `c` behind `eim` only `registry2`.

Where a scenario takes kinds (`matrix-K1-K2`, `lab matrix --kinds`), `K+upnp` is NAT kind K
whose router also offers port mapping (`Nat(portmap=True)`), e.g. `symmetric+upnp`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from ..errors import LabError
from .nat import NAT_KINDS
from .scenario import Host, Nat, Scenario, Site, load_toml

PUBLIC = "public"  # pseudo-kind: a host with its own public address
KIND_LETTERS = {PUBLIC: "u", "eim": "e", "eim-port": "p", "eim-addr": "r",
                "eim-full-cone": "f", "symmetric": "s", "collision": "c"}
MIXED_CYCLE = ("eim", PUBLIC, "symmetric", "eim-port", "eim-full-cone", "collision", "eim-addr")
MIXED_MAX = 60
PORTMAP_SUFFIX = "+upnp"  # `K+upnp`: a NAT of kind K that offers port mapping (miniupnpd)
MAPPED_LETTERS = {"symmetric+upnp": "m"}  # the port-mapping kinds of the matrix grid
# Every kind a matrix scenario takes: public, each NAT kind (those without a letter are not in
# the `matrix` lab), each with port mapping.
MATRIX_KINDS = frozenset({*KIND_LETTERS, *NAT_KINDS,
                          *(kind + PORTMAP_SUFFIX for kind in NAT_KINDS)})


def site(host: str, kind: str, *, nat_name: str | None = None) -> Site:
    """`host` alone (kind `public`) or behind its own NAT of `kind`, named `n<host>`
    (`K+upnp`: of kind K, with port mapping)."""
    if kind == PUBLIC:
        return Host(host)
    base = kind.removesuffix(PORTMAP_SUFFIX)
    return Nat(nat_name or f"n{host}", base, (Host(host),), portmap=base != kind)


def _easy() -> Scenario:
    return Scenario("easy", (site("a", "eim"), site("b", "eim")),
                    description="a and b behind their own eim home routers")


def _same_nat(hairpin: bool) -> Scenario:
    name = "hairpin" if hairpin else "same-nat"
    on_off = "on" if hairpin else "off"
    return Scenario(name, (Nat("nat", "eim", (Host("a"), Host("b")), hairpin=hairpin),),
                    description=f"a and b behind one eim router, hairpinning {on_off}")


def _symmetric() -> Scenario:
    return Scenario("symmetric", (site("a", "symmetric"), site("b", "eim")),
                    description="a behind a symmetric NAT, b behind eim")


def _collision() -> Scenario:
    return Scenario("collision", (site("a", "collision"), site("b", "collision")),
                    description="a and b behind Linux routers without input filtering")


def _double_nat() -> Scenario:
    return double("eim", "eim-port", name="double-nat")


def double(home: str, carrier: str, *, name: str | None = None) -> Scenario:
    cgn = Nat("cgn", carrier, (site("a", home), site("c", home)), hairpin=True)
    return Scenario(name or f"double-{home}-{carrier}", (cgn, site("b", "eim")),
                    description=f"a and c behind {home} home routers behind one {carrier} "
                    "carrier NAT; b at home")


def _two_lans() -> Scenario:
    office = Nat("office", "eim", (site("a", "eim"), site("c", "eim")), hairpin=False)
    return Scenario("two-lans", (office, site("b", "eim")),
                    description="a and c on two LANs behind one NAT without hairpinning; "
                    "b at home")


def _symmetric_upnp() -> Scenario:
    return Scenario("symmetric-upnp", (site("a", "symmetric+upnp"), site("b", "eim")),
                    description="a behind a symmetric NAT with port mapping (miniupnpd), "
                    "b behind eim")


def short_timeout(udp_timeout_s: int | None = None) -> Scenario:
    """`short-timeout`; `udp_timeout_s` shortens `a`'s NAT's timeout further (tests)."""
    nat = Nat("na", "eim-short", (Host("a"),), udp_timeout_s=udp_timeout_s)
    idle = udp_timeout_s or NAT_KINDS["eim-short"].udp_timeout_s
    return Scenario("short-timeout", (nat, site("b", "eim")),
                    description=f"a behind an eim NAT whose idle UDP mappings expire after "
                    f"{idle} s, b behind eim")


def _dual(name: str, a_ipv6: str, b_ipv6: str | None, kind: str = "eim") -> Scenario:
    def home(host: str, ipv6: str | None) -> Nat:
        return Nat(f"n{host}", kind, (Host(host),), ipv6=ipv6)

    b_has = "no IPv6" if b_ipv6 is None else f"IPv6 {b_ipv6}"
    return Scenario(name, (home("a", a_ipv6), home("b", b_ipv6)),
                    description=f"a and b behind {kind} routers (IPv4); a has IPv6 {a_ipv6}, "
                    f"b {b_has}")


def _two_registries() -> Scenario:
    c = Nat("nc", "eim", (Host("c", registries=("registry2",)),))
    return Scenario("two-registries", (site("a", "eim"), site("b", "eim-port"), c),
                    registries=2,
                    description="two registries: a (eim) and b (eim-port) follow both, c (eim) "
                    "only registry2")


def host_names(count: int) -> Iterator[str]:
    """a, b, ..., z, aa, ab, ..."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for size in itertools.count(1):
        for chars in itertools.product(letters, repeat=size):
            if count <= 0:
                return
            count -= 1
            yield "".join(chars)


def mixed(count: int) -> Scenario:
    if not 2 <= count <= MIXED_MAX:
        raise LabError(f"lab: mixed-N takes N in 2-{MIXED_MAX}, got {count}")
    sites = tuple(site(name, MIXED_CYCLE[i % len(MIXED_CYCLE)])
                  for i, name in enumerate(host_names(count)))
    cycle = ", ".join(MIXED_CYCLE)
    return Scenario(f"mixed-{count}", sites,
                    description=f"{count} hosts, NAT kinds cycling through {cycle}")


def matrix() -> Scenario:
    sites = tuple(site(f"{letter}{i}", kind)
                  for kind, letter in KIND_LETTERS.items() for i in (1, 2))
    return Scenario("matrix", sites,
                    description="two hosts per kind, each behind its own NAT: every pair of kinds")


def matrix_pair(first: str, second: str) -> Scenario:
    for kind in (first, second):
        if kind not in MATRIX_KINDS:
            raise LabError(f"lab: matrix: unknown kind {kind!r} (known: "
                           f"{', '.join(KIND_LETTERS)}; K{PORTMAP_SUFFIX} for port mapping)")
    return Scenario(f"matrix-{first}-{second}", (site("a", first), site("b", second)),
                    description=f"a behind {first}, b behind {second}")


def matrix_pairs() -> list[Scenario]:
    """One scenario per unordered pair of kinds (a kind with itself included)."""
    return [matrix_pair(x, y)
            for x, y in itertools.combinations_with_replacement(KIND_LETTERS, 2)]


NAMED: dict[str, Callable[[], Scenario]] = {
    "easy": _easy,
    "same-nat": lambda: _same_nat(False),
    "hairpin": lambda: _same_nat(True),
    "symmetric": _symmetric,
    "collision": _collision,
    "double-nat": _double_nat,
    "two-lans": _two_lans,
    "symmetric-upnp": _symmetric_upnp,
    "short-timeout": short_timeout,
    "matrix": matrix,
    "dual-open": lambda: _dual("dual-open", "open", "open"),
    "dual-fw": lambda: _dual("dual-fw", "firewall", "firewall"),
    "dual-one": lambda: _dual("dual-one", "firewall", None),
    "dual-blocked": lambda: _dual("dual-blocked", "firewall", "blocked"),
    "dual-symmetric": lambda: _dual("dual-symmetric", "firewall", "firewall", "symmetric"),
    "two-registries": _two_registries,
}
PATTERNS = ("mixed-N", "matrix-KIND1-KIND2", "double-HOME-CARRIER")


def _two_kinds(text: str, known: Container[str]) -> tuple[str, str] | None:
    """`K1-K2` split at the dash that leaves a known kind on both sides (kinds contain dashes
    themselves)."""
    for cut in range(1, len(text)):
        first, second = text[:cut], text[cut + 1:]
        if text[cut] == "-" and first in known and second in known:
            return first, second
    return None


def resolve(spec: str) -> Scenario:
    """A named scenario, `mixed-N`, `matrix-K1-K2`, or a path to a TOML file."""
    if spec in NAMED:
        return NAMED[spec]()
    if match := re.fullmatch(r"mixed-(\d{1,3})", spec):
        return mixed(int(match.group(1)))
    if spec.startswith("matrix-") and (kinds := _two_kinds(spec.removeprefix("matrix-"),
                                                            MATRIX_KINDS)):
        return matrix_pair(*kinds)
    if spec.startswith("double-") and (kinds := _two_kinds(spec.removeprefix("double-"),
                                                            NAT_KINDS)):
        return double(*kinds)
    if spec.endswith(".toml") or "/" in spec:
        return load_toml(Path(spec))
    raise LabError(
        f"lab: unknown scenario {spec!r} (named: {', '.join(NAMED)}; patterns: "
        f"{', '.join(PATTERNS)}; or a path to a .toml file; NAT kinds: {', '.join(NAT_KINDS)})"
    )
