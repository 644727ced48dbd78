"""The registry's peer table, its change history and the watch streams it feeds.

Every mutation is a plain `def` (asyncio's "Locked" rule, STYLE.md): nothing can interleave
with it, so a watch stream opened between two changes sees exactly the changes after its
starting point, no more, no less.

Revisions: each change that peers must hear about (a peer added, removed, its endpoint, allowed
IPs or report changed) takes the next revision and is appended to a bounded history, so a
reconnecting stream resumes from its last revision. A change of `latest_handshake` alone is
not such a change: WireGuard re-handshakes every 2 minutes per active peer, which would flood
every stream with events that tell a node nothing to act on; the record is updated in place
(same revision) and shows in snapshots and `/v1/peers`. The epoch, random per start, tells a
node that revisions started over.

Fan-out: each change is encoded once, as the NDJSON line every stream sends (and the history
keeps it so), whatever the number of streams; each stream has one bounded queue of lines. A
stream that cannot keep up is closed (its client reconnects and resumes from history), so one
slow reader never holds up the others.

Two revisions: `revision` moves with every change; `roster_revision` only when a peer appears,
goes or changes its allowed IPs, the only changes that alter who a source address is
(auth.Identities). A report or a new endpoint leaves it, so callers are not looked up afresh
after each change (an index of 10,000 peers takes 12-18 ms to build).
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from itertools import islice
from types import MappingProxyType

from ..errors import RequestRefused
from ..keys import Key
from ..protocol import (
    Change,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RemovedEvent,
    Reported,
    Snapshot,
    StreamItem,
    heartbeat_json,
    initiates,
    initiator_changed,
    item_json,
    ndjson_line,
)
from ..wg.model import Endpoint, IPNetwork, PeerState
from .punch import Coalescer
from .stream import Stream
from .timings import Timings

log = logging.getLogger(__name__)

# Our choice: a node that reconnects within a few hundred changes resumes without a snapshot;
# a record is a few hundred bytes, so the history stays around a megabyte.
HISTORY_MAX = 4096
# Our choice: far more than one poll can produce for a normal mesh; a reader this far behind is
# better served by reconnecting (and resuming) than by the registry buffering for it.
STREAM_QUEUE_MAX = 256
# Our choice: a stream opened within this long of another, at the same revision, starts with
# the same encoded snapshot. After a registry restart every node asks for one at once, and at
# 10,000 peers each costs ~0.2 s of CPU to encode (bench/registry_scale.py); what may be
# older than the revision is only `latest_handshake`, which moves without one anyway.
SNAPSHOT_REUSE_S = 1.0


def _canonical(nets: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """Allowed IPs in one order, so a device listing them differently is not a change."""
    if len(nets) < 2:  # most peers (a node's /32): nothing to sort, and polls see each often
        return tuple(nets)
    return tuple(sorted(set(nets), key=lambda n: (n.version, int(n.network_address),
                                                   n.prefixlen)))


def _ips(nets: Iterable[IPNetwork]) -> str:
    return ",".join(str(n) for n in nets) or "(none)"


def encode(item: StreamItem) -> bytes:
    """The watch-stream line of `item` (docs/api.md)."""
    return ndjson_line(item_json(item))


class RegistryState:
    def __init__(
        self,
        *,
        epoch: str | None = None,
        history_max: int = HISTORY_MAX,
        stream_queue_max: int = STREAM_QUEUE_MAX,
        punch_window_s: float | None = None,  # None: Timings().punch_coalesce_s
    ) -> None:
        self.epoch = epoch if epoch is not None else secrets.token_hex(8)
        self.revision = 0
        self.roster_revision = 0
        self._records: dict[Key, PeerRecord] = {}
        self._history: deque[tuple[Change, bytes]] = deque(maxlen=history_max)
        self._heartbeat = (-1, b"")  # (revision, its heartbeat line)
        self._snapshot = (-1, 0.0, b"")  # (revision, when, its line): see SNAPSHOT_REUSE_S
        self._streams: set[Stream] = set()
        self._by_caller: dict[Key, list[Stream]] = {}  # the same streams, for pushes
        self._stream_queue_max = stream_queue_max
        self._punches = Coalescer(
            Timings().punch_coalesce_s if punch_window_s is None else punch_window_s)
        # The registry's own device, for the DNS-SD `self` record (dnsserver.py). Not a change
        # peers hear about: no revision. None / 0 until the first device read.
        self.device_key: Key | None = None
        self.listen_port = 0
        # The relay slots a node holds, as the relay events a stream of its opens with
        # (relayroute.py sets it): pushed events are no history, and a node whose stream was
        # down when its peer asked for their slot (a registry restart) would otherwise keep
        # sending to a slot that is gone.
        self.standing: Callable[[Key], Iterable[StreamItem]] | None = None
        # Called with a node and the revision of the change when the endpoint the registry
        # observes for it moves from one to another (kick.py sets it): its NAT mapped it anew
        # or it roamed, and what its streams sent meanwhile may sit in TCP's back-off.
        self.on_moved: Callable[[Key, int], None] | None = None

    # -- reading ------------------------------------------------------------------------------

    @property
    def peers(self) -> Mapping[Key, PeerRecord]:
        return MappingProxyType(self._records)

    def sorted_peers(self) -> tuple[PeerRecord, ...]:
        return tuple(sorted(self._records.values(), key=lambda r: r.public_key.raw))

    def snapshot(self) -> Snapshot:
        return Snapshot(self.epoch, self.revision, self.sorted_peers())

    def changes_since(self, since: int | None, epoch: str | None) -> list[Change] | None:
        """The changes after `since`, or None when only a snapshot can bring a client up to
        date: no `since`, another epoch (or none given), `since` ahead of us, or too old."""
        backlog = self._backlog(since, epoch)
        return None if backlog is None else [change for change, _line in backlog]

    def heartbeat_line(self) -> bytes:
        """The heartbeat line at the current revision (encoded once per revision)."""
        if self._heartbeat[0] != self.revision:
            self._heartbeat = (self.revision, ndjson_line(heartbeat_json(self.revision)))
        return self._heartbeat[1]

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def streams_of(self, caller: Key) -> tuple[Stream, ...]:
        return tuple(self._by_caller.get(caller, ()))

    # -- changing (plain def: no await inside) ------------------------------------------------

    def observe(self, device_peers: Iterable[PeerState]) -> list[Change]:
        """Bring the table in line with a complete device read; returns the changes published."""
        current = {peer.public_key: peer for peer in device_peers}
        return self.observe_changes(current.values(),
                                    [key for key in self._records if key not in current])

    def observe_changes(self, changed: Iterable[PeerState], removed: Iterable[Key]
                        ) -> list[Change]:
        """Apply part of a device read: the peers in `changed` may be new or differ, those in
        `removed` are gone, every other peer is as it was. Returns the changes published.
        The observer calls this with what `Device.changes` found, so a poll of a large
        device that changed little costs little here too."""
        changes: list[Change] = []
        for peer in changed:
            key = peer.public_key
            allowed = _canonical(peer.allowed_ips)
            old = self._records.get(key)
            if old is None:
                self.roster_revision += 1
                changes.append(self._commit(PeerRecord(
                    key, allowed, peer.endpoint, peer.latest_handshake, None, 0)))
                log.info("peer %s appeared: endpoint %s, allowed IPs %s", key,
                         peer.endpoint or "(none)", _ips(allowed),
                         extra={"event": "peer_appeared", "peer": str(key),
                                "endpoint": str(peer.endpoint or "")})
            elif old.endpoint != peer.endpoint or old.allowed_ips != allowed:
                self.roster_revision += old.allowed_ips != allowed
                changes.append(self._commit(replace(
                    old, allowed_ips=allowed, endpoint=peer.endpoint,
                    latest_handshake=peer.latest_handshake)))
                self._log_change(old, peer.endpoint, allowed)
                if (self.on_moved is not None and old.endpoint is not None
                        and peer.endpoint is not None and old.endpoint != peer.endpoint):
                    self.on_moved(key, self.revision)
            elif old.latest_handshake != peer.latest_handshake:
                self._records[key] = replace(old, latest_handshake=peer.latest_handshake)
        for key in removed:
            if self._records.pop(key, None) is None:
                continue
            self.roster_revision += 1
            self.revision += 1
            changes.append(self._publish(RemovedEvent(self.revision, key)))
            log.info("peer %s removed", key, extra={"event": "peer_removed", "peer": str(key)})
        return changes

    def observe_device(self, public_key: Key | None, listen_port: int) -> None:
        """Remember the registry's own key and WireGuard listen port (from a device read)."""
        self.device_key, self.listen_port = public_key, listen_port

    def report(self, key: Key, reported: Reported) -> int:
        """Record what node `key` says about itself; returns the registry's revision."""
        old = self._records.get(key)
        if old is None:
            raise RequestRefused(f"peer {key} is no longer a peer of the registry", 403)
        if old.reported == reported:
            log.debug("node %s reported itself again, unchanged", key)
            return self.revision
        new = replace(old, reported=reported)
        for partner in self._punches.partners(key):
            other = self._records.get(partner)
            if other is not None and initiator_changed(old, other, new, other):
                self._punches.forget(key, partner)
        self._commit(new)
        log.info("node %s reported itself: listen port %d, local addresses %s, version %r, "
                 "%s", key, reported.listen_port,
                 ",".join(map(str, reported.local_addresses)) or "(none)", reported.version,
                 "NAT not reported" if reported.nat is None else reported.nat.words(),
                 extra={"event": "node_reported", "peer": str(key)})
        return self.revision

    def request_punch(self, caller: Key, target: Key, now: float) -> tuple[Endpoint, bool]:
        """Push a punch event to both sides' streams, unless this pair was punched less than
        the coalescing window ago. Returns the target's endpoint and whether it was pushed."""
        me, other = self.pair_with_endpoints(caller, target, "punch")
        assert me.endpoint is not None and other.endpoint is not None
        if not self._punches.admit(caller, target, now):
            log.debug("punch %s <-> %s coalesced", caller, target)
            return other.endpoint, False
        first = initiates(me, other)
        reached_caller = self.push(caller, PunchEvent(self.revision, target, other.endpoint,
                                                       first))
        reached_target = self.push(target, PunchEvent(self.revision, caller, me.endpoint,
                                                        not first))
        if not (reached_caller and reached_target):
            # A side without a stream missed this push (typically a node just starting):
            # its own request, which will follow, must push again rather than be coalesced.
            self._punches.forget(caller, target)
        log.info("punch requested %s <-> %s (%s <-> %s)", caller, target, me.endpoint,
                 other.endpoint, extra={"event": "punch", "peer": str(caller),
                                        "target": str(target)})
        return other.endpoint, True

    def opened(self, caller: Key, target: Key) -> bool:
        """`caller` opened its NAT toward `target` for a punch: tell `target`, if it is the
        pair's initiator, that its initiation may go (DESIGN.md §3: an initiation reaching a
        NAT before that NAT's own opener left it may meet a router that keeps the state of
        the unsolicited packet, and then never connects). Whether it was pushed."""
        me, other = self.pair_with_endpoints(caller, target, "punch")
        # Only toward the initiator: nobody can make a side initiate that should not.
        if not initiates(other, me):
            return False
        assert me.endpoint is not None
        return self.push(target, PunchEvent(self.revision, caller, me.endpoint, True,
                                            opened=True))

    def pair_with_endpoints(self, caller: Key, target: Key, what: str
                            ) -> tuple[PeerRecord, PeerRecord]:
        """Both records of a pair that a punch or a relay slot is asked for, each with an
        observed endpoint; else the refusal (docs/api.md)."""
        if caller == target:
            raise RequestRefused(f"{what}: a node cannot {what} itself", 400)
        me, other = self._records.get(caller), self._records.get(target)
        if other is None:
            raise RequestRefused(f"{what}: no peer {target}", 404)
        if me is None:
            raise RequestRefused(f"peer {caller} is no longer a peer of the registry", 403)
        if me.endpoint is None:
            raise RequestRefused(f"{what}: the registry observes no endpoint for you ({caller})",
                                 409)
        if other.endpoint is None:
            raise RequestRefused(f"{what}: the registry observes no endpoint for {target}", 409)
        return me, other

    def open_stream(
        self, caller: Key, since: int | None, epoch: str | None, *, now: float,
        address: str | None = None,
    ) -> tuple[Stream, list[bytes]]:
        """A new stream for `caller` and the lines it starts with: the changes after `since`,
        or a snapshot, then the relay slots it holds (`standing`). Atomic, so no change falls
        between the two. To a node that knew another epoch (we restarted), a heartbeat
        follows: the list of slots is whole, and a slot its agent holds that the list leaves
        out is gone (node/view.py RegistryView.unconfirmed)."""
        backlog = self._backlog(since, epoch)
        first = ([self._snapshot_line(now)] if backlog is None
                 else [line for _change, line in backlog])
        if self.standing is not None:
            first += [encode(item) for item in self.standing(caller)]
        if epoch is not None and epoch != self.epoch:
            first.append(self.heartbeat_line())
        stream = Stream(caller, self._stream_queue_max, address)
        self._streams.add(stream)
        self._by_caller.setdefault(caller, []).append(stream)
        return stream, first

    def close_stream(self, stream: Stream) -> None:
        stream.close()
        self._forget(stream)

    def close_streams(self) -> None:
        """End every stream (shutdown)."""
        for stream in list(self._streams):
            self.close_stream(stream)

    # -- internals ----------------------------------------------------------------------------

    def _backlog(self, since: int | None, epoch: str | None
                 ) -> list[tuple[Change, bytes]] | None:
        """`changes_since`, with each change's line."""
        if since is None or epoch != self.epoch or since > self.revision:
            return None
        if since == self.revision:
            return []
        oldest = self._history[0][0].revision if self._history else self.revision + 1
        if since < oldest - 1:
            return None
        # Revisions in the history are consecutive, so the position follows from the number.
        return list(islice(self._history, since - oldest + 1, None))

    def _snapshot_line(self, now: float) -> bytes:
        revision, when, line = self._snapshot
        if revision != self.revision or not 0 <= now - when < SNAPSHOT_REUSE_S:
            line = encode(self.snapshot())
            self._snapshot = (self.revision, now, line)
        return line

    def _forget(self, stream: Stream) -> None:
        if stream not in self._streams:
            return
        self._streams.discard(stream)
        held = self._by_caller[stream.caller]
        held.remove(stream)
        if not held:
            del self._by_caller[stream.caller]

    @staticmethod
    def _log_change(old: PeerRecord, endpoint: Endpoint | None,
                    allowed: tuple[IPNetwork, ...]) -> None:
        key = old.public_key
        if old.endpoint != endpoint:
            log.info("peer %s changed endpoint: %s -> %s", key, old.endpoint or "(none)",
                     endpoint or "(none)",
                     extra={"event": "peer_endpoint", "peer": str(key),
                            "endpoint": str(endpoint or ""), "previous": str(old.endpoint or "")})
        if old.allowed_ips != allowed:
            log.info("peer %s changed allowed IPs: %s -> %s", key, _ips(old.allowed_ips),
                     _ips(allowed), extra={"event": "peer_allowed_ips", "peer": str(key)})

    def _commit(self, record: PeerRecord) -> PeerEvent:
        self.revision += 1
        record = replace(record, revision=self.revision)
        self._records[record.public_key] = record
        event = PeerEvent(self.revision, record)
        self._publish(event)
        return event

    def _publish(self, change: Change) -> Change:
        line = encode(change)  # once, for every stream and the history
        self._history.append((change, line))
        for stream in list(self._streams):
            self._offer(stream, line)
        return change

    def push(self, key: Key, item: StreamItem) -> bool:
        """Offer `item` to every stream of `key`; False when `key` has no stream."""
        streams = list(self._by_caller.get(key, ()))
        line = encode(item)
        for stream in streams:
            self._offer(stream, line)
        return bool(streams)

    def _offer(self, stream: Stream, line: bytes) -> None:
        stream.offer(line)
        if stream.overflowed:
            self._forget(stream)
            log.warning("watch stream of %s closed: it fell %d events behind", stream.caller,
                        self._stream_queue_max,
                        extra={"event": "stream_overflow", "peer": str(stream.caller)})
