"""The node's HTTP/1.1 client: just what the registry API needs (docs/api.md), with h11
speaking the protocol and asyncio streams doing the I/O.

A node's first punch request is on the time-to-direct path, and importing aiohttp's client
took 0.3 s of the agent's 0.5 s start-up on a busy 2-core machine (bench/startup.py); the
node needs JSON requests on kept-alive connections and one streamed response, no more.
h11 (sans-IO) writes the requests and reads the replies: the head, bodies framed by
`Content-Length`, chunked encoding or the end of the connection, and whether a connection
may carry the next request. This module reads and writes the bytes, bounds them and keeps
the connections.

- Connections are kept alive and reused, at most `limit` open at once (below the
  registry's per-caller cap), and one idle for `idle_s` is closed by us, before the
  registry's own idle timeout closes it under a request (registry/timings.py).
- A request that fails on a reused connection before any byte of the reply came is sent
  again once on a new one: the server may have closed the connection as we picked it.
- `stream()`: a GET whose reply body is handed over as it arrives, each read bounded by a
  timeout, on a connection of its own that is closed afterwards; a connection attempt that
  takes longer than `CONNECT_AGAIN_S` is made again rather than left to the kernel's 1 s.

Every failure is an `ApiError` whose message names the method and URL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from .. import __version__
from ..errors import ApiError

# Status line and headers; h11 bounds every piece it waits for whole by this (a chunk's
# size line, the trailers too).
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a /v1/peers reply of a very large registry
READ_BYTES = 64 * 1024
ERROR_TEXT_MAX = 200  # of h11's words on a bad reply, which quote the reply
# A stream's connection attempt is dropped and made anew (a new SYN at once) after this long,
# three times longer per attempt: a lost SYN or SYN-ACK otherwise waits for the kernel's own
# retry a second later (RFC 6298's initial RTO), and so did the new watch stream that brings
# the news of new endpoints after a NAT forgot (bench/time_to_direct.py forget, 5 % loss per
# uplink). Our choice: above a round trip on most paths; a slower one connects on a later try.
CONNECT_AGAIN_S = 0.3


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


class _Conn:
    """One connection and h11's state of it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = time.monotonic()
        self.reused = False
        self.replied = False  # a byte of the current reply came

    def usable(self, idle_s: float) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and time.monotonic() - self.idle_since < idle_s)

    def send(self, *events: h11.Event) -> None:
        self.writer.write(b"".join(self.http.send(event) or b"" for event in events))

    async def receive(self) -> h11.Event:
        """The reply's next event; `_Stale` when the connection ends before its first byte.
        Called until the reply's `EndOfMessage`, never after (where h11 would pause)."""
        while not isinstance(event := self.http.next_event(), h11.Event):
            data = await self.reader.read(READ_BYTES)
            if not data and not self.replied:
                raise _Stale("connection closed before a reply")
            self.replied = True
            self.http.receive_data(data)  # b"": the end, which h11 judges
        return event

    def next_cycle(self) -> bool:
        """Ready for the next request, if h11 says both sides may go on (no `Connection:
        close`, no body framed by the close) and the server sent nothing past the reply."""
        if (self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE
                or self.http.trailing_data[0]):
            return False
        self.http.start_next_cycle()
        self.idle_since, self.reused, self.replied = time.monotonic(), False, False
        return True

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Requests to one origin (`base_url`: http:// or https://, host and port)."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None,
                 limit: int = 32, idle_s: float = 15.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ApiError(f"registry: {base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls = url.scheme == "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        self.headers = {"Host": host if default_port else f"{host}:{self.port}",
                        "User-Agent": f"wgpunch/{__version__}", **(headers or {})}
        self.idle_s = idle_s
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Conn] = []
        self._streams: set[_Conn] = set()

    async def close(self) -> None:
        for conn in [*self._idle, *self._streams]:
            conn.close()
        self._idle.clear()
        self._streams.clear()

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      content_type: str = "application/json",
                      timeout_s: float = 5.0) -> Response:
        url = self.base_url + path
        try:
            async with self._slots, asyncio.timeout(timeout_s):
                while True:
                    conn = await self._connection()
                    try:
                        return await self._exchange(conn, method, path, body, content_type)
                    except _Stale:  # a reused one the server closed as we picked it
                        if not conn.reused:
                            raise
        except TimeoutError:
            raise ApiError(f"registry: {method} {url}: no answer within {timeout_s:g} s") from None
        except (OSError, _Stale, h11.ProtocolError) as error:
            raise ApiError(f"registry: {method} {url}: {_describe(error)}") from None

    async def stream(self, path: str, *, connect_timeout_s: float,
                     read_timeout_s: float) -> AsyncIterator[tuple[int, bytes]]:
        """GET `path`: yields (status, data) for each piece of the reply body as it arrives
        (the whole body at once for an error status or a body of a declared length), and
        ends with the body; `ApiError` when a read waits longer than `read_timeout_s`."""
        url = self.base_url + path
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(connect_timeout_s):
                conn = await self._open_promptly()
                self._streams.add(conn)
                conn.send(self._request("GET", path, None, ""), h11.EndOfMessage())
                head = await _read_head(conn)
            if head.status_code >= 400 or _declared_length(head):
                async with asyncio.timeout(read_timeout_s):
                    body = await _read_body(conn)
                yield head.status_code, body
                return
            while True:
                async with asyncio.timeout(read_timeout_s):
                    event = await conn.receive()
                if not isinstance(event, h11.Data):
                    return  # EndOfMessage
                yield head.status_code, bytes(event.data)
        except TimeoutError:
            raise ApiError(f"registry: GET {url}: nothing for {read_timeout_s:g} s"
                           if conn is not None else
                           f"registry: GET {url}: no connection within {connect_timeout_s:g} s"
                           ) from None
        except (OSError, _Stale, h11.ProtocolError) as error:
            raise ApiError(f"registry: GET {url}: {_describe(error)}") from None
        finally:
            if conn is not None:
                self._streams.discard(conn)
                conn.close()

    # -- connections ------------------------------------------------------------------------

    async def _connection(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(self.idle_s):
                conn.reused = True
                return conn
            conn.close()
        return await self._open()

    async def _open_promptly(self) -> _Conn:
        wait = CONNECT_AGAIN_S
        while True:
            try:
                async with asyncio.timeout(wait):
                    return await self._open()
            except TimeoutError:
                wait *= 3

    async def _open(self) -> _Conn:
        tls = None
        if self.tls:
            import ssl  # only for an https:// registry: 10 ms of start-up otherwise

            tls = ssl.create_default_context()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=tls)
        return _Conn(reader, writer)

    def _request(self, method: str, path: str, body: bytes | None,
                 content_type: str) -> h11.Request:
        headers = list(self.headers.items())
        if body is not None:
            headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        elif method in ("POST", "PUT"):
            headers.append(("Content-Length", "0"))
        return h11.Request(method=method, target=path, headers=headers)

    async def _exchange(self, conn: _Conn, method: str, path: str, body: bytes | None,
                        content_type: str) -> Response:
        keep = False
        try:
            conn.send(self._request(method, path, body, content_type),
                      *([h11.Data(data=body)] if body else []), h11.EndOfMessage())
            try:
                await conn.writer.drain()
                head = await _read_head(conn)
            except ConnectionError:
                if conn.replied:
                    raise
                raise _Stale("connection closed before a reply") from None
            data = await _read_body(conn)
            keep = conn.next_cycle()
            return Response(head.status_code, data)
        finally:
            if keep:
                self._idle.append(conn)
            else:
                conn.close()


class _Stale(Exception):
    """The connection ended before a reply began."""


class _TooLarge(h11.RemoteProtocolError):
    """A reply body over MAX_BODY_BYTES."""


async def _read_head(conn: _Conn) -> h11.Response:
    while True:
        event = await conn.receive()
        if isinstance(event, h11.Response):
            return event
        # an InformationalResponse (1xx): the final one follows


async def _read_body(conn: _Conn) -> bytes:
    body = bytearray()
    while isinstance(event := await conn.receive(), h11.Data):
        body += event.data
        if len(body) > MAX_BODY_BYTES:
            raise _TooLarge(f"reply over {MAX_BODY_BYTES} bytes")
    return bytes(body)  # at EndOfMessage


def _declared_length(head: h11.Response) -> bool:
    return any(name == b"content-length" for name, _ in head.headers)


def _describe(error: Exception) -> str:
    if isinstance(error, h11.LocalProtocolError):
        # h11 quotes the offending header, which may be the bearer token: not in a message.
        return "the request is not valid HTTP/1.1 (a control character in a header?)"
    if isinstance(error, h11.RemoteProtocolError):
        return f"bad reply: {str(error)[:ERROR_TEXT_MAX]}"
    return str(error) or type(error).__name__
