"""Where the API accepts connections: `ApiSite`, an aiohttp site with its own accept loop.

aiohttp's `TCPSite` hands the listening socket to asyncio, which accepts whatever comes until
the process runs out of file descriptors, and then logs an error with a traceback at every
attempt (a slow-request flood made 117 MB of log in 45 s, and the observer could no longer open
the device). Here the registry accepts by hand (`Listener`), so it decides before a byte is
read:

- while the connection table is full (its capacity leaves `Limits.fd_reserve` descriptors for
  the rest of the registry), it does not accept at all: new connections wait in the kernel's
  backlog and cost us nothing;
- a connection over a cap (connlimit.py) is closed at once (RST), with one throttled line;
- an admitted one is served by aiohttp's protocol behind a `Guard` (connlimit.py), whose
  timers close it if its request head is late or it idles.

aiohttp's protocol answers a request it cannot parse itself, as text; `JsonErrors` makes that
answer `{"error": ...}` like every other (it overrides `RequestHandler.handle_error`, the one
method aiohttp uses to build that answer; tests/test_registry_api.py pins it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import ConfigError
from .api import handler_kwargs
from .appkeys import CLIENT_LOG, CONNECTIONS, IDENTITIES, LIMITS, STATE, TIMINGS
from .auth import source_ip
from .clientlog import ClientLog
from .connlimit import (
    Client,
    ConnectionTable,
    Guard,
    Refusal,
    Slot,
    classify,
    fd_capacity,
    open_fds,
    raise_fd_limit,
)
from .request import json_error

log = logging.getLogger(__name__)

# Connections accepted per wake-up of the listening socket, as asyncio does (its backlog
# argument); the event loop runs other work in between.
ACCEPT_BATCH = 128
# accept() failing for lack of a resource: wait (Timings.accept_retry_s) and try again.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Sources remembered by a listener (a stranger can try many addresses).
CLASSIFIED_MAX = 4096
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, keeps no TIME_WAIT


class JsonErrors(web.RequestHandler):
    """aiohttp's protocol, answering what it cannot parse with a JSON error, logged as one
    throttled line per source rather than a traceback per request."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 client_log: ClientLog, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._client_log = client_log

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("response already started: cannot answer with an error")
        if status >= 500:
            log.error("internal error serving a request from %s", request.remote,
                      exc_info=exc, extra={"event": "internal_error"})
            text = "internal error"
        else:
            detail = exc.message if isinstance(exc, HttpProcessingError) else message
            lines = (str(detail or "") or HTTPStatus(status).phrase).strip().splitlines()
            reason = lines[0][:120] if lines else str(status)
            text = f"malformed HTTP request: {reason}"
            self._client_log.log(request.remote or "?", "malformed HTTP request from %s: %s",
                                 request.remote, reason, event="malformed_http")
        response = json_error(status, text)
        response.force_close()
        return response


class Listener:
    """Accepts on one listening socket by hand: see the module docstring."""

    def __init__(self, sock: socket.socket, app: web.Application, server: web.Server) -> None:
        self._sock = sock
        local = source_ip(sock.getsockname()[0])
        self._local_text = None if local is None or local.is_unspecified else str(local)
        self._loop = asyncio.get_running_loop()
        self._state = app[STATE]
        self._classified: dict[tuple[str, str], Client] = {}
        self._classified_at = -1
        self._table: ConnectionTable = app[CONNECTIONS]
        self._identify = app[IDENTITIES]
        self._timings = app[TIMINGS]
        self._client_log: ClientLog = app[CLIENT_LOG]
        kwargs = handler_kwargs(app[TIMINGS], app[LIMITS])
        self._make_protocol = lambda: JsonErrors(server, loop=self._loop,
                                                 client_log=self._client_log, **kwargs)
        self._reading = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._resume()

    def close(self) -> None:
        self._closed = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()

    def _resume(self) -> None:
        self._retry = None
        if not self._closed and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._table.full:
                self._pause()
                self._table.when_room(self._resume)
                self._client_log.log(
                    "all", "not accepting API connections: %d open, the most the open-files "
                    "limit leaves room for", self._table.open, event="connections_full")
                return
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._client_log.log("all", "cannot accept API connections for now: %s",
                                         exc.strerror or exc, event="accept_failed")
                    self._pause()
                    self._retry = self._loop.call_later(self._timings.accept_retry_s,
                                                        self._resume)
                    return
                continue  # the client gave up before we took it (ECONNABORTED, EPROTO)
            self._take(conn, address)

    def _take(self, conn: socket.socket, address: Any) -> None:
        client = self._classify(conn, address[0])
        if client is None:
            conn.close()
            return
        admitted = self._table.admit(client)
        if isinstance(admitted, Refusal):
            self._client_log.log(client.source, "refused a connection from %s (%s): %s",
                                 client.source, client.kind.value, admitted.reason,
                                 event=admitted.event)
            _reset(conn)
            return
        conn.setblocking(False)
        task = self._loop.create_task(self._serve(conn, admitted))
        self._tasks.add(task)  # a reference, so the task is not collected half-way
        task.add_done_callback(self._tasks.discard)

    def _classify(self, conn: socket.socket, source_text: str) -> Client | None:
        """Who connected, from the addresses alone; answers are kept while the table's
        roster revision stands (a flood of connections from one source costs a dict lookup
        each)."""
        local_text = self._local_text
        if local_text is None:  # a wildcard address: which one was reached?
            try:
                local_text = conn.getsockname()[0]
            except OSError:
                return None
        revision = self._state.roster_revision
        if revision != self._classified_at or len(self._classified) >= CLASSIFIED_MAX:
            self._classified.clear()
            self._classified_at = revision
        key = (source_text, local_text)
        client = self._classified.get(key)
        if client is None:
            source = source_ip(source_text)
            if source is None:
                return None
            client = self._classified[key] = classify(source, source_ip(local_text),
                                                      self._identify)
        return client

    async def _serve(self, conn: socket.socket, slot: Slot) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: Guard(self._make_protocol(), slot, self._timings, self._timed_out),
                conn)
        except OSError:  # gone before its transport was made
            slot.release()
            conn.close()

    def _timed_out(self, client: Client, waiting_for: str) -> None:
        if waiting_for == "idle":
            return  # an idle keep-alive connection closed: routine, not the client's fault
        self._client_log.log(client.source, "closed a connection of %s (%s): no complete "
                             "request head within %g s", client.source, client.kind.value,
                             self._timings.head_timeout_s, event="slow_request")


class ApiSite(web.BaseSite):
    """Serve `runner`'s application (made by api.create_app) on HOST:PORT, through a
    `Listener`. The first site to start raises the open-files limit and fits the connection
    table to it."""

    __slots__ = ("_bound_port", "_host", "_listener", "_port")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port = host, port
        self._bound_port: int | None = None
        self._listener: Listener | None = None

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    async def start(self) -> None:
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        app = runner.app
        sock = _listening_socket(self._host, self._port, self._backlog)
        await super().start()
        _fit_fd_limit(app[CONNECTIONS])
        self._bound_port = sock.getsockname()[1]
        self._listener = Listener(sock, app, runner.server)
        self._listener.start()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await super().stop()


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"registry: cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio: [::] means IPv6 only
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _fit_fd_limit(table: ConnectionTable) -> None:
    if table.fitted:
        return
    before, soft, hard = raise_fd_limit()
    in_use = open_fds()
    limits = table.limits
    table.capacity = fd_capacity(limits.max_connections, soft, in_use, limits.fd_reserve)
    table.fitted = True
    if soft != before:
        log.info("raised the open-files limit from %d to %d", before, soft,
                 extra={"event": "fd_limit_raised", "soft": soft, "hard": hard})
    level = logging.WARNING if table.capacity < min(limits.max_connections, 512) else logging.INFO
    log.log(level, "API: at most %d connections (open-files limit %d, %d in use, %d kept for "
            "the rest of the registry)%s", table.capacity, soft, in_use, limits.fd_reserve,
            "; raise the hard limit (LimitNOFILE=, ulimit -Hn) to serve more nodes"
            if level == logging.WARNING else "",
            extra={"event": "connection_capacity", "capacity": table.capacity})


def _reset(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    conn.close()
