"""node/upgrade.py: the back-off and restart of probing, the switch rule, the verification
of a switch (pure, a fake clock), the probe datagrams, and two agents' prober cores talking
through a fake network in process."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import replace

import pytest

from test_natpunch_rawudp import (
    B_IP,
    LPORT,
    ROUTER_ALERT,
    SPORT,
    in_netns,
    namespace_pair,
    packet,
    run_bpf,
)
from wgpunch.errors import MalformedPacket
from wgpunch.keys import Key
from wgpunch.natpunch.rawudp import _attach_filter, magic_filter, udp_payload
from wgpunch.node.candidates import Candidate, CandidateKind
from wgpunch.node.decide import Kind, Memory, Reason, decide
from wgpunch.node.timings import Timings
from wgpunch.node.track import Track
from wgpunch.node.upgrade import (
    Backoff,
    Check,
    Sent,
    Switched,
    Upgrades,
    UpgradeTimings,
    backed_off,
    check,
    counts,
    next_round,
    seen_of,
    targets,
)
from wgpunch.node.upgradelink import RawProbeChannel
from wgpunch.node.upgradewire import MAGIC, SIZE, Answer, Probe, parse
from wgpunch.protocol import NatBehaviour, PeerRecord, Reported
from wgpunch.wg.model import Endpoint, PeerState

T = UpgradeTimings()
A, B, C = Key(bytes([1]) * 32), Key(bytes([2]) * 32), Key(bytes([3]) * 32)
TXID = bytes(range(16))


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


def walk(seen_at: dict[float, object], until: float, step: float = 0.25) -> list[float]:
    """The times probe rounds go, ticking every `step` s; `seen_at`: from when the registry
    says what (a change restarts the rounds)."""
    rounds, backoff, now, seen = [], None, 0.0, seen_at[0.0]
    while now <= until:
        seen = seen_at.get(now, seen)
        backoff, due = next_round(backoff, now, seen, T)
        if due:
            rounds.append(now)
        now += step
    return rounds


def test_rounds_back_off_from_a_second_to_a_minute():
    assert walk({0.0: "x"}, 300.0) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 124.0, 184.0, 244.0]


def test_a_change_either_side_reports_restarts_the_rounds_at_once():
    # Rounds at 1, 2, 4, 8, 16; the registry reports a change at 20: a round at once, then
    # the back-off starts over (21, 23, ...), not at 32.
    assert walk({0.0: "x", 20.0: "y"}, 30.0) == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 21.0, 23.0,
                                                27.0]


def test_a_switch_that_did_not_hold_backs_off():
    assert backed_off(None, 5.0, T) == Backoff(6.0, 2.0, None)
    assert backed_off(Backoff(10.0, 8.0, "x"), 5.0, T) == Backoff(13.0, 16.0, "x")
    assert backed_off(Backoff(10.0, 60.0, "x"), 5.0, T).pause_s == 60.0


def record(endpoint: str | None, listen_port: int = 51820) -> PeerRecord:
    reported = Reported(listen_port, (ipaddress.ip_address("192.168.1.2"),), "0.1.0")
    return PeerRecord(B, (), None if endpoint is None else ep(endpoint), None, reported, 1)


@pytest.mark.parametrize(("endpoint", "candidates", "expected", "intent"), [
    ("198.51.100.2:51820", ["198.51.100.2:51820"], ["198.51.100.2:51820"],
     "port kept: the observed endpoint only"),
    ("198.51.100.2:40000", ["198.51.100.2:40000"], ["198.51.100.2:40000", "198.51.100.2:51820"],
     "port changed: also the peer's own port at its public address (a NAT that keeps it now)"),
    ("198.51.100.2:40000", ["192.168.1.2:51820", "198.51.100.2:40000", "192.0.2.2:31000"],
     ["192.168.1.2:51820", "198.51.100.2:40000", "198.51.100.2:51820"],
     "the LAN candidate too; never the relay"),
    ("[2001:db8::2]:40000", ["[2001:db8::2]:40000"], [], "IPv6: the raw socket is IPv4 only"),
])
def test_probe_targets(endpoint, candidates, expected, intent):
    kinds = {"192.0.2.2:31000": CandidateKind.RELAY, "192.168.1.2:51820": CandidateKind.LAN}
    given = [Candidate(kinds.get(c, CandidateKind.PUBLIC), ep(c)) for c in candidates]
    assert targets(record(endpoint), given) == tuple(map(ep, expected)), intent


SENT = Sent(B, ep("198.51.100.2:51820"), 10.0)


@pytest.mark.parametrize(("sent", "sender", "source", "now", "expected", "intent"), [
    (SENT, B, "198.51.100.2:51820", 10.1, True, "our probe, answered from where it went"),
    (None, B, "198.51.100.2:51820", 10.1, False, "no probe of ours had this id"),
    (SENT, C, "198.51.100.2:51820", 10.1, False, "another node answered"),
    (SENT, B, "198.51.100.2:40000", 10.1, False,
     "from another port: the endpoint we probed is not shown to work"),
    (SENT, B, "198.51.100.2:51820", 12.5, False, "too late"),
])
def test_the_switch_rule(sent, sender, source, now, expected, intent):
    answer = Answer(TXID, sender, ep("203.0.113.9:1234"))
    assert counts(sent, answer, ep(source), now, T) is expected, intent


DIRECT, RELAY = ep("198.51.100.2:51820"), ep("192.0.2.2:31000")
FRESH = Switched(DIRECT, RELAY, 10.0, "why")
MARKED = Switched(DIRECT, RELAY, 10.0, "why", rx_mark=500)


@pytest.mark.parametrize(("s", "now", "rx", "current", "expected", "intent"), [
    (FRESH, 10.1, 400, RELAY, Check.REASSERT, "a late relayed datagram moved the device back"),
    (FRESH, 10.1, 400, DIRECT, Check.WAIT, "relayed datagrams may still be on their way"),
    (FRESH, 10.4, 400, DIRECT, Check.MARK, "settled: count from here"),
    (MARKED, 10.5, 600, DIRECT, Check.HOLDS, "a byte came from the peer"),
    (MARKED, 11.0, 500, DIRECT, Check.WAIT, "nothing yet, within verify_s"),
    (MARKED, 12.0, 500, DIRECT, Check.FAILED, "nothing within verify_s: back to the relay"),
    (MARKED, 12.0, 600, ep("198.51.100.2:40000"), Check.HOLDS,
     "roamed to another address of the peer's: WireGuard's own, and it works"),
])
def test_verifying_a_switch(s, now, rx, current, expected, intent):
    assert check(s, now, rx, current, T) is expected, intent


def test_probe_datagrams():
    probe = Probe(TXID, A).encode()
    assert len(probe) == SIZE and probe[:4] == MAGIC and probe[0] not in range(1, 5)
    assert probe == MAGIC + bytes([1, 1, 0, 0]) + TXID + A.raw + bytes(8)
    assert parse(probe) == Probe(TXID, A)
    answer = Answer(TXID, B, ep("198.51.100.1:40000"))
    raw = answer.encode()
    assert raw[56:62] == bytes([198, 51, 100, 1]) + (40000).to_bytes(2, "big")
    assert parse(raw) == answer


@pytest.mark.parametrize(("data", "error"), [
    (Probe(TXID, A).encode()[:63], "63 bytes"),
    (b"XGUP" + Probe(TXID, A).encode()[4:], "magic"),
    (Probe(TXID, A).encode()[:4] + bytes([2]) + Probe(TXID, A).encode()[5:], "version 2"),
    (Probe(TXID, A).encode()[:5] + bytes([3]) + Probe(TXID, A).encode()[6:], "unknown type"),
    (Probe(TXID, A).encode()[:62] + b"\0\1", "padding"),
    (Probe(TXID, A).encode()[:56] + bytes([1, 2, 3, 4, 0, 0, 0, 0]), "no observed address"),
    (Probe(TXID, A).encode()[:5] + bytes([2]) + Probe(TXID, A).encode()[6:], "port 0"),
])
def test_malformed_probe_datagrams(data, error):
    with pytest.raises(MalformedPacket, match=error):
        parse(data)


PROBE = Probe(TXID, A).encode()
WG_INIT = bytes([1, 0, 0, 0]) + bytes(144)
FILTER_CASES = {
    "a probe to our port": (packet(sport=40000, payload=PROBE), True),
    "an answer to our port": (packet(payload=Answer(TXID, A, ep("192.0.2.1:1")).encode()), True),
    "a probe with IP options": (packet(options=ROUTER_ALERT, payload=PROBE), True),
    "a probe to another port": (packet(dport=51821, payload=PROBE), False),
    "WireGuard's own initiation": (packet(payload=WG_INIT), False),
    "a probe one byte short": (packet(payload=PROBE[:63]), False),
    "a probe with a byte more": (packet(payload=PROBE + b"\0"), False),
    "another magic": (packet(payload=b"WGNP" + PROBE[4:]), False),
    "a fragment": (packet(fragment=0x2000, payload=PROBE), False),
    "TCP": (packet(protocol=6, payload=PROBE), False),
}


@pytest.mark.parametrize(("data", "accepted"), FILTER_CASES.values(), ids=FILTER_CASES.keys())
def test_the_filter_passes_the_probe_shape_only(data, accepted):
    program = magic_filter(51820, SIZE, MAGIC)
    assert (run_bpf(program, data) > 0) is accepted
    if accepted:  # and what the channel then reads of it (upgradelink.py)
        found = udp_payload(data)
        assert found is not None and found[1:] == (51820, data[-SIZE:])


def test_the_kernel_accepts_the_probe_filter():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _attach_filter(sock, magic_filter(51820, SIZE, MAGIC))


# -- two prober cores, a fake network between them ---------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class Net:
    """Delivers a datagram sent to `to` to the node whose public endpoint that is, as coming
    from the sender's public endpoint, when `open`."""

    def __init__(self) -> None:
        self.nodes: dict[Endpoint, tuple[Endpoint, Upgrades]] = {}
        self.open = True
        self.sent: list[tuple[Endpoint, Endpoint, bytes]] = []

    def channel(self, public: Endpoint) -> Channel:
        return Channel(self, public)


class Channel:
    def __init__(self, net: Net, public: Endpoint) -> None:
        self.net, self.public = net, public

    def listen(self, listen_port, heard) -> bool:
        return True

    def send(self, listen_port: int, to: Endpoint, payload: bytes) -> bool:
        self.net.sent.append((self.public, to, payload))
        target = self.net.nodes.get(to)
        if self.net.open and target is not None:
            target[1].heard(self.public, payload)
        return True

    def close(self) -> None:
        pass


class Client:
    def __init__(self) -> None:
        self.direct_calls: list[tuple[Key, Endpoint, Endpoint]] = []

    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        self.direct_calls.append((peer, endpoint, peer_endpoint))


def core(net: Net, me: Key, public: str, client: Client, clock: Clock, woke: list[Key]
         ) -> Upgrades:
    upgrades = Upgrades(net.channel(ep(public)), client, None, None, clock, {}, {},  # type: ignore[arg-type]
                        lambda: woke.append(me))
    upgrades.start(me, 51820, lambda key: key in (A, B))
    net.nodes[ep(public)] = (ep(public), upgrades)
    return upgrades


async def test_an_answered_probe_asks_the_registry_to_switch_with_both_endpoints():
    net, clock, client, woke = Net(), Clock(), Client(), []
    a = core(net, A, "198.51.100.1:51820", client, clock, woke)
    core(net, B, "203.0.113.2:51820", Client(), clock, woke)
    a._round(B, [ep("203.0.113.2:51820"), ep("203.0.113.2:40000")], clock.now)
    # B answered the probe that reached it; the one to a port nobody has went nowhere.
    assert [(s, t) for s, t, _ in net.sent] == [
        (ep("198.51.100.1:51820"), ep("203.0.113.2:51820")),
        (ep("203.0.113.2:51820"), ep("198.51.100.1:51820")),
        (ep("198.51.100.1:51820"), ep("203.0.113.2:40000"))]
    assert a.answered == {B: (ep("203.0.113.2:51820"), ep("198.51.100.1:51820"))}
    assert woke == [A]
    a._post(B, *a.answered.pop(B), clock.now)
    a._post(B, ep("203.0.113.2:51820"), ep("198.51.100.1:51820"), clock.now + 0.1)  # repeat
    for task in list(a._tasks):
        await task
    assert client.direct_calls == [(B, ep("203.0.113.2:51820"), ep("198.51.100.1:51820"))]


async def test_probes_from_strangers_and_floods_get_few_answers():
    net, clock, woke = Net(), Clock(), []
    b = core(net, B, "203.0.113.2:51820", Client(), clock, woke)
    stranger = Probe(TXID, C).encode()
    b.heard(ep("192.0.2.66:1"), stranger)
    assert not net.sent  # C is no peer of ours
    for _ in range(100):
        b.heard(ep("192.0.2.66:1"), Probe(TXID, A).encode())
    assert len(net.sent) == T.answers_per_s  # the burst, then the rate
    clock.now += 0.5
    b.heard(ep("192.0.2.66:1"), Probe(TXID, A).encode())
    assert len(net.sent) == T.answers_per_s + 1
    # An answer nobody asked for, or a datagram of another shape, changes nothing.
    b.heard(ep("192.0.2.66:1"), Answer(TXID, A, ep("203.0.113.2:51820")).encode())
    b.heard(ep("192.0.2.66:1"), b"\x01" + bytes(63))
    assert not b.answered and not woke


class Device:
    name = "wgtest0"

    def __init__(self) -> None:
        self.endpoints: list[tuple[Key, Endpoint]] = []

    async def set_endpoint(self, key: Key, endpoint: Endpoint) -> None:
        self.endpoints.append((key, endpoint))


class Io:
    def __init__(self) -> None:
        self.probes: list[object] = []

    async def probe(self, ifname: str, address: object) -> bool:
        self.probes.append(address)
        return True


class RelayClient(Client):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[Key] = []

    async def relay(self, peer: Key) -> object:
        self.asked.append(peer)
        return "offer"


def peer_state(endpoint: Endpoint, rx: int) -> PeerState:
    return PeerState(B, endpoint, (ipaddress.ip_network("10.99.0.2/32"),), 100.0, rx, 0, 25,
                     False)


@pytest.mark.parametrize("holds", [True, False])
async def test_a_switch_is_kept_when_the_peer_answers_and_undone_when_not(holds):
    """A direct event moves the peer (no handshake: its session goes on); a byte from the peer
    after settling keeps it, none within verify_s puts the relay slot back and asks for it
    again (which resumes it)."""
    clock, device, io, client = Clock(), Device(), Io(), RelayClient()
    directs: dict[Key, Endpoint] = {B: DIRECT}
    offers: dict[Key, object] = {}
    up = Upgrades(None, client, device, io, clock, directs, offers, lambda: None)  # type: ignore[arg-type]
    track, rec = Track(), record("198.51.100.2:51820")

    async def tick(endpoint: Endpoint, rx: int) -> None:
        await up.step(peer_state(endpoint, rx), track, rec, None, (), RELAY,  # type: ignore[arg-type]
                      clock.now)

    await tick(RELAY, 100)
    assert device.endpoints == [(B, DIRECT)] and len(io.probes) == 1
    clock.now += 0.1
    await tick(RELAY, 100)  # a relayed datagram came late: the device roamed back
    assert device.endpoints[-1] == (B, DIRECT) and len(device.endpoints) == 2
    clock.now += 0.3
    await tick(DIRECT, 120)  # settled: count from here, probe again
    assert len(io.probes) == 2 and up.found(B) == (Candidate(CandidateKind.PUBLIC, DIRECT),)
    clock.now += 0.2 if holds else 2.0
    await tick(DIRECT, 200 if holds else 120)
    if holds:
        assert B in up.upgraded and not client.asked and B not in up.switched
        assert up.upgraded[B][1] == "back from the relay: the peer's probe of us was answered"
    else:
        for task in list(up._tasks):
            await task
        assert device.endpoints[-1] == (B, RELAY) and client.asked == [B]
        assert offers == {B: "offer"} and up.backoffs[B].next_at > clock.now
        assert up.found(B) == ()


def test_decide_keeps_the_direct_endpoint_a_switch_found():
    """A switch may land on an endpoint the registry does not know (the peer's port kept by
    its NAT): offered as a candidate while in use, decide() keeps it and calls the path
    direct; without it, decide() would suspect the session and probe toward the registry's."""
    guess, public = ep("198.51.100.2:51820"), ep("198.51.100.2:40000")
    up = Upgrades(None, Client(), None, None, Clock(), {}, {}, lambda: None)  # type: ignore[arg-type]
    up.upgraded[B] = (guess, "why")
    peer = peer_state(guess, 1000)
    given = (Candidate(CandidateKind.PUBLIC, public), Candidate(CandidateKind.RELAY, RELAY))
    now = dict(initiator=True, punched=False, now_wall=100.0, now=5.0, t=Timings())
    kept = decide(peer, (*given, *up.found(B)), Memory(rx_changed_at=5.0), **now)
    assert (kept.kind, kept.reason, kept.path) == (Kind.LEAVE, Reason.ROAMED, "direct")
    suspect = decide(peer, given, Memory(rx_changed_at=5.0), **now)
    assert (suspect.kind, suspect.endpoint) == (Kind.PROBE, public)


def test_what_restarts_the_rounds():
    peer, mine = record("198.51.100.2:40000"), record("203.0.113.9:51820")
    base = seen_of(peer, mine)
    assert seen_of(record("198.51.100.2:40000"), record("203.0.113.9:51820")) == base
    eim = NatBehaviour("endpoint-independent", "address-and-port-dependent", True)
    assert peer.reported is not None
    changes = {
        "the peer's endpoint": seen_of(record("198.51.100.2:40001"), mine),
        "ours": seen_of(peer, record("203.0.113.9:51821")),
        "the peer's NAT report": seen_of(
            replace(peer, reported=replace(peer.reported, nat=eim)), mine),
        "the peer's port mapping": seen_of(
            replace(peer, reported=replace(peer.reported, mapped=ep("198.51.100.2:1"))), mine),
    }
    assert all(seen != base for seen in changes.values()), changes


def probe_exchange() -> list[tuple[Endpoint, bytes]]:
    """Run inside A: WireGuard's stand-in owns LPORT; the channel sends a probe from it to
    B's echo server, then datagrams of other shapes come back to LPORT: the channel hears
    only the probe's echo, and WireGuard's socket still gets every datagram."""
    heard: list[tuple[Endpoint, bytes]] = []
    server, probe = Endpoint(ipaddress.ip_address(B_IP), SPORT), Probe(TXID, A).encode()

    async def talk(wireguard: socket.socket) -> None:
        channel, got = RawProbeChannel(), asyncio.Event()

        def hear(source: Endpoint, data: bytes) -> None:
            heard.append((source, data))
            got.set()

        assert channel.listen(LPORT, hear)
        try:
            assert channel.send(LPORT, server, probe)
            assert wireguard.recvfrom(65535) == (probe, (B_IP, SPORT))
            async with asyncio.timeout(5):
                await got.wait()
            # B's echo server answers "spray" from two wrong places and then once more
            # (none shaped like a probe); WireGuard's socket gets all three after the raw
            # socket had its copies, and the channel's reader hears none of them.
            assert channel.send(LPORT, server, b"spray")
            assert [wireguard.recvfrom(65535)[0] for _ in range(3)] == [
                b"wrong source port", b"wrong source address", b"after spray"]
            for _ in range(10):
                await asyncio.sleep(0)  # give the reader its turns
        finally:
            channel.close()

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wireguard:
        wireguard.bind(("0.0.0.0", LPORT))
        wireguard.settimeout(5)  # a deadline for each datagram, not a wait for one
        asyncio.run(talk(wireguard))
    return heard


@pytest.mark.lab
def test_the_raw_channel_hears_probe_datagrams_only():
    with namespace_pair() as pair:
        heard = in_netns(pair.a, probe_exchange)
    assert heard == [(Endpoint(ipaddress.ip_address(B_IP), SPORT), Probe(TXID, A).encode())]
