"""`--metrics-listen ADDR:PORT`: Prometheus metrics over HTTP, served on the daemon's own
event loop (docs/metrics.md).

The daemons import this module (and with it prometheus_client) only when the option is given,
so a daemon without it, and every `--help`, pays nothing for metrics. Each daemon exports its
own `CollectorRegistry`, never prometheus_client's global one: tests run several daemons'
metrics in one process, and nothing a library registers globally leaks into ours.

Any address the operator gives is used, as exporters do (node_exporter listens on every
address by default). `/metrics` has no authentication and this listener none of the API's
connection limits (registry/site.py), so a wildcard or a public address is logged as a
warning: on the registry host that exposes it to the whole internet. Loopback or the tunnel
address is what the options' help suggests.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import ConfigError
from .wg.model import Endpoint

log = logging.getLogger(__name__)

PATH = "/metrics"


def parse_address(text: str, layer: str) -> Endpoint:
    """`ADDR:PORT` or `[IPv6]:PORT`: a port is required (there is no default to guess)."""
    try:
        return Endpoint.parse(text)
    except ValueError:
        raise ConfigError(f"{layer}: metrics address {text[:80]!r}: expected ADDR:PORT or "
                          "[IPv6]:PORT, with ADDR an IP address and PORT in 1-65535") from None


def exposure(endpoint: Endpoint) -> str | None:
    """Why serving at `endpoint` deserves a warning, or None."""
    if endpoint.ip.is_unspecified:
        return "every address"
    if endpoint.ip.is_global:
        return "a public address"
    return None


class MetricsServer:
    """`GET /metrics`: `registry` in the format the scraper asks for (Prometheus text, or
    OpenMetrics when its Accept header says so)."""

    def __init__(self, registry: CollectorRegistry, layer: str) -> None:
        self._registry = registry
        self._layer = layer
        app = web.Application()
        app.router.add_get(PATH, self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0: a free one, for tests); returns where it listens."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self._runner.cleanup()
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"{self._layer}: cannot serve metrics on {where}: "
                              f"{exc.strerror or exc}") from None
        bound = self._runner.addresses[0]
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self._registry), headers={"Content-Type": content_type})


async def serve(registry: CollectorRegistry, endpoint: Endpoint, layer: str) -> MetricsServer:
    """A started MetricsServer at `endpoint`, logged (with a warning if it is exposed)."""
    server = MetricsServer(registry, layer)
    await server.start(str(endpoint.ip), endpoint.port)
    url = f"http://{endpoint}{PATH}"
    exposed = exposure(endpoint)
    if exposed is not None:
        log.warning("%s: serving metrics on %s (%s), without authentication: anyone who "
                    "reaches it reads them; listen on 127.0.0.1 or the tunnel address, or "
                    "firewall it", layer, url, exposed,
                    extra={"event": "metrics_exposed", "url": url})
    log.info("%s: serving Prometheus metrics on %s", layer, url,
             extra={"event": "metrics_serving", "url": url})
    return server
