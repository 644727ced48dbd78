"""What the API's handlers (api.py, relayroute.py) do with a request: take a token of the
caller's rate, read its body with a deadline and a size limit, name the peer its path names,
and answer in JSON (`{"error": ...}` for a refusal, docs/api.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import MalformedMessage, RateLimited, RequestRefused
from ..keys import Key
from ..protocol import decode_object, dumps
from .appkeys import CALLER, CLIENT_LOG, TIMINGS
from .ratelimit import RateLimiter
from .wire import only_params, path_key


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


def json_error(status: int, message: str, headers: dict[str, str] | None = None
               ) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


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
