"""The little HTTP/1.1 the node speaks to its registry (docs/api.md): JSON requests on kept-alive
connections, and one streamed response (the watch stream), over asyncio's streams.

Not aiohttp: its client cost the agent ~12 MB of resident memory and ~0.45 s of start-up to
import (bench/agent_footprint.py), for four requests and a stream. What the registry sends
is read strictly: a status line, headers, then a body by Content-Length, chunked, or until
the connection closes; anything else, and every failure of a connection (refused, reset,
cut off, too slow), is an `HttpError`, so callers catch one type.

A connection kept alive is reused for the next request. One that the registry closed
meanwhile fails on first use, and the request goes again once on a new connection: every
request of the node is safe to repeat (reads, a report, a punch the registry coalesces). An
idle connection is dropped after IDLE_S, below the registry's 20 s (registry/timings.py), so
that the node, not the registry, closes it, and never while the node sends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import HttpError

IDLE_S = 15.0  # as aiohttp's client did (keepalive_timeout), below the registry's 20 s
IDLE_MAX = 4  # connections kept for reuse; more at once are opened and closed
MAX_HEAD_BYTES = 16 * 1024  # a status line and headers; the registry's are a few hundred


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    def __init__(self, base_url: str, *, headers: dict[str, str], connections_max: int) -> None:
        url = urlsplit(base_url)
        self._host = url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._head = "".join(f"{k}: {v}\r\n" for k, v in
                             {"Host": f"{host}:{self._port}", **headers}.items())
        self._slots = asyncio.Semaphore(connections_max)
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def request(self, method: str, path: str, body: bytes | None, timeout_s: float
                      ) -> Response:
        """One request with a JSON body (or none), its whole answer within `timeout_s`."""
        head = (f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}"
                f"Content-Length: {len(body or b'')}\r\n"
                + ("Content-Type: application/json\r\n" if body is not None else "")
                + "\r\n").encode() + (body or b"")
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                connection = self._take_idle()
                if connection is not None:
                    try:
                        return await self._exchange(connection, head)
                    except (OSError, asyncio.IncompleteReadError):
                        pass  # closed by the registry while idle: once more, afresh
                return await self._exchange(await self._connect(), head)
        except TimeoutError:
            raise HttpError(f"no complete answer within {timeout_s:g} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise HttpError(_describe(error)) from None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, connect_timeout_s: float
                     ) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """GET `path` on a connection of its own, closed on leaving: the status within
        `connect_timeout_s`, and the body as it comes (the caller bounds each read; a failed
        read is an `HttpError`)."""
        head = f"GET {self._prefix}{path} HTTP/1.1\r\n{self._head}\r\n".encode()
        connection: _Connection | None = None
        try:
            try:
                async with asyncio.timeout(connect_timeout_s):
                    connection = await self._connect()
                    connection.writer.write(head)
                    status, headers = await _read_head(connection.reader)
            except TimeoutError:
                raise HttpError(f"no answer within {connect_timeout_s:g} s") from None
            yield status, _body(connection.reader, headers)
        except TimeoutError:  # the caller's own bound on a read (an OSError too): it says why
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise HttpError(_describe(error)) from None
        finally:
            if connection is not None:
                connection.close()

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < IDLE_S and not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl,
                                                       limit=MAX_HEAD_BYTES)
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, head: bytes) -> Response:
        keep = False
        try:
            connection.writer.write(head)
            status, headers = await _read_head(connection.reader)
            body = b"".join([chunk async for chunk in _body(connection.reader, headers)])
            keep = headers.get("connection", "").lower() != "close" and \
                ("content-length" in headers or "chunked" in headers.get(
                    "transfer-encoding", ""))
            return Response(status, body)
        finally:
            if keep and len(self._idle) < IDLE_MAX:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise HttpError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise HttpError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(code), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body as it arrives: by Content-Length, chunked, or until the connection closes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                raise HttpError(f"malformed chunk size: {size_line[:40]!r}") from None
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from the registry
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HttpError(f"malformed Content-Length: {headers['content-length'][:40]!r}"
                            ) from None
        yield await reader.readexactly(length)
    else:
        while chunk := await reader.read(65536):
            yield chunk


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.IncompleteReadError):
        return "the connection closed mid-answer"
    return str(error) or type(error).__name__
