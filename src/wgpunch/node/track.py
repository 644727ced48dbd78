"""One peer as the agent follows it: its decision memory, and the path it shows `wgpunch
status` (pathfile.py), with the log lines for a path that begins or ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..protocol import PeerRecord, has_mapping
from ..wg.model import PeerState
from . import pathfile
from .candidates import PathKind
from .decide import Decision, Memory, Reason
from .metrics import NodeMetrics

if TYPE_CHECKING:
    from .quiet import Settled

log = logging.getLogger(__name__)


@dataclass
class Track:
    memory: Memory = field(default_factory=Memory)
    path: PathKind = PathKind.NONE
    since: float | None = None  # wall time of the last path change
    reason: str = ""
    settled: Settled | None = None  # what its last full pass read, if it settled (quiet.py)
    _shown: tuple[tuple[object, ...], pathfile.PeerPath] | None = field(
        default=None, repr=False, compare=False)

    def note(self, peer: PeerState, d: Decision, now_wall: float, now: float,
             metrics: NodeMetrics) -> None:
        """Take this tick's decision into the path (and the attempt counters it resets)."""
        if d.live and self.path is PathKind.NONE:
            took = None if self.memory.first_attempt_at is None else (
                now - self.memory.first_attempt_at)
            log.info(
                "peer %s connected: %s via %s%s", peer.public_key, d.path, peer.endpoint,
                "" if took is None else f", time-to-direct {took:.3f} s",
                extra={"event": "connected", "peer": str(peer.public_key), "path": str(d.path),
                       "endpoint": str(peer.endpoint), "time_to_direct_s": took},
            )
            metrics.connected(d.path, took)
            self.path, self.since = d.path, now_wall
            self.memory = replace(self.memory, attempts=0, attempt_at=None,
                                  attempt_endpoint=None, first_attempt_at=None,
                                  awaiting_opener_since=None)
        elif d.reason in (Reason.LIVE, Reason.ROAMED) and self.memory.attempts:
            self.memory = replace(self.memory, attempts=0, attempt_at=None)
        elif not d.live and self.path is not PathKind.NONE:
            log.info("peer %s: session lost (%s)", peer.public_key, d.reason,
                     extra={"event": "disconnected", "peer": str(peer.public_key)})
            self.path, self.since = PathKind.NONE, now_wall
        elif d.live and d.path is not self.path:
            log.info("peer %s: path %s -> %s via %s", peer.public_key, self.path, d.path,
                     peer.endpoint, extra={"event": "path_changed", "peer": str(peer.public_key),
                                           "path": str(d.path), "previous": str(self.path),
                                           "endpoint": str(peer.endpoint)})
            self.path, self.since = d.path, now_wall
        self.reason = d.reason.value

    def published(self, known: PeerRecord | None) -> pathfile.PeerPath:
        """What `wgpunch status` shows; `known`: the registry's record of the peer. The same
        object while nothing it shows changed: the agent compares every peer's each pass."""
        shown = (known, self.path, self.since, self.reason)
        if self._shown is None or self._shown[0] != shown:
            self._shown = shown, self._published(known)
        return self._shown[1]

    def _published(self, known: PeerRecord | None) -> pathfile.PeerPath:
        return pathfile.PeerPath(
            path=self.path,
            since=self.since, reason=self.reason,
            endpoint=None if known is None or known.endpoint is None else str(known.endpoint),
            nat=None if known is None or known.nat is None else known.nat.to_json(),
            mapped=known is not None and has_mapping(known),
        )
