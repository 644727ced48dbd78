"""The node agent's view of the registry: its peers and what its watch stream said about
them (`RegistryView`), as follow.py applies the stream's events and agent.py reconciles the
device with it.

The view changes only in plain `def` methods, so no `await` can interleave with an update.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

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
    Snapshot,
    initiator,
    initiator_changed,
)
from ..wg.model import Endpoint, IPInterface
from .pathfile import RegistryHealth
from .portmap.rule import initiates_by_mapping

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


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
        # would ask for it anew, for nothing (and a relay older than the rule that a side
        # asked for again forwards until it moves, registry/relayslots.py, unbinds it: a
        # live pair lost pings after 7 of 29 lab restarts).
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
