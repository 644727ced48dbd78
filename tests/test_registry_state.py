"""The peer table: what is a change, revisions, history and resume, epochs, stream fan-out,
and punch coordination, all without a clock or a socket (time is passed in)."""

import ipaddress
import json
from dataclasses import replace

import pytest

from wgpunch.errors import RequestRefused
from wgpunch.keys import Key
from wgpunch.protocol import (
    Heartbeat,
    PeerEvent,
    PunchEvent,
    RelayEvent,
    RemovedEvent,
    Reported,
    Snapshot,
    initiator,
    item_from_json,
    pair_of,
)
from wgpunch.protocol.natinfo import NatBehaviour
from wgpunch.registry.punch import Coalescer
from wgpunch.registry.state import RegistryState
from wgpunch.wg.model import Endpoint, PeerState

K1, K2, K3 = (Key(bytes([n]) * 32) for n in (1, 2, 3))


def peer(key: Key, endpoint: str | None = None, allowed: str = "",
         handshake: float | None = None, rx: int = 0) -> PeerState:
    return PeerState(
        public_key=key,
        endpoint=None if endpoint is None else Endpoint.parse(endpoint),
        allowed_ips=tuple(ipaddress.ip_network(a) for a in allowed.split(",") if a),
        latest_handshake=handshake, rx_bytes=rx, tx_bytes=rx, persistent_keepalive=25,
        has_preshared_key=False,
    )


def report(port: int = 51820) -> Reported:
    return Reported(port, (ipaddress.ip_address("192.168.1.2"),), "0.1.0")


def two_peers() -> RegistryState:
    state = RegistryState(epoch="e1")
    state.observe([peer(K1, "198.51.100.1:51820", "10.0.0.1/32"),
                   peer(K2, "203.0.113.2:4000", "10.0.0.2/32")])
    return state


def decode(line: bytes | None):
    """A stream line as the node reads it (None: the end marker)."""
    return None if line is None else item_from_json(json.loads(line))


def drain(stream) -> list:
    items = []
    while not stream.queue.empty():
        items.append(decode(stream.queue.get_nowait()))
    return items


# -- what is a change -------------------------------------------------------------------------

def test_new_peers_are_changes_with_consecutive_revisions():
    state = two_peers()
    assert state.revision == 2
    assert [r.revision for r in state.sorted_peers()] == [1, 2]
    assert state.peers[K1].endpoint == Endpoint.parse("198.51.100.1:51820")


@pytest.mark.parametrize(("intent", "after", "is_change"), [
    ("nothing changed", peer(K1, "198.51.100.1:51820", "10.0.0.1/32"), False),
    ("traffic counters are not a change",
     peer(K1, "198.51.100.1:51820", "10.0.0.1/32", rx=9), False),
    ("a handshake alone is not a change",
     peer(K1, "198.51.100.1:51820", "10.0.0.1/32", 1e9), False),
    ("the endpoint roamed", peer(K1, "198.51.100.1:40000", "10.0.0.1/32"), True),
    ("the endpoint went away", peer(K1, None, "10.0.0.1/32"), True),
    ("allowed IPs grew", peer(K1, "198.51.100.1:51820", "10.0.0.1/32,fd00::1/128"), True),
])
def test_what_counts_as_a_change(intent, after, is_change):
    state = two_peers()
    changes = state.observe([after, peer(K2, "203.0.113.2:4000", "10.0.0.2/32")])
    assert bool(changes) == is_change, intent
    assert state.revision == (3 if is_change else 2)
    # The table always shows the latest reading, even when it published nothing.
    assert state.peers[K1].latest_handshake == after.latest_handshake


def test_allowed_ips_in_another_order_are_not_a_change():
    state = RegistryState()
    state.observe([peer(K1, None, "10.0.0.0/24,fd00::/64,10.1.0.0/16")])
    assert state.observe([peer(K1, None, "fd00::/64,10.1.0.0/16,10.0.0.0/24")]) == []
    assert [str(n) for n in state.peers[K1].allowed_ips] == [
        "10.0.0.0/24", "10.1.0.0/16", "fd00::/64"]


def test_handshake_only_update_keeps_the_record_revision():
    state = two_peers()
    state.observe([peer(K1, "198.51.100.1:51820", "10.0.0.1/32", 1_700_000_000.5),
                   peer(K2, "203.0.113.2:4000", "10.0.0.2/32")])
    record = state.peers[K1]
    assert (record.latest_handshake, record.revision, state.revision) == (
        1_700_000_000.5, 1, 2)


def test_a_peer_gone_from_the_device_is_removed():
    state = two_peers()
    changes = state.observe([peer(K2, "203.0.113.2:4000", "10.0.0.2/32")])
    assert changes == [RemovedEvent(3, K1)]
    assert K1 not in state.peers


def test_a_partial_read_touches_only_the_peers_it_names():
    """What the observer applies after the first read: `Device.changes`' new or different
    peers and the keys gone; a peer it does not mention is unchanged, not removed."""
    state = two_peers()
    changes = state.observe_changes(
        [peer(K2, "203.0.113.2:4001", "10.0.0.2/32"), peer(K3, None, "10.0.0.3/32")],
        removed=[K1, Key(bytes([9]) * 32)])  # an unknown key: nothing to remove
    assert [(type(c).__name__, c.revision) for c in changes] == [
        ("PeerEvent", 3), ("PeerEvent", 4), ("RemovedEvent", 5)]
    assert set(state.peers) == {K2, K3}
    assert str(state.peers[K2].endpoint) == "203.0.113.2:4001"
    assert state.observe_changes([], []) == [] and state.revision == 5
    # A peer named again unchanged publishes nothing, as in a complete read.
    assert state.observe_changes([peer(K3, None, "10.0.0.3/32", rx=7)], []) == []


def test_report_is_a_change_once():
    state = two_peers()
    assert state.report(K1, report()) == 3
    assert state.peers[K1].reported == report() and state.peers[K1].revision == 3
    assert state.report(K1, report()) == 3  # the same again: no new revision
    assert state.report(K1, report(9)) == 4


def test_report_survives_endpoint_changes_and_a_stranger_cannot_report():
    state = two_peers()
    state.report(K1, report())
    state.observe([peer(K1, "198.51.100.1:1", "10.0.0.1/32"), peer(K2, None, "10.0.0.2/32")])
    assert state.peers[K1].reported == report()
    with pytest.raises(RequestRefused) as refused:
        state.report(K3, report())
    assert refused.value.status == 403


# -- history and resume -----------------------------------------------------------------------

@pytest.mark.parametrize(("intent", "since", "epoch", "want"), [
    ("no since: snapshot", None, "e1", None),
    ("no epoch: a restart cannot be ruled out, snapshot", 2, None, None),
    ("another epoch: the registry restarted, snapshot", 2, "e0", None),
    ("ahead of the registry: snapshot", 9, "e1", None),
    ("older than the history: snapshot", 0, "e1", None),
    ("oldest resumable point", 1, "e1", [2, 3, 4]),
    ("in the middle", 3, "e1", [4]),
    ("up to date: nothing to send", 4, "e1", []),
])
def test_changes_since(intent, since, epoch, want):
    state = RegistryState(epoch="e1", history_max=3)
    state.observe([peer(K1, None, "10.0.0.1/32")])  # 1
    state.observe([peer(K1, None, "10.0.0.1/32"), peer(K2, None, "10.0.0.2/32")])  # 2
    state.report(K1, report())  # 3
    state.observe([peer(K1, None, "10.0.0.1/32")])  # 4: K2 removed
    got = state.changes_since(since, epoch)
    assert (None if got is None else [c.revision for c in got]) == want, intent


def test_fresh_registry_resumes_from_zero_with_nothing():
    state = RegistryState(epoch="e1")
    assert state.changes_since(0, "e1") == []
    assert state.changes_since(1, "e1") is None


def test_epoch_is_random_hex_per_state():
    a, b = RegistryState(), RegistryState()
    assert a.epoch != b.epoch and len(a.epoch) == 16 and int(a.epoch, 16) >= 0


# -- streams ----------------------------------------------------------------------------------

def test_open_stream_starts_with_snapshot_or_backlog_then_gets_live_changes():
    state = two_peers()
    stream, first = state.open_stream(K1, None, None, now=0.0)
    assert [decode(line) for line in first] == [Snapshot("e1", 2, state.sorted_peers())]
    resumed, backlog = state.open_stream(K2, 1, "e1", now=0.0)
    [change] = [decode(line) for line in backlog]
    assert isinstance(change, PeerEvent) and change.peer.public_key == K2
    state.observe([peer(K1, "198.51.100.1:51820", "10.0.0.1/32")])
    assert drain(stream) == drain(resumed) == [RemovedEvent(3, K2)]


@pytest.mark.parametrize(("intent", "since", "epoch", "ends"), [
    ("a node that knew another epoch: the list of its slots ends with a heartbeat", 7, "e0",
     True),
    ("a node's first stream: it holds no slot to confirm", None, None, False),
    ("a stream resumed in the same epoch: its slots are as they were", 2, "e1", False),
])
def test_a_stream_starts_with_the_slots_its_caller_holds(intent, since, epoch, ends):
    state = two_peers()
    slot = RelayEvent(0, K2, 32000, ipaddress.ip_address("198.51.100.10"))
    state.standing = lambda caller: [slot] if caller == K1 else []
    _, first = state.open_stream(K1, since, epoch, now=0.0)
    lines = [decode(line) for line in first]
    assert lines[-2 if ends else -1] == slot, intent
    assert (lines[-1] == Heartbeat(2)) == ends, intent


def test_each_change_is_encoded_once_for_every_stream_and_the_history():
    state = two_peers()
    streams = [state.open_stream(key, 2, "e1", now=0.0)[0] for key in (K1, K2, K3)]
    state.report(K1, report())
    lines = [s.queue.get_nowait() for s in streams]
    _, backlog = state.open_stream(K3, 2, "e1", now=0.0)
    assert all(line is lines[0] for line in lines + backlog)  # one bytes object, shared
    assert decode(lines[0]).peer.reported == report()


@pytest.mark.parametrize(("intent", "now", "change", "reused"), [
    ("another stream at once, nothing changed", 0.5, None, True),
    ("a second later: handshake times may have moved", 1.0, None, False),
    ("a change in between", 0.5, "198.51.100.1:4", False),
])
def test_a_snapshot_is_encoded_once_per_revision_and_second(intent, now, change, reused):
    state = two_peers()
    _, [first] = state.open_stream(K1, None, None, now=0.0)
    if change is not None:
        state.observe([peer(K1, change, "10.0.0.1/32"), peer(K2, "203.0.113.2:4000",
                                                             "10.0.0.2/32")])
    _, [second] = state.open_stream(K2, None, None, now=now)
    assert (second is first) == reused, intent
    assert decode(second) == Snapshot("e1", state.revision, state.sorted_peers()), intent


@pytest.mark.parametrize(("intent", "after", "moves"), [
    ("an endpoint change leaves who an address is", [
        peer(K1, "198.51.100.1:9", "10.0.0.1/32"), peer(K2, "203.0.113.2:4000", "10.0.0.2/32")
    ], False),
    ("new allowed IPs", [peer(K1, "198.51.100.1:51820", "10.0.0.9/32"),
                         peer(K2, "203.0.113.2:4000", "10.0.0.2/32")], True),
    ("a peer gone", [peer(K1, "198.51.100.1:51820", "10.0.0.1/32")], True),
    ("a peer new", [peer(K1, "198.51.100.1:51820", "10.0.0.1/32"),
                    peer(K2, "203.0.113.2:4000", "10.0.0.2/32"), peer(K3)], True),
])
def test_the_roster_revision_moves_only_when_who_an_address_is_can_change(intent, after,
                                                                          moves):
    state = two_peers()
    roster = state.roster_revision
    state.report(K2, report())  # a report never moves it
    state.observe(after)
    assert (state.roster_revision != roster) == moves, intent


def test_a_stream_that_cannot_keep_up_is_closed_and_others_get_everything():
    state = RegistryState(stream_queue_max=2)
    slow, _ = state.open_stream(K1, None, None, now=0.0)
    for n in range(1, 4):  # three changes into a queue of two
        state.observe([peer(K1, f"192.0.2.1:{n}", "10.0.0.1/32")])
    assert slow.closed and slow.overflowed
    assert drain(slow) == [None]  # the end marker alone: the client resumes from history
    assert state.stream_count == 0
    fast, _ = state.open_stream(K1, None, None, now=0.0)
    state.observe([peer(K1, "192.0.2.1:9", "10.0.0.1/32")])
    assert [c.revision for c in drain(fast)] == [4]


def test_one_overflowing_stream_does_not_affect_another():
    state = RegistryState(stream_queue_max=2)
    slow, _ = state.open_stream(K1, None, None, now=0.0)
    state.observe([peer(K1, "192.0.2.1:1", "10.0.0.1/32")])
    state.observe([peer(K1, "192.0.2.1:2", "10.0.0.1/32")])
    other, _ = state.open_stream(K2, None, None, now=0.0)
    state.observe([peer(K1, "192.0.2.1:3", "10.0.0.1/32")])  # slow overflows here
    assert slow.closed and [c.revision for c in drain(other)] == [3]


def test_close_streams_ends_every_stream():
    state = two_peers()
    streams = [state.open_stream(K1, None, None, now=0.0)[0] for _ in range(3)]
    state.close_streams()
    assert all(drain(s) == [None] for s in streams) and state.stream_count == 0


# -- punch ------------------------------------------------------------------------------------

def test_punch_reaches_both_sides_at_once_with_each_others_endpoint():
    state = two_peers()
    s1, _ = state.open_stream(K1, None, None, now=0.0)
    s2, _ = state.open_stream(K2, None, None, now=0.0)
    s3, _ = state.open_stream(K3, None, None, now=0.0)  # a bystander hears nothing
    endpoint, pushed = state.request_punch(K2, K1, now=100.0)
    assert (str(endpoint), pushed) == ("198.51.100.1:51820", True)
    assert drain(s1) == [PunchEvent(2, K2, Endpoint.parse("203.0.113.2:4000"), True)]
    assert drain(s2) == [PunchEvent(2, K1, Endpoint.parse("198.51.100.1:51820"), False)]
    assert drain(s3) == []
    assert state.changes_since(2, "e1") == []  # punches are not history


def test_between_a_public_node_and_a_natted_one_the_natted_one_initiates():
    """K1 (lower key) reports the address we observe: it has no NAT, so K2 behind its NAT
    sends first (registry/punch.py `initiator`); K2's report does not make it public."""
    state = two_peers()
    s1, _ = state.open_stream(K1, None, None, now=0.0)
    s2, _ = state.open_stream(K2, None, None, now=0.0)
    state.report(K1, Reported(51820, (ipaddress.ip_address("198.51.100.1"),), "0.1.0"))
    state.report(K2, report())
    records = {r.public_key: r for r in state.sorted_peers()}
    assert records[K1].public and not records[K2].public
    drain(s1), drain(s2)
    state.request_punch(K1, K2, now=100.0)
    [to_k1] = drain(s1)
    [to_k2] = drain(s2)
    assert (to_k1.initiator, to_k2.initiator) == (False, True)


def test_punch_repeats_within_the_window_are_coalesced_for_the_pair():
    state = two_peers()
    s1, _ = state.open_stream(K1, None, None, now=0.0)
    s2, _ = state.open_stream(K2, None, None, now=0.0)
    assert state.request_punch(K1, K2, now=10.0)[1]
    assert not state.request_punch(K2, K1, now=10.2)[1]  # the same pair, other direction
    assert state.request_punch(K1, K2, now=10.25)[1]
    assert len(drain(s1)) == 2 and len(drain(s2)) == 2


def test_a_nat_report_lets_the_next_punch_of_its_pairs_through():
    """A node that learns its NAT maps per destination becomes the initiator: the punch its
    peers ask for then is no repeat of the one just before, whatever the window says."""
    state = two_peers()
    s1, _ = state.open_stream(K1, None, None, now=0.0)
    s2, _ = state.open_stream(K2, None, None, now=0.0)
    assert state.request_punch(K1, K2, now=10.0)[1]
    state.report(K2, report())  # no NAT reported yet: nothing changes who initiates
    assert not state.request_punch(K1, K2, now=10.05)[1]
    symmetric = NatBehaviour("address-and-port-dependent", "address-and-port-dependent", False)
    state.report(K2, replace(report(), nat=symmetric))
    assert state.request_punch(K1, K2, now=10.1)[1]
    punches = [e for e in drain(s1) if isinstance(e, PunchEvent)]
    assert [p.initiator for p in punches] == [True, False]  # K1 (lower key), then K2
    assert len([e for e in drain(s2) if isinstance(e, PunchEvent)]) == 2
    # K1's NAT measured, mapping endpoint-independently: K2 still initiates, so a punch
    # now repeats the last one (protocol.initiator_changed).
    eim = NatBehaviour("endpoint-independent", "address-and-port-dependent", True)
    state.report(K1, replace(report(), nat=eim))
    assert not state.request_punch(K1, K2, now=10.15)[1]


def test_a_punch_that_missed_a_side_is_not_coalesced():
    """K2 was not listening yet (a node starting): its own request must reach both."""
    state = two_peers()
    s1, _ = state.open_stream(K1, None, None, now=0.0)
    assert state.request_punch(K1, K2, now=10.0)[1]
    s2, _ = state.open_stream(K2, None, None, now=0.0)
    assert state.request_punch(K2, K1, now=10.05)[1]
    assert len(drain(s1)) == 2 and len(drain(s2)) == 1
    assert not state.request_punch(K1, K2, now=10.1)[1]  # both heard that one


def test_the_other_sides_opened_reaches_the_initiator_alone():
    """K1 (lower key) initiates; K2 opened its NAT and says so: K1 hears it as a punch event
    with `opened`, K2 hears nothing. K1 saying it is ignored: it must not make K2 initiate."""
    state = two_peers()
    s1, _ = state.open_stream(K1, None, None, now=0.0)
    s2, _ = state.open_stream(K2, None, None, now=0.0)
    assert state.opened(K2, K1)
    assert drain(s1) == [PunchEvent(2, K2, Endpoint.parse("203.0.113.2:4000"), True,
                                    opened=True)]
    assert drain(s2) == []
    assert not state.opened(K1, K2) and drain(s2) == []
    with pytest.raises(RequestRefused) as refused:
        state.opened(K1, K1)
    assert refused.value.status == 400


@pytest.mark.parametrize(("intent", "caller", "target", "status"), [
    ("a node names itself", K1, K1, 400),
    ("unknown target", K1, Key(bytes([9]) * 32), 404),
    ("the caller has no endpoint", K3, K1, 409),
    ("the target has no endpoint", K1, K3, 409),
    ("the caller is no longer a peer", Key(bytes([9]) * 32), K1, 403),
])
def test_punch_refusals(intent, caller, target, status):
    state = two_peers()
    state.observe([peer(K1, "198.51.100.1:51820", "10.0.0.1/32"),
                   peer(K2, "203.0.113.2:4000", "10.0.0.2/32"),
                   peer(K3, None, "10.0.0.3/32")])
    with pytest.raises(RequestRefused) as refused:
        state.request_punch(caller, target, now=0.0)
    assert refused.value.status == status, intent


def test_initiator_is_the_lower_key_and_pairs_are_unordered():
    assert initiator(K1, K2) and not initiator(K2, K1)
    assert initiator(K1, K2, side_public=True, other_public=True)
    assert not initiator(K1, K2, side_public=True)  # the NATed side sends, whatever the keys
    assert initiator(K2, K1, other_public=True)
    assert pair_of(K2, K1) == pair_of(K1, K2) == (K1, K2)


def test_coalescer_forgets_old_pairs_but_not_recent_ones():
    coalescer = Coalescer(0.5)
    keys = [Key(n.to_bytes(32, "big")) for n in range(10, 1110)]
    for n, key in enumerate(keys):
        assert coalescer.admit(K1, key, now=n * 1.0)
    assert len(coalescer._last) <= Coalescer._SWEEP_AT + 1
    assert not coalescer.admit(keys[-1], K1, now=len(keys) - 1 + 0.1)
