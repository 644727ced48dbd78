"""The node agent's /metrics, scraped over loopback while the real agent works a real
wireguard-go pair (tests/agentrig.py, as test_node_agent.py: a fake registry stream, senders
that only record): each value moves when its event happens. And nothing secret in either
daemon's metrics.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

import agentrig
from agentrig import FakeIo, FakeRegistry, Pair, Running, agent_for
from scraped import Scraped, scrape
from wgpunch.errors import ApiError
from wgpunch.exposition import MetricsServer
from wgpunch.keys import Key
from wgpunch.node.exporter import NodeExporter, short_keys
from wgpunch.protocol import Heartbeat
from wgpunch.registry.exporter import RegistryExporter
from wgpunch.registry.observer import Observer
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg import open_device
from wgpunch.wg.model import Endpoint

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

# The rig's fixtures: the device pair (a, the agent's, with a registry peer and a stranger),
# the fake registry and senders.
pair, registry, io = agentrig.pair, agentrig.registry, agentrig.io


@dataclass
class Exported:
    run: Running
    url: str

    async def scrape(self) -> Scraped:
        return await scrape(self.url)

    async def until(self, name: str, at_least: float, **labels: str) -> Scraped:
        """The first scrape whose sample `name` with `labels` is at least `at_least`."""
        async def reached() -> Scraped | None:
            got = await self.scrape()
            return got if (got.value(name, **labels) or 0) >= at_least else None
        return await self.run.until(reached, what=f"{name}{labels} >= {at_least}")


@asynccontextmanager
async def exported(pair: Pair, registry: FakeRegistry, io: FakeIo) -> AsyncIterator[Exported]:
    """The agent running with its metrics served, as `node --metrics-listen` runs it."""
    exporter = NodeExporter()
    agent = agent_for(pair, registry, io, metrics=exporter)
    exporter.watch_agent(agent)
    server = MetricsServer(exporter.registry, "node")
    host, port = await server.start("127.0.0.1", 0)
    try:
        async with Running(agent) as run:
            yield Exported(run, f"http://{host}:{port}/metrics")
    finally:
        await server.close()


def short(key: Key) -> str:
    return key.base64()[:8]


async def test_a_pair_that_goes_direct_shows_in_paths_time_to_direct_and_the_registry_link(
        pair, registry, io):
    registry.answer_punches = True
    async with exported(pair, registry, io) as node:
        before = await node.until("wgpunch_node_registry_state", 1, state="connecting")
        assert before.labels("wgpunch_node_peer_path") == []
        assert before.value("wgpunch_node_punch_requests_total", result="accepted") == 0

        registry.publish(*pair.records())
        got = await node.until("wgpunch_node_peer_path", 1, peer=short(pair.b.public),
                               path="direct")
        assert got.labels("wgpunch_node_peer_path") == [
            {"peer": short(pair.b.public), "path": "direct"}]
        assert [got.value("wgpunch_node_peers", path=p) for p in ("direct", "lan", "relay",
                                                                   "none")] == [1, 0, 0, 0]
        assert got.value("wgpunch_node_time_to_direct_seconds_count", path="direct") == 1
        took = got.value("wgpunch_node_time_to_direct_seconds_sum", path="direct")
        assert took is not None and 0 < took < 5
        assert got.value("wgpunch_node_punch_requests_total", result="accepted") == 1
        assert got.value("wgpunch_node_punch_retries_total") == 0
        assert got.value("wgpunch_node_registry_state", state="following") == 1
        since = got.value("wgpunch_node_registry_state_since_timestamp_seconds")
        assert since is not None and since <= time.time()
        assert got.value("wgpunch_node_registry_reconnects_total") == 0

        registry.push(ApiError("registry: watch: 502"))
        await node.until("wgpunch_node_registry_state", 1, state="unreachable")
        registry.push(Heartbeat(registry.revision))
        got = await node.until("wgpunch_node_registry_reconnects_total", 1)
        assert got.value("wgpunch_node_registry_state", state="following") == 1


async def test_the_non_initiator_counts_the_openers_it_sends(pair, registry, io):
    registry.answer_punches = False
    async with exported(pair, registry, io) as node:
        registry.publish(*pair.records())
        await node.run.until(lambda: len(io.opened) >= 2, what="two openers")
        got = await node.scrape()
        sent = got.value("wgpunch_node_openers_total")
        assert sent is not None and 2 <= sent <= len(io.opened)


async def test_failed_punch_requests_and_retries_toward_a_peer_that_never_answers(
        pair, registry, io):
    """b's record points where nobody is: every attempt fails, and the agent tries again."""
    registry.punch_error = ApiError("registry: POST /v1/punch: connection refused")
    nowhere = Endpoint.parse("192.0.2.77:51820")
    a, _, reg = pair.records()
    async with exported(pair, registry, io) as node:
        registry.publish(a, pair.record(pair.b.public, nowhere), reg)
        got = await node.until("wgpunch_node_punch_retries_total", 2)
        assert got.value("wgpunch_node_punch_requests_total", result="failed") >= 2
        assert got.value("wgpunch_node_punch_requests_total", result="accepted") == 0
        assert got.value("wgpunch_node_peer_path", peer=short(pair.b.public), path="none") == 1
        assert got.value("wgpunch_node_time_to_direct_seconds_count", path="direct") is None


def test_short_keys_grow_only_where_two_peers_share_a_prefix():
    same = [Key(b"\x00" * 6 + bytes([n]) + b"\x00" * 25) for n in (0, 255)]  # 8 chars alike
    other = Key(bytes([9]) * 32)
    got = short_keys([same[0], other, same[1]])
    assert got[other] == other.base64()[:8]
    assert [got[k] for k in same] == [k.base64()[:9] for k in same]
    assert got[same[0]] != got[same[1]]
    twins = [Key(bytes(31) + bytes([n])) for n in (0, 1)]  # alike but for the last character
    assert short_keys(twins) == {k: k.base64()[:43] for k in twins}  # all but the padding


async def test_nothing_secret_shows_in_either_daemons_metrics(pair, registry, io):
    """a's device holds its private key and a preshared key for b; a registry observer
    reads the same device (a registry's device has both kinds too). Neither key shows in
    any of the three spellings, nor any whole public key."""
    psk = Key(bytes(range(32)), secret=True)
    psk_file = pair.tmp / "psk"
    psk_file.write_text(psk.base64())
    pair.a.wg_set("peer", pair.b.public.base64(), "preshared-key", str(psk_file))
    pair.b.wg_set("peer", pair.a.public.base64(), "preshared-key", str(psk_file))
    registry.answer_punches = True
    state = RegistryState()
    reg_exporter = RegistryExporter(state)
    observer = Observer(lambda: open_device(pair.a.ifname), state,
                        Timings(poll_interval_s=0.01), metrics=reg_exporter)
    reg_server = MetricsServer(reg_exporter.registry, "registry")
    host, port = await reg_server.start("127.0.0.1", 0)
    polling = asyncio.create_task(observer.run())
    try:
        async with exported(pair, registry, io) as node:
            registry.publish(*pair.records())
            node_text = (await node.until("wgpunch_node_peers", 1, path="direct")).text
            reg = Exported(node.run, f"http://{host}:{port}/metrics")
            reg_text = (await reg.until("wgpunch_registry_observer_poll_seconds_count", 2)).text
    finally:
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        await observer.close()
        await reg_server.close()
    assert state.peers  # the registry really read the device
    secrets = [pair.a.private, psk]
    public = [pair.a.public, pair.b.public, pair.registry, pair.stranger]
    for text in (node_text, reg_text):
        for key in secrets:
            for spelling in (key.base64(), key.hex(), key.base32()):
                assert spelling.lower() not in text.lower()
        for key in public:
            assert key.base64() not in text and key.hex() not in text

