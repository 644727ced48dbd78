"""The node's API client (node/client.py) on its own HTTP client (node/http.py): against the
real registry API served on loopback as `wgpunch registry` serves it, and against a throwaway
server for what the registry will not do on demand (a reply cut short, garbage, a closed
kept-alive connection, silence)."""

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from wgpunch.errors import ApiError
from wgpunch.keys import Key
from wgpunch.node.client import RegistryClient
from wgpunch.node.http import HttpClient
from wgpunch.protocol import PunchEvent, Reported, Snapshot
from wgpunch.registry.api import create_app
from wgpunch.registry.site import ApiSite
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg.device import Endpoint, PeerState

A = Key(bytes([1]) * 32)  # the client: 127.0.0.1
B = Key(bytes([0xFF]) * 32)
DEADLINE_S = 5.0


def peer(key: Key, endpoint: str, allowed: str) -> PeerState:
    return PeerState(key, Endpoint.parse(endpoint), (ipaddress.ip_network(allowed),),
                     1_700_000_000.25, 0, 0, 25, False)


@pytest.fixture
async def registry() -> AsyncIterator[str]:
    state = RegistryState(epoch="e1", punch_window_s=0.01)
    state.observe([peer(A, "198.51.100.1:51820", "127.0.0.1/32"),
                   peer(B, "203.0.113.2:4000", "127.0.0.2/32")])
    timings = Timings(heartbeat_s=30.0, punch_coalesce_s=0.01)
    runner = web.AppRunner(create_app(state, timings=timings), handler_cancellation=True,
                           shutdown_timeout=timings.shutdown_grace_s)
    await runner.setup()
    site = ApiSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site.port}"
    await runner.cleanup()


async def test_requests_and_the_watch_stream_against_the_registry(registry):
    client = RegistryClient(registry)
    try:
        snapshot = await client.peers()
        assert {p.public_key for p in snapshot.peers} == {A, B}
        await client.report_self(Reported(51820, (ipaddress.ip_address("192.168.1.2"),), "t"))
        stream = client.watch(None, None)
        async with asyncio.timeout(DEADLINE_S):
            first = await anext(stream)
            assert isinstance(first, Snapshot) and first.epoch == "e1"
            await client.punch(B)
            event = await anext(stream)
            while not isinstance(event, PunchEvent):  # the report's own change comes first
                event = await anext(stream)
        assert event.peer == B and event.endpoint == Endpoint.parse("203.0.113.2:4000")
        await stream.aclose()
        with pytest.raises(ApiError, match="404") as refused:
            await client.punch(Key(bytes([9]) * 32))
        assert refused.value.status == 404
    finally:
        await client.close()


# -- a throwaway server ------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    raw = await reader.readuntil(b"\r\n\r\n")
    first, *lines = raw.decode().rstrip("\r\n").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return first, headers, body


def reply(body: bytes, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_connections_are_kept_alive_and_bodies_sent_as_declared():
    seen = []

    async def handler(reader, writer):
        while True:
            try:
                first, headers, body = await head(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append((first, headers.get("authorization"), body))
            writer.write(reply(b'{"ok": true}'))

    server = Server(handler)
    async with server as url:
        http = HttpClient(url, headers={"Authorization": "Bearer t"})
        try:
            for _ in range(3):
                response = await http.request("PUT", "/v1/self", b'{"a": 1}')
                assert (response.status, json.loads(response.body)) == (200, {"ok": True})
        finally:
            await http.close()
    assert seen == [("PUT /v1/self HTTP/1.1", "Bearer t", b'{"a": 1}')] * 3
    assert server.connections == 1


async def test_a_connection_the_server_closed_meanwhile_is_replaced():
    async def handler(reader, writer):
        await head(reader)
        writer.write(reply(b"{}"))  # keep-alive by default, but the server closes it
        await writer.drain()

    server = Server(handler)
    async with server as url:
        http = HttpClient(url)
        try:
            assert (await http.request("GET", "/a")).status == 200
            assert (await http.request("GET", "/b")).status == 200
        finally:
            await http.close()
    assert server.connections == 2


@pytest.mark.parametrize(("intent", "answer", "message"), [
    ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n", "bad reply: illegal status line"),
    ("cut in the body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
     r"bad reply: .*without sending complete message body \(received 3 bytes, expected 10\)"),
    ("a bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "bad reply: illegal chunk header"),
    ("a header without a colon", b"HTTP/1.1 200 OK\r\nnonsense\r\n\r\n",
     "bad reply: illegal header line"),
    ("a head without end", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000,
     "bad reply: Receive buffer too long"),
    ("nothing at all", b"", "closed before a reply"),
])
async def test_a_reply_that_is_not_http_is_an_api_error(intent, answer, message):
    async def handler(reader, writer):
        await head(reader)
        writer.write(answer)
        await writer.drain()

    async with Server(handler) as url:
        http = HttpClient(url)
        try:
            with pytest.raises(ApiError, match=message):
                await http.request("GET", "/v1/peers")
        finally:
            await http.close()


async def test_a_chunked_stream_arrives_as_sent_and_silence_ends_it():
    release = asyncio.Event()

    async def handler(reader, writer):
        await head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\nline1\n\r\n")
        await writer.drain()
        await release.wait()

    async with Server(handler) as url:
        http = HttpClient(url)
        try:
            stream = http.stream("/v1/watch", connect_timeout_s=DEADLINE_S, read_timeout_s=0.2)
            assert await anext(stream) == (200, b"line1\n")
            with pytest.raises(ApiError, match=r"nothing for 0\.2 s"):
                await anext(stream)
        finally:
            release.set()
            await http.close()


async def test_a_chunked_reply_is_read_whole():
    async def handler(reader, writer):
        await head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
        await writer.drain()

    async with Server(handler) as url:
        http = HttpClient(url)
        try:
            assert (await http.request("GET", "/x")).body == b"abcde"
        finally:
            await http.close()


@pytest.mark.parametrize(("intent", "answer"), [
    ("Connection: close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
    ("HTTP/1.0 without keep-alive", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("bytes past the reply", reply(b"ok") + b"HTTP/1.1 200 OK\r\n"),
])
async def test_a_connection_the_reply_leaves_unfit_for_another_is_not_reused(intent, answer):
    async def handler(reader, writer):  # would answer a second request on the connection
        while True:
            try:
                await head(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(answer)

    server = Server(handler)
    async with server as url:
        http = HttpClient(url)
        try:
            for _ in range(2):
                assert (await http.request("GET", "/x")).body == b"ok", intent
        finally:
            await http.close()
    assert server.connections == 2, intent


@pytest.mark.parametrize(("intent", "answer"), [
    ("framed by the end of the connection", b"HTTP/1.1 200 OK\r\n\r\nwhole body"),
    ("after a 100 Continue", b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"whole body")),
])
async def test_a_reply_is_read_whole_and_streamed_whole(intent, answer):
    async def handler(reader, writer):
        await head(reader)
        writer.write(answer)
        await writer.drain()

    async with Server(handler) as url:
        http = HttpClient(url)
        try:
            assert (await http.request("GET", "/x")).body == b"whole body", intent
            pieces = [data async for _status, data in http.stream(
                "/x", connect_timeout_s=DEADLINE_S, read_timeout_s=DEADLINE_S)]
            assert b"".join(pieces) == b"whole body", intent
        finally:
            await http.close()


async def test_a_header_that_is_not_http_is_refused_without_quoting_it():
    async def handler(reader, writer):
        await reader.read()

    async with Server(handler) as url:
        http = HttpClient(url, headers={"Authorization": "Bearer s3cret\r\nX-Injected: 1"})
        try:
            with pytest.raises(ApiError, match=r"GET \S+/x: the request is not valid") as caught:
                await http.request("GET", "/x")
            assert "s3cret" not in str(caught.value)
        finally:
            await http.close()
