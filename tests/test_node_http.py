"""The node's HTTP client (node/http.py) against a throwaway server on loopback, for what the
registry will not do on demand: a reply cut short, garbage, a connection closed under a
request, silence. test_node_client.py runs the API client over it against the real registry.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from wgpunch.errors import ApiError
from wgpunch.node.http import HttpClient

DEADLINE_S = 5.0


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


Serve = Callable[..., Awaitable[tuple[HttpClient, Server]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`await serve(handler, **client_kwargs)`: a throwaway server running `handler` for each
    connection, and an HttpClient for it; both closed after the test, whatever it did."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(handler: Handler, **client_kwargs: Any) -> tuple[HttpClient, Server]:
            server = Server(handler)
            url = await stack.enter_async_context(server)
            http = HttpClient(url, **client_kwargs)
            stack.push_async_callback(http.close)
            return http, server

        yield start


def answering(answer: bytes) -> Handler:
    """A handler that reads one request and sends `answer`."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await head(reader)
        writer.write(answer)
        await writer.drain()
    return handler


async def head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    raw = await reader.readuntil(b"\r\n\r\n")
    first, *lines = raw.decode().rstrip("\r\n").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return first, headers, body


def reply(body: bytes, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_connections_are_kept_alive_and_bodies_sent_as_declared(serve):
    seen = []

    async def handler(reader, writer):
        while True:
            try:
                first, headers, body = await head(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append((first, headers.get("authorization"), body))
            writer.write(reply(b'{"ok": true}'))

    http, server = await serve(handler, headers={"Authorization": "Bearer t"})
    for _ in range(3):
        response = await http.request("PUT", "/v1/self", b'{"a": 1}')
        assert (response.status, json.loads(response.body)) == (200, {"ok": True})
    assert seen == [("PUT /v1/self HTTP/1.1", "Bearer t", b'{"a": 1}')] * 3
    assert server.connections == 1


async def test_a_kept_alive_connection_closed_under_the_next_request_is_replaced(serve):
    """The server takes the second request on a connection and closes it unanswered (as a
    server whose idle timeout struck as we picked the connection): sent again, once, on a
    new one. (A connection closed while idle is not picked at all: test_node_client.py.)"""
    async def handler(reader, writer):
        await head(reader)
        writer.write(reply(b"{}"))  # keep-alive by default
        await writer.drain()
        await head(reader)  # the next request on it: closed without an answer

    http, server = await serve(handler)
    assert (await http.request("GET", "/a")).status == 200
    assert (await http.request("GET", "/b")).status == 200
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
async def test_a_reply_that_is_not_http_is_an_api_error(serve, intent, answer, message):
    http, _server = await serve(answering(answer))
    with pytest.raises(ApiError, match=message):
        await http.request("GET", "/v1/peers")


async def test_a_chunked_stream_arrives_as_sent_and_silence_ends_it(serve):
    release = asyncio.Event()

    async def handler(reader, writer):
        await head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\nline1\n\r\n")
        await writer.drain()
        await release.wait()

    http, _server = await serve(handler)
    try:
        stream = http.stream("/v1/watch", connect_timeout_s=DEADLINE_S, read_timeout_s=0.2)
        assert await anext(stream) == (200, b"line1\n")
        with pytest.raises(ApiError, match=r"nothing for 0\.2 s"):
            await anext(stream)
    finally:
        release.set()


async def test_a_chunked_reply_is_read_whole(serve):
    http, _server = await serve(answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"))
    assert (await http.request("GET", "/x")).body == b"abcde"


@pytest.mark.parametrize(("intent", "answer"), [
    ("Connection: close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
    ("HTTP/1.0 without keep-alive", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("bytes past the reply", reply(b"ok") + b"HTTP/1.1 200 OK\r\n"),
])
async def test_a_connection_the_reply_leaves_unfit_for_another_is_not_reused(serve, intent,
                                                                            answer):
    async def handler(reader, writer):  # would answer a second request on the connection
        while True:
            try:
                await head(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(answer)

    http, server = await serve(handler)
    for _ in range(2):
        assert (await http.request("GET", "/x")).body == b"ok", intent
    assert server.connections == 2, intent


@pytest.mark.parametrize(("intent", "answer"), [
    ("framed by the end of the connection", b"HTTP/1.1 200 OK\r\n\r\nwhole body"),
    ("after a 100 Continue", b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"whole body")),
])
async def test_a_reply_is_read_whole_and_streamed_whole(serve, intent, answer):
    http, _server = await serve(answering(answer))
    assert (await http.request("GET", "/x")).body == b"whole body", intent
    pieces = [data async for _status, data in http.stream(
        "/x", connect_timeout_s=DEADLINE_S, read_timeout_s=DEADLINE_S)]
    assert b"".join(pieces) == b"whole body", intent


async def test_a_header_that_is_not_http_is_refused_without_quoting_it(serve):
    async def handler(reader, writer):
        await reader.read()

    http, _server = await serve(
        handler, headers={"Authorization": "Bearer s3cret\r\nX-Injected: 1"})
    with pytest.raises(ApiError, match=r"GET \S+/x: the request is not valid") as caught:
        await http.request("GET", "/x")
    assert "s3cret" not in str(caught.value)
