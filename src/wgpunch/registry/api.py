"""The registry's HTTP API, exactly docs/api.md, on aiohttp: its handlers and the application.

Every handler runs inside the two middlewares of middleware.py (JSON errors, pacing, who is
calling); connections themselves are admitted, capped and timed by site.py and connlimit.py,
which read this application's keys (appkeys.py).

Request bodies are read with a deadline (request.py), become validated frozen values
(report.py) before they touch the state, and the state is changed only through its plain-`def`
methods. Reports and punch requests are rate-limited per caller; watch streams are capped per
caller (a new one beyond the cap ends the caller's oldest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..protocol import MAX_BODY_BYTES, peers_json, reported_from_json
from . import kick
from .appkeys import (
    CALLER,
    CLIENT_LOG,
    CONNECTIONS,
    IDENTITIES,
    LIMITS,
    METRICS,
    OBSERVER,
    PACE,
    PUNCH_RATE,
    REPORT_RATE,
    STATE,
    STREAMS,
    TIMINGS,
    TOKEN,
)
from .auth import Identities
from .clientlog import ClientLog, quiet_malformed_http
from .connlimit import ConnectionTable
from .limits import Limits
from .metrics import RegistryMetrics
from .middleware import auth_middleware, errors_middleware
from .observer import Observer
from .ratelimit import RateLimiter
from .request import json_response, peer_in_path, rate_limit, read_body
from .state import RegistryState
from .stream import Stream
from .timings import Timings
from .watch import Pump
from .wire import only_params, watch_query

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


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
    rate_limit(request, REPORT_RATE, "PUT /v1/self")
    reported = reported_from_json(await read_body(request))
    state = request.app[STATE]
    before = state.revision
    revision = state.report(request[CALLER], reported)
    if revision != before:  # a node that starts or moves reports: its endpoint may move too
        _nudge(request.app)
    return json_response({"revision": revision})


async def post_punch(request: web.Request) -> web.Response:
    target = await peer_in_path(request, "POST /v1/punch", PUNCH_RATE)
    _nudge(request.app)  # a punch follows a start or a path that died: endpoints may move
    endpoint, pushed = request.app[STATE].request_punch(
        request[CALLER], target, time.monotonic())
    request.app[METRICS].punch(pushed)
    return json_response({"peer": target.base64(), "endpoint": str(endpoint)}, status=202)


async def post_opened(request: web.Request) -> web.Response:
    target = await peer_in_path(request, "POST /v1/punch/{peer}/opened", PUNCH_RATE,
                                "POST /v1/punch")
    pushed = request.app[STATE].opened(request[CALLER], target)
    return json_response({"peer": target.base64(), "pushed": pushed}, status=202)


def _nudge(app: web.Application) -> None:
    observer = app.get(OBSERVER)
    if observer is not None:
        observer.nudge()


async def watch(request: web.Request) -> web.StreamResponse:
    since, epoch = watch_query(request.query.items())
    app, caller = request.app, request[CALLER]
    state, timings = app[STATE], app[TIMINGS]
    stream, first = state.open_stream(caller, since, epoch, now=time.monotonic(),
                                      address=request.remote)
    _hold(app, stream)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})

    def abort() -> None:
        if request.transport is not None:
            request.transport.abort()

    try:
        await response.prepare(request)
        pump = Pump(response, stream, state.heartbeat_line, timings, abort)
        if not await pump.run(b"".join(first)):
            app[CLIENT_LOG].log(
                caller, "ended the watch stream of %s: it took no line for %g s", caller,
                timings.stream_write_timeout_s, event="stream_stalled")
    except ConnectionResetError:
        log.debug("watch stream of %s: client went away", caller)
    finally:
        state.close_stream(stream)
        _release(app, stream)
    return response


def _hold(app: web.Application, stream: Stream) -> None:
    """Count `stream` as its caller's; beyond the cap, end the caller's oldest (it is most
    likely one the node gave up for dead, docs/api.md)."""
    held = app[STREAMS].setdefault(stream.caller, [])
    held.append(stream)
    cap = app[LIMITS].caller_streams
    while len(held) > cap:
        oldest = held.pop(0)
        app[STATE].close_stream(oldest)
        app[CLIENT_LOG].log(stream.caller, "ended the oldest watch stream of %s: at most %d "
                            "per node", stream.caller, cap, event="stream_replaced",
                            level=logging.INFO)


def _release(app: web.Application, stream: Stream) -> None:
    held = app[STREAMS].get(stream.caller)
    if held is not None and stream in held:
        held.remove(stream)
        if not held:
            del app[STREAMS][stream.caller]


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


async def _end_streams(app: web.Application) -> None:
    app[STATE].close_streams()


async def _count_response(request: web.Request, response: web.StreamResponse) -> None:
    resource = request.match_info.route.resource  # None: no route matched
    request.app[METRICS].api_response("other" if resource is None else resource.canonical,
                                      response.status)


def handler_kwargs(timings: Timings, limits: Limits) -> dict[str, Any]:
    """aiohttp's per-connection settings (RequestHandler): head sizes, idle timeout."""
    return {
        # An idle keep-alive connection is closed (Guard does too; this covers other sites).
        "keepalive_timeout": timings.idle_timeout_s,
        # A body the handler did not read (a refused or rate-limited request) is not read
        # afterwards either: the connection is closed after the answer.
        "lingering_time": 0,
        "max_line_size": limits.max_line_bytes,
        "max_field_size": limits.max_line_bytes,
        "max_headers": limits.max_headers,
        "access_log": None,  # one line per request is what a flood would make of the log
    }


def create_app(
    state: RegistryState,
    *,
    timings: Timings | None = None,
    limits: Limits | None = None,
    observer: Observer | None = None,
    token: str | None = None,
    metrics: RegistryMetrics | None = None,
) -> web.Application:
    """The API over `state`; with `observer`, the application also runs it (started before
    the first request, stopped after the last). Serve it with site.ApiSite, which applies
    the connection limits. `metrics` counts requests, refusals and punches."""
    timings = timings or Timings()
    limits = limits or Limits()
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[errors_middleware, auth_middleware],
                          handler_args=handler_kwargs(timings, limits))
    app[STATE] = state
    app[TIMINGS] = timings
    app[LIMITS] = limits
    app[IDENTITIES] = Identities(state)
    app[METRICS] = metrics = metrics or RegistryMetrics()
    app[CLIENT_LOG] = ClientLog(log, timings.forbidden_log_s, limits.log_lines_per_kind,
                                count=metrics.client_event)
    app[CONNECTIONS] = ConnectionTable(limits)
    app[PACE] = RateLimiter(limits.requests_burst, limits.requests_per_s)
    app[REPORT_RATE] = RateLimiter(limits.report_burst, limits.report_per_s)
    app[PUNCH_RATE] = RateLimiter(limits.punch_burst, limits.punch_per_s)
    app[STREAMS] = {}
    app.cleanup_ctx.append(quiet_malformed_http(app[CLIENT_LOG]))
    kick.install(app, state, timings)
    if token is not None:
        app[TOKEN] = token
    if observer is not None:
        app[OBSERVER] = observer
        app.cleanup_ctx.append(_observer_ctx(observer))
    app.on_shutdown.append(_end_streams)
    app.on_response_prepare.append(_count_response)
    # No HEAD: docs/api.md defines none, and a HEAD watch would stream nothing, forever.
    app.router.add_get("/v1/peers", get_peers, allow_head=False)
    app.router.add_get("/v1/watch", watch, allow_head=False)
    app.router.add_put("/v1/self", put_self)
    app.router.add_post("/v1/punch/{peer}", post_punch)
    app.router.add_post("/v1/punch/{peer}/opened", post_opened)
    app.router.add_get("/healthz", healthz, allow_head=False)
    return app
