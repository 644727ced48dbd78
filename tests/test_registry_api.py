"""The HTTP API over real sockets, served as `wgpunch registry` serves it (site.ApiSite) on
loopback.

Identity comes from the source address, so the table gives peer A the allowed IP 127.0.0.1/32
and peer B 127.0.0.2/32: a client bound to 127.0.0.2 is B. The state is fed directly with
device snapshots (`PeerState`), as the observer would.
"""

import asyncio
import gzip
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from wgpunch.keys import Key
from wgpunch.registry.api import create_app
from wgpunch.registry.limits import Limits
from wgpunch.registry.observer import Observer
from wgpunch.registry.site import ApiSite
from wgpunch.registry.state import RegistryState
from wgpunch.registry.stream import Stream
from wgpunch.registry.timings import Timings
from wgpunch.registry.watch import Pump
from wgpunch.wg.device import Device
from wgpunch.wg.model import DeviceState, Endpoint, PeerState

A = Key(bytes([1]) * 32)
B = Key(bytes([0xFF]) * 32)  # base64 '//////...': a path key that needs percent-encoding
C = Key(bytes([7]) * 32)
QUIET = Timings(heartbeat_s=30.0, punch_coalesce_s=30.0)
READ_S = 3.0  # deadline for any one line of a stream


def peer(key: Key, endpoint: str | None, allowed: str) -> PeerState:
    return PeerState(key, None if endpoint is None else Endpoint.parse(endpoint),
                     (ipaddress.ip_network(allowed),), 1_700_000_000.25, 0, 0, 25, False)


def table(a_endpoint: str = "198.51.100.1:51820") -> list[PeerState]:
    return [peer(A, a_endpoint, "127.0.0.1/32"), peer(B, "203.0.113.2:4000", "127.0.0.2/32"),
            peer(C, None, "10.0.0.3/32")]


class Registry:
    """The application served as `wgpunch registry` serves it: an AppRunner and an ApiSite
    (site.py: connection limits, timeouts, JSON answers to malformed HTTP) on loopback."""

    def __init__(self, state: RegistryState, runner: web.AppRunner, site: ApiSite) -> None:
        self.state, self.runner, self.site = state, runner, site
        self.host, self.port = "127.0.0.1", site.port
        self.clients: list[aiohttp.ClientSession] = []

    @property
    def app(self) -> web.Application:
        return self.runner.app

    async def client(self, source: str = "127.0.0.1", **kwargs) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        client = aiohttp.ClientSession(f"http://{self.host}:{self.port}", connector=connector,
                                       **kwargs)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.runner.cleanup()


async def start(state: RegistryState, timings: Timings = QUIET, **kwargs) -> Registry:
    runner = web.AppRunner(create_app(state, timings=timings, **kwargs),
                           handler_cancellation=True, shutdown_timeout=timings.shutdown_grace_s)
    await runner.setup()
    site = ApiSite(runner, "127.0.0.1", 0)
    await site.start()
    return Registry(state, runner, site)


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    state = RegistryState(epoch="e1", punch_window_s=QUIET.punch_coalesce_s)
    state.observe(table())
    reg = await start(state)
    yield reg
    await reg.close()


async def next_line(resp: aiohttp.ClientResponse) -> dict | None:
    async with asyncio.timeout(READ_S):
        line = await resp.content.readline()
    return json.loads(line) if line else None


# -- reading ----------------------------------------------------------------------------------

async def test_peers_lists_everyone_and_names_the_caller(registry):
    a = await registry.client()
    resp = await a.get("/v1/peers")
    assert resp.status == 200
    body = await resp.json()
    assert (body["epoch"], body["revision"], body["you"]) == ("e1", 3, A.base64())
    assert [p["public_key"] for p in body["peers"]] == [A.base64(), C.base64(), B.base64()]
    assert body["peers"][0] == {
        "public_key": A.base64(), "allowed_ips": ["127.0.0.1/32"],
        "endpoint": "198.51.100.1:51820", "latest_handshake": 1_700_000_000.25,
        "reported": None, "revision": 1,
    }
    b = await registry.client("127.0.0.2")
    assert (await (await b.get("/v1/peers")).json())["you"] == B.base64()


async def test_healthz_needs_no_identity(registry):
    registry.state.observe([])  # nobody is a peer any more
    stranger = await registry.client()
    resp = await stranger.get("/healthz")
    assert (resp.status, await resp.json()) == (
        200, {"ok": True, "epoch": "e1", "revision": 6, "peers": 0})


async def test_a_stranger_is_refused_everywhere_and_logged_once(caplog):
    state = RegistryState()
    state.observe([peer(B, None, "10.0.0.2/32")])
    reg = await start(state)
    try:
        stranger = await reg.client()
        with caplog.at_level(logging.WARNING, logger="wgpunch.registry.api"):
            for method, path in [("GET", "/v1/peers"), ("GET", "/v1/watch"),
                                 ("PUT", "/v1/self"), ("POST", f"/v1/punch/{B.hex()}"),
                                 ("GET", "/no/such/path")]:
                resp = await stranger.request(method, path)
                assert resp.status == 403, path
                assert "127.0.0.1 is not the tunnel address" in (await resp.json())["error"]
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1 and refused[0].event == "forbidden"
    finally:
        await reg.close()


async def test_bearer_token_is_a_second_factor():
    state = RegistryState()
    state.observe(table())
    reg = await start(state, token="s3cret")
    try:
        a = await reg.client()
        assert (await a.get("/v1/peers")).status == 401
        assert (await a.get("/v1/peers", headers={"Authorization": "Bearer nope"})).status == 401
        ok = await a.get("/v1/peers", headers={"Authorization": "Bearer s3cret"})
        assert ok.status == 200
        assert (await a.get("/healthz")).status == 200
    finally:
        await reg.close()


# -- reporting --------------------------------------------------------------------------------

async def test_put_self_records_the_report(registry):
    a = await registry.client()
    report = {"listen_port": 51820, "local_addresses": ["192.168.1.2"], "version": "0.1.0"}
    resp = await a.put("/v1/self", json=report)
    assert (resp.status, await resp.json()) == (200, {"revision": 4})
    peers = (await (await a.get("/v1/peers")).json())["peers"]
    # A report from a node older than `nat` is taken, and shown as it came.
    assert peers[0]["reported"] == report and peers[0]["revision"] == 4
    nat = {"mapping": "address-and-port-dependent", "filtering": "address-and-port-dependent",
           "port_preserved": False}
    resp = await a.put("/v1/self", json={**report, "nat": nat})
    assert (resp.status, await resp.json()) == (200, {"revision": 5})
    peers = (await (await a.get("/v1/peers")).json())["peers"]
    assert peers[0]["reported"]["nat"] == nat


class TableDevice(Device):
    """A device that shows `table()` at every read, so that the observer has a table."""

    backend = "table"

    async def _read(self):
        return DeviceState("wgtest", None, 51820, 0, tuple(table())), {}

    async def _write(self, changes):
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def test_a_new_report_or_a_punch_request_quickens_the_observer():
    """The observer reads at its quick pace after a report that changes something or a punch
    request (their node may have just moved), not after a report that changes nothing."""
    now = [0.0]
    state = RegistryState(epoch="e1", punch_window_s=QUIET.punch_coalesce_s)
    timings = Timings(heartbeat_s=30.0, punch_coalesce_s=30.0, poll_interval_s=30.0,
                      poll_fast_factor=0.5, poll_fast_for_s=5.0)
    observer = Observer(lambda: TableDevice("wgtest"), state, timings, clock=lambda: now[0])
    reg = await start(state, timings, observer=observer)
    try:
        a = await reg.client()
        assert observer.interval() == 30.0
        report = {"listen_port": 51820, "local_addresses": ["192.168.1.2"], "version": "0.1.0"}
        assert (await a.put("/v1/self", json=report)).status == 200
        assert observer.interval() == 15.0
        now[0] = 10.0
        assert (await a.put("/v1/self", json=report)).status == 200  # the same again
        assert observer.interval() == 30.0
        assert (await a.post(f"/v1/punch/{B.hex()}")).status == 202
        assert observer.interval() == 15.0
    finally:
        await reg.close()


GZIP_NOT = {"data": b"this is not gzip" * 8, "headers": {"Content-Encoding": "gzip"}}
GZIP_BOMB = {"data": gzip.compress(bytes(16 << 20), 9), "headers": {"Content-Encoding": "gzip"}}
OVERSIZED = json.dumps({"listen_port": 1, "local_addresses": [], "version": "x" * 5000})


async def chunks() -> AsyncIterator[bytes]:
    for _ in range(10):
        yield b"x" * 1000


@pytest.mark.parametrize(("intent", "method", "path", "kwargs", "status"), [
    ("not JSON", "PUT", "/v1/self", {"data": b"{nope"}, 400),
    ("empty body", "PUT", "/v1/self", {}, 400),
    ("a JSON list", "PUT", "/v1/self", {"json": []}, 400),
    ("an unknown field", "PUT", "/v1/self",
     {"json": {"listen_port": 1, "local_addresses": [], "version": "", "admin": True}}, 400),
    ("a wrong type", "PUT", "/v1/self",
     {"json": {"listen_port": "1", "local_addresses": [], "version": ""}}, 400),
    ("a host name as address", "PUT", "/v1/self",
     {"json": {"listen_port": 1, "local_addresses": ["evil.example"], "version": ""}}, 400),
    ("loopback, IPv4-mapped", "PUT", "/v1/self",
     {"json": {"listen_port": 1, "local_addresses": ["::ffff:127.0.0.1"], "version": ""}}, 400),
    ("unspecified, IPv4-mapped", "PUT", "/v1/self",
     {"json": {"listen_port": 1, "local_addresses": ["::ffff:0.0.0.0"], "version": ""}}, 400),
    ("multicast, IPv4-mapped", "PUT", "/v1/self",
     {"json": {"listen_port": 1, "local_addresses": ["::ffff:224.0.0.1"], "version": ""}}, 400),
    ("an address twice, once IPv4-mapped", "PUT", "/v1/self",
     {"json": {"listen_port": 1, "local_addresses": ["192.168.1.2", "::ffff:192.168.1.2"],
               "version": ""}}, 400),
    ("binary garbage", "PUT", "/v1/self", {"data": bytes(range(256))}, 400),
    ("deeply nested", "PUT", "/v1/self", {"data": b"[" * 4000}, 400),
    ("over 4 KiB", "PUT", "/v1/self", {"data": OVERSIZED}, 413),
    ("over 4 KiB, chunked", "PUT", "/v1/self", {"data": chunks()}, 413),
    ("Content-Encoding: gzip, not gzip", "PUT", "/v1/self", GZIP_NOT, 400),
    ("a gzip bomb: 16 MiB of zeros", "PUT", "/v1/self", GZIP_BOMB, 413),
    ("a punch with a gzip bomb", "POST", f"/v1/punch/{B.hex()}", GZIP_BOMB, 413),
    ("deflate, not deflate", "PUT", "/v1/self",
     {"data": b"\x00" * 64, "headers": {"Content-Encoding": "deflate"}}, 400),
    ("an unknown content encoding", "PUT", "/v1/self",
     {"data": b"{}", "headers": {"Content-Encoding": "x-nope"}}, 400),
    ("a query on /v1/self", "PUT", "/v1/self?x=1", {"json": {}}, 400),
    ("a query on /v1/peers", "GET", "/v1/peers?all=1", {}, 400),
    ("a bad since", "GET", "/v1/watch?since=-1", {}, 400),
    ("a bad epoch", "GET", "/v1/watch?since=1&epoch=XYZ", {}, 400),
    ("a short key", "POST", "/v1/punch/AAAA", {}, 400),
    ("a key with bad percent-encoding", "POST", "/v1/punch/%ZZ" + "A" * 41, {}, 400),
    ("a key with a NUL", "POST", "/v1/punch/%00" + "A" * 43, {}, 400),
    ("a key with non-UTF-8 bytes", "POST", "/v1/punch/%FF%FE" + "A" * 42, {}, 400),
    ("a very long key", "POST", "/v1/punch/" + "A" * 3000, {}, 400),
    ("a since with bad percent-encoding", "GET", "/v1/watch?since=%ZZ", {}, 400),
    ("a since with a NUL", "GET", "/v1/watch?since=1%00", {}, 400),
    ("a key with a bad character", "POST", "/v1/punch/" + "!" * 64, {}, 400),
    ("a base64 key, not percent-encoded", "POST", "/v1/punch/" + B.base64(), {}, 404),
    ("a key of nobody", "POST", "/v1/punch/" + C.hex().replace("07", "08"), {}, 404),
    ("a punch with a body", "POST", f"/v1/punch/{B.hex()}", {"json": {"x": 1}}, 400),
    ("a punch with a bad body", "POST", f"/v1/punch/{B.hex()}", {"data": b"nope"}, 400),
    ("a punch at yourself", "POST", f"/v1/punch/{A.hex()}", {}, 400),
    ("a punch at a peer without endpoint", "POST", f"/v1/punch/{C.hex()}", {}, 409),
    ("an unknown path", "GET", "/v1/nothing", {}, 404),
    ("a wrong method", "DELETE", "/v1/peers", {}, 405),
    ("HEAD on the watch stream", "HEAD", "/v1/watch", {}, 405),
])
async def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(
        registry, intent, method, path, kwargs, status, caplog):
    a = await registry.client()
    with caplog.at_level(logging.DEBUG):
        resp = await a.request(method, path, **kwargs)
    assert resp.status == status, intent
    assert resp.content_type == "application/json", intent
    if method != "HEAD":  # a HEAD answer has no body
        assert isinstance((await resp.json())["error"], str), intent
    assert (await a.get("/v1/peers")).status == 200
    # Client input is never a traceback, nor an error of ours.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        caplog.text


@pytest.mark.parametrize("raw", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello
    b"GET /v1/peers HTTP/9.9\r\n\r\n",
    b"GET /v1/peers HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"PUT /v1/self HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET /v1/peers HTTP/1.1\r\n" + b"X: y\r\n" * 1000 + b"\r\n",
])
async def test_broken_http_gets_a_json_400_and_the_server_keeps_serving(registry, raw, caplog):
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            reader, writer = await asyncio.open_connection(registry.host, registry.port)
            writer.write(raw)
            async with asyncio.timeout(READ_S):
                answer = await reader.read()  # the registry closes the connection after it
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", head), answer
    assert b"Content-Type: application/json" in head, answer
    assert json.loads(body)["error"].startswith("malformed HTTP request: "), body
    # One line for both, without a traceback, not an ERROR with one per request.
    logged = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.event for r in logged] == ["malformed_http"], caplog.text
    assert not any(r.exc_info for r in caplog.records), caplog.text
    a = await registry.client()
    assert (await a.get("/v1/peers")).status == 200


async def test_an_unexpected_error_is_a_logged_500_and_the_server_keeps_serving(caplog):
    state = RegistryState()
    state.observe(table())
    app = create_app(state, timings=QUIET)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_get("/v1/broken", broken)
    server = TestServer(app, host="127.0.0.1")
    async with TestClient(server) as a:
        with caplog.at_level(logging.ERROR, logger="wgpunch.registry.middleware"):
            resp = await a.get("/v1/broken")
        assert (resp.status, await resp.json()) == (500, {"error": "internal error"})
        assert any(r.exc_info for r in caplog.records)
        assert (await a.get("/v1/peers")).status == 200


# -- punch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", [quote(B.base64(), safe=""), B.hex(), B.base32()])
async def test_punch_accepts_every_key_spelling(registry, spelling):
    a = await registry.client()
    resp = await a.post(f"/v1/punch/{spelling}")
    assert (resp.status, await resp.json()) == (
        202, {"peer": B.base64(), "endpoint": "203.0.113.2:4000"})


async def test_punch_reaches_both_streams_at_once_and_repeats_are_coalesced(registry):
    a, b = await registry.client(), await registry.client("127.0.0.2")
    watch_a, watch_b = await a.get("/v1/watch"), await b.get("/v1/watch")
    assert (await next_line(watch_a))["type"] == (await next_line(watch_b))["type"] == "snapshot"
    assert (await b.post(f"/v1/punch/{A.hex()}")).status == 202
    assert await next_line(watch_a) == {"type": "punch", "revision": 3, "peer": B.base64(),
                                        "endpoint": "203.0.113.2:4000", "initiator": True}
    assert await next_line(watch_b) == {"type": "punch", "revision": 3, "peer": A.base64(),
                                        "endpoint": "198.51.100.1:51820", "initiator": False}
    # Within the window: answered, not pushed. The next line on each stream is the change.
    assert (await a.post(f"/v1/punch/{quote(B.base64(), safe='')}")).status == 202
    registry.state.observe(table("198.51.100.1:40000"))
    for stream in (watch_a, watch_b):
        line = await next_line(stream)
        assert (line["type"], line["peer"]["endpoint"]) == ("peer", "198.51.100.1:40000")


async def test_the_other_sides_opened_reaches_the_initiator(registry):
    a, b = await registry.client(), await registry.client("127.0.0.2")
    watch_a = await a.get("/v1/watch")
    assert (await next_line(watch_a))["type"] == "snapshot"
    resp = await b.post(f"/v1/punch/{A.hex()}/opened")  # A initiates: B opened its NAT
    assert (resp.status, await resp.json()) == (202, {"peer": A.base64(), "pushed": True})
    assert await next_line(watch_a) == {"type": "punch", "revision": 3, "peer": B.base64(),
                                        "endpoint": "203.0.113.2:4000", "initiator": True,
                                        "opened": True}
    resp = await a.post(f"/v1/punch/{B.hex()}/opened", json={"x": 1})
    assert resp.status == 400


# -- watch ------------------------------------------------------------------------------------

async def test_watch_starts_with_a_snapshot_then_streams_changes(registry):
    a = await registry.client()
    resp = await a.get("/v1/watch")
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    first = await next_line(resp)
    assert (first["type"], first["epoch"], first["revision"], len(first["peers"])) == (
        "snapshot", "e1", 3, 3)
    registry.state.observe(table("198.51.100.1:40000"))
    line = await next_line(resp)
    assert (line["type"], line["revision"], line["peer"]["public_key"]) == ("peer", 4, A.base64())
    registry.state.observe(table("198.51.100.1:40000")[:2])
    assert await next_line(resp) == {"type": "removed", "revision": 5, "public_key": C.base64()}


@pytest.mark.parametrize(("intent", "query", "first_type", "revisions"), [
    ("resume in the same epoch", "since=3&epoch=e1", "peer", [4, 5]),
    ("resume from the last one", "since=4&epoch=e1", "peer", [5]),
    ("another epoch: snapshot", "since=3&epoch=e0", "snapshot", [5]),
    ("no epoch: snapshot", "since=3", "snapshot", [5]),
    ("from the future: snapshot", "since=99&epoch=e1", "snapshot", [5]),
])
async def test_watch_resumes_or_starts_over(registry, intent, query, first_type, revisions):
    registry.state.observe(table("198.51.100.1:1"))  # 4
    registry.state.observe(table("198.51.100.1:2"))  # 5
    a = await registry.client()
    resp = await a.get(f"/v1/watch?{query}")
    lines = [await next_line(resp) for _ in revisions]
    assert lines[0]["type"] == first_type, intent
    assert [line["revision"] for line in lines] == revisions, intent


async def test_watch_sends_heartbeats_when_idle():
    state = RegistryState()
    state.observe(table())
    reg = await start(state, Timings(heartbeat_s=0.05))
    try:
        a = await reg.client()
        resp = await a.get(f"/v1/watch?since=3&epoch={state.epoch}")
        assert await next_line(resp) == {"type": "heartbeat", "revision": 3}
        assert await next_line(resp) == {"type": "heartbeat", "revision": 3}
    finally:
        await reg.close()


async def test_a_stream_that_falls_behind_is_closed_and_resumes_from_history():
    state = RegistryState(stream_queue_max=2)
    state.observe(table())
    reg = await start(state)
    try:
        a = await reg.client()
        resp = await a.get("/v1/watch")
        assert (await next_line(resp))["type"] == "snapshot"
        for port in range(1, 6):  # five changes at once into a queue of two
            state.observe(table(f"198.51.100.1:{port}"))
        assert await next_line(resp) is None  # the registry ended the stream
        resumed = await a.get(f"/v1/watch?since=3&epoch={state.epoch}")
        assert [(await next_line(resumed))["revision"] for _ in range(5)] == [4, 5, 6, 7, 8]
        assert (await a.get("/v1/peers")).status == 200
    finally:
        await reg.close()


async def test_shutdown_ends_open_streams_promptly():
    state = RegistryState()
    state.observe(table())
    reg = await start(state)
    a = await reg.client()
    resp = await a.get("/v1/watch")
    assert (await next_line(resp))["type"] == "snapshot"
    async with asyncio.timeout(3.0):  # aiohttp would wait 60 s for a handler still running
        await reg.runner.cleanup()
        assert await next_line(resp) is None
    assert state.stream_count == 0
    await a.close()


async def test_a_client_that_goes_away_releases_its_stream(registry):
    a = await registry.client()
    resp = await a.get("/v1/watch")
    assert (await next_line(resp))["type"] == "snapshot"
    assert registry.state.stream_count == 1
    resp.close()
    deadline = asyncio.get_running_loop().time() + 3.0
    while registry.state.stream_count:
        assert asyncio.get_running_loop().time() < deadline, "stream not released in 3 s"
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline above


# -- limits per caller (registry/limits.py) ----------------------------------------------------

REPORT = {"listen_port": 51820, "local_addresses": ["192.168.1.2"], "version": "0.1.0"}


async def limited(**limits) -> Registry:
    state = RegistryState(epoch="e1", punch_window_s=QUIET.punch_coalesce_s)
    state.observe(table())
    return await start(state, limits=Limits(**limits))


@pytest.mark.parametrize(("intent", "method", "path", "limits"), [
    ("reports", "PUT", "/v1/self", {"report_burst": 2, "report_per_s": 0.4}),
    ("punch requests", "POST", f"/v1/punch/{B.hex()}", {"punch_burst": 2, "punch_per_s": 0.4}),
])
async def test_a_caller_over_its_rate_gets_429_with_retry_after_and_others_do_not(
        intent, method, path, limits, caplog):
    reg = await limited(**limits)
    try:
        a, b = await reg.client(), await reg.client("127.0.0.2")
        body = {"json": REPORT} if method == "PUT" else {}
        for _ in range(2):
            assert (await a.request(method, path, **body)).status in (200, 202), intent
        with caplog.at_level(logging.INFO, logger="wgpunch.registry"):
            for _ in range(3):
                refused = await a.request(method, path, **body)
                assert refused.status == 429, intent
                assert refused.headers["Retry-After"] == "3", intent  # 1 token at 0.4/s: 2.5 s
                assert "retry in 2.5 s" in (await refused.json())["error"], intent
        assert [r.event for r in caplog.records] == ["rate_limited"], caplog.text  # one line
        other = A.hex() if method == "POST" else None
        again = await b.request(method, path.replace(B.hex(), other) if other else path, **body)
        assert again.status in (200, 202), intent  # B has a bucket of its own
        assert reg.state.revision <= 5  # two reports of A's, one of B's: nothing more
    finally:
        await reg.close()


async def test_requests_over_a_callers_pace_wait_their_turn_and_others_do_not():
    reg = await limited(requests_burst=3, requests_per_s=10.0)
    try:
        a, b = await reg.client(), await reg.client("127.0.0.2")
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = await asyncio.gather(*(a.get("/v1/peers") for _ in range(6)))
        took_a = loop.time() - started
        assert [r.status for r in answers] == [200] * 6
        assert 0.25 <= took_a <= 1.0  # three at once, then one every 0.1 s
        started = loop.time()
        assert (await b.get("/v1/peers")).status == 200
        assert loop.time() - started < 0.1  # B's budget is its own
    finally:
        await reg.close()


async def test_a_new_watch_stream_beyond_the_cap_ends_the_callers_oldest(caplog):
    reg = await limited(caller_streams=2)
    try:
        a, b = await reg.client(), await reg.client("127.0.0.2")
        streams = []
        for _ in range(2):
            streams.append(await a.get("/v1/watch"))
            assert (await next_line(streams[-1]))["type"] == "snapshot"
        on_b = await b.get("/v1/watch")
        assert (await next_line(on_b))["type"] == "snapshot"
        with caplog.at_level(logging.INFO, logger="wgpunch.registry"):
            third = await a.get("/v1/watch")
            assert (await next_line(third))["type"] == "snapshot"
            assert await next_line(streams[0]) is None  # the oldest, ended
        assert [r.event for r in caplog.records] == ["stream_replaced"]
        assert reg.state.stream_count == 3
        reg.state.observe(table("198.51.100.1:40000"))
        for stream in (streams[1], third, on_b):  # the others go on
            assert (await next_line(stream))["type"] == "peer"
    finally:
        await reg.close()


class StuckResponse:
    """A stream response whose client takes nothing: every write waits forever."""

    async def write(self, data: bytes) -> None:
        await asyncio.Event().wait()


class Recorder:
    """A stream response whose client takes everything at once; `done` after `count` writes."""

    def __init__(self, count: int) -> None:
        self.writes: list[bytes] = []
        self.count = count
        self.done = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.writes.append(data)
        if len(self.writes) == self.count:
            self.done.set()


async def test_lines_queued_while_a_stream_waits_go_in_one_write_in_order():
    stream, response = Stream(A, 8), Recorder(2)
    for n in range(3):
        stream.offer(b"%d\n" % n)
    stream.offer(b"3\n")
    task = asyncio.create_task(Pump(response, stream, lambda: b"h\n", QUIET,
                                    lambda: None).run(b"first\n"))
    async with asyncio.timeout(READ_S):
        await response.done.wait()
    stream.close()
    assert await task is True
    assert response.writes == [b"first\n", b"0\n1\n2\n3\n"]


async def test_a_stream_line_not_taken_in_time_ends_the_stream():
    timings = Timings(stream_write_timeout_s=0.05)
    aborted = []
    pump = Pump(StuckResponse(), Stream(A, 4), lambda: b"", timings,
                lambda: aborted.append(True))
    started = asyncio.get_running_loop().time()
    assert await pump.run(b'{"type":"heartbeat","revision":1}\n') is False
    assert aborted and asyncio.get_running_loop().time() - started < 1.0


@pytest.mark.parametrize("path", ["/healthz", "/v1/peers", "/v1/self"])
async def test_a_strangers_bad_gzip_and_bombs_cost_no_traceback(path, caplog):
    state = RegistryState()
    state.observe(table())
    reg = await start(state)
    try:
        stranger = await reg.client("127.0.0.9")
        with caplog.at_level(logging.DEBUG):
            for kwargs in (GZIP_NOT, GZIP_BOMB) * 2:
                resp = await stranger.put(path, **kwargs) if path == "/v1/self" else \
                    await stranger.get(path, **kwargs)
                assert resp.status in (200, 403) and resp.content_type == "application/json"
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
            caplog.text
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1
    finally:
        await reg.close()


async def test_on_a_plain_aiohttp_site_broken_http_is_one_line_all_the_same(caplog):
    """Served by aiohttp's own site (not ApiSite), aiohttp answers broken HTTP itself and logs
    an ERROR with a traceback each time: the application turns that into the client log's
    line."""
    state = RegistryState()
    state.observe(table())
    server = TestServer(create_app(state, timings=QUIET), host="127.0.0.1")
    await server.start_server()
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                reader, writer = await asyncio.open_connection(server.host, server.port)
                writer.write(b"GET /v1/peers HTTP/9.9\r\n\r\n")
                async with asyncio.timeout(READ_S):
                    assert (await reader.read()).startswith(b"HTTP/1.0 400 ")
                writer.close()
        logged = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert [r.event for r in logged] == ["malformed_http"], caplog.text
        assert not any(r.exc_info for r in caplog.records)
    finally:
        await server.close()
