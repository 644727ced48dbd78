"""One peer as the agent follows it: its decision memory, and the path it shows `wgpunch
status` (pathfile.py), with the log lines for a path that begins or ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from ..protocol import PeerRecord
from ..wg.device import PeerState
from . import pathfile
from .decide import Decision, Memory, Reason

log = logging.getLogger(__name__)


@dataclass
class Track:
    memory: Memory = field(default_factory=Memory)
    connected: bool = False
    since: float | None = None  # wall time of the last path change
    reason: str = ""

    def note(self, peer: PeerState, d: Decision, now_wall: float, now: float) -> None:
        """Take this tick's decision into the path (and the attempt counters it resets)."""
        if d.live and not self.connected:
            took = None if self.memory.first_attempt_at is None else (
                now - self.memory.first_attempt_at)
            log.info(
                "peer %s connected: direct via %s%s", peer.public_key, peer.endpoint,
                "" if took is None else f", time-to-direct {took:.3f} s",
                extra={"event": "connected", "peer": str(peer.public_key), "path": "direct",
                       "endpoint": str(peer.endpoint), "time_to_direct_s": took},
            )
            self.connected, self.since = True, now_wall
            self.memory = replace(self.memory, attempts=0, attempt_at=None,
                                  attempt_endpoint=None, first_attempt_at=None)
        elif d.reason in (Reason.LIVE, Reason.ROAMED) and self.memory.attempts:
            self.memory = replace(self.memory, attempts=0, attempt_at=None)
        elif not d.live and self.connected:
            log.info("peer %s: session lost (%s)", peer.public_key, d.reason,
                     extra={"event": "disconnected", "peer": str(peer.public_key)})
            self.connected, self.since = False, now_wall
        self.reason = d.reason.value

    def path(self, known: PeerRecord | None) -> pathfile.PeerPath:
        """What `wgpunch status` shows; `known`: the registry's record of the peer."""
        return pathfile.PeerPath(
            path=pathfile.PathKind.DIRECT if self.connected else pathfile.PathKind.NONE,
            since=self.since, reason=self.reason,
            endpoint=None if known is None or known.endpoint is None else str(known.endpoint),
        )
