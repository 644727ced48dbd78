"""Who initiates a punch, and which pairs cannot punch at all: the rules, decided by the
registry and carried in its punch events (`PunchEvent.initiator`); modes without a registry
that coordinates (DNS-SD, natpunch) and a node that has had no punch event for a peer yet call
the same functions.

WireGuard breaks no tie between two initiations that cross in flight: each side's incoming
initiation replaces its own pending one and neither response matches, so the pair waits out
the 5 s retry (tests/test_wg_device.py measured 5.07 s). One side must go first; both agree on
which from what both know: whether a side has a NAT, how its NAT maps (natinfo.py, as each
node measured and reported it), and last the raw public key bytes.
"""

from __future__ import annotations

from ..keys import Key
from .natinfo import NatBehaviour
from .records import PeerRecord


def initiator(side: Key, other: Key, *, side_public: bool = False,
              other_public: bool = False, side_nat: NatBehaviour | None = None,
              other_nat: NatBehaviour | None = None) -> bool:
    """True when `side` is the one that sends the first initiation. `*_public`: the side has
    no NAT of its own (PeerRecord.public); `*_nat`: its NAT's behaviour as reported (None:
    not reported).

    WireGuard answers from the socket the initiation reached, so the initiation must come
    from the side whose mapping toward the peer nobody can know beforehand: behind an
    endpoint-dependent ("symmetric") NAT, an initiation *toward* that side never arrives,
    and only its own initiation (which the other side answers, roaming to its source) makes
    a path; the other side opens its filter with an opener first (DESIGN.md §3). Measured in
    the lab's mixed-4, public b vs symmetric c, by the lower key alone: direct in 0 of 9 runs
    with b initiating, 17 of 17 with c; full-cone x symmetric and eim-addr x symmetric were
    direct only when the key order happened to make the symmetric side initiate (issue 13).
    So: between a side without NAT and one behind a NAT, the NATed side; else the side whose
    NAT maps per destination, if only one does; else the lower key (bytes)."""
    if side_public != other_public:
        return other_public
    side_dependent = side_nat is not None and side_nat.endpoint_dependent
    other_dependent = other_nat is not None and other_nat.endpoint_dependent
    if side_dependent != other_dependent:
        return side_dependent
    return lower_key(side, other)


def lower_key(a: Key, b: Key) -> bool:
    """Whether `a` is the lower key of the two (by its bytes): the last tie-break of
    `initiator`, and the first of a pair in `pair_of`."""
    return a.raw < b.raw


def initiates(a: PeerRecord, b: PeerRecord) -> bool:
    """`initiator` for node `a` toward node `b`, from the registry's records of both."""
    return initiator(a.public_key, b.public_key, side_public=a.public, other_public=b.public,
                     side_nat=a.nat, other_nat=b.nat)


def initiator_changed(old_a: PeerRecord, old_b: PeerRecord, new_a: PeerRecord,
                      new_b: PeerRecord) -> bool:
    """Whether a report (a NAT measured anew) changes who initiates between `a` and `b`. Then
    the next punch of the pair is a new one, not a repeat: the attempts before went the wrong
    way. So the registry lets it through its coalescing window (the punch just before
    decided without the report), and the node drops the role the last punch event gave and
    punches again at once rather than at its back-off's next turn (lab matrix: eim-addr x
    symmetric 11 of 11 direct, was relayed in 2 of 3; cone x symmetric 1.6 s -> ~0.8 s)."""
    return initiates(old_a, old_b) != initiates(new_a, new_b)


def relay_reason(a: NatBehaviour | None, b: NatBehaviour | None, *,
                 mapped: bool = False) -> str | None:
    """Why no direct path can exist between two nodes behind these NATs, in words; None when
    one may (or when either is not known: then the pair tries). DESIGN.md §6: both NATs map
    per destination (neither side can learn the port the other's NAT will use toward it), or
    one maps per destination and the other lets in only the exact endpoint it sent to (which
    is not the port the first one's NAT will pick). `mapped`: either side holds a port mapping
    on its NAT (has_mapping), which anyone reaches whatever the NATs' behaviour (DESIGN.md
    §3, candidate "mapped"): then nothing is ruled out (lab matrix: every symmetric+upnp
    cell direct)."""
    if mapped or a is None or b is None:
        return None
    if a.endpoint_dependent and b.endpoint_dependent:
        return "both NATs map per destination: needs a relay"
    if (a.endpoint_dependent and b.filters_per_port) or (
            b.endpoint_dependent and a.filters_per_port):
        return ("one NAT maps per destination and the other filters per port: needs a "
                "relay")
    return None


def needs_relay(a: NatBehaviour | None, b: NatBehaviour | None, *,
                mapped: bool = False) -> bool:
    """Whether a pair behind these NATs needs a relay (relay_reason says why)."""
    return relay_reason(a, b, mapped=mapped) is not None


def has_mapping(record: PeerRecord) -> bool:
    """Whether the node reported a port mapping on its NAT (Reported.mapped)."""
    return record.reported is not None and record.reported.mapped is not None


def pair_of(a: Key, b: Key) -> tuple[Key, Key]:
    """The pair in one canonical order, so A→B and B→A are the same pair."""
    return (a, b) if lower_key(a, b) else (b, a)
