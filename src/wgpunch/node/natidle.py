"""How long our NAT keeps an idle UDP mapping, and the persistent keepalive that outlasts it
(issue 13; the registry's side is registry/natprobe.py, the datagrams protocol/probewire.py).

WireGuard's persistent keepalive (25 s as the agent sets it: timings.Timings.keepalive_s) keeps
a mapping open only if the NAT keeps an idle one longer. Some do not (carrier and mobile NATs,
20 s or less; the lab's `eim-short`). There the mapping toward a peer lapses between
keepalives, our NAT drops the peer's packets until ours go out again, and a peer that starts
sending after a quiet spell hears nothing and asks for a punch. The registry's own mapping is
not at stake: the link's heartbeats (registrylink.py) cross it every second.

Measuring: from several UDP sockets at once, one request each to the registry's probe port,
each asking for a later answer after one of `ladder`'s delays (probewire flag 4). The first
answer shows the path works; a later answer arriving means our NAT kept that socket's mapping
idle that long. A NAT that forgets a mapping idle for t forgets one idle longer too, so the
shortest delay whose later answer did not come ends the measurement (a NAT with a 20 s
timeout is known in 23 s; one that keeps mappings longer than the ladder, in 27 s; both
after IdleTimings.start_after_s).
Ordinary sockets, not the WireGuard port: a NAT gives every UDP flow of a host the same idle
timeout, and several flows at once take one round instead of a search. Linux
routers time out a flow that had one packet each way (these) after 30 s and one with traffic
for 2 s (WireGuard's) after 120 s: there a measurement undershoots, which is harmless above
`ladder`'s top (the agent's keepalive plus a second) and errs toward keeping alive below it.

`verdict` and `lowered` are pure; `probe_idle` is the one edge (`IdleProbe`, so the agent
runs in process against a fake); `IdleWatch` measures and keeps the agent's peers' keepalive
below what it found.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from ..errors import ChangeRefused, DeviceError, MalformedPacket
from ..protocol.probewire import TXID_SIZE, Ask, Request, Via, parse_reply
from ..wg.device import Device
from ..wg.model import Endpoint, PeerState

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


@dataclass(frozen=True, slots=True)
class IdleTimings:
    # Delays asked for, one socket each. The top rung is the agent's keepalive (25 s) plus
    # one: above it the keepalive is safe. Below, about 3 s apart: a keepalive within 3 s of
    # the NAT's timeout; the lowest, 2 s, gives a keepalive of 1 s (WireGuard's least).
    ladder: tuple[int, ...] = (2, 4, 7, 10, 13, 16, 19, 22, 26)
    # The first answer: a round trip to the registry; our choice, as natprobe.ProbeTimings.
    first_wait_s: float = 1.0
    # A later answer may be this late: the registry's timer and a round trip.
    late_s: float = 1.0
    # The first measurement waits this long after the agent starts: the registry lets a
    # source address send 32 probes at once, then 16 a second (registry/natprobe.py), and
    # two nodes behind one NAT measuring their mapping at start must not find the budget
    # spent on this. Two seconds refill it; our choice.
    start_after_s: float = 2.0
    # Measured again this often: a node that moved to another network, a NAT that changed.
    # A measurement costs one socket and two datagrams per rung.
    again_s: float = 600.0
    # A measurement that learnt nothing is tried again after this, doubling up to again_s:
    # a registry busy with many nodes, datagrams lost; or no probe port (then 9 datagrams
    # per try, ever rarer).
    retry_first_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Idle:
    """What a measurement found: the longest delay whose later answer came (0: none did) and
    the shortest whose did not (None: every one came)."""

    kept_s: int
    lost_s: int | None

    def keepalive_s(self, default_s: int) -> int | None:
        """A persistent keepalive below what our NAT keeps, when `default_s` is not: one
        second under the longest idle spell the mapping survived, at least 1."""
        if self.lost_s is None or self.kept_s > default_s:
            return None
        return max(1, self.kept_s - 1)

    def words(self) -> str:
        if self.lost_s is None:
            return f"our NAT keeps idle UDP mappings at least {self.kept_s} s"
        if not self.kept_s:
            return f"our NAT forgets idle UDP mappings within {self.lost_s} s"
        return (f"our NAT forgets idle UDP mappings after {self.kept_s}-{self.lost_s} s "
                "without a packet")


def verdict(top: int, heard: Collection[int], lost: Collection[int]) -> Idle | None:
    """`heard`: the delays whose later answer came; `lost`: those whose first answer came
    and later one did not; `top`: the longest delay asked. A NAT that forgets after t forgets
    every longer spell too, so the boundary is the longest heard (a lost datagram below it
    counts for nothing). None: nothing lost, yet the longest delay told nothing either (its
    datagrams lost): not measured."""
    kept = max(heard, default=0)
    after = [s for s in lost if s > kept]
    if after:
        return Idle(kept, min(after))
    return Idle(kept, None) if kept >= top else None


class IdleProbe(Protocol):
    async def __call__(self, server: Endpoint, ladder: Sequence[int], t: IdleTimings
                       ) -> Idle | None:
        """Measure toward the probe port `server`; None: nothing learnt (the port did not
        answer: off, or a registry too old for later answers; or too many datagrams lost)."""
        ...


class _Client(asyncio.DatagramProtocol):
    def __init__(self, txid: bytes) -> None:
        self.txid = txid
        self.first = asyncio.get_running_loop().create_future()
        self.later = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = parse_reply(data)
        except MalformedPacket:
            return
        if reply.txid != self.txid:
            return
        done = self.later if reply.via is Via.LATER else self.first
        if not done.done():
            done.set_result(None)


async def probe_idle(server: Endpoint, ladder: Sequence[int], t: IdleTimings) -> Idle | None:
    """The real probe: one connected UDP socket per rung (the kernel drops datagrams from
    anyone else)."""
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[int, _Client] = {}
        for delay in ladder:
            try:
                transport, client = await loop.create_datagram_endpoint(
                    functools.partial(_Client, os.urandom(TXID_SIZE)),
                    remote_addr=(str(server.ip), server.port))
            except OSError as error:
                log.debug("NAT idle probe: %s", error)
                return None
            stack.callback(transport.close)
            transport.sendto(Request(client.txid, Ask.LATER, delay).encode())
            clients[delay] = client
        sent = loop.time()
        await asyncio.wait([c.first for c in clients.values()], timeout=t.first_wait_s)
        if not any(c.first.done() for c in clients.values()):
            return None
        heard: list[int] = []
        lost: list[int] = []
        for delay in sorted(clients):  # shortest first: the first one lost ends it
            client = clients[delay]
            left = sent + delay + t.late_s - loop.time()
            await asyncio.wait([client.later], timeout=max(0.0, left))
            if client.later.done():
                heard.append(delay)
            elif client.first.done():
                lost.append(delay)
                break
            # Neither answer came: the request or the answers were lost; nothing learnt.
        return verdict(max(clients), heard, lost)


def lowered(current_s: int, safe_s: int | None, *, live: bool) -> int | None:
    """The keepalive to set on a peer the agent steers, if any: only ever lower. A peer
    without one (0) gets one only while its session is `live`: the peer reached us and none
    of our packets keeps our NAT open for it (one without a session gets the keepalive with
    the endpoint the agent sets, `IdleWatch.keepalive_s`)."""
    if safe_s is None or (current_s == 0 and not live) or 0 < current_s <= safe_s:
        return None
    return safe_s


class IdleWatch:
    """The agent's part: measure (at start, then every again_s), and lower the keepalive of
    each peer the agent steers when our NAT forgets sooner than `default_keepalive_s`."""

    def __init__(self, probe: IdleProbe, t: IdleTimings, default_keepalive_s: int,
                 changed: Callable[[], None]) -> None:
        self.probe = probe
        self.t = t
        self.default_s = default_keepalive_s
        self.changed = changed  # wakes the agent's loop
        self.found: Idle | None = None

    async def watch(self, server: Endpoint) -> None:
        await asyncio.sleep(self.t.start_after_s)
        retry_s = self.t.retry_first_s
        while True:
            if await self.watch_once(server):
                retry_s = self.t.retry_first_s
                await asyncio.sleep(self.t.again_s)
            else:
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, self.t.again_s)

    async def watch_once(self, server: Endpoint) -> bool:
        """One measurement; False when it learnt nothing."""
        found = await self.probe(server, self.t.ladder, self.t)
        if found is None:
            return False
        if found == self.found:
            return True
        safe = found.keepalive_s(self.default_s)
        log.log(logging.INFO if safe or self.found else logging.DEBUG,
                "NAT: %s: %s", found.words(),
                f"persistent keepalive {safe} s toward the peers we steer" if safe
                else f"a persistent keepalive of {self.default_s} s keeps them open",
                extra={"event": "nat_idle_measured", "kept_s": found.kept_s,
                       "lost_s": found.lost_s, "keepalive_s": safe})
        self.found = found
        self.changed()
        return True

    def keepalive_s(self) -> int:
        """The persistent keepalive the agent sets with an endpoint."""
        safe = None if self.found is None else self.found.keepalive_s(self.default_s)
        return safe or self.default_s

    def lowers(self, peer: PeerState, *, live: bool) -> int | None:
        """The keepalive `keep_open` sets on `peer`; None: it leaves the peer alone."""
        if self.found is None:
            return None
        return lowered(peer.persistent_keepalive, self.found.keepalive_s(self.default_s),
                       live=live)

    async def keep_open(self, device: Device, peer: PeerState, *, live: bool,
                        nudge: Callable[[PeerState], Awaitable[None]]) -> PeerState:
        """Lower `peer`'s keepalive if it outlasts our NAT's mappings (`lowered`); nothing
        else of the peer changes. A `live` peer is then `nudge`d (a packet through the
        tunnel): WireGuard re-arms its keepalive timer with the new interval only when a
        packet passes, so the one under way would still wait out the old one. Returns the
        peer as it is now (a handshake-now later in the same pass re-adds it as given)."""
        want = self.lowers(peer, live=live)
        if want is None or self.found is None:
            return peer
        try:
            await device.set_keepalive(peer.public_key, want)
        except (DeviceError, ChangeRefused) as error:
            log.warning("peer %s: setting persistent keepalive failed: %s", peer.public_key,
                        error)
            return peer
        log.info("peer %s: persistent keepalive %s -> %d s: %s", peer.public_key,
                 f"{peer.persistent_keepalive} s" if peer.persistent_keepalive else "off",
                 want, self.found.words(),
                 extra={"event": "keepalive_lowered", "peer": str(peer.public_key),
                        "keepalive_s": want})
        if live:
            await nudge(peer)
        return replace(peer, persistent_keepalive=want)
