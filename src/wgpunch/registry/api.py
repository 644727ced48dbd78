"""The registry's HTTP API, exactly docs/api.md, on aiohttp.

Two middlewares wrap every handler. The outer one tells the connection's `Guard`
(connlimit.py) that a request is being handled, and turns every failure into a JSON error:
`MalformedMessage` → 400, `RequestRefused` → its status (`RateLimited`: 429 with Retry-After),
aiohttp's own (404, 405, 413) keep their status, anything unexpected → a logged 500; nothing
a client sends can stop the server. The inner one decides who is calling (auth.py) before any
handler, or any route lookup, runs; only `/healthz` answers strangers, one request per
connection. Connections themselves are admitted, capped and timed by site.py and
connlimit.py, which read this application's keys.

Request bodies are read with a deadline, become validated frozen values (report.py) before
they touch the state, and the state is changed only through its plain-`def` methods. Reports
and punch requests are rate-limited per caller; watch streams are capped per caller (a new one
beyond the cap ends the caller's oldest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import MalformedMessage, RateLimited, RequestRefused
from ..keys import Key
from ..protocol import (
    MAX_BODY_BYTES,
    decode_object,
    dumps,
    peers_json,
    reported_from_json,
)
from . import kick
from .auth import Identities, bearer_matches, source_ip
from .clientlog import ClientLog, quiet_malformed_http
from .connlimit import Client, ConnectionTable, Guard, Kind
from .limits import Limits
from .metrics import RegistryMetrics
from .observer import Observer
from .ratelimit import RateLimiter
from .state import RegistryState, Stream
from .timings import Timings
from .watch import Pump
from .wire import only_params, path_key, watch_query

log = logging.getLogger(__name__)

STATE = web.AppKey("state", RegistryState)
TIMINGS = web.AppKey("timings", Timings)
LIMITS = web.AppKey("limits", Limits)
TOKEN = web.AppKey("token", str)  # absent: no bearer token required
OBSERVER = web.AppKey("observer", Observer)  # absent: the state is fed by someone else
IDENTITIES = web.AppKey("identities", Identities)
CLIENT_LOG = web.AppKey("client_log", ClientLog)
CONNECTIONS = web.AppKey("connections", ConnectionTable)
PACE = web.AppKey("pace", RateLimiter)
REPORT_RATE = web.AppKey("report_rate", RateLimiter)
PUNCH_RATE = web.AppKey("punch_rate", RateLimiter)
STREAMS = web.AppKey("streams", dict[Key, list[Stream]])  # each caller's, oldest first
METRICS = web.AppKey("metrics", RegistryMetrics)
CALLER = web.RequestKey("caller", Key)

# Needs no identity: it tells only counts, so the registry host can monitor itself.
PUBLIC_PATHS = frozenset({"/healthz"})
STRANGERS = "strangers"  # the one pacing budget of every source that is no peer's
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


def _guard(request: web.Request) -> Guard | None:
    transport = request.transport
    protocol = None if transport is None else transport.get_protocol()
    return protocol if isinstance(protocol, Guard) else None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = _guard(request)  # None when served by a plain aiohttp site (tests)
    if guard is not None:
        guard.request_started()
    try:
        if guard is not None:
            await _pace(request.app, guard.slot.client)
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except MalformedMessage as exc:
        return json_error(400, str(exc))
    except RateLimited as exc:
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))  # RFC 9110: whole seconds
        return json_error(429, str(exc), {"Retry-After": retry_after})
    except RequestRefused as exc:
        response = json_error(exc.status, str(exc))
        if exc.status == 408:
            response.force_close()  # the rest of the body may still come
        return response
    except ConnectionError:  # the client went away mid-request: nobody to answer
        log.debug("%s %s: the client went away", request.method, request.path[:100])
        return json_error(400, "connection lost")
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path,
                      extra={"event": "internal_error"})
        return json_error(500, "internal error")
    finally:
        if guard is not None:
            guard.request_finished()


async def _pace(app: web.Application, client: Client) -> None:
    """Wait for this client's turn (Limits.requests_per_s): one budget per caller, per
    address of this host, and one for all strangers."""
    key = STRANGERS if client.kind is Kind.STRANGER else client.key
    wait_s = app[PACE].reserve(key, time.monotonic())
    if wait_s:
        app[CLIENT_LOG].log(key, "pacing the requests of %s: more than %d at once or %g per "
                            "second", key, app[PACE].burst, app[PACE].per_s, event="paced",
                            level=logging.INFO)
        await asyncio.sleep(wait_s)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    ip = source_ip(request.remote)
    caller = None if ip is None else app[IDENTITIES](ip)
    if request.path in PUBLIC_PATHS:
        response = await handler(request)
        if caller is None:
            response.force_close()  # a stranger's connection serves one request
        return response
    if caller is None:
        app[CLIENT_LOG].log(
            request.remote, "refused %s %r from %s: not the tunnel address of exactly one peer",
            request.method, request.path[:100], request.remote, event="forbidden")
        response = json_error(403, f"source address {request.remote} is not the tunnel "
                                   "address of exactly one peer of the registry")
        response.force_close()
        return response
    token = app.get(TOKEN)
    if token is not None and not bearer_matches(request.headers.get("Authorization"), token):
        return json_error(401, "missing or wrong bearer token",
                          {"WWW-Authenticate": 'Bearer realm="wgpunch"'})
    request[CALLER] = caller
    return await handler(request)


def rate_limit(request: web.Request, key: web.AppKey[RateLimiter], what: str) -> None:
    """Take a token of the caller's bucket for `what`, or refuse with 429 (before the body is
    read: a refused request costs little)."""
    limiter, caller = request.app[key], request[CALLER]
    wait_s = limiter.take(caller, time.monotonic())
    if wait_s:
        request.app[CLIENT_LOG].log(
            (caller, what), "rate-limited %s from %s: more than %d at once or %.3g per second",
            what, caller, limiter.burst, limiter.per_s, event="rate_limited")
        raise RateLimited(f"{what}: more than {limiter.burst} at once or "
                          f"{limiter.per_s:.3g} per second; retry in {wait_s:.1f} s", wait_s)


async def read_body(request: web.Request) -> bytes:
    """The request body (decoded, at most MAX_BODY_BYTES), complete within body_timeout_s;
    a body that does not decode (a bad `Content-Encoding`) is a MalformedMessage."""
    timeout_s = request.app[TIMINGS].body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestRefused(f"body: not complete within {timeout_s:g} s", 408) from None
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        detail = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
        reason = (str(detail).strip().splitlines() or ["cannot be read"])[0][:120]
        raise MalformedMessage(f"body: {reason}") from None


async def peer_in_path(request: web.Request, route: str, rate: web.AppKey[RateLimiter],
                       rate_as: str | None = None) -> Key:
    """The peer that a `POST {route}` names in its path, for a request that carries nothing
    else: no query, no body fields; rate-limited by `rate` (under the name `rate_as`, where
    routes share a bucket)."""
    only_params(request.query.items(), ())
    target = path_key(request.match_info["peer"])
    rate_limit(request, rate, rate_as or route)
    body = await read_body(request)
    # The contract has no body; an empty JSON object (what many clients send) is the same.
    if body.strip() and decode_object(body):
        raise MalformedMessage(f"body: {route} takes no fields")
    return target


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
