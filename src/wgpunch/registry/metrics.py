"""What the registry counts: one method per event, called once where the event happens
(api.py, clientlog.py, observer.py), on one object per daemon that is passed in.

This class counts nothing. It is what a registry without `--metrics-listen` runs with, so a
hook costs a method call and prometheus_client is never imported; exporter.py counts the same
events for Prometheus (docs/metrics.md names every metric). What the registry keeps anyway
(the peer table, the streams, the DNS server's counts) is read when scraped, through
`watch_*`, instead of being counted twice.

Room for the relay: it keeps its own counts (as the DNS server does) and, once started, calls
`watch_relay(read)` with a function that returns them as `RelayCounts`; each scrape then
exports `wgpunch_registry_relay_*` from what `read()` says. It needs no prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RelayCounts:
    """The relay's state and totals since start, as a scrape sees them."""

    slots: int  # allocated now
    kernel_slots: int  # of those, forwarded by the kernel (nftables) now
    # Since start, by path: "userspace" or "kernel".
    packets: Mapping[str, int] = field(default_factory=dict)
    bytes: Mapping[str, int] = field(default_factory=dict)
    # Packets not forwarded, since start, by reason (a short fixed word, e.g. "unbound").
    dropped: Mapping[str, int] = field(default_factory=dict)


class DnsCounts(Protocol):
    """What the DNS-SD server (dnsserver.py) counts itself."""

    @property
    def counts(self) -> Mapping[str, int]:
        """Queries, refusals, malformed packets, ...: DnsServer's own names."""

    @property
    def rcodes(self) -> Mapping[str, int]:
        """Answers sent, by rcode name (NOERROR, NXDOMAIN, ...)."""

    @property
    def connections(self) -> int:
        """Connections over TCP open now."""


class RegistryMetrics:
    def api_response(self, route: str, status: int) -> None:
        """The API answered a request on `route` (its pattern, or "other") with `status`."""

    def client_event(self, event: str) -> None:
        """The API refused, limited or cut off a client: the client log's event name."""

    def punch(self, pushed: bool) -> None:
        """A punch request was accepted: pushed to both sides, or coalesced with an earlier."""

    def observer_poll(self, seconds: float, ok: bool) -> None:
        """One of the observer's device reads took `seconds`; `ok`: it read the device."""

    def watch_dns(self, dns: DnsCounts) -> None:
        """Export the DNS-SD server's counts at each scrape."""

    def watch_relay(self, read: Callable[[], RelayCounts]) -> None:
        """Export what `read()` returns at each scrape (module docstring)."""
