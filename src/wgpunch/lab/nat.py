"""NAT kinds of the lab, in RFC 4787 terms, and the nftables ruleset that makes each one.

Every kind is one row of `NAT_KINDS`: what it claims (mapping, port, filtering, what an
unsolicited inbound packet does), and `tests/test_lab_nat.py` measures each claim with
`natcheck` rather than reading the rules back.

| kind          | mapping (RFC 4787 §4.1)     | outside port  | filtering (§5)              |
|---------------|-----------------------------|---------------|-----------------------------|
| eim           | endpoint-independent        | preserved     | address-and-port-dependent  |
| eim-port      | endpoint-independent        | changed       | address-and-port-dependent  |
| eim-addr      | endpoint-independent        | preserved     | address-dependent           |
| eim-full-cone | endpoint-independent        | preserved     | endpoint-independent        |
| symmetric     | address-and-port-dependent  | random        | address-and-port-dependent  |
| collision     | endpoint-independent        | preserved     | address-and-port-dependent, |
|               |                             |               | but no input filter         |
| eim-short     | endpoint-independent        | preserved     | address-and-port-dependent  |

- `eim`: the common home router. `masquerade` keeps the inside port when free; input and
  forward chains accept only `ct state established,related` and the LAN
  (`policy drop`), so an unsolicited packet leaves no state behind.
- `eim-port`: a CGNAT-like NAT: the first flow from an inside `ip . port` gets a random
  outside port (20000-29999) and every later flow from it reuses that port, through a
  dynamic map learned from the packet path.
- `eim-addr`: ("restricted cone") inbound to a mapped port is let in from any port of an
  address the inside endpoint has sent to.
- `eim-full-cone`: inbound to a mapped port is let in from anyone.
- `symmetric`: `masquerade random`: a new random outside port per destination.
- `collision`: a Linux router without an input drop rule (DESIGN.md §9). An unsolicited
  packet to its public address is answered with ICMP and *leaves conntrack state*; when the
  inside host then sends to that same remote endpoint, its port-preserving mapping collides
  with the state and it gets a new outside port, so naive simultaneous open fails.
- `eim-short`: `eim` whose UDP mappings expire after 20 s without a packet, below
  WireGuard's usual 25 s persistent keepalive (some carrier and mobile NATs do so).

How long an idle UDP mapping lives is a setting of every NAT too (`udp_timeout_s`; `eim-short`
only sets it by default): an nftables `ct timeout` object in the router's own table gives each
new UDP flow that timeout for both conntrack states (unreplied and replied), so nothing
outside the router's namespace changes. Unset: Linux's 30 s unreplied, 120 s once a flow has
lived 2 s with traffic both ways.

Hairpinning (RFC 4787 §6, REQ-9) is a flag of every NAT, not a kind: with it, a packet from
the LAN to the NAT's public address and a mapped port is sent to the inside endpoint owning
that mapping, with the sender's own mapping as source. Without it, the packet goes to the
router itself and is refused with ICMP, as on most home routers.

How mappings are known: Linux NAT has no mapping table of its own, only conntrack. A chain in
postrouting *after* source NAT (priority 300) sees each outbound UDP flow's translation and
stores `outside port -> inside ip . port` in the dynamic map `inbound` (timeout 120 s, as
conntrack's assured-UDP timeout, refreshed by every outbound packet). Filtering kinds that let
unsolicited packets in, and hairpinning, DNAT through that map; those DNATs mark their flow
(`LAB_DNAT`), so that with port mapping (`portmap`, portmap.py) the forward filter can let
in what miniupnpd DNATs without letting in more than the kind does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import LabError

MAPPING_TIMEOUT_S = 120  # nf_conntrack_udp_timeout_stream: how long Linux keeps a live flow
SHORT_UDP_TIMEOUT_S = 20  # `eim-short`: below WireGuard's 25 s keepalive; our choice
UDP_TIMEOUT_RANGE = (1, 600)
EIM_PORT_RANGE = (20000, 29999)  # outside ports of `eim-port`; disjoint from the lab's own
LAB_DNAT = 0x1  # ct mark of a flow the lab's own rules DNAT (the rest: miniupnpd's)


@dataclass(frozen=True)
class NatKind:
    name: str
    mapping: str  # "endpoint-independent" | "address-and-port-dependent"
    port: str  # "preserved" | "changed" | "random"
    filtering: str  # "endpoint-independent" | "address-dependent" | "address-and-port-dependent"
    unsolicited_state: bool  # an unsolicited inbound packet leaves conntrack state
    summary: str
    udp_timeout_s: int | None = None  # idle UDP mappings expire after this; None: Linux's


NAT_KINDS: dict[str, NatKind] = {
    kind.name: kind
    for kind in (
        NatKind("eim", "endpoint-independent", "preserved", "address-and-port-dependent",
                False, "home router: masquerade, input/forward drop unsolicited"),
        NatKind("eim-port", "endpoint-independent", "changed", "address-and-port-dependent",
                False, "EIM with a random, then fixed, outside port (CGNAT-like)"),
        NatKind("eim-addr", "endpoint-independent", "preserved", "address-dependent",
                False, "restricted cone: inbound from any port of a contacted address"),
        NatKind("eim-full-cone", "endpoint-independent", "preserved", "endpoint-independent",
                False, "full cone: inbound to a mapped port from anyone"),
        NatKind("symmetric", "address-and-port-dependent", "random", "address-and-port-dependent",
                False, "masquerade random: new outside port per destination"),
        NatKind("collision", "endpoint-independent", "preserved", "address-and-port-dependent",
                True, "Linux router without input filter: unsolicited packets leave state"),
        NatKind("eim-short", "endpoint-independent", "preserved", "address-and-port-dependent",
                False, f"eim whose idle UDP mappings expire after {SHORT_UDP_TIMEOUT_S} s",
                SHORT_UDP_TIMEOUT_S),
    )
}


def check_kind(kind: str) -> NatKind:
    try:
        return NAT_KINDS[kind]
    except KeyError:
        raise LabError(
            f"lab: unknown NAT kind {kind!r} (known: {', '.join(NAT_KINDS)})"
        ) from None


@dataclass(frozen=True)
class NatInterfaces:
    """Where one NAT router sits: its WAN link and address, its LAN bridge and subnet."""

    table: str  # nft table name, carries the lab prefix
    wan: str
    wan_ip: ipaddress.IPv4Address
    lan: str
    lan_net: ipaddress.IPv4Network


def check_udp_timeout(seconds: int | None) -> int | None:
    low, high = UDP_TIMEOUT_RANGE
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)
                                or not low <= seconds <= high):
        raise LabError(f"lab: udp_timeout_s must be a whole number in {low}-{high}, "
                       f"got {seconds!r}")
    return seconds


def ruleset(kind: str, where: NatInterfaces, *, hairpin: bool, portmap: bool = False,
            udp_timeout_s: int | None = None) -> str:
    """The nft script (for `nft -f -` inside the router's namespace) for one NAT; with
    `portmap`, what miniupnpd maps passes its forward filter too; `udp_timeout_s` overrides
    the kind's idle UDP timeout."""
    nat = check_kind(kind)
    wan, lan = f'"{where.wan}"', f'"{where.lan}"'
    a, n = where.wan_ip, where.lan_net
    idle_s = check_udp_timeout(udp_timeout_s) or nat.udp_timeout_s
    dynamic = f"flags dynamic,timeout; timeout {idle_s or MAPPING_TIMEOUT_S}s;"
    to_map = f"ct mark set {LAB_DNAT:#x} dnat ip addr . port to udp dport map @inbound"

    sets = [f"map inbound {{ typeof udp dport : ip daddr . udp dport; {dynamic} }}"]
    record = [
        "meta l4proto udp ct direction original ct status snat "
        "update @inbound { ct reply proto-dst : ct original ip saddr . ct original proto-src }"
    ]
    if kind == "eim-port":
        sets.append(
            f"map outbound {{ typeof ip saddr . udp sport : ip saddr . udp sport; {dynamic} }}"
        )
        record.append(
            "meta l4proto udp ct direction original ct status snat update @outbound "
            "{ ct original ip saddr . ct original proto-src "
            ": ct reply ip daddr . ct reply proto-dst }"
        )
    if kind == "eim-addr":
        sets.append(f"set talked {{ typeof ip saddr . udp sport . ip daddr; {dynamic} }}")
        record.append(
            f"oifname {wan} meta l4proto udp ct direction original update @talked "
            "{ ct original ip saddr . ct original proto-src . ct original ip daddr }"
        )

    pre = []
    if kind in ("eim-addr", "eim-full-cone"):
        pre.append(f"iifname {wan} ip daddr {a} udp dport @inbound {to_map}")
    if hairpin:
        pre.append(f"iifname {lan} ip daddr {a} udp dport @inbound {to_map}")

    # Source NAT: `masquerade` on the WAN; the hairpin rule names the public address
    # (masquerade there would pick the LAN address).
    if kind == "symmetric":
        out_wan, out_hairpin = ["masquerade random"], [f"snat ip to {a} random"]
    elif kind == "eim-port":
        low, high = EIM_PORT_RANGE
        keep = ("ip saddr . udp sport @outbound "
                "snat ip addr . port to ip saddr . udp sport map @outbound")
        fresh = f"meta l4proto udp snat ip to {a}:{low}-{high} random"
        out_wan = [keep, fresh, "masquerade"]
        out_hairpin = [keep, fresh, f"snat ip to {a}"]
    else:
        out_wan, out_hairpin = ["masquerade"], [f"snat ip to {a}"]
    post = [f"oifname {wan} {rule}" for rule in out_wan]
    if portmap:
        # The router's own packets keep their port, as on a real router: miniupnpd's STUN
        # check (portmap.py) wants to see its own address and port from outside.
        post.insert(0, f"oifname {wan} ip saddr {a} accept")
    if hairpin:
        post += [f"oifname {lan} ip saddr {n} ct status dnat {rule}" for rule in out_hairpin]

    forward = ["ct state established,related accept", f"iifname {lan} accept"]
    if kind == "eim-full-cone":
        forward.append(f"iifname {wan} ct status dnat accept")
    if kind == "eim-addr":
        forward.append(
            f"iifname {wan} ct status dnat ip daddr . udp dport . ip saddr @talked accept")
    if portmap:
        forward.append(f"iifname {wan} ct status dnat ct mark != {LAB_DNAT:#x} accept")
    # `collision` has no input filter at all: that is the whole point of the kind.
    input_policy = "accept" if nat.unsolicited_state else "drop"
    inp = [] if nat.unsolicited_state else [
        "ct state established,related accept", f"iifname {lan} accept", 'iifname "lo" accept',
    ]

    def chain(name: str, head: str, rules: list[str]) -> str:
        body = "".join(f"\n    {rule}" for rule in rules)
        return f"  chain {name} {{\n    {head}{body}\n  }}"

    objects = [] if idle_s is None else [
        f"ct timeout udp_idle {{ protocol udp; l3proto ip; "
        f"policy = {{ unreplied : {idle_s}, replied : {idle_s} }}; }}"]
    idle = [] if idle_s is None else [
        chain("idle", "type filter hook prerouting priority filter; policy accept;",
              ['ct state new meta l4proto udp ct timeout set "udp_idle"'])]
    parts = [f"  {s}" for s in sets + objects] + idle + [
        chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", pre),
        chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post),
        # After source NAT, so the flow's translation is known (see the module docstring).
        chain("record", "type filter hook postrouting priority 300; policy accept;", record),
        chain("forward_filter", "type filter hook forward priority filter; policy drop;", forward),
        chain("input_filter", f"type filter hook input priority filter; policy {input_policy};",
              inp),
    ]
    return f"table ip {where.table} {{\n" + "\n".join(parts) + "\n}\n"
