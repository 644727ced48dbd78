"""How often a node asks its rendezvous server: every peer every poll until its session is
live, then less and less often; in-process, with a fake server client and a clock of ours."""

import asyncio
import itertools

from wgpunch.keys import Key
from wgpunch.node.natpunch import LIVE_RECHECK_MAX_S, REGISTER_EVERY_S, NatpunchSource
from wgpunch.wg.model import DeviceState, Endpoint, PeerState

ME = Key(bytes([1]) * 32)
LIVE, DOWN = Key(bytes([2]) * 32), Key(bytes([3]) * 32)
SERVER = Endpoint.parse("192.0.2.9:51822")
WALL = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL + self.now


class Device:
    """The device's state, as the source reads it: LIVE handshaked a moment ago."""

    name = "wgtest"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def state(self) -> DeviceState:
        def peer(key: Key, handshake: float | None) -> PeerState:
            return PeerState(key, None, (), handshake, 0, 0, 25, False)
        return DeviceState("wgtest", ME, 51820, 0, (peer(LIVE, self.clock.wall() - 5),
                                                    peer(DOWN, None)))


class Server:
    """A rendezvous client that records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[Key | str] = []

    async def lookup(self, me: Key, peer: Key) -> Endpoint:
        self.asked.append(peer)
        return Endpoint.parse(f"198.51.100.{peer.raw[0]}:51820")

    async def register(self, me: Key) -> None:
        self.asked.append("register")


def source(clock: Clock, server: Server, peers_device: Device) -> NatpunchSource:
    found = NatpunchSource(SERVER, None, peers_device, interval_s=5.0, clock=clock)
    found._client, found._port, found._public = server, 51820, ME  # connected already
    return found


def polls(clock: Clock, natpunch: NatpunchSource, times: list[float]) -> list[set[str]]:
    """Poll at each of `times` (seconds from now); which peers each poll asked about."""
    async def run() -> list[set[str]]:
        asked = []
        for at in times:
            clock.now = 100.0 + at
            before = len(natpunch._client.asked)
            snapshot = await natpunch.snapshot()
            assert LIVE in {r.public_key for r in snapshot.peers}  # asked or not: in the view
            asked.append({("live" if k == LIVE else "down" if k == DOWN else k)
                          for k in natpunch._client.asked[before:]})
        return asked
    return asyncio.run(run())


def test_a_live_peer_is_asked_about_less_and_less_often_and_a_dead_one_every_poll():
    clock, server = Clock(), Server()
    natpunch = source(clock, server, Device(clock))
    asked = polls(clock, natpunch, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45])
    # First answer: ask again at the poll interval; the same answer again: 10 s, then 20 s.
    assert [("live" in a) for a in asked] == [True, True, False, True, False, False, False,
                                              True, False, False]
    assert all("down" in a for a in asked)


def test_the_wait_for_a_live_peer_stops_growing_at_a_minute():
    clock, server = Clock(), Server()
    natpunch = source(clock, server, Device(clock))
    times = [5.0 * n for n in range(100)]
    asked = polls(clock, natpunch, times)
    at = [t for t, a in zip(times, asked, strict=True) if "live" in a]
    assert max(b - a for a, b in itertools.pairwise(at)) == LIVE_RECHECK_MAX_S


def test_a_poll_that_asks_about_no_peer_still_registers_us_now_and_then():
    clock, server = Clock(), Server()

    class OnlyLive(Device):
        async def state(self) -> DeviceState:
            full = await super().state()
            return DeviceState(full.name, ME, 51820, 0, full.peers[:1])

    natpunch = source(clock, server, OnlyLive(clock))
    asked = polls(clock, natpunch, [5.0 * n for n in range(40)])
    registered = [n for n, a in enumerate(asked) if "register" in a]
    assert registered and not [n for n in registered if "live" in asked[n]]
    # Every request refreshes our entry on the server: none is ever far from the last.
    contact = [n for n, a in enumerate(asked) if a]
    assert max(b - a for a, b in itertools.pairwise(contact)) * 5 <= (
        REGISTER_EVERY_S + 5)
