"""protocol/roles.py: who initiates, and which pairs need a relay, for every pair of the
lab's NAT kinds (src/wgpunch/lab/nat.py) as a node measures them (node/natprobe.py)."""

import itertools

import pytest

from wgpunch.keys import Key
from wgpunch.protocol import (
    NatBehaviour,
    PeerRecord,
    Reported,
    has_mapping,
    initiator,
    initiator_changed,
    lower_key,
    needs_relay,
    pair_of,
    relay_reason,
)
from wgpunch.wg.model import Endpoint

LOW, HIGH = Key(bytes([1]) * 32), Key(bytes([2]) * 32)
APDF = "address-and-port-dependent"
# What netcheck names each lab kind (tests/test_natcheck_lab.py checks it in the lab).
KINDS = {
    "public": NatBehaviour("none", "endpoint-independent", True),
    "eim": NatBehaviour("endpoint-independent", APDF, True),
    "eim-port": NatBehaviour("endpoint-independent", APDF, False),
    "eim-addr": NatBehaviour("endpoint-independent", "address-dependent", True),
    "eim-full-cone": NatBehaviour("endpoint-independent", "endpoint-independent", True),
    "symmetric": NatBehaviour(APDF, APDF, False),
    "collision": NatBehaviour("endpoint-independent", APDF, True),
}
# The cells no direct path can serve (issue 13: "eim x symmetric without port mapping,
# symmetric x symmetric, ..."): a NAT mapping per destination against one that maps per
# destination too or lets in only the exact endpoint it sent to.
RELAYED = {frozenset(("symmetric",)), frozenset(("symmetric", "eim")),
           frozenset(("symmetric", "eim-port")), frozenset(("symmetric", "collision"))}


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations_with_replacement(KINDS, 2)))
def test_needs_relay_for_every_pair_of_kinds(a, b):
    expected = frozenset((a, b)) in RELAYED
    assert needs_relay(KINDS[a], KINDS[b]) is expected
    assert needs_relay(KINDS[b], KINDS[a]) is expected  # symmetric in its arguments


def test_the_reason_in_words():
    symmetric, eim = KINDS["symmetric"], KINDS["eim"]
    assert relay_reason(symmetric, symmetric) == "both NATs map per destination: needs a relay"
    assert relay_reason(eim, symmetric) == relay_reason(symmetric, eim) == (
        "one NAT maps per destination and the other filters per port: needs a relay")
    assert relay_reason(KINDS["eim-full-cone"], symmetric) is None
    # Not known (an older node, not measured): the pair tries, as before.
    assert relay_reason(None, symmetric) is None and not needs_relay(symmetric, None)
    unknown = NatBehaviour("unknown", "unknown", None)
    assert not needs_relay(unknown, symmetric)


@pytest.mark.parametrize("cell", sorted(RELAYED, key=sorted))
def test_a_port_mapping_on_either_side_rules_nothing_out(cell):
    """Anyone reaches a port mapping, whatever the NATs do (lab matrix: every K+upnp cell
    direct), so no cell needs a relay when either side holds one."""
    a, b = sorted(cell) * (2 if len(cell) == 1 else 1)
    assert needs_relay(KINDS[a], KINDS[b])
    assert relay_reason(KINDS[a], KINDS[b], mapped=True) is None
    assert not needs_relay(KINDS[b], KINDS[a], mapped=True)


def nat_record(key, kind=None):
    """A node's record with the NAT of lab kind `kind` reported (None: no NAT reported)."""
    nat = None if kind is None else KINDS[kind]
    return PeerRecord(key, (), None, None, Reported(51820, (), "0.1.0", nat=nat), 1)


@pytest.mark.parametrize(("intent", "old", "new", "changed"), [
    ("LOW learns its NAT maps per destination: it initiates now, not by key order",
     (None, None), ("symmetric", None), False),
    ("HIGH learns its NAT maps per destination: HIGH now initiates",
     (None, None), (None, "symmetric"), True),
    ("a NAT that maps per destination alike on both sides: key order, as before",
     (None, None), ("symmetric", "symmetric"), False),
    ("HIGH's NAT measured anew as mapping endpoint-independently: LOW again",
     ("eim", "symmetric"), ("eim", "eim"), True),
    ("a report that changes the filtering only leaves the initiator",
     ("eim", "eim"), ("eim-addr", "eim-full-cone"), False),
])
def test_initiator_changed(intent, old, new, changed):
    old_low, old_high = nat_record(LOW, old[0]), nat_record(HIGH, old[1])
    new_low, new_high = nat_record(LOW, new[0]), nat_record(HIGH, new[1])
    assert initiator_changed(old_low, old_high, new_low, new_high) is changed
    assert initiator_changed(old_high, old_low, new_high, new_low) is changed  # both sides


def test_has_mapping_is_what_the_node_reported():
    key = Key(bytes([7]) * 32)
    mapped = Reported(51820, (), "0.1.0", Endpoint.parse("198.51.100.2:40000"))
    assert has_mapping(PeerRecord(key, (), None, None, mapped, 1))
    assert not has_mapping(PeerRecord(key, (), None, None, Reported(51820, (), "0.1.0"), 1))
    assert not has_mapping(PeerRecord(key, (), None, None, None, 1))  # never reported


@pytest.mark.parametrize(("intent", "side", "other", "side_public", "other_public", "first"), [
    ("nothing known: the lower key", LOW, HIGH, False, False, True),
    ("nothing known: the lower key, seen from the higher", HIGH, LOW, False, False, False),
    ("behind a NAT against a public side: the NATed side, whatever the keys",
     HIGH, LOW, False, True, True),
    ("both public: the lower key", LOW, HIGH, True, True, True),
])
def test_initiator_without_nat_behaviour(intent, side, other, side_public, other_public, first):
    assert initiator(side, other, side_public=side_public, other_public=other_public) is first
    assert initiator(other, side, side_public=other_public,
                     other_public=side_public) is not first  # exactly one side


def test_the_key_order_is_one_rule():
    """The lower key: the last tie-break of initiator, the first of a pair (the demo's
    lower_key column too)."""
    assert lower_key(LOW, HIGH) and not lower_key(HIGH, LOW) and not lower_key(LOW, LOW)
    assert pair_of(HIGH, LOW) == pair_of(LOW, HIGH) == (LOW, HIGH)
    assert initiator(LOW, HIGH) and not initiator(HIGH, LOW)


@pytest.mark.parametrize(("a", "b"), list(itertools.product(KINDS, KINDS)))
def test_initiator_for_every_pair_of_kinds_in_both_key_orders(a, b):
    """The side whose NAT maps per destination initiates (DESIGN.md §3); between two that do
    not (or both do), the lower key; a public side never initiates toward a NATed one."""
    for low_kind, high_kind in ((a, b), (b, a)):
        low, high = KINDS[low_kind], KINDS[high_kind]
        low_public, high_public = low_kind == "public", high_kind == "public"
        first = initiator(LOW, HIGH, side_public=low_public, other_public=high_public,
                          side_nat=low, other_nat=high)
        second = initiator(HIGH, LOW, side_public=high_public, other_public=low_public,
                           side_nat=high, other_nat=low)
        assert first is not second
        if low_public != high_public:
            assert first is high_public
        elif low.endpoint_dependent != high.endpoint_dependent:
            assert first is low.endpoint_dependent
        else:
            assert first


def test_the_symmetric_side_initiates_against_a_cone_whatever_the_keys():
    """Issue 13: full-cone x symmetric and eim-addr x symmetric went direct only when the key
    order made the symmetric side initiate."""
    for cone in ("eim-full-cone", "eim-addr"):
        assert initiator(HIGH, LOW, side_nat=KINDS["symmetric"], other_nat=KINDS[cone])
        assert not initiator(LOW, HIGH, side_nat=KINDS[cone], other_nat=KINDS["symmetric"])
