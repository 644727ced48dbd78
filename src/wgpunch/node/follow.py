"""The node agent's side of the registry: its view of the peers as the watch stream tells them
(`RegistryView`), the task that follows the stream (`follow_registry`) and the one that reports
this node (`report_self`). agent.py reconciles the device with the view.

The view changes only in plain `def` methods, so no `await` can interleave with an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from .. import __version__
from ..errors import ApiError, DeviceError, MalformedMessage
from ..keys import Key
from ..protocol import (
    DirectEvent,
    Event,
    Heartbeat,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    RemovedEvent,
    Reported,
    Snapshot,
    initiator,
    initiator_changed,
)
from ..wg.device import Device
from ..wg.model import Endpoint, IPInterface
from .addresses import ipv6_endpoints
from .edges import Clock, Io
from .natprobe import NatWatch, own_addresses
from .pace import SHARED_READ_S
from .pathfile import RegistryHealth
from .portmap.rule import initiates_by_mapping
from .source import Source

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


@dataclass(frozen=True, slots=True)
class RegistryTimings:
    # A watch stream that failed is opened again after this long, doubled per failure (each
    # pause jittered by +-20 %, so that nodes do not reconnect in step), and back to the first
    # once a stream delivered again. Up to reconnect_fast_max_s while the registry has been
    # away for less than fast_for_s, so that a registry restarted at once (an upgrade, a
    # crash under systemd's Restart=) has its nodes back within about a second; then up to
    # reconnect_max_s, so that a registry gone for good is not asked every second by every
    # node. Our choices (before: up to 30 s at once, nodes followed a registry restarted
    # after 15 s 11.7-12.3 s after it served again; with 1 s here, p50 0.80 p95 0.98 s,
    # bench/time_to_direct.py registry-restart; goal 1 s). A node then connects twice a
    # second at most: a refused SYN, to a registry that is away.
    reconnect_first_s: float = 0.1
    reconnect_fast_max_s: float = 0.5
    fast_for_s: float = 60.0
    reconnect_max_s: float = 30.0
    # A registry away for less than this is a blip, logged at DEBUG; past it, each distinct
    # failure is one warning. Our choice: a restart of the registry's process takes about this.
    warn_after_s: float = 1.0
    # Re-report our candidates this often: addresses change (DHCP, roaming).
    report_every_s: float = 60.0
    # A report that failed is tried again this soon.
    report_retry_s: float = 2.0


class RegistryView:
    """The registry's peers and what its stream said about them, as the agent knows them."""

    def __init__(self) -> None:
        self.peers: dict[Key, PeerRecord] = {}
        self.epoch: str | None = None
        self.revision: int | None = None
        self.punched: set[Key] = set()  # peers with a punch event since their last tick
        self.opened: set[Key] = set()  # peers that said their NAT is open for our initiation
        # Who initiates, per peer, as the registry's last punch event for it said: the
        # registry decides (protocol/roles.py); before an event, the same rule locally.
        self.roles: dict[Key, bool] = {}
        # Peers whose initiator a NAT report changed since their last tick (take_flipped).
        self.flipped: set[Key] = set()
        self.wake = asyncio.Event()  # something changed: reconcile now
        self.reported = asyncio.Event()  # set when the registry needs our report again
        # Our own report reaches the registry only after our watch stream is open, and we ask
        # for punches only after our report: so a peer that sees us reported knows that we
        # follow punch events (decide(peer_ready=...)).
        self.stream_open = asyncio.Event()
        # The tunnel to the registry answers again after it was dead (registrylink.py): the
        # watch stream is opened anew at once, not after TCP's retransmission back-off.
        self.relink = asyncio.Event()
        self.has_reported = False
        self.health: RegistryHealth | None = None  # None until follow_registry starts
        self.connections = 0  # watch streams that delivered, since start
        self.local: tuple[IPInterface, ...] = ()  # our own addresses, as last reported
        # Relay slots the registry gave us, by peer: its relay events and answers (relay.py).
        self.relays: dict[Key, RelayEvent] = {}
        # After a restart (a new epoch), the slots the registry has yet to say it still holds
        # (None: no restart to confirm). It says so right after its snapshot, one relay event
        # per slot, and its next line ends the list (registry/state.py open_stream): a slot
        # not in it is dropped then, and not before, since an agent that saw a slot gone
        # would ask for it anew, which unbinds a live pair's side on a relay that kept it
        # through the restart (lab: pings lost in 3 of 23 restarts).
        self.unconfirmed: set[Key] | None = None
        # Relayed peers the registry says to reach directly now, and where (upgrade.py).
        self.directs: dict[Key, Endpoint] = {}
        self.mapped: Endpoint | None = None  # our port mapping on our NAT (node/portmap/)
        self.me: Key | None = None  # our key, once the device is read
        # With several registries, the one this view is of (node/registries.py): its own
        # changes are logged with its key, apart from the merged record the agent goes by.
        self.registry: Key | None = None
        # Set when the endpoint the registry observes for us changes (measure_nat).
        self.observed_changed = asyncio.Event()

    def own_endpoint(self) -> Endpoint | None:
        """Our WireGuard endpoint as the registry's interface observes it."""
        mine = None if self.me is None else self.peers.get(self.me)
        return None if mine is None else mine.endpoint

    def apply(self, event: Event) -> None:
        observed = self.own_endpoint()
        self._apply(event)
        slots_gone = self._end_confirming(event)
        if self.own_endpoint() != observed:
            self.observed_changed.set()  # a new mapping: our NAT is measured again
        # A heartbeat (every 2 s) changes nothing here, unless it ends a restarted registry's
        # list of slots; what its arrival says about the registry, `set_health` wakes the
        # agent for. A pass for nothing costs a device read.
        if not isinstance(event, Heartbeat) or slots_gone:
            self.wake.set()

    def _apply(self, event: Event) -> None:
        if isinstance(event, Snapshot):
            if self.epoch is not None and event.epoch != self.epoch:
                log.info("registry restarted (new epoch): resynced %d peers", len(event.peers))
                self.reported.set()
                self.unconfirmed = set(self.relays)
            self.epoch = event.epoch
            self.peers = {p.public_key: p for p in event.peers}
        elif isinstance(event, PeerEvent):
            old = self.peers.get(event.peer.public_key)
            if old is not None:
                self._note_flips(old, event.peer)
            if old is not None and old.endpoint != event.peer.endpoint:
                which = {} if self.registry is None else {"registry": str(self.registry)}
                log.info(
                    "registry%s: peer %s endpoint %s -> %s",
                    "" if self.registry is None else f" {self.registry}",
                    event.peer.public_key, old.endpoint, event.peer.endpoint,
                    extra={"event": "endpoint_changed", "peer": str(event.peer.public_key),
                           **which},
                )
            self.peers[event.peer.public_key] = event.peer
        elif isinstance(event, RemovedEvent):
            self.peers.pop(event.public_key, None)
            self.roles.pop(event.public_key, None)
        elif isinstance(event, PunchEvent):
            known = self.peers.get(event.peer)
            if known is not None:
                self.peers[event.peer] = replace(known, endpoint=event.endpoint)
            (self.opened if event.opened else self.punched).add(event.peer)
            self.roles[event.peer] = event.initiator
        elif isinstance(event, RelayEvent):
            self.relays[event.peer] = event
            if self.unconfirmed is not None:
                self.unconfirmed.discard(event.peer)
        elif isinstance(event, DirectEvent):
            self.directs[event.peer] = event.endpoint
        if isinstance(event, Snapshot | PeerEvent | RemovedEvent):
            self.revision = event.revision  # punches and heartbeats are not history

    def _end_confirming(self, event: Event) -> bool:
        """Whether `event` ended a restarted registry's list of the slots it still holds and
        some slot it left out went (with the old registry's relay)."""
        if self.unconfirmed is None or isinstance(event, Snapshot | RelayEvent):
            return False
        gone, self.unconfirmed = self.unconfirmed, None
        for peer in gone:
            self.relays.pop(peer, None)
        return bool(gone)

    def _note_flips(self, old: PeerRecord, new: PeerRecord) -> None:
        """A report (ours or a peer's) that changes who initiates a pair is a new punch
        (protocol.initiator_changed): the registry's last punch event decided the role
        without it (its next one will decide with it, and so does initiates() until then),
        and the agent punches again at once (take_flipped)."""
        mine = None if self.me is None else self.peers.get(self.me)
        if mine is None:
            return
        if new.public_key == self.me:
            pairs = [(old, p, new, p) for k, p in self.peers.items() if k != self.me]
        else:
            pairs = [(mine, old, mine, new)]
        for old_me, old_peer, new_me, new_peer in pairs:
            if initiator_changed(old_me, old_peer, new_me, new_peer):
                self.roles.pop(new_peer.public_key, None)
                self.flipped.add(new_peer.public_key)

    def take_flipped(self, peer: Key) -> bool:
        """Whether a report changed who initiates with `peer` since the last call for it."""
        flipped = peer in self.flipped
        self.flipped.discard(peer)
        return flipped

    def set_health(self, following: str, state: str, now_wall: float,
                   error: str | None = None) -> None:
        """Our link to the registry, for `wgpunch status`: `since` moves only when the state
        does, so a registry that keeps failing shows since when it has."""
        old = self.health
        since = old.since if old is not None and old.state == state else now_wall
        self.health = RegistryHealth(following, state, since, error)
        if self.health != old:
            self.wake.set()  # the agent publishes it

    def take_punched(self, peer: Key) -> bool:
        """Whether a punch event for `peer` came since the last call for it."""
        punched = peer in self.punched
        self.punched.discard(peer)
        return punched

    def take_opened(self, peer: Key) -> bool:
        """Whether `peer` said since the last call that its NAT is open for our initiation."""
        opened = peer in self.opened
        self.opened.discard(peer)
        return opened

    def allow_punches(self) -> None:
        """Our report has left (__init__ says why punch requests wait for it): it is sent on
        its own connection before any request, so the registry, and through its stream every
        peer, sees it first (a request overtaking it costs the peer one coalescing window)."""
        if not self.has_reported:
            self.has_reported = True
            self.wake.set()  # punch requests held back until now may go

    def set_mapped(self, mapped: Endpoint | None) -> None:
        """Our port mapping changed: the registry needs our report again."""
        if mapped != self.mapped:
            self.mapped = mapped
            self.reported.set()

    def initiates(self, me: Key | None, peer: PeerRecord) -> bool:
        """Whether we (`me`) send the first initiation to `peer`: the side that reaches the
        other's port mapping (portmap/rule.py); else what the registry's last punch event for
        it said; before any (and without a registry that coordinates), the protocol's rule
        applied to the records we have (ours is among them)."""
        by_mapping = initiates_by_mapping(self.mapped is not None, peer)
        if by_mapping is not None:
            return by_mapping
        role = self.roles.get(peer.public_key)
        if role is not None:
            return role
        if me is None:
            return False
        mine = self.peers.get(me)
        return initiator(me, peer.public_key, side_public=mine is not None and mine.public,
                         other_public=peer.public, side_nat=None if mine is None else mine.nat,
                         other_nat=peer.nat)


async def follow_registry(client: Source, view: RegistryView, t: RegistryTimings,
                          on_silence: Callable[[], Awaitable[None]], clock: Clock) -> None:
    """Follow `client`'s watch stream into `view`, forever, reconnecting with backoff from
    where it left off; `on_silence` runs whenever a stream that had worked ends."""
    delay = t.reconnect_first_s
    view.set_health(client.following, "connecting", clock.wall())
    lost_at = clock.monotonic()  # when we last stopped hearing from it
    warned: str | None = None  # the failure last logged as a warning, until it works again
    while True:
        heard = False
        view.relink.clear()
        try:
            async for event in until_set(client.watch(view.revision, view.epoch),
                                          view.relink):
                if not heard:
                    view.connections += 1
                    log.info("%s", client.following, extra={"event": "registry_connected"})
                    view.set_health(client.following, "following", clock.wall())
                delay, heard, warned = t.reconnect_first_s, True, None
                lost_at = clock.monotonic()
                view.apply(event)
                view.stream_open.set()
        except ApiError as error:
            # A blip (the first quick retries) is no warning, nor is the same failure again
            # (retries come every second for a while): `status` says how long it has lasted.
            loud = clock.monotonic() - lost_at >= t.warn_after_s and str(error) != warned
            log.log(logging.WARNING if loud else logging.DEBUG, "%s", error)
            warned = str(error) if loud else warned
            never = not heard and view.health is not None and view.health.state == "connecting"
            view.set_health(client.following, "connecting" if never else "unreachable",
                            clock.wall(), str(error))
            view.wake.set()  # the agent publishes the change
        if heard:
            # A stream that worked and went silent: our own NAT may have lost its state
            # (reboot, flush), which blocks every peer's packets to us as well. Sending
            # is what reopens it.
            await on_silence()
        if view.relink.is_set():
            delay = t.reconnect_first_s
            continue
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # backoff, not sync
        away_s = clock.monotonic() - lost_at
        delay = min(delay * 2, t.reconnect_fast_max_s if away_s < t.fast_for_s
                    else t.reconnect_max_s)


async def measure_nat(view: RegistryView, nat: NatWatch, device: Device, io: Io,
                      observer: RegistryView | None = None) -> None:
    """Measure our NAT (node/natprobe.py) whenever the registry observes a new endpoint for
    us, and have the report carry the result. `observer`: the view of the registry the NAT
    is measured toward, when that is not `view` (several registries, registries.py: each
    may see another of our NAT's ports). Beside the report, not before it: the filtering
    test waits for replies that may never come (0.6 s behind most NATs), and the registry
    observes our endpoint only after our first handshake with it (about a second into a lab
    run), so waiting for both would delay every first punch by a second or more (bench
    easy: p50 1.46 s, against 0.05 s). Until the measurement is in, the registry decides who
    initiates without it, as for a node older than the measurement."""
    while True:
        again_in = nat.again_in()
        seen = observer or view
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(again_in):
                await seen.observed_changed.wait()
        again = not seen.observed_changed.is_set()
        seen.observed_changed.clear()
        observed = seen.own_endpoint()
        if observed is None:
            continue
        try:
            state = await device.state()
            interfaces = await io.local_addresses(device.name)
        except DeviceError as error:
            log.debug("NAT measurement skipped: %s", error)
            continue
        before = nat.measured
        await nat.current(state.listen_port, observed, own_addresses(i.ip for i in interfaces),
                          again=again)
        if nat.measured is not before:
            view.reported.set()


async def until_set(stream: AsyncIterator[Event], stop: asyncio.Event
                    ) -> AsyncIterator[Event]:
    """`stream`'s events until it ends or `stop` is set; then an ApiError, as for a stream
    that broke (the caller opens a new one)."""
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[Event] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(stream))
            await asyncio.wait((following, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                raise ApiError("registry: the tunnel to it works again: watching anew")
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stopped.cancel()
        if following is not None and not following.done():
            following.cancel()
            # asyncio.wait, not `await following`: a cancellation of our own that arrives
            # meanwhile must propagate, not be taken for the stream's.
            await asyncio.wait((following,))
        if following is not None and not following.cancelled():
            following.exception()  # retrieved: the stream is dropped either way
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def report_self(client: Source, view: RegistryView, device: Device, io: Io,
                      t: RegistryTimings, nat: NatWatch | None = None) -> None:
    """Report this node (listen port, addresses, version, port mapping, and the NAT behaviour
    `nat` measured last) once the watch stream is open, then every report_every_s, and at once
    when the registry needs it again (a new epoch, a new port mapping, a new NAT
    measurement)."""
    while True:
        sent = view.mapped
        sent_nat = None if nat is None else nat.measured
        try:
            # Only the listen port: at start the agent's own read of a moment ago does.
            state = await device.state(fresh_s=SHARED_READ_S)
            interfaces = await io.local_addresses(device.name)
            view.local = tuple(interfaces)
            # Read while the watch stream opens, sent once it is open (RegistryView says why
            # it waits): the reads would otherwise delay every first punch (bench easy p50
            # 0.054-0.055 s with them after the stream, 0.049 s before it).
            await view.stream_open.wait()
            sent = view.mapped  # made meanwhile, most often: PCP answers within ms
            sent_nat = None if nat is None else nat.measured
            report = asyncio.ensure_future(client.report_self(
                Reported(state.listen_port, tuple(i.ip for i in interfaces), __version__,
                         sent, nat=None if sent_nat is None else sent_nat.behaviour,
                         ipv6=ipv6_endpoints(interfaces, state.listen_port))
            ))
            await asyncio.sleep(0)  # the report is on its way before any punch request
            view.allow_punches()
            await report
            log.debug("reported listen port %d and %d addresses", state.listen_port,
                      len(interfaces))
            wait = t.report_every_s
        except (ApiError, DeviceError, MalformedMessage) as error:
            log.debug("report to the registry failed: %s", error)
            wait = t.report_retry_s
        view.allow_punches()  # a report that fails must not stop our punches
        view.reported.clear()
        # A mapping or a NAT measurement that changed meanwhile is reported at once.
        if view.mapped != sent or (nat is not None and nat.measured is not sent_nat):
            view.reported.set()
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: see reconcile_forever
            async with asyncio.timeout(wait):
                await view.reported.wait()
