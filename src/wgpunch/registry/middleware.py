"""The two middlewares that wrap every handler of the API (api.py).

The outer one tells the connection's `Guard` (connlimit.py) that a request is being handled,
paces the client, and turns every failure into a JSON error: `MalformedMessage` → 400,
`RequestRefused` → its status (`RateLimited`: 429 with Retry-After), aiohttp's own (404, 405,
413) keep their status, anything unexpected → a logged 500; nothing a client sends can stop
the server. The inner one decides who is calling (auth.py) before any handler, or any route
lookup, runs; only `/healthz` answers strangers, one request per connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import MalformedMessage, RateLimited, RequestRefused
from ..protocol import MAX_BODY_BYTES
from .appkeys import CALLER, CLIENT_LOG, IDENTITIES, PACE, TOKEN
from .auth import bearer_matches, source_ip
from .connlimit import Client, Guard, Kind
from .request import json_error

log = logging.getLogger(__name__)

# Needs no identity: it tells only counts, so the registry host can monitor itself.
PUBLIC_PATHS = frozenset({"/healthz"})
STRANGERS = "strangers"  # the one pacing budget of every source that is no peer's

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
