"""Log lines about what clients did: refused, timed out, rate-limited, malformed.

A hostile client can cause such a condition as often as it likes, so each kind is logged at
most once per client per period, and at most `lines_per_kind` times per period in all (a
client can use many source addresses); the next line says how many were held back. Never a
traceback: a client's input is not a bug of ours. `MalformedHttp` routes aiohttp's own lines
about unparsable requests here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..throttle import Throttle


class ClientLog:
    def __init__(self, logger: logging.Logger, period_s: float, lines_per_kind: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 count: Callable[[str], None] = lambda event: None) -> None:
        self._logger = logger
        self._count = count  # every occurrence, logged or held back (metrics.py)
        self._period_s = period_s
        self._lines_per_kind = lines_per_kind
        self._clock = clock
        self._throttles: dict[str, Throttle] = {}

    def log(self, client: Hashable, message: str, *args: object, event: str,
            level: int = logging.WARNING) -> bool:
        """Log `message % args` as `event` (the kind), unless held back; True if logged."""
        self._count(event)
        throttle = self._throttles.get(event)
        if throttle is None:
            throttle = self._throttles[event] = Throttle(self._period_s,
                                                         max_lines=self._lines_per_kind)
        held = throttle.allow(client, self._clock())
        if held is None:
            return False
        suffix = f" ({held} more like it not logged)" if held else ""
        self._logger.log(level, message + "%s", *args, suffix,
                         extra={"event": event, "source": str(client)})
        return True


class MalformedHttp(logging.Filter):
    """aiohttp logs an unparsable request (a port scan, a TLS hello, a broken client) as an
    ERROR with a traceback when it answers it itself (site.JsonErrors answers those for
    ApiSite; this covers any other path, such as a plain aiohttp site, api.create_app
    installs it). For a server on a
    network that is noise a client can make at will: it becomes the client log's line
    ("malformed_http", throttled per source), the record itself is dropped."""

    def __init__(self, client_log: ClientLog) -> None:
        super().__init__()
        self._client_log = client_log

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, web.RequestPayloadError) and isinstance(error.__cause__,
                                                                     HttpProcessingError):
            error = error.__cause__
        if not isinstance(error, HttpProcessingError):
            return True
        source = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = (error.message or type(error).__name__).strip().splitlines()[0][:120]
        self._client_log.log(source, "malformed HTTP request from %s: %s", source, reason,
                             event="malformed_http")
        return False


def quiet_malformed_http(client_log: ClientLog) -> Callable[[web.Application],
                                                            AsyncIterator[None]]:
    """A cleanup_ctx: MalformedHttp on aiohttp's server logger while the application runs."""
    async def install(app: web.Application) -> AsyncIterator[None]:
        server_log, quiet = logging.getLogger("aiohttp.server"), MalformedHttp(client_log)
        server_log.addFilter(quiet)
        try:
            yield
        finally:
            server_log.removeFilter(quiet)

    return install
