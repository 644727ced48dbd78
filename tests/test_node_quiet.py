"""node/quiet.py: a reconcile pass leaves out the peers it would leave as they are, and only
those. The agent runs in process on a device held in memory (it records writes) with a clock
the test moves; a second agent that never leaves a peer out goes through the same script, and
after every pass both must have decided and done the same."""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from agentrig import FakeIo, FakeRegistry
from wgpunch.keys import Key, generate_keypair
from wgpunch.node.agent import Agent
from wgpunch.node.decide import Memory
from wgpunch.node.natidle import Idle
from wgpunch.node.quiet import Quiet, Settled, horizon
from wgpunch.node.timings import Timings
from wgpunch.node.track import Track
from wgpunch.protocol import Event, PeerEvent, PeerRecord, PunchEvent, Reported, Snapshot
from wgpunch.wg.device import Device
from wgpunch.wg.model import DeviceState, Endpoint, PeerConfig, PeerState

T = Timings()
WALL = 1_800_000_000.0  # the wall clock at monotonic 0
PORT = 51820


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def wall(self) -> float:
        return WALL + self.now

    def monotonic(self) -> float:
        return self.now


class MemDevice(Device):
    """A device held in memory: writes are recorded, not applied (the script says what the
    device shows)."""

    backend = "memory"

    def __init__(self, state: DeviceState) -> None:
        super().__init__(state.name)
        self.shown = state
        self.writes: list[list[PeerConfig]] = []

    async def state(self, *, fresh_s: float = 0.0) -> DeviceState:
        # What the script shows, always: the passes are seconds apart on the test's clock
        # but microseconds on the real one, which a shared read goes by (node/pace.py).
        return await super().state()

    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        return self.shown, {}

    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        self.writes.append(list(changes))


class Never(Quiet):
    """The agent as it was: every peer gets a full pass."""

    def due(self, peers: Iterable[PeerState], tracks: dict[Key, Track], skip: Collection[Key],
            now: float, now_wall: float
            ) -> Iterator[tuple[PeerState, PeerRecord, Track, tuple[object, ...] | None]]:
        for peer in peers:
            known = self.view.peers.get(peer.public_key)
            if peer.public_key not in skip and known is not None:
                track = tracks.setdefault(peer.public_key, Track())
                yield peer, known, track, self.inputs(peer, known, track)


class Counted(Quiet):
    """Counts the peers passes leave out."""

    left_out = 0

    def due(self, peers: Iterable[PeerState], tracks: dict[Key, Track], skip: Collection[Key],
            now: float, now_wall: float
            ) -> Iterator[tuple[PeerState, PeerRecord, Track, tuple[object, ...] | None]]:
        known = [p for p in peers if p.public_key not in skip
                 and self.view.peers.get(p.public_key) is not None]
        went = 0
        for item in super().due(peers, tracks, skip, now, now_wall):
            went += 1
            yield item
        self.left_out += len(known) - went


def peer(key: Key, i: int, *, endpoint: bool, handshake: float | None,
         rx: int = 0, tx: int = 0) -> PeerState:
    return PeerState(key, Endpoint.parse(f"203.0.113.{i}:{PORT}") if endpoint else None,
                     (ipaddress.ip_network(f"10.9.0.{i}/32"),),
                     None if handshake is None else WALL + handshake, rx, tx, 25, False)


def record(key: Key, i: int, *, endpoint: bool = True, port: int = PORT) -> PeerRecord:
    return PeerRecord(key, (), Endpoint.parse(f"203.0.113.{i}:{port}") if endpoint else None,
                      None, Reported(PORT, (), "test"), 0)


class Script:
    """Two agents, one of which never leaves a peer out, fed the same device states,
    registry events and times."""

    def __init__(self, tmp: Path, peers: list[PeerState], records: list[PeerRecord]) -> None:
        self.me, self.registry = generate_keypair()[1], generate_keypair()[1]
        self.clock = Clock()
        self.agents: list[Agent] = []
        self.ios: list[FakeIo] = []
        for quiet in (Counted, Never):
            io = FakeIo()
            agent = Agent(MemDevice(self.state(peers)), self.registry, FakeRegistry(),
                          io=io, clock=self.clock, state_dir=tmp / quiet.__name__)
            agent.quiet = quiet(agent.view, agent.relays, agent.upgrades, agent.idle, agent.t,
                                lambda agent=agent: agent.actor.can_open)
            agent.me = agent.view.me = self.me
            agent.view.has_reported = True
            agent.view.apply(Snapshot("e1", 1, (record(self.me, 250), *records)))
            self.agents.append(agent)
            self.ios.append(io)

    @property
    def quiet(self) -> Counted:
        quiet = self.agents[0].quiet
        assert isinstance(quiet, Counted)
        return quiet

    def state(self, peers: list[PeerState]) -> DeviceState:
        return DeviceState("wgq", self.me, PORT, 0, tuple(peers))

    def show(self, peers: list[PeerState]) -> None:
        for agent in self.agents:
            assert isinstance(agent.device, MemDevice)
            agent.device.shown = self.state(peers)

    def event(self, event: Event) -> None:
        for agent in self.agents:
            agent.view.apply(event)

    async def passes(self, seconds: float, step: float = 1.0) -> None:
        """A pass every `step` for `seconds`; after each, both agents agree."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            for agent in self.agents:
                await agent.reconcile()
            self.agree()
            self.clock.now += step

    def agree(self) -> None:
        quiet, full = self.agents
        assert {k: (t.memory, t.path, t.reason) for k, t in quiet.tracks.items()} == {
            k: (t.memory, t.path, t.reason) for k, t in full.tracks.items()}
        assert self.ios[0] == self.ios[1]
        assert isinstance(quiet.device, MemDevice) and isinstance(full.device, MemDevice)
        assert quiet.device.writes == full.device.writes

    def track(self, key: Key) -> Track:
        return self.agents[0].tracks[key]


@pytest.fixture
def keys() -> list[Key]:
    return [generate_keypair()[1] for _ in range(3)]


async def test_idle_peers_are_left_out_until_their_device_state_moves(
        tmp_path: Path, keys: list[Key]) -> None:
    live = peer(keys[0], 1, endpoint=True, handshake=90.0, rx=100, tx=100)
    nowhere = peer(keys[1], 2, endpoint=False, handshake=None)
    script = Script(tmp_path, [live, nowhere],
                    [record(keys[0], 1), record(keys[1], 2, endpoint=False)])
    await script.passes(5)
    # The first pass observes, the second finds nothing changed: from the third, both out.
    assert script.quiet.left_out == 2 * 3
    assert script.track(keys[0]).reason == "live session on the endpoint the registry reports"
    left_out = script.quiet.left_out
    script.show([replace(live, rx_bytes=200), nowhere])  # a keepalive came in
    await script.passes(1)
    assert script.quiet.left_out == left_out + 1  # only the one that did not move
    assert script.track(keys[0]).memory.rx_changed_at == script.clock.now - 1


async def test_an_event_for_a_settled_peer_gets_it_a_full_pass(
        tmp_path: Path, keys: list[Key]) -> None:
    nowhere = peer(keys[1], 2, endpoint=False, handshake=None)
    script = Script(tmp_path, [nowhere], [record(keys[1], 2, endpoint=False)])
    await script.passes(3)
    assert script.track(keys[1]).settled is not None
    script.event(PeerEvent(2, record(keys[1], 2)))  # the registry learnt its endpoint
    script.event(PunchEvent(2, keys[1], Endpoint.parse(f"203.0.113.2:{PORT}"), True))
    await script.passes(3, step=0.05)
    assert script.track(keys[1]).memory.attempts >= 1  # it is being punched, in both
    assert script.track(keys[1]).settled is None


@pytest.mark.parametrize(("rx", "tx", "after_s", "intent"), [
    (100, 100, 35.0, "silence: no byte from the peer for silence_dead_s kills the path"),
    (100, 100, 180.0, "the session's keys expire session_live_s after its handshake"),
])
async def test_time_alone_ends_a_settled_live_session_on_time(
        tmp_path: Path, keys: list[Key], rx: int, tx: int, after_s: float, intent: str
) -> None:
    live = peer(keys[0], 1, endpoint=True, handshake=99.0, rx=rx, tx=tx)
    script = Script(tmp_path, [live], [record(keys[0], 1)])
    await script.passes(after_s + 5)  # the two agents agree after every pass
    assert script.quiet.left_out > 0
    assert script.track(keys[0]).path.value == "none", intent


async def test_a_stall_is_noticed_on_time(tmp_path: Path, keys: list[Key]) -> None:
    live = peer(keys[0], 1, endpoint=True, handshake=99.0, rx=100, tx=100)
    script = Script(tmp_path, [live], [record(keys[0], 1)])
    await script.passes(3)
    script.show([replace(live, tx_bytes=300)])  # we sent; nothing came back since
    await script.passes(4, step=0.25)
    assert script.ios[0].probes, "a probe after stall_s of sending without an answer"


async def test_a_keepalive_the_device_did_not_take_is_set_again_each_pass(
        tmp_path: Path, keys: list[Key]) -> None:
    live = peer(keys[0], 1, endpoint=True, handshake=99.0, rx=100, tx=100)
    script = Script(tmp_path, [live], [record(keys[0], 1)])
    for agent in script.agents:
        agent.idle.found = Idle(kept_s=15, lost_s=20)  # our NAT forgets within 20 s
    await script.passes(4)  # the device shows 25 s after each write: written each pass
    quiet = script.agents[0].device
    assert isinstance(quiet, MemDevice) and len(quiet.writes) == 4
    assert script.quiet.left_out == 0


async def test_a_random_script_of_traffic_handshakes_events_and_time(
        tmp_path: Path) -> None:
    """Whatever happens, in whatever order, the agent that leaves settled peers out decides
    and does what the one that never does decides and does (Script.agree, each pass)."""
    rnd = random.Random(18)
    keys = [generate_keypair()[1] for _ in range(4)]
    shown = [peer(keys[0], 1, endpoint=True, handshake=95.0, rx=100, tx=100),
             peer(keys[1], 2, endpoint=True, handshake=None),
             peer(keys[2], 3, endpoint=False, handshake=None),
             peer(keys[3], 4, endpoint=True, handshake=50.0, rx=10, tx=10)]
    script = Script(tmp_path, shown, [record(keys[0], 1), record(keys[1], 2),
                                      record(keys[2], 3, endpoint=False), record(keys[3], 4)])
    revision = 1
    for _ in range(400):
        i = rnd.randrange(len(keys))
        what = rnd.choice(["time", "time", "time", "rx", "tx", "handshake", "moved", "punch"])
        if what == "time":
            script.clock.now += rnd.choice([0.05, 0.3, 1.0, 1.0, 2.5, 10.0, 40.0])
        elif what in ("rx", "tx"):
            grown = {f"{what}_bytes": getattr(shown[i], f"{what}_bytes") + rnd.randrange(1, 500)}
            shown[i] = replace(shown[i], **grown)  # type: ignore[arg-type]
        elif what == "handshake":
            shown[i] = replace(shown[i], latest_handshake=WALL + script.clock.now)
        elif what == "moved":
            revision += 1
            script.event(PeerEvent(revision, record(keys[i], i + 1,
                                                    port=rnd.choice([PORT, 4444, 5555]))))
        elif script.agents[0].view.peers[keys[i]].endpoint is not None:
            script.event(PunchEvent(revision, keys[i],
                                    script.agents[0].view.peers[keys[i]].endpoint,
                                    rnd.random() < 0.5))
        script.show(shown)
        await script.passes(rnd.choice([0.05, 1.0]), step=0.05)
    assert script.quiet.left_out > 100  # and yet no pass decided otherwise


def test_horizon() -> None:
    key = generate_keypair()[1]
    now = 100.0
    quiet = Memory(rx_changed_at=90.0, tx_changed_at=80.0)
    stalling = Memory(rx_changed_at=90.0, tx_changed_at=95.0)
    live = peer(key, 1, endpoint=True, handshake=now - 10)
    assert horizon(live, quiet, WALL + now, T) == (90.0 + T.silence_dead_s,
                                                    WALL + now - 10 + T.session_live_s)
    assert horizon(live, stalling, WALL + now, T)[0] == 90.0 + T.stall_s
    dead = peer(key, 1, endpoint=True, handshake=now - T.session_live_s - 1)
    assert horizon(dead, stalling, WALL + now, T) == (math.inf, math.inf), (
        "a dead path stays dead as time passes")
    assert horizon(peer(key, 1, endpoint=False, handshake=None), quiet, WALL + now, T) == (
        math.inf, math.inf)


@pytest.mark.parametrize(("now", "now_wall", "holds", "intent"), [
    (10.0, 1010.0, True, "within both bounds"),
    (20.0, 1010.0, False, "the monotonic bound passed"),
    (10.0, 1020.0, False, "the wall bound passed"),
    (10.0, 999.0, False, "the wall clock went back: an old handshake could look young"),
    (4.0, 1010.0, False, "before the pass that settled it"),
])
def test_settled_holds(now: float, now_wall: float, holds: bool, intent: str) -> None:
    settled = Settled(("inputs",), 5.0, 1005.0, 20.0, 1020.0)
    assert settled.holds(("inputs",), now, now_wall) is holds, intent
    assert not settled.holds(("other",), 10.0, 1010.0)
