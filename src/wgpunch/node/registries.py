"""One interface that follows several registries (DESIGN.md §11, issue 18): each is an
ordinary WireGuard peer of the interface with its own tunnel address and API, and they share
no state. `Registries` is the agent's `Source` for all of them at once.

Each registry is a `Member`: its own watch stream (follow.py's `follow_registry` into its own
`RegistryView`), its own tunnel kept alive (registrylink.py), and its own copy of our report.
What the agent sees is one stream merged from them: per peer, the record `newest()` picks
(the one rule, merge.py), and every punch and relay event as it comes. Requests about a pair
(punch, opened, relay) go to a registry that lists both sides, as it is following: so losing
one registry changes nothing for pairs that share another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
    Coroutine,
    Iterable,
    Sequence,
)
from dataclasses import replace
from typing import Any, TypeVar

from ..errors import ApiError
from ..keys import Key
from ..protocol import (
    Event,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    RemovedEvent,
    Reported,
    Snapshot,
)
from ..wg.device import Device
from ..wg.model import Endpoint
from .edges import Clock, Io
from .follow import RegistryTimings, follow_registry
from .merge import Heard, newest, same
from .pathfile import RegistryHealth
from .registrylink import LinkTimings, keep_link
from .source import Source
from .view import RegistryView

T = TypeVar("T")

log = logging.getLogger("wgpunch.node.agent")  # one logger for the agent, whichever module


# -- the members -----------------------------------------------------------------------------


Changed = Callable[[Event | None, dict[Key, PeerRecord | None]], None]


class MemberView(RegistryView):
    """A member's own view: as RegistryView, and the merge hears of every change, with the
    records it touched as they were before (None: not listed)."""

    def __init__(self, registry: Key, changed: Changed) -> None:
        super().__init__()
        self.registry = registry
        self._changed = changed

    def apply(self, event: Event) -> None:
        touched: Iterable[Key]
        if isinstance(event, Snapshot):
            touched = {*self.peers, *(p.public_key for p in event.peers)}
        elif isinstance(event, PeerEvent):
            touched = (event.peer.public_key,)
        elif isinstance(event, RemovedEvent):
            touched = (event.public_key,)
        elif isinstance(event, PunchEvent):  # it carries the peer's current endpoint
            touched = (event.peer,)
        else:
            touched = ()
        before = {key: self.peers.get(key) for key in touched}
        super().apply(event)
        self._changed(event, before)

    def set_health(self, following: str, state: str, now_wall: float,
                   error: str | None = None) -> None:
        was = None if self.health is None else self.health.state
        super().set_health(following, state, now_wall, error)
        if state != was:  # every record it lists ranks anew
            self._changed(None, dict(self.peers))


class Member:
    def __init__(self, key: Key, client: Source,
                 changed: Callable[[Member, Event | None, dict[Key, PeerRecord | None]], None]
                 ) -> None:
        self.key = key
        self.client = client
        self.view = MemberView(key, lambda event, before: changed(self, event, before))
        self.heard_at: dict[Key, float] = {}  # per peer: Heard.changed_at
        self.last_event: float | None = None  # wall time of its last stream item
        self.report_sent: Reported | None = None  # the report it has from us; None: owed

    @property
    def following(self) -> bool:
        return self.view.health is not None and self.view.health.state == "following"

    def lists(self, *keys: Key) -> bool:
        return all(key in self.view.peers for key in keys)


# -- the merged source -----------------------------------------------------------------------


class Registries:
    """Several registries as one `Source`; `run()` follows them (the agent starts it)."""

    coordinates_punches = True

    def __init__(self, device: Device, clients: Sequence[tuple[Key, Source]], clock: Clock
                 ) -> None:
        self.device = device
        self.clock = clock
        self.members = [Member(key, client, self._changed) for key, client in clients]
        self.keys = frozenset(m.key for m in self.members)
        self.epoch = os.urandom(8).hex()  # of the merged stream: ours alone; unique, not secret
        self.revision = 0
        self.current: dict[Key, PeerRecord] = {}
        self.punched_by: dict[Key, Member] = {}  # who sent the last punch event, by peer
        self.relayed_by: dict[Key, Member] = {}  # whose slot a peer's relay offer is
        self._queue: asyncio.Queue[Event] | None = None  # the merged stream's, while watched
        self._ready = asyncio.Event()  # a member has delivered its first snapshot
        self._view: RegistryView | None = None  # the agent's, once run() starts
        self._retry_s = RegistryTimings().report_retry_s
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def following(self) -> str:
        return f"registries {', '.join(str(m.key) for m in self.members)}: following each"

    def view_of(self, key: Key) -> RegistryView | None:
        """What the registry `key` alone says."""
        return next((m.view for m in self.members if m.key == key), None)

    def health(self) -> tuple[RegistryHealth, ...]:
        """Each registry's link, for `wgpunch status`."""
        return tuple(
            replace(m.view.health, public_key=m.key.base64(), last_event=m.last_event)
            for m in self.members if m.view.health is not None)

    async def run(self, view: RegistryView, io: Io, on_silence: Callable[[], Awaitable[None]],
                  open_nat: Callable[[Endpoint], Awaitable[None]], t: RegistryTimings,
                  link_t: LinkTimings | None) -> None:
        """Follow every member and keep each one's tunnel, forever. `view` is the agent's:
        a registry that needs our report again has the agent report."""
        self._view, self._retry_s = view, t.report_retry_s

        async def no_openers(endpoint: Endpoint) -> None:
            del endpoint  # one member's heartbeats carry the openers (registrylink.py)

        async with asyncio.TaskGroup() as group:
            for index, member in enumerate(self.members):
                member.view.me = view.me
                group.create_task(follow_registry(member.client, member.view, t, on_silence,
                                                  self.clock))
                if link_t is not None:
                    group.create_task(keep_link(
                        self.device, member.key, io, self.clock, on_silence,
                        member.view.relink.set, open_nat if index == 0 else no_openers,
                        link_t, others=self.keys))

    # -- what the members' streams say -------------------------------------------------------

    def _changed(self, member: Member, event: Event | None,
                 before: dict[Key, PeerRecord | None]) -> None:
        """A member applied `event` (None: its stream went up or down), which touched the
        records in `before`: merge them."""
        now = self.clock.monotonic()
        if event is not None:
            member.last_event = self.clock.wall()
        if member.view.reported.is_set():  # it restarted (a new epoch): it lost our report
            member.view.reported.clear()
            member.report_sent = None
        if event is None and not member.following:
            # Away: its relay may be gone with it, and a slot that is not answered again
            # would be retried only through it. Dropped, a relayed session that still sends
            # there asks for a new slot at once, through a registry that follows (relay.py).
            self._drop_slots(member)
        else:  # those it no longer holds (a restart: RegistryView.unconfirmed)
            self._drop_slots(member, keep=member.view.relays)
        for key, old in before.items():
            record = member.view.peers.get(key)
            if record is None:
                member.heard_at.pop(key, None)
            elif not same(old, record):
                member.heard_at[key] = now
        for key in sorted(before, key=lambda k: k.raw):
            self._merge(key)
        if isinstance(event, PunchEvent):
            self.punched_by[event.peer] = member
            self._emit(event)
        elif isinstance(event, RelayEvent):
            self._background(self._offer(member, event))
        if event is None and self._view is not None and self._view.health is not None:
            self._summarise(self._view)
        if member.view.revision is not None:
            self._ready.set()
        if member.following and member.report_sent is None and self._view is not None:
            self._view.reported.set()  # the agent reports, and this member gets it

    def _drop_slots(self, member: Member, keep: Container[Key] = ()) -> None:
        for peer in [p for p, m in self.relayed_by.items() if m is member and p not in keep]:
            del self.relayed_by[peer]
            if self._view is not None:
                self._view.relays.pop(peer, None)
                self._view.wake.set()

    def _summarise(self, view: RegistryView) -> None:
        """The agent's one link to "the registries" (the merged stream, which never breaks
        by itself): following while any one is; else the first one's failure."""
        up = any(m.following for m in self.members)
        error = next((m.view.health.error for m in self.members
                      if m.view.health is not None and m.view.health.error), None)
        view.set_health(self.following, "following" if up else "unreachable",
                        self.clock.wall(), None if up else error)
        view.wake.set()  # the agent publishes it

    def _merge(self, key: Key) -> None:
        merged = newest(Heard(m.view.peers[key], m.following, m.heard_at.get(key, 0.0))
                        for m in self.members if key in m.view.peers)
        old = self.current.get(key)
        if same(old, merged):
            return
        self.revision += 1
        if merged is None:
            del self.current[key]
            self._emit(RemovedEvent(self.revision, key))
            return
        merged = replace(merged, revision=self.revision)
        self.current[key] = merged
        self._emit(PeerEvent(self.revision, merged))

    def _emit(self, event: Event) -> None:
        if self._queue is not None:
            self._queue.put_nowait(event)

    async def _offer(self, member: Member, event: RelayEvent) -> None:
        """A member's relay event: the slot's address, where the event leaves it to our
        device's endpoint of that registry, filled in (the agent's own rule knows one)."""
        offer = await self._filled(member, event)
        if offer is not None:
            self.relayed_by[event.peer] = member
            self._emit(offer)

    async def _filled(self, member: Member, event: RelayEvent) -> RelayEvent | None:
        if event.address is not None:
            return event
        peer = (await self.device.state()).peer(member.key)
        if peer is None or peer.endpoint is None:
            return None
        return replace(event, address=peer.endpoint.ip)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # a reference, so the task is not collected half-way
        task.add_done_callback(self._tasks.discard)

    # -- the Source protocol -----------------------------------------------------------------

    async def watch(self, since: int | None, epoch: str | None) -> AsyncIterator[Event]:
        """The merged stream: a snapshot of the merged records once any member has sent
        one, then each change to them and every punch and relay event. `since` and `epoch`
        do not matter: the snapshot is whole each time."""
        del since, epoch
        await self._ready.wait()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queue = queue
        try:
            yield Snapshot(self.epoch, self.revision, tuple(self.current.values()))
            while True:
                yield await queue.get()
        finally:
            if self._queue is queue:
                self._queue = None

    async def snapshot(self) -> Snapshot:
        """Every member's snapshot, merged (for `--once`): an ApiError only if none
        answers."""
        answers = await asyncio.gather(*(m.client.snapshot() for m in self.members),
                                       return_exceptions=True)
        now = self.clock.monotonic()
        heard: dict[Key, list[Heard]] = {}
        for answer in answers:
            if isinstance(answer, ApiError):
                log.warning("%s", answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                for record in answer.peers:
                    heard.setdefault(record.public_key, []).append(Heard(record, True, now))
        if all(isinstance(a, BaseException) for a in answers):
            raise ApiError("registries: none answered")
        peers = tuple(merged for h in heard.values() if (merged := newest(h)) is not None)
        return Snapshot(self.epoch, self.revision, peers)

    def _for_pair(self, peer: Key, first: Member | None = None) -> list[Member]:
        """The members to ask about `peer`, best first: those that list both of us, while
        following; the one that sent the pair's last punch event first, then those where
        the peer has reported (it follows their streams)."""
        me = self._view.me if self._view is not None else None
        shared = [m for m in self.members
                  if m.following and m.lists(peer) and (me is None or m.lists(me))]
        shared.sort(key=lambda m: (m is not first, m.view.peers[peer].reported is None))
        return shared

    async def _ask(self, peer: Key, what: str, call: Callable[[Source], Awaitable[T]],
                   first: Member | None = None) -> tuple[Member, T]:
        error: ApiError | None = None
        for member in self._for_pair(peer, first):
            try:
                return member, await call(member.client)
            except ApiError as failed:
                log.debug("%s for %s via %s failed: %s", what, peer, member.key, failed)
                error = failed
        raise error or ApiError(f"registries: none that is following lists both us and {peer}")

    async def punch(self, peer: Key) -> None:
        await self._ask(peer, "punch", lambda client: client.punch(peer))

    async def opened(self, peer: Key) -> None:
        await self._ask(peer, "opened", lambda client: client.opened(peer),
                        self.punched_by.get(peer))

    async def relay(self, peer: Key) -> RelayEvent:
        member, offer = await self._ask(peer, "relay", lambda client: client.relay(peer))
        filled = await self._filled(member, offer)
        if filled is None:
            raise ApiError(f"registry {member.key}: a relay slot, but no endpoint of it here")
        self.relayed_by[peer] = member
        member.view.relays[peer] = offer  # held there as its relay events are
        return filled

    async def direct(self, peer: Key, endpoint: Endpoint, peer_endpoint: Endpoint) -> None:
        """To the registry that gave the pair's slot first: it pauses the slot."""
        await self._ask(peer, "direct",
                        lambda client: client.direct(peer, endpoint, peer_endpoint),
                        self.relayed_by.get(peer))

    async def report_self(self, report: Reported) -> None:
        """Our report to every member that is following and does not have it yet; one that
        fails is tried again soon. An ApiError only if every one asked failed."""
        owed = [m for m in self.members if m.following and m.report_sent != report]
        results = await asyncio.gather(*(m.client.report_self(report) for m in owed),
                                       return_exceptions=True)
        failed: list[ApiError] = []
        for member, result in zip(owed, results, strict=True):
            if isinstance(result, ApiError):
                failed.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                member.report_sent = report
        # Failed, or came up while this went out (the agent's nudge was lost with it).
        if self._view is not None and any(m.following and m.report_sent != report
                                          for m in self.members):
            asyncio.get_running_loop().call_later(self._retry_s, self._view.reported.set)
        if failed and len(failed) == len(owed):
            raise failed[0]

    def lookup_failed(self, peer: Key) -> bool:
        return False  # a failed request raises; there are no per-peer lookups

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for member in self.members:
            await member.client.close()
