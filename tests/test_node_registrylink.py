"""The node's tunnel to the registry (node/registrylink.py) and which peers count as active
(node/activity.py): the decisions as tables, and handshake-now toward a registry that learns
of the node late, against real wireguard-go devices (tests/wgpair.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
from dataclasses import replace

import pytest

from wgpair import PORT, wg_pair
from wgpunch.keys import Key
from wgpunch.node.activity import Activity
from wgpunch.node.edges import SystemClock
from wgpunch.node.registrylink import (
    Act,
    LinkMemory,
    LinkTimings,
    keep_link,
    observe,
    retry_s,
    step,
)
from wgpunch.wg.model import Endpoint, IPAddress, PeerState

T = LinkTimings()
WALL = 1_800_000_000.0
REGISTRY = Key(bytes([3]) * 32)


def registry(*, rx: int = 0, age: float | None = 10.0, endpoint: bool = True) -> PeerState:
    return PeerState(REGISTRY, Endpoint.parse("192.0.2.254:51820") if endpoint else None,
                     (ipaddress.ip_network("10.99.0.254/32"),),
                     None if age is None else WALL - age, rx, 0, 25, False)


TRUSTED = LinkMemory(rx_bytes=100, heard_at=0.0, trust=T.trust_after)
UNTRUSTED = LinkMemory(rx_bytes=100, heard_at=0.0)

STEPS = [
    # (intent, peer, memory, now, act, unanswered after)
    ("a link never read starts with a heartbeat",
     registry(rx=100), observe(LinkMemory(), registry(rx=100), 0.0, T), 0.0, Act.HEARTBEAT, 1),
    ("a heartbeat answered: the next one a heartbeat later",
     registry(rx=200), replace(TRUSTED, sent_at=0.0, unanswered=0), 0.5, Act.WAIT, 0),
    ("a heartbeat interval passed: the next heartbeat",
     registry(rx=200), replace(TRUSTED, sent_at=0.0), 1.0, Act.HEARTBEAT, 1),
    ("a trusted heartbeat unanswered: a quick probe",
     registry(rx=100), replace(TRUSTED, sent_at=0.0, unanswered=1), 0.3, Act.HEARTBEAT, 2),
    ("an untrusted heartbeat unanswered: no quick probe, the next heartbeat in time",
     registry(rx=100), replace(UNTRUSTED, sent_at=0.0, unanswered=1), 0.3, Act.WAIT, 1),
    ("one heartbeat answered in time, the next unanswered: a quick probe sends it again",
     registry(rx=100), replace(UNTRUSTED, trust=1, sent_at=0.0, unanswered=1), 0.3,
     Act.HEARTBEAT, 2),
    ("not yet trusted, quick probes unanswered: not dead by them, only by silence",
     registry(rx=100), replace(UNTRUSTED, trust=1, sent_at=0.8, unanswered=5, heard_at=0.0),
     1.2, Act.HEARTBEAT, 6),
    ("trusted, heartbeat and three quick probes unanswered: dead, handshake now",
     registry(rx=100), replace(TRUSTED, sent_at=0.9, unanswered=4), 1.2, Act.HANDSHAKE, 0),
    ("untrusted, two heartbeats unanswered but the stream spoke 2 s ago: alive",
     registry(rx=100), replace(UNTRUSTED, sent_at=1.0, unanswered=2, heard_at=0.0), 2.0,
     Act.HEARTBEAT, 3),
    ("untrusted, nothing for silence_dead_s: dead",
     registry(rx=100), replace(UNTRUSTED, sent_at=2.0, unanswered=3), T.silence_dead_s,
     Act.HANDSHAKE, 0),
    ("no handshake ever: handshake now",
     registry(age=None), UNTRUSTED, 0.0, Act.HANDSHAKE, 0),
    ("a session past Reject-After-Time: handshake now",
     registry(age=181.0), UNTRUSTED, 0.0, Act.HANDSHAKE, 0),
    ("dead and attempted just now: wait for the retry",
     registry(age=None), replace(UNTRUSTED, dead=True, handshake_at=0.0, attempts=1), 0.1,
     Act.WAIT, 0),
    ("dead, the retry is due",
     registry(age=None), replace(UNTRUSTED, dead=True, handshake_at=0.0, attempts=1),
     T.retry_first_s, Act.HANDSHAKE, 0),
    ("dead by silence, still nothing after our attempt: the retry, not a heartbeat",
     registry(age=30.0), replace(UNTRUSTED, dead=True, handshake_at=5.0, attempts=1),
     5.0 + T.retry_first_s, Act.HANDSHAKE, 0),
    ("dead by silence, a handshake after our attempt: alive, heartbeats again",
     registry(age=0.1), replace(UNTRUSTED, dead=True, handshake_at=5.0, attempts=1,
                                sent_at=5.0, heard_at=0.0), 6.0, Act.HEARTBEAT, 1),
    ("no endpoint for the registry: nothing to do",
     registry(endpoint=False, age=None), UNTRUSTED, 0.0, Act.WAIT, 0),
]


@pytest.mark.parametrize(("intent", "peer", "memory", "now", "act", "unanswered"), STEPS,
                         ids=[row[0] for row in STEPS])
def test_step(intent, peer, memory, now, act, unanswered):
    decided = step(peer, memory, now=now, now_wall=WALL, t=T)
    assert decided.act is act, decided.reason
    assert decided.memory.unanswered == unanswered
    assert decided.at >= now
    assert decided.memory.dead == (act is Act.HANDSHAKE or (act is Act.WAIT and memory.dead))


def test_an_answer_in_time_builds_trust_and_a_late_one_takes_it_away():
    sent = replace(UNTRUSTED, sent_at=1.0, unanswered=1, trust=1)
    assert observe(sent, registry(rx=150), 1.2, T).trust == 2
    assert observe(replace(sent, unanswered=2), registry(rx=150), 1.8, T).trust == 0
    # bytes between heartbeats (the watch stream): neither
    assert observe(replace(sent, unanswered=0), registry(rx=150), 1.5, T).trust == 1


def test_retries_come_quickly_then_back_off_to_wireguards_own_pace():
    pauses = [retry_s(n, T) for n in range(1, 20)]
    assert pauses[:T.retry_fast_for] == [T.retry_first_s] * T.retry_fast_for
    assert pauses == sorted(pauses) and pauses[-1] == T.retry_max_s


def test_activity_needs_traffic_in_two_reads_and_lasts_active_s():
    peer = registry(rx=0)
    activity = Activity(active_s=4.0)
    assert activity.observe((peer,), 0.0) == []
    assert activity.observe((replace(peer, rx_bytes=32),), 1.0) == []  # a lone keepalive
    assert activity.observe((replace(peer, rx_bytes=32),), 2.0) == []
    assert activity.observe((replace(peer, rx_bytes=500),), 3.0) == []
    assert activity.observe((replace(peer, rx_bytes=900),), 3.3) != []
    assert activity.observe((replace(peer, rx_bytes=900),), 7.2) != []  # silence: still held
    assert activity.observe((replace(peer, rx_bytes=900),), 7.4) == []


class RecordingIo:
    """Probes recorded, not sent: this process is not in the pair's namespaces."""

    def __init__(self) -> None:
        self.probes: list[IPAddress] = []

    async def probe(self, ifname: str, address: IPAddress) -> bool:
        self.probes.append(address)
        return True


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
async def test_a_registry_that_learns_of_the_node_late_is_reached_before_wireguards_retry(
        tmp_path):
    """b plays the registry. a's device initiates to it while b does not list a (WireGuard
    alone tries again 5 s later); b lists a 1 s later; a handshake follows within 3 s: only
    handshake-now can have sent it. Nothing but b's peer changes on a's device."""
    with wg_pair(tmp_path) as (a, b):
        b.wg_set("peer", a.public.base64(), "remove")
        a.wg_set("peer", b.public.base64(), "endpoint", f"{b.veth_ip}:{PORT}")
        before = (await a.device.state()).peer(b.public)
        assert before is not None and before.latest_handshake is None
        loop = asyncio.get_running_loop()
        dead = asyncio.Event()

        async def on_dead() -> None:
            dead.set()

        async def no_opener(endpoint: Endpoint) -> None:
            raise AssertionError(f"an opener toward {endpoint}: no peer has traffic")

        link = asyncio.create_task(keep_link(a.device, b.public, RecordingIo(), SystemClock(),
                                             on_dead, lambda: None, no_opener))
        try:
            async with asyncio.timeout(5):
                await dead.wait()  # judged at its first read: no handshake ever
            await asyncio.sleep(1.0)  # the registry's configuration lags: part of the setup
            b.wg_set("peer", a.public.base64(), "allowed-ips", f"{a.tunnel_ip}/32")
            listed = loop.time()
            while (peer := (await a.device.state()).peer(b.public)).latest_handshake is None:
                assert loop.time() - listed < 3.0, "no handshake within 3 s of b listing a"
                await asyncio.sleep(0.02)  # polled, bounded by the deadline above
        finally:
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
        assert (peer.endpoint, peer.allowed_ips, peer.persistent_keepalive) == (
            before.endpoint, before.allowed_ips, before.persistent_keepalive)
