"""Several registries on one interface (node/registries.py): the merge rule as a table; the
merged stream driven through the members' own views; and the real agent with two real
registries (`wgpunch.registry`'s state and API on loopback) and a real wireguard-go pair:
it learns a peer only one registry lists, reports to both, and when one registry stops, the
pair it shares with the other keeps its record and punches through that one."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from agentrig import FAST, FAST_REGISTRY, FakeIo, Running
from polling import poll
from wgpair import PORT, Side, unique_prefix, wg_pair
from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError
from wgpunch.keys import Key, generate_keypair
from wgpunch.node import cli as node_cli
from wgpunch.node import pathfile
from wgpunch.node import serve as node_serve
from wgpunch.node.agent import Agent
from wgpunch.node.client import RegistryClient
from wgpunch.node.edges import SystemClock
from wgpunch.node.merge import Heard, newest, same
from wgpunch.node.registries import Registries
from wgpunch.node.registrylink import LinkTimings
from wgpunch.node.view import RegistryView
from wgpunch.protocol import (
    API_PORT,
    Event,
    Heartbeat,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    RemovedEvent,
    Reported,
    Snapshot,
)
from wgpunch.registry.api import create_app
from wgpunch.registry.site import ApiSite
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings as RegistryTimings
from wgpunch.wg import open_device
from wgpunch.wg.model import Endpoint, PeerState

K = [Key(bytes([n]) * 32) for n in range(8)]
E1, E2 = Endpoint.parse("198.51.100.1:1000"), Endpoint.parse("198.51.100.2:2000")
REPORT = Reported(51820, (ipaddress.ip_address("10.0.0.9"),), "test")


def rec(endpoint: Endpoint | None, *, handshake: float | None = None,
        reported: Reported | None = None, revision: int = 1) -> PeerRecord:
    return PeerRecord(K[1], (), endpoint, handshake, reported, revision)


# -- 1. the rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(("intent", "heard", "want"), [
    ("nobody lists the peer", [], None),
    ("one registry: its record", [Heard(rec(E1), True, 1.0)], rec(E1)),
    ("the observation heard last wins",
     [Heard(rec(E1), True, 1.0), Heard(rec(E2), True, 2.0)], rec(E2)),
    ("whatever order the registries are in",
     [Heard(rec(E2), True, 2.0), Heard(rec(E1), True, 1.0)], rec(E2)),
    ("a registry whose stream is down loses to one that is up, though heard later",
     [Heard(rec(E1), True, 1.0), Heard(rec(E2), False, 9.0)], rec(E1)),
    ("a registry that went away still counts while no live one lists the peer",
     [Heard(rec(E2), False, 9.0)], rec(E2)),
    ("a registry that has not observed the peer (restarted on a device that has not heard "
     "from it yet) says nothing of where it is, though heard last",
     [Heard(rec(E1), True, 1.0), Heard(rec(None), True, 2.0)], rec(E1)),
    ("an endpoint a registry that went away observed beats none from a live one",
     [Heard(rec(E1), False, 1.0), Heard(rec(None), True, 2.0)], rec(E1)),
    ("nobody observed the peer: the live registry's record",
     [Heard(rec(None, reported=REPORT), False, 3.0), Heard(rec(None), True, 1.0)],
     rec(None, reported=REPORT)),
    ("heard at once (--once): the later handshake its registry saw",
     [Heard(rec(E1, handshake=200.0), True, 1.0), Heard(rec(E2, handshake=100.0), True, 1.0)],
     rec(E1, handshake=200.0)),
    ("a handshake beats none",
     [Heard(rec(E1), True, 1.0), Heard(rec(E2, handshake=1.0), True, 1.0)],
     rec(E2, handshake=1.0)),
    ("the winner without the peer's report borrows one: the peer follows some registry",
     [Heard(rec(E1, reported=REPORT), True, 1.0), Heard(rec(E2), True, 2.0)],
     rec(E2, reported=REPORT)),
    ("a report is borrowed from a live registry before one that went away",
     [Heard(rec(E1, reported=REPORT), False, 3.0),
      Heard(rec(E1, reported=Reported(1, (), "live")), True, 1.0), Heard(rec(E2), True, 2.0)],
     rec(E2, reported=Reported(1, (), "live"))),
])
def test_newest(intent, heard, want):
    assert newest(heard) == want, intent


def test_records_are_the_same_whatever_revision_each_registry_gave_them():
    assert same(rec(E1, revision=3), rec(E1, revision=70))
    assert not same(rec(E1), rec(E2))
    assert same(None, None) and not same(rec(E1), None)


# -- 2. the merged stream, driven through the members' views ------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def wall(self) -> float:
        return 1_800_000_000.0 + self.now

    def monotonic(self) -> float:
        return self.now


async def following(stream: AsyncIterator[Event]) -> Event:
    """The merged stream's next item; one due comes at once (all of it is in this loop)."""
    async with asyncio.timeout(2.0):
        return await anext(stream)


async def test_the_merged_stream_follows_the_newest_record_and_a_registry_going_away():
    clock = Clock()
    regs = Registries(None, [(K[6], None), (K[7], None)], clock)  # type: ignore[arg-type]
    a, b = regs.members
    me, peer, only_b = K[0], K[1], K[2]
    for member in (a, b):
        member.view.set_health("x", "following", clock.wall())
    a.view.apply(Snapshot("ea", 5, (PeerRecord(me, (), E1, None, None, 1),
                                    PeerRecord(peer, (), E1, None, REPORT, 2))))
    stream = regs.watch(None, None)
    first = await following(stream)
    assert isinstance(first, Snapshot) and {r.public_key for r in first.peers} == {me, peer}

    clock.now += 1
    b.view.apply(Snapshot("eb", 9, (PeerRecord(me, (), E1, None, None, 4),
                                    PeerRecord(peer, (), E2, None, None, 7),
                                    PeerRecord(only_b, (), E2, None, None, 8))))
    got = [await following(stream) for _ in range(2)]
    # b told us last: its endpoint, with the report only a carried; and b's own peer.
    assert [(e.peer.public_key, e.peer.endpoint, e.peer.reported) for e in got
            if isinstance(e, PeerEvent)] == [(peer, E2, REPORT), (only_b, E2, None)]
    assert regs.current[me].endpoint == E1  # the same from both: no event

    clock.now += 1
    b.view.set_health("x", "unreachable", clock.wall(), "gone")  # b's records rank below a's
    event = await following(stream)
    assert isinstance(event, PeerEvent) and event.peer.endpoint == E1
    assert regs.current[only_b].endpoint == E2  # only b lists it: kept

    clock.now += 1
    a.view.apply(RemovedEvent(6, peer))
    event = await following(stream)
    assert isinstance(event, PeerEvent) and event.peer.endpoint == E2  # b's, down or not
    a.view.apply(PunchEvent(6, only_b, E1, True))  # a never listed it: forwarded all the same
    assert await following(stream) == PunchEvent(6, only_b, E1, True)
    assert regs.punched_by[only_b] is a
    await stream.aclose()


async def test_a_registry_back_without_endpoints_does_not_hide_the_others():
    """A registry restarted on a device that has not heard from the peers yet (a rebooted
    host) lists them without endpoints: the merged records keep the other registry's, and
    take its own again once it observes them."""
    clock = Clock()
    regs = Registries(None, [(K[6], None), (K[7], None)], clock)  # type: ignore[arg-type]
    a, b = regs.members
    peer = K[1]
    for member in (a, b):
        member.view.set_health("x", "following", clock.wall())
    a.view.apply(Snapshot("ea", 5, (PeerRecord(peer, (), E1, None, REPORT, 2),)))
    b.view.apply(Snapshot("eb", 5, (PeerRecord(peer, (), E1, None, REPORT, 2),)))
    stream = regs.watch(None, None)
    assert isinstance(await following(stream), Snapshot)

    clock.now += 1
    b.view.apply(Snapshot("eb2", 1, (PeerRecord(peer, (), None, None, None, 1),)))
    assert regs.current[peer].endpoint == E1
    clock.now += 1
    b.view.apply(PeerEvent(2, PeerRecord(peer, (), E2, None, None, 2)))  # it observes it
    event = await following(stream)
    assert isinstance(event, PeerEvent) and event.peer.endpoint == E2, event
    assert event.peer.reported == REPORT  # borrowed from a until b has the report again
    await stream.aclose()


RELAY_HOST = ipaddress.ip_address("198.51.100.10")


class SlotGiver:
    """A member's client that gives a slot on a relay host of its own to whoever asks."""

    async def relay(self, peer: Key) -> RelayEvent:
        return RelayEvent(1, peer, 32000, RELAY_HOST)


async def test_a_restarted_registry_keeps_the_slots_it_lists_and_drops_the_rest():
    """Our own slot (the answer to our request) and one a peer asked for, both from registry
    a: after a's restart, until its stream ends the list of the slots it still holds, the
    agent's view keeps both (a kept slot seen gone would be asked for anew, for nothing);
    then the one it left out goes."""
    clock = Clock()
    regs = Registries(None, [(K[6], SlotGiver()), (K[7], None)], clock)  # type: ignore[arg-type]
    a = regs.members[0]
    me, asked, told = K[0], K[1], K[2]
    agents = RegistryView()
    agents.me = me
    regs._view = agents  # as run() sets it
    listed = tuple(PeerRecord(k, (), E1, None, REPORT, 1) for k in (me, asked, told))
    a.view.set_health("x", "following", clock.wall())
    a.view.apply(Snapshot("ea", 5, listed))
    agents.relays[asked] = await regs.relay(asked)
    theirs = RelayEvent(1, told, 32002, RELAY_HOST)
    a.view.apply(theirs)
    await poll(lambda: told in regs.relayed_by, what="the peer's slot to be offered")
    agents.relays[told] = theirs
    a.view.apply(Snapshot("ea2", 1, listed))
    assert set(regs.relayed_by) == set(agents.relays) == {asked, told}
    a.view.apply(RelayEvent(1, told, 32002, RELAY_HOST))
    assert set(regs.relayed_by) == set(agents.relays) == {asked, told}
    a.view.apply(Heartbeat(1))
    assert set(regs.relayed_by) == set(agents.relays) == {told}


# -- 3. the real agent, two real registries ------------------------------------------------------

REG_A, REG_B = Endpoint.parse("192.0.2.253:51820"), Endpoint.parse("192.0.2.254:51820")
STRANGER_IP = "10.77.0.3"


@dataclass
class Registry:
    key: Key
    state: RegistryState
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


@asynccontextmanager
async def serving(key: Key, records: list[PeerState], host: str = "127.0.0.1", port: int = 0
                  ) -> AsyncIterator[Registry]:
    """A registry's state and API as `wgpunch registry` serves them, on loopback; the records
    are what its device would show (127.0.0.1 is the node's tunnel address to it)."""
    state = RegistryState(punch_window_s=0.01)
    state.observe(records)
    timings = RegistryTimings(heartbeat_s=0.5, punch_coalesce_s=0.01)
    runner = web.AppRunner(create_app(state, timings=timings), handler_cancellation=True,
                           shutdown_timeout=0.5)
    await runner.setup()
    site = ApiSite(runner, host, port)
    await site.start()
    registry = Registry(key, state, runner, f"http://{host}:{site.port}")
    try:
        yield registry
    finally:
        await runner.cleanup()


def seen(key: Key, endpoint: str, allowed: str) -> PeerState:
    return PeerState(key, Endpoint.parse(endpoint), (ipaddress.ip_network(allowed),),
                     1_700_000_000.0, 0, 0, 25, False)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Side, Side, Key, Key, Key]]:
    """a (the agent's device) and b as tests/wgpair.py builds them; a also has two registry
    peers (endpoints nobody answers at) and a stranger only registry B lists."""
    with wg_pair(tmp_path, unique_prefix("mr")) as (a, b):
        reg_a, reg_b, stranger = (generate_keypair()[1] for _ in range(3))
        a.wg_set("peer", reg_a.base64(), "allowed-ips", "10.77.0.253/32", "endpoint", str(REG_A))
        a.wg_set("peer", reg_b.base64(), "allowed-ips", "10.77.0.254/32", "endpoint", str(REG_B))
        a.wg_set("peer", stranger.base64(), "allowed-ips", f"{STRANGER_IP}/32")
        yield a, b, reg_a, reg_b, stranger


def public(ip: str) -> Reported:
    """A report whose address is the node's endpoint: a node without NAT, so the other side
    (a, behind its NAT as its report says) initiates (protocol/roles.py)."""
    return Reported(PORT, (ipaddress.ip_address(ip),), "test")


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
async def test_two_registries_one_interface(nodes, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="wgpunch")
    a, b, reg_a_key, reg_b_key, stranger = nodes
    me = seen(a.public, f"{a.veth_ip}:{PORT}", "127.0.0.1/32")
    peer_b = seen(b.public, f"{b.veth_ip}:{PORT}", f"{b.tunnel_ip}/32")
    async with serving(reg_a_key, [me, peer_b]) as reg_a, \
            serving(reg_b_key, [me, peer_b, seen(stranger, f"192.0.2.3:{PORT}",
                                                 f"{STRANGER_IP}/32"),
                                # A is B's peer too, elsewhere: never a peer to steer.
                                seen(reg_a_key, f"192.0.2.99:{PORT}", "10.77.0.253/32")
                                ]) as reg_b:
        for registry in (reg_a, reg_b):
            registry.state.report(b.public, public(b.veth_ip))
        reg_b.state.report(stranger, public("192.0.2.3"))
        io = FakeIo()
        device = open_device(a.ifname)
        regs = Registries(device, [(reg_a.key, RegistryClient(reg_a.url)),
                                   (reg_b.key, RegistryClient(reg_b.url))], SystemClock())
        agent = Agent(device, None, regs, timings=FAST, registry_timings=FAST_REGISTRY,
                      state_dir=tmp_path, io=io, registry_link=LinkTimings())
        try:
            async with Running(agent) as run:
                # The stranger only B lists is learned; both registries get our report.
                await poll(lambda: stranger in agent.view.peers, what="the stranger via B",
                           alive=run.alive)
                await poll(lambda: all(r.state.peers[a.public].reported is not None
                                       for r in (reg_a, reg_b)), what="a report to each",
                           alive=run.alive)
                # b goes direct, by a punch one registry coordinated.
                await poll(lambda: handshake_with(a, b.public), what="a's session with b",
                           alive=run.alive)
                # Each registry peer's link is kept (nobody answers there: each is judged
                # dead and gets handshake-now); neither is steered as a peer.
                await poll(lambda: len([r for r in caplog.records if getattr(
                    r, "event", None) == "registry_link_dead"]) >= 2,
                    what="both registry links at work", alive=run.alive)
                assert not {o[1] for o in io.opened} & {REG_A, REG_B}
                assert reg_a.key in agent.view.peers
                assert {reg_a.key, reg_b.key}.isdisjoint(agent.tracks)
                assert (await a.device.state()).peer(reg_a.key).endpoint == REG_A
                await poll(lambda: len(published_registries(tmp_path, a)) == 2,
                           what="both registries in the path file", alive=run.alive)

                await reg_a.stop()
                await poll(lambda: not regs.members[0].following, what="A seen gone",
                           alive=run.alive)
                assert agent.view.health is not None and agent.view.health.state == "following"
                await poll(lambda: {r.public_key: r.state for r in published_registries(
                    tmp_path, a)}.get(reg_a.key.base64()) == "unreachable",
                    what="status to show A unreachable", alive=run.alive)
                assert agent.view.peers[b.public].endpoint == Endpoint.parse(
                    f"{b.veth_ip}:{PORT}")
                assert stranger in agent.view.peers
                caplog.clear()
                # A new punch for b (its session dropped): through B, A being away.
                a.wg_set("peer", b.public.base64(), "remove")
                a.wg_set("peer", b.public.base64(), "allowed-ips", f"{b.tunnel_ip}/32")
                await poll(lambda: handshake_with(a, b.public), what="a new session with b",
                           alive=run.alive)
                assert any(r.name == "wgpunch.registry.state"
                           and r.getMessage().startswith("punch requested") for r in caplog.records)
                assert regs.punched_by[b.public] is regs.members[1]
                states = {r.public_key: r.state for r in published_registries(tmp_path, a)}
                assert states[reg_b.key.base64()] == "following"
        finally:
            await regs.close()
            await device.close()


async def handshake_with(side: Side, key: Key) -> bool:
    peer = (await side.device.state()).peer(key)
    return peer is not None and peer.latest_handshake is not None


def published_registries(directory: Path, side: Side) -> tuple[pathfile.RegistryHealth, ...]:
    published = pathfile.read_published(side.ifname, directory)
    return () if published is None else published.registries


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
async def test_one_api_url_for_an_interface_with_several_registries_is_refused(nodes, tmp_path):
    a, _, reg_a_key, reg_b_key, _ = nodes
    settings = node_cli.settings_from(build_parser().parse_args(
        ["node", "-i", a.ifname, "--registry", reg_a_key.base64(), "--registry",
         reg_b_key.base64(), "--api", "http://127.0.0.1:9"]), environ={})
    with pytest.raises(ConfigError, match=rf"^node: {a.ifname} has several registries as "
                       "peers; --api names one API"):
        await node_serve.serve(settings, once=True, state_dir=tmp_path)


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
async def test_node_once_with_two_registries_as_the_cli_runs_it(nodes, tmp_path):
    """`wgpunch node --once` on an interface with both registries as peers: each one's API at
    its tunnel address (here loopback addresses, so that this process reaches them), their
    lists merged: b from both, the stranger from B alone; neither registry is steered."""
    a, b, reg_a_key, reg_b_key, stranger = nodes
    a.wg_set("peer", reg_a_key.base64(), "allowed-ips", "127.0.0.2/32")
    a.wg_set("peer", reg_b_key.base64(), "allowed-ips", "127.0.0.3/32")
    me = seen(a.public, f"{a.veth_ip}:{PORT}", "127.0.0.1/32")
    peer_b = seen(b.public, f"{b.veth_ip}:{PORT}", f"{b.tunnel_ip}/32")
    async with serving(reg_a_key, [me, peer_b], "127.0.0.2", API_PORT), \
            serving(reg_b_key, [me, peer_b, seen(stranger, f"192.0.2.3:{PORT}",
                                                 f"{STRANGER_IP}/32"),
                                seen(reg_a_key, f"192.0.2.99:{PORT}", "127.0.0.2/32")],
                    "127.0.0.3", API_PORT):
        settings = node_cli.settings_from(build_parser().parse_args(
            ["node", "-i", a.ifname, "--registry", reg_a_key.base64(), "--registry",
             reg_b_key.base64(), "--no-portmap", "--natprobe-port", "0"]), environ={})
        assert await node_serve.serve(settings, once=True, state_dir=tmp_path) == 0
    state = await a.device.state()
    assert [state.peer(k).endpoint for k in (b.public, stranger, reg_a_key, reg_b_key)] == [
        Endpoint.parse(f"{b.veth_ip}:{PORT}"), Endpoint.parse(f"192.0.2.3:{PORT}"), REG_A,
        REG_B]
