"""`POST /v1/relay/{peer}` (docs/api.md) and the relays' life inside the registry's
application: the API decides who may have a slot (a caller, for a pair whose both sides the
registry observes); relaypool.py picks the relay, its own (relay.py) or one on another host;
the relay forwards. The relays start after the observer's first read and stop before it
(aiohttp's cleanup_ctx order)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from ..keys import Key
from ..protocol import RelayEvent, relay_json
from ..wg.device import IPAddress
from .api import CALLER, LIMITS, STATE, json_response, peer_in_path
from .ratelimit import RateLimiter
from .relay import Relay
from .relaypool import RelayPool
from .relayremote import RemoteRelay
from .state import RegistryState

RELAYS = web.AppKey("relays", RelayPool)
RELAY_RATE = web.AppKey("relay_rate", RateLimiter)


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
    me, other = state.pair_with_endpoints(caller, target, "relay")
    assert me.endpoint is not None and other.endpoint is not None
    grant = await app[RELAYS].allocate(caller, str(me.endpoint.ip), target,
                                       str(other.endpoint.ip))
    # The other side moves to the slot together with the caller (node/relay.py).
    state.push(target, RelayEvent(state.revision, caller, grant.theirs, grant.address))
    answer = relay_json(RelayEvent(state.revision, target, grant.mine, grant.address))
    del answer["type"]
    return json_response(answer, status=201 if grant.created else 200)


def install(app: web.Application, relay: Relay | None, address: IPAddress | None,
            remotes: Sequence[RemoteRelay] = ()) -> RelayPool:
    """Serve `POST /v1/relay/{peer}` on `app` with slots on `relay` (the registry's own,
    whose address nodes are given as `address`) and on `remotes`; run them with it."""
    pool = app[RELAYS] = RelayPool(relay, address, remotes)
    limits = app[LIMITS]
    app[RELAY_RATE] = RateLimiter(limits.relay_burst, limits.relay_per_s)
    state = app[STATE]
    state.standing = lambda node: [RelayEvent(state.revision, peer, port, at)
                                   for peer, port, at in pool.standing(node)]
    app.router.add_post("/v1/relay/{peer}", post_relay)

    async def run_relay(app: web.Application) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app.cleanup_ctx.append(run_relay)
    return pool
