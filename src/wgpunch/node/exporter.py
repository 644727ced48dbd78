"""The node agent's metrics for Prometheus: metrics.py's events counted in a registry of this
agent's own, plus each peer's path and the registry link, read from the agent at each scrape.
Imported only with `--metrics-listen` (prometheus_client costs ~80 ms of start-up). Every name
is listed in docs/metrics.md.

A peer is labelled with the first 8 characters of its public key in base64 (as `wg` prints
it), more only where two peers of the interface share them (short_keys): one series per peer,
whose `path` label is the path it has now, so a node exports as many series as it has peers.
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
        self._labels: dict[Key, str] = {}  # short_keys of the peers, while they stay the same

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        paths = {key: track.path for key, track in self._agent.tracks.items()}
        if paths.keys() != self._labels.keys():
            self._labels = short_keys(paths)
        per_peer = GaugeMetricFamily("wgpunch_node_peer_path",
                                     "1 for each peer, labelled with its path now",
                                     labels=["peer", "path"])
        for key, short in self._labels.items():
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
    """Each key's base64 cut to SHORT_KEY characters, or to one more than it shares with
    any other key here, so that a new peer lengthens only the labels it collides with."""
    ordered = sorted(keys, key=Key.base64)
    texts = [key.base64() for key in ordered]
    shared = [0] * len(texts)  # the longest prefix each shares with another (a neighbour)
    for i in range(1, len(texts)):
        common = _common_prefix(texts[i - 1], texts[i])
        shared[i - 1], shared[i] = max(shared[i - 1], common), common
    return {key: text[:max(SHORT_KEY, common + 1)]
            for key, text, common in zip(ordered, texts, shared, strict=True)}


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))
