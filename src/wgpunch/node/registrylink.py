"""The node's tunnel to the registry: kept open by small packets of its own, and brought back
at once when it is dead (DESIGN.md §3, "Handshake now"; issue 18).

Heartbeats. Every `heartbeat_s` the agent sends one path probe (probe.py) through the tunnel
to the registry's tunnel address. It costs the registry no work of its own (its kernel answers
the discard port; WireGuard carries both ways), and it does three things. Our NAT, if it lost
its state (a reboot, a conntrack flush, a carrier NAT handing out a new port), gets a mapping
again from our own packet within a heartbeat, instead of at the next persistent keepalive
(25 s): the registry's packets, the watch stream's included, reach us again. The registry's
device sees the packet come from our new outside port, so its observer learns a new endpoint
within its poll and pushes it to our peers. And the answer (any byte from the registry raises
its rx counter) tells that the tunnel works.

Dead. The session is dead when it never had a handshake, when its last one is older than
Reject-After-Time, or when the registry went silent. A heartbeat that nothing answered is
followed by quick probes `probe_s` apart once any heartbeat was answered within `probe_s` (a
lost one is sent again sooner). Silence is judged two ways. Where the registry's kernel
answers the probes (no firewall drops them), which the link learns from `trust_after`
heartbeats in a row answered in time, `dead_probes` quick probes unanswered mean dead: about
a second. Where it does not, only the watch stream's own heartbeat (a line every 2 s,
docs/api.md) is heard, so `silence_dead_s` without any byte means dead.

A dead session gets handshake-now toward the registry: the same atomic remove and re-add with
the same configuration that peers get (wg/device.py), at once and then every `retry_first_s`
for a while, doubling up to `retry_max_s` (jittered), because WireGuard itself tries again only
5 s after its previous attempt: a registry that learns of this node late (its configuration
lists the node after the node's first initiation) is reached within a retry. A live session is
never replaced: one judged dead by silence only if no handshake newer than the one judged
came meanwhile (the device layer refuses otherwise).

`step()` decides from the registry peer as the device shows it, what the link remembers and
`now`; `keep_link` reads, acts and sleeps. Nothing here touches another peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import Enum

from ..errors import ChangeRefused, DeviceError, DeviceNotFound
from ..keys import Key
from ..wg.device import Device
from ..wg.model import SESSION_LIVE_S, Endpoint, PeerState
from .activity import Activity
from .edges import Clock, Io
from .probe import tunnel_address

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


@dataclass(frozen=True, slots=True)
class LinkTimings:
    # One heartbeat per this long while the tunnel answers. Bounds how long our NAT's lost
    # state keeps the registry's packets out, and how late the registry sees our new port:
    # on the recovery path of bench/time_to_direct.py (flush, rebind, forget; goal p95 2 s).
    # A 100-byte packet and an ICMP answer per node per second; Tailscale's disco heartbeat
    # is 3 s, for no particular recovery goal. Linux answers one host about once a second
    # (net.ipv4.icmp_ratelimit, bursts of 6), which this stays within.
    heartbeat_s: float = 1.0
    # A probe answered within this long counts as answered; quick probes go this far apart.
    # Above a round trip to the registry on most paths; three of them take about a second.
    probe_s: float = 0.3
    # Quick probes unanswered in a row after a silent heartbeat: the session is dead. Three:
    # on a lossy uplink (5 % each way) a false verdict is about 1 in 1,000 silent heartbeats.
    dead_probes: int = 3
    # Heartbeats answered within probe_s in a row before silence is judged by quick probes:
    # the registry's kernel answers them (no firewall drops them).
    trust_after: int = 3
    # Otherwise: no byte from the registry for this long. The watch stream sends a line
    # every 2 s when nothing else happens (registry/timings.py), one may be late.
    silence_dead_s: float = 3.0
    # A dead session gets handshake-now at once, then every retry_first_s (jittered +-20 %)
    # for retry_fast_for attempts, then doubling up to retry_max_s: WireGuard's own
    # REKEY_TIMEOUT, the pace it keeps alone, so a registry gone for good costs no more than
    # WireGuard's own retries. Our choice: late-registry goal 0.5 s (bench/time_to_direct.py).
    retry_first_s: float = 0.3
    retry_fast_for: int = 10
    retry_max_s: float = 5.0
    # Peers with traffic (activity.py) get an opener with each heartbeat, for this long after
    # their last bytes: our NAT's mapping toward them comes back within a heartbeat after it
    # lost its state, while their packets are kept out (bench/time_to_direct.py flush). Our
    # choice: a few heartbeats, far below the 25 s of persistent keepalive.
    active_s: float = 4.0


class Act(Enum):
    WAIT = "wait"  # nothing to do until `at`
    HEARTBEAT = "heartbeat"  # send one probe to the registry
    HANDSHAKE = "handshake"  # handshake-now toward the registry


@dataclass(frozen=True, slots=True)
class LinkMemory:
    rx_bytes: int = -1  # the registry peer's rx counter as last read; -1: never read
    heard_at: float | None = None  # when it last grew, or was first read (monotonic)
    sent_at: float | None = None  # our last probe (heartbeat or quick)
    unanswered: int = 0  # probes sent since the counter last grew
    trust: int = 0  # heartbeats in a row answered within probe_s (capped at trust_after)
    handshake_at: float | None = None  # our last handshake-now
    attempts: int = 0  # handshake-nows since the session was last alive
    dead: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    act: Act
    at: float  # when to look again (monotonic)
    memory: LinkMemory
    reason: str  # why: in the log when the link is judged dead


def observe(memory: LinkMemory, peer: PeerState, now: float, t: LinkTimings) -> LinkMemory:
    """Note the registry peer's rx counter as the device shows it now."""
    if memory.rx_bytes < 0:
        return replace(memory, rx_bytes=peer.rx_bytes, heard_at=now)
    if peer.rx_bytes <= memory.rx_bytes:
        return replace(memory, rx_bytes=peer.rx_bytes)
    in_time = (memory.unanswered == 1 and memory.sent_at is not None
               and now - memory.sent_at <= 1.5 * t.probe_s)
    trust = (min(memory.trust + 1, t.trust_after) if in_time
             else 0 if memory.unanswered > 1 else memory.trust)
    return replace(memory, rx_bytes=peer.rx_bytes, heard_at=now, unanswered=0, trust=trust)


def step(peer: PeerState | None, memory: LinkMemory, *, now: float, now_wall: float,
         t: LinkTimings) -> Step:
    """What to do about the link to the registry now; `memory` has observed `peer`."""
    if peer is None or peer.endpoint is None:
        return Step(Act.WAIT, now + t.heartbeat_s, memory, "no registry endpoint to reach")
    age = peer.handshake_age(now_wall)
    if age is None or age >= SESSION_LIVE_S:
        reason = "no handshake yet" if age is None else "session expired"
    elif memory.dead and not _revived(memory, age, now):
        reason = "still no answer"
    elif (silent := _silence(memory, now, t)) is not None:
        reason = silent
    else:
        memory = replace(memory, attempts=0, dead=False)
        # Quick probes once one heartbeat was answered in time: they re-send what may have
        # been lost, and so map us again on a NAT that lost its state, 0.3 s after a lost
        # heartbeat rather than a second (bench/time_to_direct.py forget: the NATs forget
        # a few tenths of a second after start). Only a trusted link is judged by them.
        quick = memory.unanswered > 0 and memory.trust >= 1
        wait = t.probe_s if quick else t.heartbeat_s
        if memory.sent_at is None or now - memory.sent_at >= wait:
            return Step(Act.HEARTBEAT, now + t.probe_s,
                        replace(memory, sent_at=now, unanswered=memory.unanswered + 1),
                        "quick probe" if quick else "heartbeat")
        return Step(Act.WAIT, min(memory.sent_at + wait, now + t.heartbeat_s), memory, "alive")
    memory = replace(memory, dead=True, trust=0)
    due = now if memory.handshake_at is None or not memory.attempts else (
        memory.handshake_at + retry_s(memory.attempts, t))
    if now >= due:
        return Step(Act.HANDSHAKE, now + retry_s(memory.attempts + 1, t),
                    replace(memory, handshake_at=now, attempts=memory.attempts + 1,
                            unanswered=0, sent_at=now), reason)
    return Step(Act.WAIT, due, memory, reason)


def _revived(memory: LinkMemory, age: float, now: float) -> bool:
    """Whether a dead link came back: a handshake, or any byte, after our last attempt."""
    if memory.handshake_at is None:
        return True
    return age < now - memory.handshake_at or (
        memory.heard_at is not None and memory.heard_at > memory.handshake_at)


def _silence(memory: LinkMemory, now: float, t: LinkTimings) -> str | None:
    """Why the registry counts as silent, if it does."""
    if memory.trust >= t.trust_after:
        if memory.unanswered > t.dead_probes:
            return f"{memory.unanswered} probes in a row unanswered"
        return None
    if (memory.unanswered >= 2 and memory.heard_at is not None
            and now - memory.heard_at >= t.silence_dead_s):
        return f"nothing from the registry for {now - memory.heard_at:.1f} s"
    return None


def retry_s(attempts: int, t: LinkTimings) -> float:
    """The pause after the `attempts`-th handshake-now in a row (before jitter)."""
    doublings = max(0, attempts - t.retry_fast_for)
    return min(t.retry_first_s * 2.0 ** min(doublings, 16), t.retry_max_s)


async def keep_link(device: Device, registry: Key, io: Io, clock: Clock,
                    on_dead: Callable[[], Awaitable[None]],
                    on_alive: Callable[[], None],
                    open_nat: Callable[[Endpoint], Awaitable[None]],
                    t: LinkTimings | None = None, *,
                    others: frozenset[Key] = frozenset()) -> None:
    """Keep the tunnel to `registry` alive, forever. `on_dead` runs when the link is judged
    dead (our NAT may have lost its state for every peer: the agent probes its live ones);
    `on_alive` when it answers again after that (the watch stream is opened anew rather than
    waiting out TCP's retransmission back-off); `open_nat` sends an opener toward an active
    peer with each heartbeat, never toward `registry` or `others` (the interface's other
    registries, node/registries.py)."""
    t = t or LinkTimings()
    memory = LinkMemory()
    activity = Activity(t.active_s)
    while True:
        now = clock.monotonic()
        try:
            state = await device.state()
        except (DeviceError, DeviceNotFound):
            state = None  # the agent's own loop logs it
        peer = None if state is None else state.peer(registry)
        active = [] if state is None else activity.observe(state.peers, now)
        was_dead = memory.dead
        if peer is not None:
            memory = observe(memory, peer, now, t)
        decided = step(peer, memory, now=now, now_wall=clock.wall(), t=t)
        memory = decided.memory
        if memory.dead and not was_dead:
            log.info("registry tunnel: %s; handshaking with the registry now", decided.reason,
                     extra={"event": "registry_link_dead"})
            await on_dead()
        elif was_dead and not memory.dead:
            log.info("registry tunnel answers again", extra={"event": "registry_link_alive"})
            on_alive()
        if decided.act is Act.HEARTBEAT and peer is not None:
            address = tunnel_address(peer.allowed_ips)
            if address is not None:
                await io.probe(device.name, address)
            if decided.reason == "heartbeat":
                for other in active:
                    if (other.public_key != registry and other.public_key not in others
                            and other.endpoint is not None):
                        await open_nat(other.endpoint)
        elif decided.act is Act.HANDSHAKE and peer is not None and peer.endpoint is not None:
            await _handshake(device, peer, clock.wall())
        pause = max(0.0, decided.at - clock.monotonic())
        if decided.act is Act.HANDSHAKE:
            pause *= random.uniform(0.8, 1.2)  # nodes that lost the registry together: not in step
        await asyncio.sleep(pause)


async def _handshake(device: Device, peer: PeerState, now_wall: float) -> None:
    assert peer.endpoint is not None
    age = peer.handshake_age(now_wall)
    # Judged dead by silence: replaced only if no handshake newer than the one judged came.
    live_s = SESSION_LIVE_S if age is None else max(0.0, min(age - 0.05, SESSION_LIVE_S))
    with contextlib.suppress(ChangeRefused):
        try:
            await device.handshake_now(peer.public_key, peer.endpoint, live_s=live_s,
                                       now=now_wall)
        except DeviceError as error:
            log.debug("registry tunnel: handshake-now failed: %s", error)
