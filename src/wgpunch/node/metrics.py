"""What the node agent counts: one method per event, called once where the event happens
(act.py, track.py), on one object per agent that is passed in.

This class counts nothing. It is what an agent without `--metrics-listen` runs with, so a hook
costs a method call and prometheus_client is never imported; exporter.py counts the same
events for Prometheus and reads each peer's path and the registry link from the agent when
scraped (docs/metrics.md names every metric).
"""

from __future__ import annotations


class NodeMetrics:
    def punch_attempt(self, attempt: int) -> None:
        """The agent tries a peer again: `attempt` since its last live session (1: first)."""

    def punch_requested(self, ok: bool) -> None:
        """A punch request reached the registry (`ok`) or failed."""

    def opener_sent(self) -> None:
        """A datagram left to open our NAT toward a peer."""

    def connected(self, path: str, seconds: float | None) -> None:
        """A peer's session came up on `path`, `seconds` after the first attempt (None: we
        made none, the peer did)."""
