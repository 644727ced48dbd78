"""Both daemons' /metrics with the real processes: `wgpunch registry` and two `wgpunch node`
agents in the `easy` lab, each with `--metrics-listen 127.0.0.1:PORT` in its own namespace,
scraped from inside that namespace while the pair goes direct. The text is parsed with
prometheus_client.parser, as Prometheus would read it.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from scraped import Scraped
from wgpunch.lab import catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.lab import Lab
from wgpunch.lab.netns import wait_for

pytestmark = pytest.mark.lab

REGISTRY_METRICS = "127.0.0.1:9587"
NODE_METRICS = "127.0.0.1:9588"
DIRECT_DEADLINE_S = 10.0  # typically ~1 s (test_core_loop.py)

# GET argv[1]; prints the body, or nothing when nothing answers yet. No proxy: the
# environment's proxy settings must not reroute a request to loopback.
GET = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=3) as resp:
        sys.stdout.write(resp.read().decode())
except OSError:
    pass
"""


def scrape(lab: Lab, host: str, address: str) -> Scraped | None:
    done = lab.exec(host, [sys.executable, "-c", GET, f"http://{address}/metrics"])
    return Scraped(done.stdout) if done.stdout else None


def short(lab: Lab, host: str) -> str:
    return lab.host(host).public_key.base64()[:8]


def test_both_daemons_metrics_follow_a_pair_going_direct(lab_prefix):
    with Lab(catalog.resolve("easy"), prefix=lab_prefix) as lab, Agents(
            lab, registry_args=["--metrics-listen", REGISTRY_METRICS],
            node_args=["--metrics-listen", NODE_METRICS]) as agents:
        agents.start_registry()
        registry_before = wait_for(lambda: scrape(lab, "registry", REGISTRY_METRICS),
                                   timeout=10, interval=0.05, what="the registry's metrics")
        assert registry_before.value("wgpunch_registry_watch_streams") == 0
        assert registry_before.value("wgpunch_registry_punches_total", result="pushed") == 0
        started = time.monotonic()
        agents.start_nodes()

        def direct_everywhere() -> dict[str, Scraped] | None:
            agents.check_alive()
            nodes = {host: scrape(lab, host, NODE_METRICS) for host in ("a", "b")}
            if not all(nodes.values()):
                return None
            other = {"a": "b", "b": "a"}
            if all(got is not None and got.value("wgpunch_node_peer_path", path="direct",
                                                 peer=short(lab, other[host])) == 1
                   for host, got in nodes.items()):
                return nodes
            return None

        nodes = wait_for(direct_everywhere, timeout=DIRECT_DEADLINE_S, interval=0.1,
                         what="both agents' metrics to show the other peer direct")
        took = time.monotonic() - started
        [pair] = evidence.pairs(lab, asyncio.run(evidence.read_devices(lab)))
        assert pair.direct  # what the devices show agrees

        def streams_and_reports() -> Scraped | None:
            got = scrape(lab, "registry", REGISTRY_METRICS)
            return got if got is not None and got.value(
                "wgpunch_registry_peers_reported") == 2 else None

        registry = wait_for(streams_and_reports, timeout=5, interval=0.05,
                            what="the registry to count both reports")
    assert registry.value("wgpunch_registry_peers") == 2
    assert registry.value("wgpunch_registry_watch_streams") == 2
    assert registry.value("wgpunch_registry_punches_total", result="pushed") >= 1
    requests = "wgpunch_registry_api_requests_total"
    assert registry.value(requests, route="/v1/watch", status="200") >= 2
    assert registry.value(requests, route="/v1/self", status="200") >= 2
    assert registry.value(requests, route="/v1/punch/{peer}", status="202") >= 1
    assert registry.value("wgpunch_registry_device_readable") == 1
    assert registry.value("wgpunch_registry_observer_poll_seconds_count") >= 1
    assert registry.value("wgpunch_registry_device_read_failures_total") == 0
    for host, got in nodes.items():
        assert got.value("wgpunch_node_peers", path="direct") == 1, host
        assert got.value("wgpunch_node_registry_state", state="following") == 1, host
        assert got.value("wgpunch_node_registry_reconnects_total") == 0, host
        assert len(got.labels("wgpunch_node_peer_path")) == 1, host  # the registry is no peer
    # Each side attempted (the initiator asks for the punch, the other opens its NAT).
    assert sum(got.total("wgpunch_node_time_to_direct_seconds_count") for got in
               nodes.values()) >= 1
    assert sum(got.value("wgpunch_node_punch_requests_total", result="accepted")
               for got in nodes.values()) >= 1
    ttd = {host: got.total("wgpunch_node_time_to_direct_seconds_sum") for host, got in
           nodes.items()}
    print(f"\nboth agents' metrics showed the pair direct {took:.2f} s after they started; "
          f"time to direct by their histograms (sum): {ttd}")
