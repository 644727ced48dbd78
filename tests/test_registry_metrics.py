"""The registry's /metrics, scraped over loopback while the real API (api.create_app behind
site.ApiSite, as `wgpunch registry` serves it) and the real DNS-SD server take requests: each
value moves when its event happens. As in test_registry_api.py, peer A's tunnel address is
127.0.0.1 and B's 127.0.0.2; 127.0.0.9 is nobody's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.message
import pytest
from aiohttp import web

from ports import free_ports
from scraped import Scraped, scrape
from test_registry_cli import SRC, port_is_free, wait_json, wgpunch_cli
from wgpair import wg_pair
from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError
from wgpunch.exposition import MetricsServer, exposure, parse_address
from wgpunch.keys import Key
from wgpunch.lab.netns import wait_for
from wgpunch.node import cli as node_cli
from wgpunch.registry import cli as registry_cli
from wgpunch.registry.api import create_app
from wgpunch.registry.dnssd import Zone
from wgpunch.registry.dnsserver import DnsServer
from wgpunch.registry.exporter import RegistryExporter
from wgpunch.registry.metrics import RelayCounts
from wgpunch.registry.observer import Observer
from wgpunch.registry.site import ApiSite
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg import open_device
from wgpunch.wg.model import Endpoint, PeerState

A = Key(bytes([1]) * 32)
B = Key(bytes([2]) * 32)
C = Key(bytes([7]) * 32)
QUIET = Timings(heartbeat_s=30.0, punch_coalesce_s=30.0)
STRANGER = "127.0.0.9"
REPORT = '{"listen_port": 51820, "local_addresses": [], "version": "test"}'


def peer(key: Key, endpoint: str | None, allowed: str) -> PeerState:
    return PeerState(key, None if endpoint is None else Endpoint.parse(endpoint),
                     (ipaddress.ip_network(allowed),), None, 0, 0, 25, False)


def table() -> list[PeerState]:
    return [peer(A, "198.51.100.1:51820", "127.0.0.1/32"),
            peer(B, "203.0.113.2:4000", "127.0.0.2/32"), peer(C, None, "10.0.0.3/32")]


@dataclass
class Served:
    state: RegistryState
    exporter: RegistryExporter
    api: str
    metrics: str

    async def scrape(self) -> Scraped:
        return await scrape(self.metrics)

    async def request(self, method: str, path: str, *, source: str = "127.0.0.1",
                      body: str | None = None) -> int:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session, session.request(
                method, self.api + path, data=body) as resp:
            await resp.read()
            return resp.status


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    state = RegistryState(epoch="e1", punch_window_s=QUIET.punch_coalesce_s)
    state.observe(table())
    exporter = RegistryExporter(state)
    runner = web.AppRunner(create_app(state, timings=QUIET, metrics=exporter),
                           handler_cancellation=True, shutdown_timeout=QUIET.shutdown_grace_s)
    await runner.setup()
    site = ApiSite(runner, "127.0.0.1", 0)
    await site.start()
    server = MetricsServer(exporter.registry, "registry")
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield Served(state, exporter, f"http://127.0.0.1:{site.port}",
                     f"http://{host}:{port}/metrics")
    finally:
        await server.close()
        await runner.cleanup()


async def until(check: Callable[[], Awaitable[bool]], *, within_s: float = 3.0,
                what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline above


# -- the peer table and the streams, read when scraped ---------------------------------------


async def test_peers_and_reports_follow_the_table(served):
    first = await served.scrape()
    assert first.value("wgpunch_registry_peers") == 3
    assert first.value("wgpunch_registry_peers_reported") == 0
    served.state.observe([*table(), peer(Key(bytes([9]) * 32), None, "10.0.0.9/32")])
    assert await served.request("PUT", "/v1/self", body=REPORT) == 200
    after = await served.scrape()
    assert after.value("wgpunch_registry_peers") == 4
    assert after.value("wgpunch_registry_peers_reported") == 1


@asynccontextmanager
async def watching(served: Served, source: str) -> AsyncIterator[None]:
    """A watch stream from `source`, registered by the time this is entered."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session, session.get(
            served.api + "/v1/watch") as resp:
        assert resp.status == 200
        await resp.content.readline()  # the snapshot: the stream is registered by now
        yield


async def test_watch_streams_open_are_counted_while_open(served):
    assert (await served.scrape()).value("wgpunch_registry_watch_streams") == 0
    async with watching(served, "127.0.0.1"), watching(served, "127.0.0.2"):
        assert (await served.scrape()).value("wgpunch_registry_watch_streams") == 2

    async def closed() -> bool:
        return (await served.scrape()).value("wgpunch_registry_watch_streams") == 0
    await until(closed, what="the stream to be gone")


# -- events, counted as they happen -----------------------------------------------------------


async def test_api_requests_are_counted_by_route_and_status_and_refusals_by_event(served):
    assert await served.request("GET", "/v1/peers") == 200
    assert await served.request("GET", "/v1/peers") == 200
    assert await served.request("GET", "/v1/peers", source=STRANGER) == 403
    assert await served.request("GET", "/v1/nothing") == 404
    assert await served.request("GET", "/healthz", source=STRANGER) == 200
    got = await served.scrape()
    total = "wgpunch_registry_api_requests_total"
    assert got.value(total, route="/v1/peers", status="200") == 2
    assert got.value(total, route="/v1/peers", status="403") == 1
    assert got.value(total, route="other", status="404") == 1
    assert got.value(total, route="/healthz", status="200") == 1
    assert got.value("wgpunch_registry_client_events_total", event="forbidden") == 1


async def test_punches_are_counted_pushed_then_coalesced(served):
    """With both sides following (a side without a stream makes the registry forget the
    punch, so that the next one is pushed again: state.py)."""
    got = await served.scrape()
    assert got.value("wgpunch_registry_punches_total", result="pushed") == 0
    async with watching(served, "127.0.0.1"), watching(served, "127.0.0.2"):
        assert await served.request("POST", f"/v1/punch/{B.hex()}") == 202
        assert await served.request("POST", f"/v1/punch/{B.hex()}") == 202  # in the window
        assert await served.request("POST", f"/v1/punch/{C.hex()}") == 409  # no endpoint
        got = await served.scrape()
    assert got.value("wgpunch_registry_punches_total", result="pushed") == 1
    assert got.value("wgpunch_registry_punches_total", result="coalesced") == 1
    assert got.value("wgpunch_registry_api_requests_total", route="/v1/punch/{peer}",
                     status="409") == 1


async def test_dns_queries_are_counted_by_rcode_and_the_unanswered_by_reason(served):
    zone = Zone.parse("mesh.internal.")
    server = DnsServer(zone, served.state, self_config=None)
    await server.start([("127.0.0.1", 0)])
    served.exporter.watch_dns(server)
    port = server.addresses[0][1]
    try:
        for name, source in (("_wireguard._udp.mesh.internal.", "127.0.0.1"),
                             ("nobody._wireguard._udp.mesh.internal.", "127.0.0.1"),
                             ("example.com.", "127.0.0.2"),
                             ("_wireguard._udp.mesh.internal.", STRANGER)):
            wire = dns.message.make_query(name, "PTR").to_wire()
            await udp(port, wire, source, answered=source != STRANGER)
        await udp(port, b"\x00\x01junk", "127.0.0.1", answered=False)

        async def counted() -> bool:
            got = await served.scrape()
            return got.value("wgpunch_registry_dns_unanswered_total", reason="malformed") == 1
        await until(counted, what="the malformed packet to be counted")
        got = await served.scrape()
    finally:
        await server.close()
    queries = "wgpunch_registry_dns_queries_total"
    assert [got.value(queries, rcode=rcode) for rcode in ("NOERROR", "NXDOMAIN", "REFUSED")] == [
        1, 1, 1]
    assert got.value("wgpunch_registry_dns_unanswered_total", reason="refused") == 1
    assert got.value("wgpunch_registry_dns_errors_total") == 0
    assert got.value("wgpunch_registry_dns_tcp_connections") == 0


async def udp(port: int, wire: bytes, source: str, *, answered: bool) -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(
        Client, local_addr=(source, 0), remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(wire)
        if answered:
            async with asyncio.timeout(2):
                await got
    finally:
        transport.close()


async def test_the_relay_reports_through_its_read_function(served):
    """The room left for the relay (registry/metrics.py): what `read` returns, at each
    scrape; nothing of it before the relay registers."""
    assert "wgpunch_registry_relay_slots" not in (await served.scrape()).families
    counts = [RelayCounts(2, 1, {"userspace": 10, "kernel": 5}, {"userspace": 1480},
                          {"unbound": 3})]
    served.exporter.watch_relay(lambda: counts[0])
    got = await served.scrape()
    assert (got.value("wgpunch_registry_relay_slots"),
            got.value("wgpunch_registry_relay_kernel_slots")) == (2, 1)
    assert got.value("wgpunch_registry_relay_packets_total", path="kernel") == 5
    assert got.value("wgpunch_registry_relay_bytes_total", path="userspace") == 1480
    assert got.value("wgpunch_registry_relay_dropped_total", reason="unbound") == 3
    counts[0] = RelayCounts(0, 0, {"userspace": 12, "kernel": 5})
    got = await served.scrape()
    assert got.value("wgpunch_registry_relay_slots") == 0
    assert got.value("wgpunch_registry_relay_packets_total", path="userspace") == 12


async def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(served):
    connector = aiohttp.TCPConnector()
    async with aiohttp.ClientSession(connector=connector) as session, session.get(
            served.metrics, headers={"Accept": "application/openmetrics-text"}) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).endswith("# EOF\n")


# -- the observer, on a real device -----------------------------------------------------------


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed")
async def test_observer_polls_are_timed_and_a_device_that_goes_away_counts_failures(tmp_path):
    with wg_pair(tmp_path) as (_, b):
        state = RegistryState()
        exporter = RegistryExporter(state)
        observer = Observer(lambda: open_device(b.ifname), state,
                            Timings(poll_interval_s=0.01, device_error_log_s=60.0),
                            metrics=exporter)
        server = MetricsServer(exporter.registry, "registry")
        host, port = await server.start("127.0.0.1", 0)
        task = asyncio.create_task(observer.run())
        url = f"http://{host}:{port}/metrics"

        def polled(count: int, readable: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                got = await scrape(url)
                polls = got.value("wgpunch_registry_observer_poll_seconds_count") or 0
                return polls >= count and got.value("wgpunch_registry_device_readable") == (
                    readable)
            return check

        try:
            await until(polled(3, 1), what="three good polls")
            got = await scrape(url)
            assert got.value("wgpunch_registry_peers") == 1  # a
            assert got.value("wgpunch_registry_device_read_failures_total") == 0
            b.daemon.stop()  # the device is gone: every read fails
            await until(polled(0, 0), what="a failed poll")
            failed = (await scrape(url)).value("wgpunch_registry_device_read_failures_total")
            assert failed is not None and failed >= 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await observer.close()
            await server.close()


# -- the option -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    ("127.0.0.1", "expected ADDR:PORT"),
    ("localhost:9587", "expected ADDR:PORT"),
    ("127.0.0.1:0", "expected ADDR:PORT"),
    ("::1:9587", "expected ADDR:PORT"),
])
def test_a_metrics_address_is_an_ip_and_a_port(text, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_address(text, "registry")


@pytest.mark.parametrize("command", ["registry", "node"])
def test_the_option_comes_from_a_flag_the_environment_or_the_file(command, tmp_path: Path):
    settings_from = {"registry": registry_cli, "node": node_cli}[command].settings_from
    needs = ["--interface", "wg0"] + (["--listen", "127.0.0.1"] if command == "registry" else
                                      ["--registry", Key(bytes(32)).base64()])
    args = build_parser().parse_args([command, *needs])
    assert settings_from(args, {}).metrics_listen is None
    env = {"WGPUNCH_METRICS_LISTEN": "[::1]:9587"}
    assert settings_from(args, env).metrics_listen == Endpoint.parse("[::1]:9587")
    config = tmp_path / "c.toml"
    config.write_text('metrics_listen = "127.0.0.1:1"\n')
    args = build_parser().parse_args([command, *needs, "--config", str(config)])
    assert settings_from(args, {}).metrics_listen == Endpoint.parse("127.0.0.1:1")
    with pytest.raises(ConfigError, match=rf"^{command}: metrics address '9587': .* \(from "
                       r"environment WGPUNCH_METRICS_LISTEN\)$"):
        settings_from(args, {"WGPUNCH_METRICS_LISTEN": "9587"})


@pytest.mark.parametrize(("text", "warned"), [
    ("127.0.0.1:9587", None), ("10.99.0.254:9587", None), ("[fd00::1]:9587", None),
    ("0.0.0.0:9587", "every address"), ("[::]:9587", "every address"),
    ("8.8.8.8:9587", "a public address"),
])
def test_a_wildcard_or_public_address_is_what_gets_a_warning(text, warned):
    assert exposure(Endpoint.parse(text)) == warned


async def test_a_port_in_use_is_a_one_line_error(served):
    port = int(served.metrics.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConfigError, match=r"registry: cannot serve metrics on 127\.0\.0\.1:\d+: "):
        await MetricsServer(served.exporter.registry, "registry").start("127.0.0.1", port)


# -- the real command -------------------------------------------------------------------------


def test_the_registry_command_serves_metrics_and_releases_the_port_on_sigterm():
    """`wgpunch registry --metrics-listen` as a process, with no such WireGuard device: the
    API serves, and /metrics says the device cannot be read."""
    api, metrics = free_ports(2)
    proc = subprocess.Popen(
        wgpunch_cli("registry", "-i", "nosuchwg0", "--listen", f"127.0.0.1:{api}",
                    "--poll-interval", "0.01", "--metrics-listen", f"127.0.0.1:{metrics}",
                    "--natprobe-port", "0"),
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{metrics}/metrics"
    try:
        wait_json(f"http://127.0.0.1:{api}/healthz", proc)

        def failing() -> Scraped | None:
            got = scrape_now(url)
            failures = got.value("wgpunch_registry_device_read_failures_total") or 0
            return got if failures >= 1 else None
        got = wait_for(failing, timeout=5, interval=0.02, what="a failed read counted")
        assert got.value("wgpunch_registry_device_readable") == 0
        assert got.value("wgpunch_registry_peers") == 0
        assert got.value("process_open_fds") is not None  # the process's own, too
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert port_is_free(metrics)
        assert f"registry: serving Prometheus metrics on {url}" in stderr
        assert "without authentication" not in stderr  # loopback: no warning
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def scrape_now(url: str) -> Scraped:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=3) as resp:
        return Scraped(resp.read().decode())
