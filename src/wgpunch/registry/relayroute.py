"""`POST /v1/relay/{peer}` (docs/api.md) and the relay's life inside the registry's
application: the API decides who may have a slot (a caller, for a pair whose both sides the
registry observes); relay.py forwards. The relay starts after the observer's first read and
stops before it (aiohttp's cleanup_ctx order)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..keys import Key
from ..protocol import RelayEvent, relay_json
from ..wg.device import IPAddress
from .api import CALLER, LIMITS, STATE, json_response, peer_in_path
from .ratelimit import RateLimiter
from .relay import Relay
from .state import RegistryState

RELAY = web.AppKey("relay", Relay)
RELAY_RATE = web.AppKey("relay_rate", RateLimiter)
# The address nodes send to; absent: null, the registry's own endpoint as they have it.
RELAY_ADDRESS: web.AppKey[IPAddress] = web.AppKey("relay_address")


def observed_ip(state: RegistryState) -> Callable[[Key], str | None]:
    """The relay's view of a node's public IP: the registry's observation of it now."""
    def ip(node: Key) -> str | None:
        record = state.peers.get(node)
        return None if record is None or record.endpoint is None else str(record.endpoint.ip)
    return ip


async def post_relay(request: web.Request) -> web.Response:
    target = await peer_in_path(request, "POST /v1/relay", RELAY_RATE)
    app, caller = request.app, request[CALLER]
    state = app[STATE]
    state.pair_with_endpoints(caller, target, "relay")
    mine, theirs = app[RELAY].allocate(caller, target)
    address = app.get(RELAY_ADDRESS)
    # The other side moves to the slot together with the caller (node/relay.py).
    state.push(target, RelayEvent(state.revision, caller, theirs.port, address))
    answer = relay_json(RelayEvent(state.revision, target, mine.port, address))
    del answer["type"]
    return json_response(answer, status=201 if mine.created else 200)


def install(app: web.Application, relay: Relay, address: IPAddress | None) -> None:
    """Serve `POST /v1/relay/{peer}` on `app` and run `relay` with it."""
    app[RELAY] = relay
    limits = app[LIMITS]
    app[RELAY_RATE] = RateLimiter(limits.relay_burst, limits.relay_per_s)
    if address is not None:
        app[RELAY_ADDRESS] = address
    app.router.add_post("/v1/relay/{peer}", post_relay)

    async def run_relay(app: web.Application) -> AsyncIterator[None]:
        await relay.start()
        try:
            yield
        finally:
            await relay.close()

    app.cleanup_ctx.append(run_relay)
