"""When the agent asks for a relay slot, and how a slot becomes the path (node/relay.py)."""

import asyncio
import ipaddress
from dataclasses import replace

import pytest

from wgpunch.errors import ApiError
from wgpunch.keys import Key
from wgpunch.node.candidates import Candidate, CandidateKind, PathKind
from wgpunch.node.decide import Kind, Memory, decide
from wgpunch.node.relay import (
    Relays,
    RelayTimings,
    Why,
    retry_after,
    slot_endpoint,
    want_slot,
)
from wgpunch.node.timings import Timings
from wgpunch.node.track import Track
from wgpunch.protocol import RelayEvent
from wgpunch.wg.model import Endpoint, PeerState

T = RelayTimings()
PEER = Key(bytes(range(32)))
PUBLIC = Endpoint.parse("198.51.100.2:51820")
REGISTRY = Endpoint.parse("192.0.2.2:51820")
DIRECT = (Candidate(CandidateKind.PUBLIC, PUBLIC),)


@pytest.mark.parametrize(("asks", "after"), [(1, 10.0), (2, 20.0), (3, 40.0), (9, 300.0)])
def test_slot_requests_back_off(asks, after):
    assert retry_after(asks, T) == after


@pytest.mark.parametrize(("mem", "live", "asked_at", "now", "want", "intent"), [
    (Memory(), False, None, 5.0, False, "no attempt yet: nothing says direct fails"),
    (Memory(first_attempt_at=4.2), False, None, 5.0, False, "the punch has its second"),
    (Memory(first_attempt_at=4.0), False, None, 5.0, True, "a second without a handshake"),
    (Memory(first_attempt_at=4.0), True, None, 5.0, False, "live: never leave a working path"),
    (Memory(first_attempt_at=0.0), False, 0.5, 5.0, False, "asked 4.5 s ago: not again yet"),
    (Memory(first_attempt_at=0.0), False, 0.5, 10.5, True, "asked retry_s ago: again"),
])
def test_want_slot(mem, live, asked_at, now, want, intent):
    assert want_slot(mem, now, T, live=live, asked_at=asked_at) is want, intent


def test_while_a_nat_is_not_known_the_relay_waits_longer():
    """Who initiates may be wrong until both NATs are measured: the next punch may go direct."""
    mem = Memory(first_attempt_at=4.0)
    assert not want_slot(mem, 5.0, T, live=False, asked_at=None, nats_known=False)
    assert want_slot(mem, 4.0 + T.after_unknown_s, T, live=False, asked_at=None,
                     nats_known=False)


def test_a_pair_that_can_never_go_direct_asks_at_once():
    assert want_slot(Memory(), 5.0, T, live=False, asked_at=None, impossible=True)
    assert not want_slot(Memory(), 5.0, T, live=True, asked_at=None, impossible=True)
    assert not want_slot(Memory(), 5.0, T, live=False, asked_at=1.0, impossible=True)


def test_slot_endpoint():
    event = RelayEvent(1, PEER, 31000, None)
    assert slot_endpoint(event, REGISTRY) == Endpoint.parse("192.0.2.2:31000")
    assert slot_endpoint(event, None) is None  # no registry endpoint: no address to send to
    given = RelayEvent(1, PEER, 31000, ipaddress.ip_address("203.0.113.7"))
    assert slot_endpoint(given, None) == Endpoint.parse("203.0.113.7:31000")


class FakeRegistry:
    """Only what Relays asks: a slot, or a refusal."""

    coordinates_punches = True

    def __init__(self, answer: RelayEvent | ApiError) -> None:
        self.answer, self.asked = answer, []

    async def relay(self, peer: Key) -> RelayEvent:
        self.asked.append(peer)
        if isinstance(self.answer, ApiError):
            raise self.answer
        return self.answer


async def settle(relays: Relays) -> None:
    """Let the background requests finish."""
    async with asyncio.timeout(2):
        await asyncio.gather(*relays._tasks)


async def test_a_slot_becomes_the_only_candidate_left_and_both_sides_handshake():
    registry = FakeRegistry(RelayEvent(3, PEER, 31001, None))
    offers: dict[Key, RelayEvent] = {}
    woken = []
    relays = Relays(registry, offers, lambda: woken.append(1))  # type: ignore[arg-type]
    relays.registry = REGISTRY
    mem = Memory(attempts=2, attempt_at=4.5, attempt_endpoint=PUBLIC, first_attempt_at=4.0)
    candidates, same = relays.plan(PEER, DIRECT, mem, live=False, current=PUBLIC, now=5.0)
    assert (candidates, same) == (DIRECT, mem)
    await settle(relays)
    assert registry.asked == [PEER] and woken and PEER in offers
    candidates, mem = relays.plan(PEER, DIRECT, mem, live=False, current=PUBLIC, now=5.1)
    relay = Endpoint.parse("192.0.2.2:31001")
    assert candidates == (Candidate(CandidateKind.RELAY, relay),)  # only the slot, for now
    assert mem.attempt_endpoint is None
    assert (mem.attempts, mem.attempt_at, mem.first_attempt_at) == (0, None, 4.0)
    again = relays.plan(PEER, DIRECT, mem, live=False, current=PUBLIC, now=5.2)
    assert again[1] == mem  # only once

    dead = PeerState(PEER, PUBLIC, (), None, 0, 0, 25, False)
    now = dict(now_wall=1.8e9, now=5.2, t=Timings())
    asked = decide(dead, candidates, mem, initiator=True, punched=False, **now)
    assert (asked.kind, asked.endpoint) == (Kind.REQUEST_PUNCH, relay)
    # On the punch event the non-initiator sends its own initiation to the relay (its
    # port is bound by what arrives), not a NAT opener, even where openers work.
    passive = decide(dead, candidates, mem, initiator=False, punched=True, can_open=True, **now)
    assert (passive.kind, passive.endpoint) == (Kind.HANDSHAKE, relay)

    assert relays.is_slot(PEER, relay) and not relays.is_slot(PEER, PUBLIC)
    track = Track(path=PathKind.RELAY)
    relays.annotate(PEER, track)
    assert track.reason == Why.NO_HANDSHAKE.value


async def test_a_slot_that_got_no_handshake_is_asked_for_again_later():
    offers = {PEER: RelayEvent(3, PEER, 31001, None)}  # the peer asked for it
    registry = FakeRegistry(ApiError("registry: POST /v1/relay: 404 not found", 404))
    relays = Relays(registry, offers, lambda: None)  # type: ignore[arg-type]
    relays.registry = REGISTRY
    mem = Memory(first_attempt_at=0.0)
    _candidates, mem = relays.plan(PEER, DIRECT, mem, live=False, current=PUBLIC, now=1.0)
    assert relays.leases[PEER].why == Why.PEER_ASKED.value
    relay = relays.leases[PEER].endpoint
    trying = Memory(first_attempt_at=0.0, attempt_endpoint=relay, attempts=2)
    candidates, mem = relays.plan(PEER, DIRECT, trying, live=False, current=PUBLIC, now=1.5)
    assert candidates == (Candidate(CandidateKind.RELAY, relay),)  # stays on the slot
    failed = replace(trying, attempts=4)
    candidates, _ = relays.plan(PEER, DIRECT, failed, live=False, current=PUBLIC, now=2.0)
    assert candidates == DIRECT and PEER not in offers and PEER not in relays.leases
    await settle(relays)
    assert registry.asked == [PEER]  # asked (and refused); not again within retry_s
    relays.plan(PEER, DIRECT, failed, live=False, current=PUBLIC, now=3.0)
    await settle(relays)
    assert registry.asked == [PEER]


async def test_a_slot_gone_under_a_live_session_is_asked_for_at_once_and_moved_to():
    """The registry restarted (its relay's slots are gone: RegistryView clears the offers on
    a new epoch) while our device sends to the slot: ask at once, though the session still
    looks live; until the new slot comes, the gone one stays the only candidate, and while
    the new slot differs, offer only it (decide() probes the dead old path and repoints
    there, rather than to a direct path that failed or cannot work)."""
    old, new = RelayEvent(3, PEER, 31001, None), RelayEvent(1, PEER, 31003, None)
    offers = {PEER: old}
    registry = FakeRegistry(new)
    relays = Relays(registry, offers, lambda: None)  # type: ignore[arg-type]
    relays.registry = REGISTRY
    on_old = Endpoint.parse("192.0.2.2:31001")
    relays.plan(PEER, DIRECT, Memory(), live=True, current=on_old, now=1.0)
    offers.clear()
    waiting = relays.plan(PEER, DIRECT, Memory(), live=True, current=on_old, now=100.0)[0]
    assert waiting == (Candidate(CandidateKind.RELAY, on_old),)
    dead_old = PeerState(PEER, on_old, (), 1.8e9 - 10, 100, 200, 25, False)
    probed = Memory(probe_at=99.0, probe_endpoint=on_old, probe_rx_bytes=100)
    stays = decide(dead_old, waiting, probed, initiator=True, punched=False, now_wall=1.8e9,
                   now=100.0, t=Timings())
    assert stays.kind is not Kind.REPOINT  # not moved off the slot to a direct candidate
    await settle(relays)
    assert registry.asked == [PEER]
    candidates, _ = relays.plan(PEER, DIRECT, Memory(), live=True, current=on_old, now=100.1)
    assert candidates == (Candidate(CandidateKind.RELAY, Endpoint.parse("192.0.2.2:31003")),)
    moved = Endpoint.parse("192.0.2.2:31003")
    # The session is still relayed where it is (status), though only the new slot is offered.
    assert relays.is_slot(PEER, on_old) and relays.is_slot(PEER, moved)
    candidates, _ = relays.plan(PEER, DIRECT, Memory(), live=True, current=moved, now=101.0)
    assert candidates == (*DIRECT, Candidate(CandidateKind.RELAY, moved))


def test_a_live_session_on_a_slot_of_an_impossible_pair_keeps_only_the_slot():
    """Both NATs rule direct out: under a live session the slot stays the only candidate, so
    a probe through it that goes unanswered (the relay restarting) cannot move the session to
    a direct path; a pair that may go direct keeps its direct candidates beside the slot."""
    offers = {PEER: RelayEvent(3, PEER, 31001, None)}
    relays = Relays(FakeRegistry(RelayEvent(3, PEER, 31001, None)), offers,  # type: ignore[arg-type]
                    lambda: None)
    relays.registry = REGISTRY
    slot = Candidate(CandidateKind.RELAY, Endpoint.parse("192.0.2.2:31001"))
    kept, _ = relays.plan(PEER, DIRECT, Memory(), live=True, current=slot.endpoint, now=1.0,
                          impossible="both NATs map per destination")
    assert kept == (slot,)
    dead_slot = PeerState(PEER, slot.endpoint, (), 1.8e9 - 10, 100, 200, 25, False)
    unanswered = Memory(probe_at=1.0, probe_endpoint=slot.endpoint, probe_rx_bytes=100)
    stays = decide(dead_slot, kept, unanswered, initiator=True, punched=False,
                   now_wall=1.8e9, now=9.0, t=Timings())
    assert stays.kind is not Kind.REPOINT
    maybe, _ = relays.plan(PEER, DIRECT, Memory(), live=True, current=slot.endpoint, now=2.0)
    assert maybe == (*DIRECT, slot)


async def test_a_live_session_through_a_slot_that_stalled_asks_for_the_slot_again():
    """A relay that restarted holds no slot, and a live session through it only stalls: the
    first stall punch (a probe went unanswered) asks for the slot again, which makes the relay
    hold it again; again only after retry_s while the session stays silent, and at once the
    next time once it carried traffic in between."""
    offers = {PEER: RelayEvent(3, PEER, 31001, None)}
    registry = FakeRegistry(RelayEvent(3, PEER, 31001, None))
    relays = Relays(registry, offers, lambda: None)  # type: ignore[arg-type]
    relays.registry = REGISTRY
    slot = Endpoint.parse("192.0.2.2:31001")
    stalled = Memory(attempts=1)

    def plan(mem: Memory, now: float, *, stalled: bool = True) -> None:
        relays.plan(PEER, DIRECT, mem, live=True, current=slot, now=now, stalled=stalled)

    plan(Memory(), 1.0, stalled=False)
    plan(Memory(), 3.0)  # stalled, the probe not yet unanswered: no stall punch yet
    await settle(relays)
    assert registry.asked == []
    plan(stalled, 4.0)
    await settle(relays)
    assert registry.asked == [PEER]
    plan(replace(stalled, attempts=3), 4.0 + T.retry_s - 0.1)
    await settle(relays)
    assert registry.asked == [PEER]  # still silent: not again within retry_s
    plan(replace(stalled, attempts=4), 4.0 + T.retry_s)
    await settle(relays)
    assert registry.asked == [PEER, PEER]
    plan(Memory(), 20.0, stalled=False)  # traffic again
    plan(stalled, 21.0)
    await settle(relays)
    assert registry.asked == [PEER, PEER, PEER]
    assert relays.leases[PEER].endpoint == slot  # the same slot, held again
