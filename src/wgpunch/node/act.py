"""What a decision does: the agent's hands. decide.py says what to do about a peer, agent.py
reads and decides, and an `Actor` does it: it opens our NAT toward the peer, sends a
handshake or a path probe, moves a live session, or asks the registry for a punch. Requests
to the registry go in the background, so a slow registry holds up no pass.

An Actor holds what only acting needs: our listen port, whether raw openers work here (an
opener that fails turns them off for good), their TTL, the punch requests under way and the
background tasks. Everything else it reads is the agent's, passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Coroutine
from dataclasses import replace
from typing import Any

from ..errors import ApiError, ChangeRefused, DeviceError, DeviceNotFound
from ..keys import Key
from ..wg.device import Device
from ..wg.model import DeviceState, Endpoint, PeerState
from .decide import Decision, Kind, Memory, Reason
from .edges import Clock, Io
from .metrics import NodeMetrics
from .portmap.rule import holds_back
from .probe import tunnel_address
from .punch import OpenerTtl
from .source import Source
from .timings import Timings
from .track import Track
from .view import RegistryView

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


class Actor:
    def __init__(
        self,
        device: Device,
        client: Source,
        view: RegistryView,
        tracks: dict[Key, Track],  # the agent's: a punch request that fails notes its attempt
        io: Io,
        clock: Clock,
        t: Timings,
        keepalive_s: Callable[[], int],  # what outlasts our NAT's idle timeout (natidle.py)
        metrics: NodeMetrics,
        opener_ttl: int | None,
    ) -> None:
        self.device = device
        self.client = client
        self.view = view
        self.tracks = tracks
        self.io = io
        self.clock = clock
        self.t = t
        self.keepalive_s = keepalive_s
        self.metrics = metrics
        self.opener_ttl = OpenerTtl(opener_ttl, hops=io.opener_hops)
        self.listen_port = 0
        self.can_open = False  # whether raw openers work here: asked in start()
        self.punching: set[Key] = set()  # peers with a punch request under way
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, listen_port: int) -> None:
        self.listen_port = listen_port
        self.can_open = self.io.can_send_raw()

    # -- packets the agent sends itself (also for the tasks that follow the registry) --------

    async def probe_live_peers(self) -> None:
        try:
            state = await self.device.state()
        except (DeviceError, DeviceNotFound):
            return
        now = self.clock.wall()
        for peer in state.peers:
            address = tunnel_address(peer.allowed_ips)
            if peer.has_live_session(now, self.t.session_live_s) and address is not None:
                await self.io.probe(self.device.name, address)

    async def probe_peer(self, peer: PeerState) -> None:
        address = tunnel_address(peer.allowed_ips)
        if address is not None:
            await self.io.probe(self.device.name, address)

    async def open_nat(self, endpoint: Endpoint) -> None:
        if self.can_open:
            await self.io.open(self.listen_port, endpoint, await self.opener_ttl.get(endpoint))

    # -- one decision -----------------------------------------------------------------------

    async def act(self, peer: PeerState, d: Decision, mem: Memory, now: float) -> Memory:
        key = peer.public_key
        if d.live and mem.open_pending_since is not None:
            mem = replace(mem, open_pending_since=None)
        if d.kind is Kind.LEAVE:
            if d.reason is Reason.OPEN_AWAITS_REPORT:
                return replace(mem, open_pending_since=mem.open_pending_since or now)
            if d.reason is Reason.PEER_PUNCHING:
                return replace(mem, attempt_at=now)
            # Reason.MAPPED leaves the backoff clock alone: our own punch requests go on,
            # and count the rounds we hold back (portmap/rule.py).
            if d.reason is Reason.PEER_NOT_READY:
                return replace(mem, skipped=True)
            if d.reason is Reason.PROBE_ANSWERED:
                log.info("peer %s: registry reports %s, but the current path %s answers; "
                         "left alone", key, d.endpoint, peer.endpoint)
                return replace(mem, cleared_endpoint=d.endpoint, probe_at=None)
            if d.reason is Reason.AWAITING_OPENER and mem.awaiting_opener_since is None:
                return replace(mem, awaiting_opener_since=now)
            return mem
        if d.kind is Kind.REQUEST_PUNCH:
            return await self.request_punch(peer, d, mem, now)
        if d.kind in (Kind.HANDSHAKE, Kind.OPEN):
            if d.kind is Kind.HANDSHAKE or d.endpoint is None:
                await self.handshake(peer, d.endpoint)
            elif await self.io.open(self.listen_port, d.endpoint,
                                    await self.opener_ttl.get(d.endpoint)):
                for also in d.also:
                    await self.io.open(self.listen_port, also, await self.opener_ttl.get(also))
                self.metrics.opener_sent()
                self.background(self.say_opened(key))
            else:
                self.can_open = False  # decide() falls back to handshakes from now on
            return replace(
                mem, attempt_at=mem.attempt_at or now,
                attempt_endpoint=mem.attempt_endpoint or d.endpoint,
                attempts=max(mem.attempts, 1), first_attempt_at=mem.first_attempt_at or now,
                opened_at=now, opened_endpoint=d.endpoint, awaiting_opener_since=None,
                open_pending_since=None,
            )
        probe_to = tunnel_address(peer.allowed_ips)
        if d.kind is Kind.REPOINT and d.endpoint is not None:
            log.info("peer %s: path probe unanswered; moving from %s to %s", key,
                     peer.endpoint, d.endpoint,
                     extra={"event": "repoint", "peer": str(key), "to": str(d.endpoint)})
            with contextlib.suppress(ChangeRefused):
                await self.device.set_endpoint(key, d.endpoint)
        if probe_to is not None:
            await self.io.probe(self.device.name, probe_to)
        return replace(mem, probe_at=now, probe_rx_bytes=peer.rx_bytes, probe_endpoint=d.endpoint,
                       repointed=d.kind is Kind.REPOINT)

    async def request_punch(self, peer: PeerState, d: Decision, mem: Memory, now: float) -> Memory:
        if not self.view.has_reported:
            return mem  # see RegistryView: the request waits for our report (a few ms)
        mem = replace(mem, attempt_at=now, attempt_endpoint=d.endpoint, attempts=mem.attempts + 1,
                      skipped=False,
                      first_attempt_at=mem.first_attempt_at or now)
        self.metrics.punch_attempt(mem.attempts)
        if d.live:
            log.info("peer %s: we send but hear nothing, and a probe went unanswered; "
                     "asking the peer to send too (punch)", peer.public_key,
                     extra={"event": "stall", "peer": str(peer.public_key)})
        elif mem.attempts > 1:
            log.info("peer %s: no handshake with %s yet (attempt %d); punching again",
                     peer.public_key, d.endpoint, mem.attempts,
                     extra={"event": "punch_retry", "peer": str(peer.public_key)})
        if peer.public_key not in self.punching:
            # In the background: a slow registry (a lost SYN costs a second) must not hold up
            # the loop that notices handshakes and answers punch events.
            self.punching.add(peer.public_key)
            self.background(self.punch_or_go_alone(peer, d.endpoint))
        return mem

    async def punch_or_go_alone(self, peer: PeerState, endpoint: Endpoint | None) -> None:
        try:
            await self.client.punch(peer.public_key)
            self.metrics.punch_requested(ok=True)
        except ApiError as error:
            self.metrics.punch_requested(ok=False)
            # Without the registry's help, at least our side opens its NAT and tries (unless
            # the peer comes in through our mapping: then our sending would block it).
            log.debug("punch request for %s failed (%s); trying alone", peer.public_key, error)
            known = self.view.peers.get(peer.public_key)
            track = self.tracks.get(peer.public_key)
            attempts = track.memory.attempts if track is not None else 0
            if (known is not None and endpoint is not None and endpoint.ip.version == 4
                    and holds_back(self.view.mapped is not None, known, attempts)):
                return
            await self.handshake(peer, endpoint)
            track = self.tracks.get(peer.public_key)
            if track is not None:
                track.memory = replace(track.memory, opened_at=self.clock.monotonic(),
                                       opened_endpoint=endpoint)
        finally:
            self.punching.discard(peer.public_key)

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)  # a reference, so the task is not collected half-way
        task.add_done_callback(self.tasks.discard)

    async def say_opened(self, peer: Key) -> None:
        """Our opener toward `peer` is out: its initiation may go (decide.py)."""
        try:
            await self.client.opened(peer)
        except ApiError as error:  # it sends anyway after Timings.opener_wait_s
            log.debug("telling the registry our NAT is open for %s failed: %s", peer, error)

    async def handshake(self, peer: PeerState, endpoint: Endpoint | None) -> None:
        if endpoint is None:
            return
        keepalive = peer.persistent_keepalive or self.keepalive_s()
        # A session that looks live by age but was judged dead by silence may be replaced;
        # any handshake newer than the one we judged makes the device layer refuse.
        now = self.clock.wall()
        age = peer.handshake_age(now)
        live_s = (self.t.session_live_s if age is None
                  else max(0.0, min(age - 0.05, self.t.session_live_s)))
        try:
            await self.device.handshake_now(
                peer.public_key, endpoint, persistent_keepalive=keepalive, live_s=live_s,
                now=now,
            )
        except ChangeRefused as refused:
            log.debug("%s", refused)  # a handshake completed meanwhile: nothing to do
        except DeviceError as error:
            log.warning("peer %s: handshake-now to %s failed: %s", peer.public_key, endpoint,
                        error)

    # -- cron ---------------------------------------------------------------------------------

    async def handshake_all(self, state: DeviceState, skip: Collection[Key]) -> int:
        """Agent.run_once's pass: every peer not in `skip`, without a live session, whose
        endpoint the registry knows gets it through handshake-now. Returns how many peers
        failed (lookup or device)."""
        failures = 0
        now = self.clock.wall()
        for peer in state.peers:
            key = peer.public_key
            known = self.view.peers.get(key)
            if key in skip or peer.has_live_session(now, self.t.session_live_s):
                continue
            if known is None or known.endpoint is None:
                if self.client.lookup_failed(key):
                    log.warning("peer %s: lookup failed", key)
                    failures += 1
                continue
            try:
                await self.device.handshake_now(
                    key, known.endpoint,
                    persistent_keepalive=peer.persistent_keepalive or self.t.keepalive_s,
                    now=self.clock.wall())
                log.info("peer %s: endpoint %s set, handshake sent", key, known.endpoint)
            except (DeviceError, ChangeRefused) as error:
                log.warning("peer %s: %s", key, error)
                failures += 1
        return failures
