"""The node's HTTP/1.1 client: just what the registry API needs (docs/api.md), on asyncio
streams.

A node's first punch request is on the time-to-direct path, and importing aiohttp's client
took 0.3 s of the agent's 0.5 s start-up on a busy 2-core machine (bench/startup.py); the
node needs JSON requests on kept-alive connections and one streamed response, no more.

- Requests: `Content-Length` bodies, replies framed by `Content-Length`, chunked encoding, or
  the end of the connection. Connections are kept alive and reused, at most `limit` open at
  once (below the registry's per-caller cap), and one idle for `idle_s` is closed by us, before
  the registry's own idle timeout closes it under a request (registry/timings.py).
- A request that fails on a reused connection before any byte of the reply came is sent
  again once on a new one: the server may have closed the connection as we picked it.
- `stream()`: a GET whose reply body is handed over as it arrives, each read bounded by a
  timeout, on a connection of its own that is closed afterwards.

Every failure is an `ApiError` whose message names the method and URL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import __version__
from ..errors import ApiError

MAX_HEAD_BYTES = 64 * 1024  # status line and headers
MAX_BODY_BYTES = 64 * 1024 * 1024  # a /v1/peers reply of a very large registry
READ_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()
        self.reused = False

    def usable(self, idle_s: float) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and time.monotonic() - self.idle_since < idle_s)

    def close(self) -> None:
        self.writer.close()


class _Head:
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("connection", "").lower()


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
                    except _Stale:
                        continue  # the server closed it as we picked it: a new one
        except TimeoutError:
            raise ApiError(f"registry: {method} {url}: no answer within {timeout_s:g} s") from None
        except OSError as error:
            raise ApiError(f"registry: {method} {url}: {_describe(error)}") from None
        except _Malformed as error:
            raise ApiError(f"registry: {method} {url}: {error}") from None

    async def stream(self, path: str, *, connect_timeout_s: float,
                     read_timeout_s: float) -> AsyncIterator[tuple[int, bytes]]:
        """GET `path`: yields (status, data) for each piece of the reply body as it arrives
        (the whole body at once for an error status or a body of a declared length), and
        ends with the body; `ApiError` when a read waits longer than `read_timeout_s`."""
        url = self.base_url + path
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(connect_timeout_s):
                conn = await self._open()
                self._streams.add(conn)
                conn.writer.write(self._head("GET", path, None, ""))
                head = await _read_head(conn.reader)
            if head.status >= 400 or "content-length" in head.headers:
                async with asyncio.timeout(read_timeout_s):
                    body = await _read_body(conn.reader, head)
                yield head.status, body
                return
            while True:
                async with asyncio.timeout(read_timeout_s):
                    data = await (_read_chunk(conn.reader) if head.chunked
                                  else conn.reader.read(READ_BYTES))
                if not data:
                    return
                yield head.status, data
        except TimeoutError:
            raise ApiError(f"registry: GET {url}: nothing for {read_timeout_s:g} s"
                           if conn is not None else
                           f"registry: GET {url}: no connection within {connect_timeout_s:g} s"
                           ) from None
        except OSError as error:
            raise ApiError(f"registry: GET {url}: {_describe(error)}") from None
        except (_Malformed, _Stale) as error:
            raise ApiError(f"registry: GET {url}: {error or 'connection closed'}") from None
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

    async def _open(self) -> _Conn:
        tls = None
        if self.tls:
            import ssl  # only for an https:// registry: 10 ms of start-up otherwise

            tls = ssl.create_default_context()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=tls,
                                                       limit=MAX_HEAD_BYTES)
        return _Conn(reader, writer)

    def _head(self, method: str, path: str, body: bytes | None, content_type: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in self.headers.items())]
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        elif method in ("POST", "PUT"):
            lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def _exchange(self, conn: _Conn, method: str, path: str, body: bytes | None,
                        content_type: str) -> Response:
        keep = False
        try:
            conn.writer.write(self._head(method, path, body, content_type))
            try:
                await conn.writer.drain()
                head = await _read_head(conn.reader)
            except (_Stale, ConnectionError) as error:
                if conn.reused:
                    raise _Stale() from None
                raise _Malformed("connection closed before a reply") from error
            data = await _read_body(conn.reader, head)
            keep = head.keep_alive and (head.chunked or "content-length" in head.headers)
            return Response(head.status, data)
        finally:
            if keep:
                conn.idle_since, conn.reused = time.monotonic(), False
                self._idle.append(conn)
            else:
                conn.close()


class _Stale(Exception):
    """The connection ended before a reply began."""


class _Malformed(Exception):
    """The reply is not HTTP/1.1 as this client reads it."""


async def _read_head(reader: asyncio.StreamReader) -> _Head:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            raise _Stale() from None
        raise _Malformed("connection closed in the reply's head") from None
    except asyncio.LimitOverrunError:
        raise _Malformed(f"reply head over {MAX_HEAD_BYTES} bytes") from None
    status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise _Malformed(f"not an HTTP/1.x reply: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise _Malformed(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return _Head(int(code), headers)


async def _read_body(reader: asyncio.StreamReader, head: _Head) -> bytes:
    try:
        if head.chunked:
            body = bytearray()
            while chunk := await _read_chunk(reader):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _Malformed(f"reply over {MAX_BODY_BYTES} bytes")
            return bytes(body)
        if "content-length" in head.headers:
            text = head.headers["content-length"]
            if not text.isdigit() or int(text) > MAX_BODY_BYTES:
                raise _Malformed(f"bad Content-Length {text[:20]!r}")
            return await reader.readexactly(int(text))
        body = bytearray()  # framed by the end of the connection
        while data := await reader.read(READ_BYTES):
            body += data
            if len(body) > MAX_BODY_BYTES:
                raise _Malformed(f"reply over {MAX_BODY_BYTES} bytes")
        return bytes(body)
    except asyncio.IncompleteReadError:
        raise _Malformed("connection closed in the reply's body") from None


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); b"" for the last, trailers consumed."""
    try:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Malformed(f"bad chunk size {size_text[:20]!r}") from None
        if size > MAX_BODY_BYTES or size < 0:
            raise _Malformed(f"chunk of {size} bytes")
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailer fields: none that we use
            return b""
        data = await reader.readexactly(size + 2)
        if not data.endswith(b"\r\n"):
            raise _Malformed("chunk not followed by CRLF")
        return data[:-2]
    except asyncio.IncompleteReadError:
        raise _Malformed("connection closed in a chunk") from None
    except asyncio.LimitOverrunError:
        raise _Malformed("chunk size line too long") from None


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__

