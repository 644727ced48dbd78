"""The node agent: the only loop that acts. Read the device and the registry, `decide()` per
peer, apply (act.py), repeat; wake at once when the registry's watch stream says something
changed (follow.py follows it and reports this node).

Peers the registry does not know, and the registry peer itself, are never touched; no peer is
added or removed, except by the managed mesh (mesh.py) when the agent is given one. The clock
and every packet the agent sends itself (openers, probes) go through `Clock` and `Io`
(edges.py), so tests run the real agent in process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, DeviceError, DeviceNotFound
from ..keys import Key
from ..protocol import has_mapping, relay_reason
from ..protocol.kickwire import PORT as KICK_PORT
from ..wg.device import Device
from ..wg.model import DeviceState, Endpoint
from . import pathfile
from .act import Actor
from .candidates import CandidateKind, PathKind, candidates_of
from .decide import Kind, Reason, decide, failover, path_is_dead
from .edges import Clock, Io, SystemClock, SystemIo
from .follow import RegistryTimings, follow_registry, measure_nat, report_self
from .kick import follow_kicks, open_socket
from .metrics import NodeMetrics
from .natidle import IdleProbe, IdleTimings, IdleWatch, probe_idle
from .natprobe import Channel, NatWatch, RawChannel
from .pace import SHARED_READ_S, next_pass
from .portmap.rule import holds_back
from .quiet import Quiet
from .registries import Registries
from .registrylink import LinkTimings, keep_link
from .relay import Relays, RelayTimings
from .source import Source
from .timings import Timings
from .track import Track
from .upgrade import Upgrades, UpgradeTimings
from .upgradelink import ProbeChannel, RawProbeChannel
from .view import RegistryView

if TYPE_CHECKING:
    from .mesh import Mesh  # only with --mesh (node/serve.py)
    from .portmap.mapper import Mapping, PortmapTimings  # only with --portmap (run)

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        device: Device,
        registry: Key | None,
        client: Source,
        *,
        timings: Timings | None = None,
        state_dir: Path = pathfile.STATE_DIR,
        opener_ttl: int | None = None,
        registry_timings: RegistryTimings | None = None,
        relay_timings: RelayTimings | None = None,
        clock: Clock | None = None,
        io: Io | None = None,
        mesh: Mesh | None = None,
        natprobe_port: int | None = None,
        nat_channel: Channel | None = None,
        metrics: NodeMetrics | None = None,
        portmap: bool = False,
        portmap_timings: PortmapTimings | None = None,
        registry_link: LinkTimings | None = None,  # None: no heartbeats (registrylink.py)
        kick_port: int | None = KICK_PORT,  # with registry_link; None: no kicks (kick.py)
        upgrade_channel: ProbeChannel | None = None,  # None: raw sockets, unless `io` is given
        upgrade_timings: UpgradeTimings | None = None,
        idle_probe: IdleProbe = probe_idle,
        idle_timings: IdleTimings | None = None,
    ) -> None:
        self.device = device
        self.registry_key = registry
        self.client = client
        # Several registries (registries.py): one merged source; none of them is steered.
        self.registries = client if isinstance(client, Registries) else None
        self.registry_keys = (self.registries.keys if self.registries is not None
                              else frozenset(() if registry is None else (registry,)))
        self.t = timings or Timings()
        self.registry_t = registry_timings or RegistryTimings()
        self.state_dir = state_dir
        self.link_t = registry_link
        self.kick_port = kick_port
        self.clock: Clock = clock or SystemClock()
        self.io: Io = io or SystemIo()
        self.mesh = mesh
        self.metrics = metrics or NodeMetrics()
        self.me: Key | None = None
        self.view = RegistryView()
        self.tracks: dict[Key, Track] = {}
        self.relays = Relays(client, self.view.relays, self.view.wake.set, relay_timings)
        self.upgrades = Upgrades(
            upgrade_channel or (RawProbeChannel() if io is None else None), client, device,
            self.io, self.clock, self.view.directs, self.view.relays, self.view.wake.set,
            upgrade_timings, self.t)
        self._published: pathfile.Published | None = None
        self._device_failing = False
        self.portmap = portmap  # keep our listen port mapped on our NAT (node/portmap/)
        self.portmap_t = portmap_timings
        self.natprobe_port = natprobe_port  # the registry's NAT probe port; None: no probing
        self.nat_channel = nat_channel
        self.nat: NatWatch | None = None
        # How long our NAT keeps an idle mapping, and the keepalive that outlasts it.
        self.idle = IdleWatch(idle_probe, idle_timings or IdleTimings(), self.t.keepalive_s,
                              self.view.wake.set)
        self.actor = Actor(device, client, self.view, self.tracks, self.io, self.clock, self.t,
                           self.idle.keepalive_s, self.metrics, opener_ttl)
        self.quiet = Quiet(self.view, self.relays, self.upgrades, self.idle, self.t,
                           lambda: self.actor.can_open)

    # -- tasks ------------------------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        while True:
            recheck = await self.reconcile()
            await next_pass(self.view.wake, self.device, recheck, self.t.idle_recheck_s)
            self.view.wake.clear()

    async def run(self) -> None:
        # serve.py read the device a moment ago, to build this agent: one read for both.
        state = await self.device.state(fresh_s=SHARED_READ_S)
        if state.public_key is None:
            raise ConfigError(f"node: {state.name} has no private key configured")
        self.me = self.view.me = state.public_key
        self.actor.start(state.listen_port)
        if self.client.coordinates_punches:
            self.upgrades.start(self.me, state.listen_port, lambda key: key in self.view.peers)
        # With several registries, the TTL and our NAT are measured toward the first given.
        order = ([m.key for m in self.registries.members] if self.registries is not None
                 else [] if self.registry_key is None else [self.registry_key])
        registry = next((p for key in order
                         if (p := state.peer(key)) is not None and p.endpoint is not None), None)
        if self.actor.can_open and registry is not None and registry.endpoint is not None:
            self.actor.opener_ttl.measure(registry.endpoint.ip)
        probe_port = None
        if (self.natprobe_port and self.client.coordinates_punches and registry is not None
                and registry.endpoint is not None):
            probe_port = Endpoint(registry.endpoint.ip, self.natprobe_port)
            self.nat = NatWatch(self.nat_channel or RawChannel(), probe_port)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(follow_registry(self.client, self.view, self.registry_t,
                                                  self.actor.probe_live_peers, self.clock))
                group.create_task(self.report())
                if self.registries is not None:
                    group.create_task(self.registries.run(
                        self.view, self.io, self.actor.probe_live_peers, self.actor.open_nat,
                        self.registry_t, self.link_t))
                if self.nat is not None:
                    group.create_task(measure_nat(
                        self.view, self.nat, self.device, self.io,
                        None if self.registries is None or registry is None
                        else self.registries.view_of(registry.public_key)))
                if probe_port is not None:
                    group.create_task(self.idle.watch(probe_port))
                group.create_task(self.reconcile_forever())
                if self.portmap:
                    group.create_task(self.keep_mapped())
                if self.link_t is not None and self.registry_key is not None:
                    group.create_task(keep_link(self.device, self.registry_key, self.io,
                                                self.clock, self.actor.probe_live_peers,
                                                self.view.relink.set, self.actor.open_nat,
                                                self.link_t))
                    own = state.peer(self.registry_key)
                    # Without the socket, TCP's own retries as before.
                    kicks = (None if self.kick_port is None or own is None
                             else open_socket(self.device.name, self.kick_port))
                    if kicks is not None and own is not None:
                        group.create_task(follow_kicks(kicks, self.view, own.allowed_ips))
        finally:
            self.upgrades.close()
            pathfile.remove(self.device.name, self.state_dir)

    async def report(self) -> None:
        # A peer takes our report as "follows punch events for me": with a mesh, only true
        # once the mesh has put the registry's peers on the device (a collision NAT then
        # never connected: the peer's initiation came before our opener).
        if self.mesh is not None:
            await self.mesh.synced.wait()
        await report_self(self.client, self.view, self.device, self.io, self.registry_t,
                          self.nat)

    async def keep_mapped(self) -> None:
        # Imported here: an agent without --portmap loads none of the mapper's 6 modules and
        # miniupnpc (bench/startup.py).
        from .portmap.mapper import PortmapTimings, keep_mapped

        await keep_mapped(self.actor.listen_port, self.mapping_changed,
                          self.portmap_t or PortmapTimings())

    def mapping_changed(self, mapping: Mapping | None) -> None:
        self.view.set_mapped(None if mapping is None else mapping.external)

    async def run_once(self) -> int:
        """One pass, for cron: every peer without a live session whose endpoint the registry
        knows gets it through handshake-now. Returns how many peers failed (lookup or
        device); a live session is left alone, as always."""
        state = await self.device.state()
        self.view.apply(await self.client.snapshot())
        return await self.actor.handshake_all(await self.sync_mesh(state), self.registry_keys)

    # -- one pass ---------------------------------------------------------------------------

    async def reconcile(self) -> float:
        try:
            state = await self.device.state(fresh_s=SHARED_READ_S)
        except (DeviceError, DeviceNotFound) as error:  # gone: wg-quick down/up, a restart
            if not self._device_failing:
                log.error("reading %s failed: %s", self.device.name, error)
            self._device_failing = True
            return self.t.idle_recheck_s
        if self._device_failing:
            log.info("reading %s works again", self.device.name)
            self._device_failing = False
        state = await self.sync_mesh(state)
        now_wall, now = self.clock.wall(), self.clock.monotonic()
        recheck = self.t.idle_recheck_s
        registry = None if self.registry_key is None else state.peer(self.registry_key)
        self.relays.registry = None if registry is None else registry.endpoint
        for read, known, track, inputs in self.quiet.due(state.peers, self.tracks,
                                                         self.registry_keys, now, now_wall):
            peer = await self.idle.keep_open(
                self.device, read, nudge=self.actor.probe_peer,
                live=read.has_live_session(now_wall, self.t.session_live_s))
            punched = self.view.take_punched(peer.public_key)
            memory = track.memory.observe(peer.rx_bytes, peer.tx_bytes, now)
            # Without punch events (DNS-SD, natpunch) no peer reports: each counts as ready.
            ready = not self.client.coordinates_punches or known.reported is not None
            if ready != (memory.unready_since is None):
                memory = replace(memory, unready_since=None if ready else now)
            candidates = (*candidates_of(known, self.view.peers.get(self.me) if self.me else None,
                                         self.view.local), *self.upgrades.found(peer.public_key))
            live = not path_is_dead(peer, memory, now_wall, now, self.t)
            mine = self.view.peers.get(self.me) if self.me else None
            nats = (None if mine is None else mine.nat, known.nat)
            # IPv6 on both sides goes around the NATs, as a port mapping does.
            impossible = None if any(c.kind is CandidateKind.IPV6 for c in candidates) else (
                relay_reason(*nats, mapped=self.view.mapped is not None or has_mapping(known)))
            candidates, memory = self.relays.plan(
                peer.public_key, candidates, memory, live=live, current=peer.endpoint, now=now,
                impossible=impossible, stalled=memory.stalled(now, self.t),
                nats_known=all(n is not None and n.mapping != "unknown" for n in nats))
            memory = failover(memory, candidates, now=now, t=self.t, live=live)
            initiator = self.view.initiates(self.me, known)
            if self.view.take_flipped(peer.public_key) and not live:
                # protocol.initiator_changed: the attempts so far went the wrong way.
                log.info("peer %s: we %s initiate now (a NAT report came in): punching again",
                         peer.public_key, "do" if initiator else "no longer")
                memory = replace(memory, attempt_at=None)
            decision = decide(
                peer, candidates, memory,
                initiator=initiator,
                punched=punched, opened=self.view.take_opened(peer.public_key),
                can_open=self.actor.can_open, peer_ready=ready,
                now_wall=now_wall, now=now, t=self.t,
            )
            if (decision.kind in (Kind.OPEN, Kind.HANDSHAKE)
                    and not self.relays.is_slot(peer.public_key, decision.endpoint)
                    # Our IPv4 mapping does not let the peer in over IPv6: we open as usual.
                    and decision.endpoint is not None and decision.endpoint.ip.version == 4
                    and holds_back(self.view.mapped is not None, known, memory.attempts)):
                decision = replace(decision, kind=Kind.LEAVE, reason=Reason.MAPPED)
            if decision.live and self.relays.is_slot(peer.public_key, peer.endpoint):
                # Also on the slot it leaves, which is no candidate any more.
                decision = replace(decision, path=PathKind.RELAY)
            track.memory = await self.actor.act(peer, decision, memory, now)
            track.note(peer, decision, now_wall, now, self.metrics)
            self.relays.annotate(peer.public_key, track)
            lease = self.relays.leases.get(peer.public_key)
            peer_recheck = min(decision.recheck_s, await self.upgrades.step(
                peer, track, known, mine, candidates, None if lease is None else lease.endpoint,
                now))
            self.quiet.settle(read, known, track, inputs, decision, peer_recheck, now, now_wall)
            recheck = min(recheck, peer_recheck)
        self.publish(state, now_wall)
        return recheck

    async def sync_mesh(self, state: DeviceState) -> DeviceState:
        if self.mesh is None or self.view.revision is None:  # never before a snapshot
            return state
        state = await self.mesh.sync(self.device, state, {
            key: record.allowed_ips for key, record in self.view.peers.items()})
        for gone in [k for k in self.tracks if state.peer(k) is None]:
            del self.tracks[gone]  # in place: the actor holds the same dict
        return state

    def publish(self, state: DeviceState, now_wall: float) -> None:
        published = pathfile.Published(
            {key.base64(): track.published(self.view.peers.get(key))
             for key, track in self.tracks.items()}, self.view.health,
            None if self.nat is None or self.nat.measured is None
            else self.nat.measured.behaviour.to_json(), self.view.mapped is not None,
            () if self.registries is None else self.registries.health())
        if published != self._published:
            try:
                pathfile.write(state.name, published.peers, self.state_dir,
                               published.registry, published.nat, published.mapped,
                               published.registries)
                self._published = published
            except OSError as error:
                log.warning("cannot write %s: %s", pathfile.path_file(state.name), error)
