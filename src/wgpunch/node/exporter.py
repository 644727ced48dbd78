"""The node agent's metrics for Prometheus: metrics.py's events counted in a registry of this
agent's own, plus each peer's path and the registry link, read from the agent at each scrape.
Imported only with `--metrics-listen` (prometheus_client costs ~80 ms of start-up). Every name
is listed in docs/metrics.md.

A peer is labelled with the first 8 characters of its public key in base64 (as `wg` prints
it), more only if two peers of the interface share them: one series per peer, whose `path`
label is the path it has now, so a node exports as many series as it has peers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..keys import Key
from .candidates import PathKind
from .metrics import NodeMetrics

if TYPE_CHECKING:
    from .agent import Agent

# The lab's easy pair goes direct in ~0.05 s, with 30 ms uplinks in ~0.5 s, under loss
# WireGuard's 5 s retry shows (README "Measured").
TIME_TO_DIRECT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REGISTRY_STATES = ("connecting", "following", "unreachable")  # pathfile.RegistryHealth
SHORT_KEY = 8


class NodeExporter(NodeMetrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._retries = Counter(
            "wgpunch_node_punch_retries", "Punch attempts at a peer after the first since "
            "its last live session", registry=self.registry)
        self._requests = Counter(
            "wgpunch_node_punch_requests", "Punch requests sent to the registry, by result",
            ["result"], registry=self.registry)
        for result in ("accepted", "failed"):
            self._requests.labels(result)
        self._openers = Counter(
            "wgpunch_node_openers", "Datagrams sent to open our NAT toward a peer",
            registry=self.registry)
        self._time_to_direct = Histogram(
            "wgpunch_node_time_to_direct_seconds", "From the first attempt at a peer to its "
            "live session, by the path it came up on", ["path"],
            buckets=TIME_TO_DIRECT_BUCKETS, registry=self.registry)

    def watch_agent(self, agent: Agent) -> None:
        """Export `agent`'s paths and registry link at each scrape."""
        self.registry.register(_AgentState(agent))

    def punch_attempt(self, attempt: int) -> None:
        if attempt > 1:
            self._retries.inc()

    def punch_requested(self, ok: bool) -> None:
        self._requests.labels("accepted" if ok else "failed").inc()

    def opener_sent(self) -> None:
        self._openers.inc()

    def connected(self, path: str, seconds: float | None) -> None:
        if seconds is not None:
            self._time_to_direct.labels(path).observe(seconds)


class _AgentState(Collector):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        paths = {key: track.path for key, track in self._agent.tracks.items()}
        per_peer = GaugeMetricFamily("wgpunch_node_peer_path",
                                     "1 for each peer, labelled with its path now",
                                     labels=["peer", "path"])
        for key, short in short_keys(paths).items():
            per_peer.add_metric([short, str(paths[key])], 1)
        yield per_peer
        by_path = GaugeMetricFamily("wgpunch_node_peers", "Peers by their path now",
                                    labels=["path"])
        for kind in PathKind:
            by_path.add_metric([str(kind)], sum(1 for path in paths.values() if path is kind))
        yield by_path
        view = self._agent.view
        yield CounterMetricFamily(
            "wgpunch_node_registry_reconnects", "Watch streams that delivered after the first",
            value=max(0, view.connections - 1))
        health = view.health
        if health is None:
            return
        state = GaugeMetricFamily("wgpunch_node_registry_state",
                                  "1 for the state of the link to the registry now",
                                  labels=["state"])
        for name in REGISTRY_STATES:
            state.add_metric([name], 1 if health.state == name else 0)
        yield state
        if health.since is not None:
            yield GaugeMetricFamily("wgpunch_node_registry_state_since_timestamp_seconds",
                                    "Unix time the link to the registry entered its state",
                                    value=health.since)


def short_keys(keys: Iterable[Key]) -> dict[Key, str]:
    """Each key's shortest base64 prefix of SHORT_KEY characters or more that no other key
    here shares (whole keys when only the last character differs)."""
    texts = {key: key.base64() for key in keys}
    for length in range(SHORT_KEY, 44):
        prefixes = {key: text[:length] for key, text in texts.items()}
        if len(set(prefixes.values())) == len(prefixes):
            return prefixes
    return texts
