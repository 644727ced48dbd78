"""follow.py's watch stream ends at once when the tunnel to the registry answers again after
it was dead (RegistryView.relink), so that a new stream replaces one that TCP's
retransmission back-off would hold up; the view notes the pairs whose initiator a NAT
report changed, and keeps the relay slots a restarted registry still holds."""

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import pytest

from wgpunch.errors import ApiError
from wgpunch.keys import Key
from wgpunch.node.follow import until_set
from wgpunch.node.view import RegistryView
from wgpunch.protocol import (
    Event,
    Heartbeat,
    NatBehaviour,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    Reported,
    Snapshot,
)
from wgpunch.wg.model import Endpoint


async def one_then_silence(closed: list[bool]) -> AsyncIterator[Event]:
    try:
        yield Heartbeat(7)
        await asyncio.Event().wait()  # a stream that went quiet
    finally:
        closed.append(True)


async def test_a_quiet_stream_gives_way_when_relink_is_set():
    closed: list[bool] = []
    relink = asyncio.Event()
    stream = until_set(one_then_silence(closed), relink)
    assert await anext(stream) == Heartbeat(7)
    later = asyncio.get_running_loop().call_later(0.05, relink.set)
    try:
        with pytest.raises(ApiError, match="works again"):
            async with asyncio.timeout(5):
                await anext(stream)
    finally:
        later.cancel()
    assert closed == [True]  # the underlying stream (and its connection) is closed


async def test_events_pass_and_the_end_is_the_end():
    async def two() -> AsyncIterator[Event]:
        yield Heartbeat(1)
        yield Heartbeat(2)

    assert [e async for e in until_set(two(), asyncio.Event())] == [Heartbeat(1), Heartbeat(2)]


# -- a NAT report that changes who initiates (protocol.initiator_changed) ----------------

ME, LOW_PEER, HIGH_PEER = (Key(bytes([n]) * 32) for n in (2, 1, 3))
SYMMETRIC = NatBehaviour("address-and-port-dependent", "address-and-port-dependent", False)
EIM = NatBehaviour("endpoint-independent", "address-and-port-dependent", True)


def record(key: Key, nat: NatBehaviour | None, revision: int = 1) -> PeerRecord:
    return PeerRecord(key, (), Endpoint.parse("203.0.113.9:51820"), None,
                      Reported(51820, (), "0.1.0", nat=nat), revision)


def punched_view() -> RegistryView:
    """Us between two peers, no NAT reported yet; a punch event with each gave our role."""
    view = RegistryView()
    view.me = ME
    view.apply(Snapshot("e", 1, (record(ME, None), record(LOW_PEER, None),
                                 record(HIGH_PEER, None))))
    for peer in (LOW_PEER, HIGH_PEER):
        view.apply(PunchEvent(1, peer, Endpoint.parse("203.0.113.9:51820"), peer == HIGH_PEER))
    return view


def test_a_peers_report_that_flips_the_initiator_voids_the_role_and_re_punches():
    view = punched_view()
    assert view.initiates(ME, view.peers[HIGH_PEER])  # key order: the lower key, ours
    view.apply(PeerEvent(2, record(HIGH_PEER, EIM, 2)))  # ours still
    assert not view.take_flipped(HIGH_PEER) and view.roles[HIGH_PEER] is True
    view.apply(PeerEvent(3, record(ME, None, 3)))  # a report without a NAT changes nothing
    assert not view.take_flipped(LOW_PEER) and not view.take_flipped(HIGH_PEER)
    view.apply(PeerEvent(4, record(HIGH_PEER, SYMMETRIC, 4)))  # it maps per destination
    assert view.take_flipped(HIGH_PEER) and HIGH_PEER not in view.roles
    assert not view.take_flipped(HIGH_PEER)  # taken once
    assert not view.initiates(ME, view.peers[HIGH_PEER])
    assert view.roles[LOW_PEER] is False  # the other pair keeps its role


def test_our_own_report_flips_every_pair_it_changes():
    view = punched_view()
    view.apply(PeerEvent(2, record(ME, SYMMETRIC, 2)))  # we initiate toward everyone now
    assert view.take_flipped(LOW_PEER) and LOW_PEER not in view.roles
    assert not view.take_flipped(HIGH_PEER) and view.roles[HIGH_PEER] is True
    assert view.initiates(ME, view.peers[LOW_PEER])


async def test_a_heartbeat_wakes_the_agent_only_through_the_registrys_health():
    view = RegistryView()
    view.apply(Snapshot("e1", 1, ()))
    assert view.wake.is_set(), "a change: the agent reconciles"
    view.wake.clear()
    view.apply(Heartbeat(1))
    assert not view.wake.is_set(), "nothing changed: no pass (each reads the device)"
    view.set_health("registry", "following", 100.0)
    assert view.wake.is_set(), "the first event of a stream: following, to publish"
    view.wake.clear()
    view.set_health("registry", "following", 101.0)
    assert not view.wake.is_set(), "still following, since as it was: nothing to publish"
    view.set_health("registry", "unreachable", 102.0, "refused")
    assert view.wake.is_set()


@pytest.mark.parametrize(("intent", "end"), [
    ("the heartbeat the registry sends after the list", Heartbeat(1)),
    ("a registry older than that heartbeat: the first line after the list", PunchEvent(
        2, HIGH_PEER, Endpoint.parse("203.0.113.9:51820"), True)),
])
def test_a_restarted_registry_keeps_the_slots_it_lists_and_the_rest_go_when_the_list_ends(
        intent, end):
    """After a restart (a new epoch) the registry lists the slots it still holds (a relay on
    another host keeps them through it): until the list ends, every slot stays as it was, so
    that no pass meanwhile takes a kept slot for gone and asks anew, for nothing; when it
    ends, those it left out are gone."""
    remote = ipaddress.ip_address("198.51.100.10")
    kept, gone = RelayEvent(1, LOW_PEER, 32000, remote), RelayEvent(1, HIGH_PEER, 31000, None)
    view = RegistryView()
    for event in (Snapshot("e1", 1, ()), kept, gone):
        view.apply(event)
    view.apply(Snapshot("e2", 1, ()))
    assert view.relays == {LOW_PEER: kept, HIGH_PEER: gone}, intent
    listed = RelayEvent(1, LOW_PEER, 32000, remote)
    view.apply(listed)
    assert view.relays == {LOW_PEER: listed, HIGH_PEER: gone}, intent
    view.wake.clear()
    view.apply(end)
    assert view.relays == {LOW_PEER: listed}, intent
    assert view.wake.is_set(), "the agent asks for the gone slot's pair at once"
    new = RelayEvent(2, HIGH_PEER, 31001, None)
    for event in (new, Heartbeat(2)):  # a slot given after the list is not taken back
        view.apply(event)
    assert view.relays == {LOW_PEER: listed, HIGH_PEER: new}, intent


def test_a_stream_resumed_in_the_same_epoch_keeps_every_slot():
    slot = RelayEvent(1, LOW_PEER, 31000, None)
    view = RegistryView()
    for event in (Snapshot("e1", 1, ()), slot, Snapshot("e1", 1, ()), Heartbeat(1)):
        view.apply(event)
    assert view.relays == {LOW_PEER: slot}
