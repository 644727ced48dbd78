"""The registry's metrics for Prometheus: metrics.py's events counted in a registry of this
daemon's own, plus what the peer table, the DNS-SD server and the relay hold, read at each
scrape. Imported only with `--metrics-listen` (prometheus_client costs ~80 ms of start-up).
Every name is listed in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .metrics import DnsCounts, RegistryMetrics, RelayCounts
from .state import RegistryState

# A poll of a small device takes about a millisecond, of 10,000 peers ~50 ms (bench/dns.py);
# past a second the poll interval is stretched (observer.py).
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# DnsServer.counts of queries that got no answer, as `reason` labels.
DNS_UNANSWERED = {"refused": "refused", "malformed": "malformed", "ignored": "ignored",
                  "dropped": "send_buffer_full"}
DNS_TCP_REFUSED = {"tcp_refused": "server_full", "tcp_client_full": "client_full"}


class RegistryExporter(RegistryMetrics):
    def __init__(self, state: RegistryState) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._tables = _Tables(state)
        self.registry.register(self._tables)
        self._api = Counter(
            "wgpunch_registry_api_requests", "API requests answered, by route and status",
            ["route", "status"], registry=self.registry)
        self._client_events = Counter(
            "wgpunch_registry_client_events",
            "Clients refused, limited or cut off by the API, by event (docs/events.md)",
            ["event"], registry=self.registry)
        self._punches = Counter(
            "wgpunch_registry_punches", "Punch requests accepted: pushed to both sides, or "
            "coalesced with one pushed less than the coalescing window ago", ["result"],
            registry=self.registry)
        for result in ("pushed", "coalesced"):
            self._punches.labels(result)
        self._poll = Histogram(
            "wgpunch_registry_observer_poll_seconds", "How long one read of the device took",
            buckets=POLL_BUCKETS, registry=self.registry)
        self._read_failures = Counter(
            "wgpunch_registry_device_read_failures", "Reads of the device that failed",
            registry=self.registry)
        self._readable = Gauge(
            "wgpunch_registry_device_readable",
            "1 if the observer's last read of the device worked, else 0", registry=self.registry)

    def api_response(self, route: str, status: int) -> None:
        self._api.labels(route, str(status)).inc()

    def client_event(self, event: str) -> None:
        self._client_events.labels(event).inc()

    def punch(self, pushed: bool) -> None:
        self._punches.labels("pushed" if pushed else "coalesced").inc()

    def observer_poll(self, seconds: float, ok: bool) -> None:
        self._poll.observe(seconds)
        self._readable.set(1 if ok else 0)
        if not ok:
            self._read_failures.inc()

    def watch_dns(self, dns: DnsCounts) -> None:
        self._tables.dns = dns

    def watch_relay(self, read: Callable[[], RelayCounts]) -> None:
        self._tables.relay = read


class _Tables(Collector):
    """What the registry holds anyway, read when scraped."""

    def __init__(self, state: RegistryState) -> None:
        self._state = state
        self.dns: DnsCounts | None = None
        self.relay: Callable[[], RelayCounts] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        peers = self._state.peers
        yield GaugeMetricFamily("wgpunch_registry_peers", "Peers of the registry's device",
                                value=len(peers))
        yield GaugeMetricFamily(
            "wgpunch_registry_peers_reported", "Peers whose node agent reported itself",
            value=sum(1 for record in peers.values() if record.reported is not None))
        yield GaugeMetricFamily("wgpunch_registry_watch_streams", "Watch streams open",
                                value=self._state.stream_count)
        if self.dns is not None:
            yield from _dns(self.dns)
        if self.relay is not None:
            yield from _relay(self.relay())


def _dns(dns: DnsCounts) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    answered = CounterMetricFamily("wgpunch_registry_dns_queries",
                                   "DNS-SD queries answered, by rcode", labels=["rcode"])
    for rcode, count in sorted(dns.rcodes.items()):
        answered.add_metric([rcode], count)
    yield answered
    unanswered = CounterMetricFamily(
        "wgpunch_registry_dns_unanswered", "DNS-SD messages not answered, by reason",
        labels=["reason"])
    for key, reason in DNS_UNANSWERED.items():
        unanswered.add_metric([reason], dns.counts[key])
    yield unanswered
    yield CounterMetricFamily("wgpunch_registry_dns_errors",
                              "Internal errors answering a DNS-SD query",
                              value=dns.counts["errors"])
    yield GaugeMetricFamily("wgpunch_registry_dns_tcp_connections",
                            "DNS-SD connections over TCP open", value=dns.connections)
    tcp_refused = CounterMetricFamily(
        "wgpunch_registry_dns_tcp_refused", "DNS-SD TCP connections closed at once for a limit",
        labels=["reason"])
    for key, reason in DNS_TCP_REFUSED.items():
        tcp_refused.add_metric([reason], dns.counts[key])
    yield tcp_refused


def _relay(counts: RelayCounts) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield GaugeMetricFamily("wgpunch_registry_relay_slots", "Relay slots allocated",
                            value=counts.slots)
    yield GaugeMetricFamily("wgpunch_registry_relay_kernel_slots",
                            "Relay slots forwarded by the kernel", value=counts.kernel_slots)
    for name, what, values, label in (
            ("packets", "Packets relayed, by path", counts.packets, "path"),
            ("bytes", "Bytes relayed, by path", counts.bytes, "path"),
            ("dropped", "Packets the relay did not forward, by reason", counts.dropped,
             "reason")):
        family = CounterMetricFamily(f"wgpunch_registry_relay_{name}", what, labels=[label])
        for value, count in sorted(values.items()):
            family.add_metric([value], count)
        yield family
