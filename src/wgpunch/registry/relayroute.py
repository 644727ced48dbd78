"""`POST /v1/relay/{peer}` and `POST /v1/relay/{peer}/direct` (docs/api.md), and the relays'
life inside the registry's application: the API decides who may have a slot (a caller, for a
pair whose both sides the registry observes) and when a pair leaves it for a direct path;
relaypool.py picks the relay, its own (relay.py) or one on another host; the relay forwards.
The relays start after the observer's first read and stop before it (aiohttp's cleanup_ctx
order).

Going direct: a node whose probe of the peer's direct candidate was answered (node/upgrade.py)
names the endpoint it reaches the peer at and the one the peer saw it at. Each must be an
address of its node that the registry knows (observed, reported on its LAN, mapped; the port
may differ, as a NAT's may toward another peer), so that no node can make another send its
traffic anywhere else. The slot is paused before both sides hear it, so nothing relayed can
reach a device after it moved."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from ..errors import ChangeRefused, MalformedMessage, RequestRefused
from ..keys import Key
from ..protocol import DirectEvent, PeerRecord, RelayEvent, decode_object, relay_json
from ..wg.model import Endpoint, IPAddress
from .appkeys import CALLER, LIMITS, STATE
from .ratelimit import RateLimiter
from .relay import Relay
from .relaypool import RelayPool
from .relayremote import RemoteRelay
from .request import json_response, peer_in_path, rate_limit, read_body
from .state import RegistryState
from .wire import only_params, path_key

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


def known_addresses(record: PeerRecord) -> set[IPAddress]:
    """Where a node may be: its observed address, its reported LAN addresses, its mapping."""
    found = {address for address in (record.reported.local_addresses
                                     if record.reported is not None else ())}
    if record.endpoint is not None:
        found.add(record.endpoint.ip)
    mapped = None if record.reported is None else record.reported.mapped
    if mapped is not None:
        found.add(mapped.ip)
    return found


def _endpoint_of(body: dict[str, object], field: str, record: PeerRecord) -> Endpoint:
    text = body.get(field)
    if not isinstance(text, str):
        raise MalformedMessage(f"body: {field}: expected \"ip:port\"")
    try:
        endpoint = Endpoint.parse(text)
    except ChangeRefused as error:
        raise MalformedMessage(f"body: {field}: {error}") from None
    if endpoint.ip not in known_addresses(record):
        raise RequestRefused(f"relay: {field} {endpoint} is no address the registry knows of "
                             f"{record.public_key}", 409)
    return endpoint


async def post_direct(request: web.Request) -> web.Response:
    only_params(request.query.items(), ())
    target = path_key(request.match_info["peer"])
    rate_limit(request, RELAY_RATE, "POST /v1/relay")
    body = decode_object(await read_body(request))
    if set(body) != {"endpoint", "peer_endpoint"}:
        raise MalformedMessage("body: POST /v1/relay/{peer}/direct takes exactly "
                               "\"endpoint\" and \"peer_endpoint\"")
    app, caller = request.app, request[CALLER]
    state = app[STATE]
    me, other = state.pair_with_endpoints(caller, target, "relay")
    endpoint = _endpoint_of(body, "endpoint", other)  # where the caller reaches the peer
    peer_endpoint = _endpoint_of(body, "peer_endpoint", me)  # where the peer reaches it
    pushed = await app[RELAYS].pause(caller, target)
    if pushed:
        state.push(caller, DirectEvent(state.revision, target, endpoint))
        state.push(target, DirectEvent(state.revision, caller, peer_endpoint))
    return json_response({"peer": target.base64(), "pushed": pushed}, status=202)


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
    app.router.add_post("/v1/relay/{peer}/direct", post_direct)

    async def run_relay(app: web.Application) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app.cleanup_ctx.append(run_relay)
    return pool
