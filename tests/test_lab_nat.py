"""Every NAT kind does what `NAT_KINDS` claims, measured by behaviour (`natcheck`).

One lab holds a NAT of each kind; reflectors on two outside hosts report the mappings, and
unsolicited packets from a third host probe the filtering (see natcheck's docstring).
"""

from __future__ import annotations

import pytest

from wgpunch.lab import natcheck
from wgpunch.lab.nat import NAT_KINDS
from wgpunch.lab.natcheck import ProbeProcess
from wgpunch.lab.netns import wait_for
from wgpunch.lab.scenario import Host, Nat, Scenario

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def measured(make_module_lab):
    lab = make_module_lab(natcheck.scenario())
    kinds, hairpins = natcheck.measure(lab)
    return {b.kind: b for b in kinds}, {h.nat: h for h in hairpins}


@pytest.mark.parametrize("kind", list(NAT_KINDS))
def test_kind_behaves_as_declared(measured, kind):
    behaviour = measured[0][kind]
    claim = NAT_KINDS[kind]
    assert (behaviour.mapping, behaviour.port, behaviour.filtering,
            behaviour.unsolicited_state) == (
        claim.mapping, claim.port, claim.filtering, claim.unsolicited_state
    ), behaviour


def test_only_collision_loses_its_port_to_an_unsolicited_packet(measured):
    """DESIGN.md §9: leftover state of an unsolicited packet pushes the mapping elsewhere."""
    kept = {kind: b.port_after_unsolicited == "kept" for kind, b in measured[0].items()
            if b.port == "preserved"}
    assert kept == {"eim": True, "eim-addr": True, "eim-full-cone": True, "collision": False,
                    "eim-short": True}


def test_eim_port_picks_from_its_range_and_keeps_it(measured):
    behaviour = measured[0]["eim-port"]
    ports = {int(m.rpartition(":")[2]) for m in behaviour.mapped}
    assert len(ports) == 1
    low, high = 20000, 29999
    assert low <= ports.pop() <= high


def test_hairpin_on_delivers_with_the_senders_public_mapping(measured):
    for nat in ("hp", "hq"):  # eim, eim-port
        hairpin = measured[1][nat]
        assert hairpin.arrives, hairpin
        assert hairpin.source == hairpin.sender_public, hairpin


def test_hairpin_off_does_not_deliver(measured):
    assert not measured[1]["hn"].arrives



def test_a_forgetting_nat_maps_even_a_steady_flow_anew(make_lab):
    """Lab.forget_mappings on an `eim-port` NAT: the inside's next packet gets a new outside
    port, also when it sends all the time (a packet between the conntrack flush and the map
    flush wrote the old mapping back: issue 18, bench/time_to_direct.py forget)."""
    lab = make_lab(Scenario("forget", (
        Host("o1", wireguard=False),
        Nat("n", "eim-port", (Host("h", wireguard=False),)))))
    reflector = f"{lab.plan.node('o1').address.ip}:3478"
    with ProbeProcess(lab.ns("o1"), "--port", "3478", "--echo", "--lifetime", "60") as echo:
        echo.wait(lambda e: e["event"] == "bound", timeout=natcheck.ANSWER_S)
        with ProbeProcess(lab.ns("h"), "--port", "40000", "--send", reflector,
                          "--every", "0.001", "--lifetime", "60") as flow:
            flow.wait(lambda e: e["event"] == "recv", timeout=natcheck.ANSWER_S)
            for _ in range(3):
                before, seen = flow.received()[-1]["text"], len(flow.events)
                lab.forget_mappings("n")
                after = wait_for(lambda seen=seen, before=before: next(
                    (e["text"] for e in flow.events[seen:]
                     if e["event"] == "recv" and e["text"] != before), None),
                    timeout=natcheck.ANSWER_S, what=f"a mapping other than {before}")
                assert after.rpartition(":")[0] == before.rpartition(":")[0]
