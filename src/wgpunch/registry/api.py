"""The registry's HTTP API, exactly docs/api.md, on aiohttp.

Two middlewares wrap every handler. The outer one turns every failure into a JSON error:
`MalformedMessage` → 400, `RequestRefused` → its status, aiohttp's own (404, 405, 413) keep their
status, anything unexpected → a logged 500; nothing a client sends can stop the server. The
inner one decides who is calling (auth.py) before any handler, or any route lookup, runs; only
`/healthz` answers strangers.

Request bodies become validated frozen values (report.py) before they touch the state, and
the state is changed only through its plain-`def` methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import MalformedMessage, RequestRefused
from ..keys import Key
from ..protocol import (
    MAX_BODY_BYTES,
    decode_object,
    dumps,
    heartbeat_json,
    item_json,
    ndjson_line,
    peers_json,
    reported_from_json,
)
from ..throttle import Throttle
from .auth import bearer_matches, identify, source_ip
from .observer import Observer
from .state import RegistryState
from .timings import Timings
from .wire import only_params, path_key, watch_query

log = logging.getLogger(__name__)

STATE = web.AppKey("state", RegistryState)
TIMINGS = web.AppKey("timings", Timings)
TOKEN = web.AppKey("token", str)  # absent: no bearer token required
OBSERVER = web.AppKey("observer", Observer)  # absent: the state is fed by someone else
FORBIDDEN_LOG = web.AppKey("forbidden_log", Throttle)
CALLER = web.RequestKey("caller", Key)

# Needs no identity: it tells only counts, so the registry host can monitor itself.
PUBLIC_PATHS = frozenset({"/healthz"})
NDJSON = "application/x-ndjson"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


def json_error(status: int, message: str, headers: dict[str, str] | None = None
               ) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


def _http_error(exc: web.HTTPException) -> web.Response:
    if exc.status == 413:
        message = f"request body larger than {MAX_BODY_BYTES} bytes"
    else:
        message = exc.reason.lower()
    keep = {k: v for k, v in exc.headers.items()
            if k.lower() not in ("content-type", "content-length")}
    return json_error(exc.status, message, keep)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except MalformedMessage as exc:
        return json_error(400, str(exc))
    except RequestRefused as exc:
        return json_error(exc.status, str(exc))
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path,
                      extra={"event": "internal_error"})
        return json_error(500, "internal error")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    app = request.app
    ip = source_ip(request.remote)
    caller = None if ip is None else identify(ip, app[STATE].peers.values())
    if caller is None:
        held = app[FORBIDDEN_LOG].allow(request.remote, time.monotonic())
        if held is not None:
            log.warning("refused %s %r from %s: not the tunnel address of exactly one peer%s",
                        request.method, request.path[:100], request.remote,
                        f" ({held} more refused since)" if held else "",
                        extra={"event": "forbidden", "source": request.remote})
        return json_error(403, f"source address {request.remote} is not the tunnel address "
                               "of exactly one peer of the registry")
    token = app.get(TOKEN)
    if token is not None and not bearer_matches(request.headers.get("Authorization"), token):
        return json_error(401, "missing or wrong bearer token",
                          {"WWW-Authenticate": 'Bearer realm="wgpunch"'})
    request[CALLER] = caller
    return await handler(request)


# -- handlers ---------------------------------------------------------------------------------


async def get_peers(request: web.Request) -> web.Response:
    only_params(request.query.items(), ())
    state = request.app[STATE]
    return json_response({
        "epoch": state.epoch,
        "revision": state.revision,
        "you": request[CALLER].base64(),
        "peers": peers_json(state.sorted_peers()),
    })


async def put_self(request: web.Request) -> web.Response:
    only_params(request.query.items(), ())
    reported = reported_from_json(await request.read())
    revision = request.app[STATE].report(request[CALLER], reported)
    return json_response({"revision": revision})


async def post_punch(request: web.Request) -> web.Response:
    only_params(request.query.items(), ())
    target = path_key(request.match_info["peer"])
    body = await request.read()
    # The contract has no body; an empty JSON object (what many clients send) is the same.
    if body.strip() and decode_object(body):
        raise MalformedMessage("body: POST /v1/punch takes no fields")
    endpoint, _pushed = request.app[STATE].request_punch(
        request[CALLER], target, time.monotonic())
    return json_response({"peer": target.base64(), "endpoint": str(endpoint)}, status=202)


async def watch(request: web.Request) -> web.StreamResponse:
    since, epoch = watch_query(request.query.items())
    state, timings = request.app[STATE], request.app[TIMINGS]
    stream, first = state.open_stream(request[CALLER], since, epoch)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    try:
        await response.prepare(request)
        for item in first:
            await response.write(ndjson_line(item_json(item)))
        while True:
            try:
                async with asyncio.timeout(timings.heartbeat_s):
                    next_item = await stream.queue.get()
            except TimeoutError:
                await response.write(ndjson_line(heartbeat_json(state.revision)))
                continue
            if next_item is None:  # closed: overflow or shutdown; the client resumes
                break
            await response.write(ndjson_line(item_json(next_item)))
    except ConnectionResetError:
        log.debug("watch stream of %s: client went away", request[CALLER])
    finally:
        state.close_stream(stream)
    return response


async def healthz(request: web.Request) -> web.Response:
    only_params(request.query.items(), ())
    state = request.app[STATE]
    observer = request.app.get(OBSERVER)
    return json_response({
        "ok": observer is None or observer.failures == 0,
        "epoch": state.epoch,
        "revision": state.revision,
        "peers": len(state.peers),
    })


# -- the application --------------------------------------------------------------------------


def _observer_ctx(observer: Observer) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run_observer(app: web.Application) -> AsyncIterator[None]:
        # One read before serving, so that the first requests find their callers.
        await observer.poll_once()
        task = asyncio.create_task(observer.run(), name="registry-observer")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await observer.close()

    return run_observer


class _MalformedHttp(logging.Filter):
    """aiohttp logs every unparsable request (a port scan, a TLS hello, a broken client) as an
    ERROR with a traceback. For a server on a network that is one line of noise per packet:
    make it one WARNING line, at most once per source per `period_s`."""

    def __init__(self, period_s: float) -> None:
        super().__init__()
        self._throttle = Throttle(period_s)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        source = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        if self._throttle.allow(source, time.monotonic()) is None:
            return False
        reason = (error.message or type(error).__name__).strip().splitlines()[0][:120]
        record.msg, record.args = "malformed HTTP request from %s: %s", (source, reason)
        if record.levelno > logging.WARNING:  # aiohttp says ERROR; a non-HTTP hello, DEBUG
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        record.event, record.source = "malformed_http", source
        return True


def _quiet_malformed_http(period_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def install(app: web.Application) -> AsyncIterator[None]:
        server_log, quiet = logging.getLogger("aiohttp.server"), _MalformedHttp(period_s)
        server_log.addFilter(quiet)
        try:
            yield
        finally:
            server_log.removeFilter(quiet)

    return install


async def _end_streams(app: web.Application) -> None:
    app[STATE].close_streams()


def create_app(
    state: RegistryState,
    *,
    timings: Timings | None = None,
    observer: Observer | None = None,
    token: str | None = None,
) -> web.Application:
    """The API over `state`; with `observer`, the application also runs it (started before
    the first request, stopped after the last)."""
    timings = timings or Timings()
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[errors_middleware, auth_middleware])
    app[STATE] = state
    app[TIMINGS] = timings
    app[FORBIDDEN_LOG] = Throttle(timings.forbidden_log_s)
    app.cleanup_ctx.append(_quiet_malformed_http(timings.forbidden_log_s))
    if token is not None:
        app[TOKEN] = token
    if observer is not None:
        app[OBSERVER] = observer
        app.cleanup_ctx.append(_observer_ctx(observer))
    app.on_shutdown.append(_end_streams)
    # No HEAD: docs/api.md defines none, and a HEAD watch would stream nothing, forever.
    app.router.add_get("/v1/peers", get_peers, allow_head=False)
    app.router.add_get("/v1/watch", watch, allow_head=False)
    app.router.add_put("/v1/self", put_self)
    app.router.add_post("/v1/punch/{peer}", post_punch)
    app.router.add_get("/healthz", healthz, allow_head=False)
    return app
